"""Test registries and images: fixtures over hyperrun/sample_images.py
(registries and images made with real tools, not with hyperrun), and:
- A TCP proxy that counts requests and bytes and can cut a response short,
  and a tiny fake registry (http.server in a thread) for what a real
  registry will not serve.

Use the fixtures by importing them into a test module:

    from tests.registry import registry, tls_registry, images, pushed  # noqa: F401

Session fixtures stop their processes at the end; registries run with
PR_SET_PDEATHSIG, so even a killed pytest leaves none behind.

Debian packages: docker-registry skopeo umoci busybox-static openssl apache2-utils.
"""
from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import socket
import threading
from dataclasses import dataclass
from typing import Callable

import pytest

from hyperrun.sample_images import (Images, Layout, Registry, build_debian, build_test_images,
                                    debian_blog, debian_minbase, make_tls, missing_tools,
                                    start_registry)


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs Debian packages: apt-get install {' '.join(missing)}")



# ------------------------------------------------------------------ proxies and fakes

class TCPProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, for plain-HTTP registries.

    Records each HTTP request (method, path, Range header) and the bytes
    sent back. cut_after=N (with cuts=K, None for always) ends the
    connection after N bytes of a response to a blob GET, K times."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_down = 0
        self.cut_after: int | None = None
        self.cuts: int | None = None
        self.cut_count = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_down = 0
            self.cut_count = 0

    def blob_requests(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if "/blobs/" in r[1]]

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        for c in list(self._conns):
            try:
                c.close()
            except OSError:
                pass

    def __enter__(self) -> "TCPProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            state = {"since_blob": None}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        buf = b""
        try:
            while data := client.recv(65536):
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
                    m = re.match(r"([A-Z]+) (\S+) HTTP/1\.[01]", head)
                    if m:
                        rng = re.search(r"(?im)^range:\s*(.+)$", head)
                        with self._lock:
                            self.requests.append((m.group(1), m.group(2),
                                                  rng.group(1).strip() if rng else None))
                            state["since_blob"] = 0 if "/blobs/" in m.group(2) else None
                if len(buf) > 65536:
                    buf = b""        # not HTTP (a TLS hello): nothing to record
                server.sendall(data)
        except OSError:
            pass
        finally:
            _shut(server)

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := server.recv(65536):
                with self._lock:
                    cut = None
                    if (self.cut_after is not None and state["since_blob"] is not None
                            and (self.cuts is None or self.cut_count < self.cuts)):
                        room = self.cut_after - state["since_blob"]
                        if len(data) >= room:
                            cut = max(room, 0)
                            self.cut_count += 1
                    if state["since_blob"] is not None:
                        state["since_blob"] += len(data)
                    sent = data if cut is None else data[:cut]
                    self.bytes_down += len(sent)
                if sent:
                    client.sendall(sent)
                if cut is not None:
                    break
        except OSError:
            pass
        finally:
            _shut(client)
            _shut(server)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


Response = tuple[int, dict[str, str], bytes]


class FakeRegistry:
    """A tiny HTTP registry in a thread: routes map a path to a response
    (status, headers, body) or to a function of the request handler that
    returns one. Unknown paths are 404. Every request is recorded as
    (method, path, headers)."""

    def __init__(self, routes: dict[str, Response | Callable] | None = None) -> None:
        self.routes = dict(routes or {})
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _serve(self) -> None:
                fake.requests.append((self.command, self.path, dict(self.headers)))
                path = self.path.split("?", 1)[0]
                route = fake.routes.get(path) or fake.routes.get(self.path)
                if route is None:
                    status, headers, body = 404, {"Content-Type": "application/json"}, \
                        b'{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}'
                elif callable(route):
                    status, headers, body = route(self)
                else:
                    status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_manifest(self, repo: str, ref: str, body: bytes, content_type: str,
                     digest_header: str | None = "auto") -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = {"Content-Type": content_type}
        if digest_header == "auto":
            headers["Docker-Content-Digest"] = digest
        elif digest_header:
            headers["Docker-Content-Digest"] = digest_header
        for r in {ref, digest}:
            self.routes[f"/v2/{repo}/manifests/{r}"] = (200, headers, body)
        return digest

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.routes[f"/v2/{repo}/blobs/{digest}"] = (
            200, {"Content-Type": "application/octet-stream"}, data)
        return digest

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    require_tools()
    return build_test_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """docker-registry over plain HTTP on 127.0.0.1, no auth."""
    require_tools()
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    """docker-registry over TLS (CA in .tls.ca) with basic auth (.user/.password)."""
    require_tools()
    d = tmp_path_factory.mktemp("tls-registry")
    reg = start_registry(d, tls=make_tls(d / "tls"), user="tester", password="s3cret-pw")
    yield reg
    reg.stop()


@dataclass
class Pushed:
    """What the session pushed to `registry`, by name -> manifest digest."""
    registry: Registry
    digests: dict[str, str]

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


@pytest.fixture(scope="session")
def pushed(registry, images) -> Pushed:
    """The test images in `registry`:
    busybox:latest (OCI), busybox:v2s2 (Docker schema 2), busybox-config:latest,
    layered:latest, multi:latest (OCI index), multi:v2s2 (Docker manifest list),
    big:latest, library/busybox:latest (for mirror tests)."""
    lay = images.layout.path
    digests = {
        "busybox:latest": registry.push(lay, images.busybox, "busybox:latest"),
        "busybox:v2s2": registry.push(lay, images.busybox, "busybox:v2s2", format="v2s2"),
        "busybox-config:latest": registry.push(lay, images.busybox_config,
                                               "busybox-config:latest"),
        "layered:latest": registry.push(lay, images.layered, "layered:latest"),
        "multi:latest": registry.push(lay, images.multi, "multi:latest", all_platforms=True),
        "multi:v2s2": registry.push(lay, images.multi, "multi:v2s2", all_platforms=True,
                                    format="v2s2"),
        "big:latest": registry.push(lay, images.big, "big:latest"),
        "library/busybox:latest": registry.push(lay, images.busybox, "library/busybox:latest"),
    }
    return Pushed(registry, digests)


def _debian_image(registry, tmp_path_factory, make_tree: Callable, name: str) -> str:
    """A Debian tree (made by make_tree under the test cache, once per
    machine) as an image pushed to `registry` as name:bookworm; its
    reference."""
    require_tools()
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (apt install debootstrap)")
    from hyperrun.paths import cache_root

    tree = make_tree(cache_root() / "test")
    d = tmp_path_factory.mktemp(name)
    layout = Layout(d / "oci")
    build_debian(layout, name, d, tree)
    registry.push(layout.path, name, f"{name}:bookworm")
    return registry.ref(f"{name}:bookworm")


@pytest.fixture(scope="session")
def debian(registry, tmp_path_factory) -> str:
    """A Debian minbase image (debootstrap, umoci) pushed to `registry`;
    returns its reference."""
    return _debian_image(registry, tmp_path_factory, debian_minbase, "debian")


@pytest.fixture(scope="session")
def blog_image(registry, tmp_path_factory) -> str:
    """examples/blog's image: Debian bookworm with nginx-light, php-fpm,
    php-mysql and mariadb-server (sample_images.debian_blog)."""
    return _debian_image(registry, tmp_path_factory, debian_blog, "blog")
