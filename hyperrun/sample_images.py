"""Sample OCI images and a registry to serve them, made with real tools
(not with hyperrun), for the demo, the bench and the tests:
- Debian's `docker-registry` (distribution 2.8) as a child process on
  127.0.0.1: plain HTTP, or TLS (a throwaway CA made with openssl) with
  htpasswd basic auth (apache2-utils).
- Images built with `umoci` from `busybox-static` and pushed with `skopeo`:
  busybox, a multi-layer image with whiteouts and opaque directories, a
  multi-platform index, images of random data of a chosen size, and a
  Debian minbase image (debootstrap).

Registries run with PR_SET_PDEATHSIG: a killed parent leaves none behind.
Debian packages: docker-registry skopeo umoci busybox-static openssl apache2-utils
(debootstrap for the Debian image).
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "umoci": "umoci",
         "openssl": "openssl", "htpasswd": "apache2-utils", "busybox": "busybox-static"}
BUSYBOX = "/bin/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
REF_NAME = "org.opencontainers.image.ref.name"


def missing_tools() -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS.items()
                   if shutil.which(tool) is None and not Path(f"/bin/{tool}").exists()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    """A tool run that fails the test with its stderr when it fails."""
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({out.returncode}):\n"
                           f"{out.stderr}{out.stdout}")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------ TLS and auth

@dataclass
class TLSFiles:
    ca: Path        # the CA certificate (PEM), to trust
    cert: Path      # the server certificate, SAN IP:127.0.0.1, DNS:localhost
    key: Path
    cert_dir: Path  # a directory with ca.crt, for skopeo --dest-cert-dir


def make_tls(directory: Path) -> TLSFiles:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca.key"
    cert, key, csr = d / "server.pem", d / "server.key", d / "server.csr"
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=hyperrun test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth\n"
                   "authorityKeyIdentifier=keyid\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)
    cert_dir = d / "certs"
    cert_dir.mkdir(exist_ok=True)
    shutil.copy(ca, cert_dir / "ca.crt")
    return TLSFiles(ca, cert, key, cert_dir)


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    out = run("htpasswd", "-Bbn", user, password)
    Path(path).write_text(out.stdout.strip() + "\n")
    return Path(path)


def docker_config(directory: Path, auths: dict[str, dict]) -> Path:
    """Write DIR/config.json with these "auths"; point DOCKER_CONFIG at DIR."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"auths": auths}))
    return d


def basic_auth_entry(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


# ------------------------------------------------------------------ docker-registry

@dataclass
class Registry:
    port: int
    storage: Path
    proc: subprocess.Popen
    log: Path
    tls: TLSFiles | None = None
    user: str | None = None
    password: str | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def blob_data(self, digest: str) -> Path:
        """The registry's own file holding a blob (to corrupt in tests)."""
        hexpart = digest.split(":", 1)[1]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart
                / "data")

    def skopeo_dest_args(self) -> list[str]:
        args = [f"--dest-cert-dir={self.tls.cert_dir}"] if self.tls else ["--dest-tls-verify=false"]
        if self.user:
            args.append(f"--dest-creds={self.user}:{self.password}")
        return args

    def push(self, layout: Path, tag: str, name: str, *, all_platforms: bool = False,
             format: str | None = None) -> str:
        """skopeo copy oci:LAYOUT:TAG docker://HOST/NAME; returns the manifest
        digest the registry now serves for NAME."""
        args = ["skopeo", "copy", "--quiet", *self.skopeo_dest_args()]
        if all_platforms:
            args.append("--all")
        if format:
            args.append(f"--format={format}")
        run(*args, f"oci:{layout}:{tag}", f"docker://{self.host}/{name}")
        repo, _, ref = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
        return self.manifest_digest(repo, ref)

    def _context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None

    def request(self, path: str, method: str = "GET", headers: dict | None = None,
                data: bytes | None = None) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        if self.user:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.url + path, method=method, headers=headers, data=data)
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def manifest_digest(self, repo: str, ref: str) -> str:
        status, headers, body = self.request(f"/v2/{repo}/manifests/{ref}",
                                             headers={"Accept": ACCEPT})
        assert status == 200, (status, body)
        return headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def manifest(self, repo: str, ref: str) -> dict:
        status, _, body = self.request(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
        assert status == 200, (status, body)
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_registry(directory: Path, *, tls: TLSFiles | None = None,
                   user: str | None = None, password: str | None = None) -> Registry:
    """Start docker-registry on 127.0.0.1:<free port>, storage under directory."""
    d = Path(directory)
    storage = d / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "hyperrun-test"},
    }
    if tls:
        config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
    if user:
        htpasswd = make_htpasswd(d / "htpasswd", user, password or "")
        config["auth"] = {"htpasswd": {"realm": "hyperrun-test", "path": str(htpasswd)}}
    # JSON is YAML.
    (d / "config.yml").write_text(json.dumps(config, indent=1))
    log = d / "registry.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")],
                                stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
    reg = Registry(port, storage, proc, log, tls, user, password)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited ({proc.returncode}):\n{log.read_text()}")
        try:
            status, _, _ = reg.request("/v2/")
            if status in (200, 401):
                return reg
        except (OSError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError(f"docker-registry did not answer:\n{log.read_text()}")
        time.sleep(0.05)


# ------------------------------------------------------------------ images (umoci)

class Layout:
    """An OCI image layout directory, built with umoci."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / "index.json").exists():
            run("umoci", "init", "--layout", self.path)

    def image(self, tag: str) -> str:
        return f"{self.path}:{tag}"

    def umoci(self, *args) -> None:
        run("umoci", *args)

    def descriptor(self, tag: str) -> dict:
        index = json.loads((self.path / "index.json").read_text())
        for m in index.get("manifests") or []:
            if (m.get("annotations") or {}).get(REF_NAME) == tag:
                return m
        raise KeyError(tag)

    def digest(self, tag: str) -> str:
        return self.descriptor(tag)["digest"]

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def manifest(self, tag: str) -> dict:
        return json.loads(self.blob(self.digest(tag)))

    def config(self, tag: str) -> dict:
        return json.loads(self.blob(self.manifest(tag)["config"]["digest"]))

    def put_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    def tag_descriptor(self, tag: str, desc: dict) -> None:
        index_path = self.path / "index.json"
        index = json.loads(index_path.read_text())
        index["manifests"] = [m for m in index.get("manifests") or []
                              if (m.get("annotations") or {}).get(REF_NAME) != tag]
        index["manifests"].append({**desc, "annotations": {REF_NAME: tag}})
        index_path.write_text(json.dumps(index))

    def edit(self, tag: str, work: Path, change: Callable[[Path], None],
             new_tag: str | None = None) -> None:
        """unpack TAG, let change() modify the rootfs, repack as a new layer."""
        bundle = Path(work) / f"bundle-{new_tag or tag}-{time.monotonic_ns()}"
        self.umoci("unpack", "--image", self.image(tag), bundle)
        change(bundle / "rootfs")
        target = self.image(tag)
        if new_tag and new_tag != tag:
            # repack writes to the tag given; start from a copy of the source.
            self.tag_descriptor(new_tag, {k: v for k, v in self.descriptor(tag).items()
                                          if k != "annotations"})
            target = self.image(new_tag)
        self.umoci("repack", "--image", target, bundle)
        shutil.rmtree(bundle)


def _busybox_rootfs(root: Path, marker: str) -> None:
    for d in ("bin", "etc", "home/user", "root", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "user:x:1000:1000:user:/home/user:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nusers:x:100:user\nuser:x:1000:\n"
                                    "nogroup:x:65534:\n")
    os.chown(root / "home/user", 1000, 1000)
    (root / "etc/hyperrun-test").write_text(marker + "\n")


def build_busybox(layout: Layout, tag: str, work: Path, *, arch: str = "amd64",
                  variant: str = "", marker: str = "busybox") -> str:
    """A busybox image (busybox-static and its applet symlinks, /etc/passwd
    with root and user 1000); Cmd ["sh"], PATH set. Returns the manifest digest."""
    layout.umoci("new", "--image", layout.image(tag))
    layout.edit(tag, work, lambda root: _busybox_rootfs(root, marker))
    args = ["config", "--image", layout.image(tag), "--os", "linux", "--architecture", arch,
            "--config.cmd", "sh",
            "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--no-history"]
    layout.umoci(*args)
    if variant:
        # umoci has no --variant: set it in the config by hand (new blobs, new manifest).
        _set_config(layout, tag, lambda c: c.update(variant=variant))
    return layout.digest(tag)


def configure_busybox(layout: Layout, tag: str, new_tag: str) -> str:
    """busybox with Entrypoint/Cmd/Env/WorkingDir/User set (for run tests)."""
    layout.umoci("config", "--image", layout.image(tag), "--tag", new_tag,
                 "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
                 "--config.cmd", 'echo "$GREETING from $(pwd) as $(id -u):$(id -g)"',
                 "--config.env", "GREETING=hello", "--config.env", "EMPTY=",
                 "--config.workingdir", "/home/user", "--config.user", "user:users",
                 "--config.stopsignal", "SIGINT", "--no-history")
    return layout.digest(new_tag)


def _set_config(layout: Layout, tag: str, change: Callable[[dict], None]) -> None:
    desc = layout.descriptor(tag)
    manifest = json.loads(layout.blob(desc["digest"]))
    config = json.loads(layout.blob(manifest["config"]["digest"]))
    change(config)
    cdata = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": layout.put_blob(cdata),
                          "size": len(cdata)}
    mdata = json.dumps(manifest).encode()
    layout.tag_descriptor(tag, {"mediaType": desc["mediaType"], "digest": layout.put_blob(mdata),
                                "size": len(mdata)})


# What the layered image's file tree is after all its layers are applied:
# path -> file content (str), "dir", "symlink:TARGET", or None (must not exist).
LAYERED_EXPECT: dict[str, str | None] = {
    "data/keep.txt": "kept\n",
    "data/old.txt": None,                 # removed in layer 3 (whiteout)
    "data/replaced.txt": "second\n",      # rewritten in layer 3
    "data/sub": None,                     # directory removed in layer 4 (umoci insert --whiteout)
    "data/sub/a.txt": None,
    "opt/app": "dir",                     # replaced by an opaque directory in layer 3
    "opt/app/new.txt": "new\n",
    "opt/app/old1.txt": None,
    "opt/app/nested": None,
    "etc/motd": "motd v2\n",
    "was-dir": "now a file\n",            # a directory replaced by a file (layer 4)
    "was-dir/inner.txt": None,
    "was-file": "dir",                    # a file replaced by a directory (layer 4)
    "was-file/inside.txt": "inside\n",
    "link": "symlink:data/keep.txt",      # symlink retargeted in layer 4
}


def build_layered(layout: Layout, base_tag: str, tag: str, work: Path) -> str:
    """busybox plus three layers that add, delete and replace files and
    directories: whiteouts (from umoci repack and umoci insert --whiteout)
    and an opaque directory (umoci insert --opaque). See LAYERED_EXPECT."""
    def layer2(root: Path) -> None:
        (root / "data/sub").mkdir(parents=True)
        (root / "data/keep.txt").write_text("kept\n")
        (root / "data/old.txt").write_text("old\n")
        (root / "data/replaced.txt").write_text("first\n")
        (root / "data/sub/a.txt").write_text("a\n")
        (root / "opt/app/nested").mkdir(parents=True)
        (root / "opt/app/old1.txt").write_text("old1\n")
        (root / "opt/app/nested/deep.txt").write_text("deep\n")
        (root / "etc/motd").write_text("motd v1\n")
        (root / "was-dir").mkdir()
        (root / "was-dir/inner.txt").write_text("inner\n")
        (root / "was-file").write_text("a file\n")
        (root / "link").symlink_to("etc/motd")

    layout.edit(base_tag, work, layer2, new_tag=tag)

    def layer3(root: Path) -> None:
        (root / "data/old.txt").unlink()
        (root / "data/replaced.txt").write_text("second\n")
        (root / "etc/motd").write_text("motd v2\n")

    layout.edit(tag, work, layer3)
    # Opaque directory and directory whiteout as layers of their own, made
    # with GNU tar and added with umoci raw add-layer. (umoci 0.4.7's
    # `insert --opaque/--whiteout` would do it, but writes tars without
    # their end blocks: its bug #436, fixed after 0.4.7.)
    add_tar_layer(layout, tag, work, {"opt/app/.wh..wh..opq": "", "opt/app/new.txt": "new\n"})
    add_tar_layer(layout, tag, work, {"data/.wh.sub": ""})

    def layer4(root: Path) -> None:
        shutil.rmtree(root / "was-dir")
        (root / "was-dir").write_text("now a file\n")
        (root / "was-file").unlink()
        (root / "was-file").mkdir()
        (root / "was-file/inside.txt").write_text("inside\n")
        (root / "link").unlink()
        (root / "link").symlink_to("data/keep.txt")

    layout.edit(tag, work, layer4)
    return layout.digest(tag)


def add_tar_layer(layout: Layout, tag: str, work: Path, files: dict[str, str]) -> None:
    """Append an uncompressed layer holding files (path -> content; names
    like .wh.X are whiteouts) made with GNU tar, via umoci raw add-layer."""
    src = Path(work) / f"tar-layer-{time.monotonic_ns()}"
    for name, content in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        os.chmod(path, 0 if Path(name).name.startswith(".wh.") else 0o644)
    tops = sorted({Path(name).parts[0] for name in files})
    tar = src.with_suffix(".tar")
    run("tar", "--numeric-owner", "--owner=0", "--group=0", "--sort=name",
        "-C", src, "-cf", tar, *tops)
    layout.umoci("raw", "add-layer", "--image", layout.image(tag), tar)
    shutil.rmtree(src)
    tar.unlink()


def build_random(layout: Layout, tag: str, work: Path, *, layer_sizes: list[int],
                 seed: int = 0) -> str:
    """An image with one layer per size, each a file of random
    (incompressible) bytes of about that size."""
    import random

    rng = random.Random(seed)
    layout.umoci("new", "--image", layout.image(tag))
    for i, size in enumerate(layer_sizes):
        def change(root: Path, i=i, size=size) -> None:
            with open(root / f"random-{i}.bin", "wb") as f:
                left = size
                while left > 0:
                    n = min(left, 1 << 20)
                    f.write(rng.randbytes(n))
                    left -= n
        layout.edit(tag, work, change)
    layout.umoci("config", "--image", layout.image(tag), "--os", "linux",
                 "--architecture", "amd64", "--config.cmd", "/random-0.bin", "--no-history")
    return layout.digest(tag)


def build_index(layout: Layout, tag: str, platforms: dict[str, str]) -> str:
    """An OCI image index named tag over existing tags: {"linux/amd64": "tag1", ...}.
    Returns the index digest. Push it with skopeo copy --all."""
    manifests = []
    for plat, src in platforms.items():
        os_, arch, *variant = plat.split("/")
        desc = layout.descriptor(src)
        p = {"architecture": arch, "os": os_}
        if variant:
            p["variant"] = variant[0]
        manifests.append({"mediaType": desc["mediaType"], "digest": desc["digest"],
                          "size": desc["size"], "platform": p})
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": manifests}).encode()
    digest = layout.put_blob(data)
    layout.tag_descriptor(tag, {"mediaType": OCI_INDEX, "digest": digest, "size": len(data)})
    return digest


@dataclass
class Images:
    """The test images, in one OCI layout."""
    layout: Layout
    busybox: str             # tag names in the layout
    busybox_config: str
    layered: str
    multi: str               # an index: linux/amd64 and linux/arm64/v8
    big: str                 # one ~24 MiB random layer plus a small one
    platform_markers: dict[str, str] = field(default_factory=dict)


def build_test_images(directory: Path) -> Images:
    d = Path(directory)
    work = d / "work"
    work.mkdir(parents=True, exist_ok=True)
    layout = Layout(d / "oci")
    build_busybox(layout, "busybox", work)
    configure_busybox(layout, "busybox", "busybox-config")
    build_layered(layout, "busybox", "layered", work)
    build_busybox(layout, "multi-amd64", work, marker="amd64")
    build_busybox(layout, "multi-arm64", work, arch="arm64", variant="v8", marker="arm64")
    build_index(layout, "multi", {"linux/amd64": "multi-amd64", "linux/arm64/v8": "multi-arm64"})
    build_random(layout, "big", work, layer_sizes=[24 << 20, 64 << 10], seed=1)
    return Images(layout, "busybox", "busybox-config", "layered", "multi", "big",
                  {"linux/amd64": "amd64", "linux/arm64": "arm64"})


# ------------------------------------------------------------------ a Debian image

def debian_minbase(cache: Path) -> Path:
    """A `debootstrap --variant=minbase --include=python3 bookworm` tree,
    made once per machine (about 40 s from the Debian mirror) and kept
    under cache."""
    tree = cache / "debian-bookworm-minbase-python3"
    if (tree / "etc" / "debian_version").exists():
        return tree
    partial = cache / "debian-bookworm-minbase-python3.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", "--include=python3", "bookworm", partial,
        "http://deb.debian.org/debian")
    partial.rename(tree)
    return tree


def build_debian(layout: Layout, tag: str, work: Path, tree: Path) -> str:
    """The Debian tree as an image of three layers: the base system,
    /usr/share, and the .debs debootstrap left in /var/cache/apt/archives
    (already compressed: they keep the image above 100 MB compressed)."""
    share, archives = Path("usr/share"), Path("var/cache/apt/archives")
    layout.umoci("new", "--image", layout.image(tag))

    def copy_tree_except(src: Path, dst: Path, skip: set[Path], rel: Path = Path()) -> None:
        for child in (src / rel).iterdir():
            child_rel = rel / child.name
            if child_rel in skip:
                (dst / child_rel).mkdir(parents=True, exist_ok=True)
            elif any(s.is_relative_to(child_rel) for s in skip):
                (dst / child_rel).mkdir(parents=True, exist_ok=True)
                shutil.copystat(child, dst / child_rel)
                copy_tree_except(src, dst, skip, child_rel)
            else:
                run("cp", "-a", "--", str(child), str(dst / rel))

    layout.edit(tag, work, lambda root: copy_tree_except(tree, root, {share, archives}))
    for part in (share, archives):
        layout.edit(tag, work, lambda root, part=part: run(
            "cp", "-a", "--", *[str(p) for p in (tree / part).iterdir()], str(root / part)))
    layout.umoci("config", "--image", layout.image(tag), "--os", "linux",
                 "--architecture", "amd64", "--config.cmd", "bash",
                 "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--no-history")
    return layout.digest(tag)


BLOG_PACKAGES = ("nginx-light", "php-fpm", "php-mysql", "mariadb-server")


def debian_blog(cache: Path) -> Path:
    """The minbase tree with examples/blog's servers (BLOG_PACKAGES: nginx,
    php-fpm with mysqli, MariaDB) installed by apt, none started; made once
    per machine and kept under cache, as debian_minbase."""
    tree = cache / "debian-bookworm-blog"
    if (tree / "usr" / "sbin" / "mariadbd").exists():
        return tree
    base = debian_minbase(cache)
    partial = cache / "debian-bookworm-blog.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run("cp", "-a", str(base), str(partial))
    policy = partial / "usr" / "sbin" / "policy-rc.d"  # no service starts in the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", partial / "etc" / "resolv.conf")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    run("chroot", str(partial), "apt-get", "update", "-q", env=env)
    run("chroot", str(partial), "apt-get", "install", "-y", "-q", "--no-install-recommends",
        *BLOG_PACKAGES, env=env)
    run("chroot", str(partial), "apt-get", "clean", env=env)
    policy.unlink()
    (partial / "etc" / "resolv.conf").write_text("")
    # The packages' own data directory: the example's database lives on a volume.
    shutil.rmtree(partial / "var" / "lib" / "mysql", ignore_errors=True)
    (partial / "var" / "lib" / "mysql").mkdir()
    partial.rename(tree)
    return tree
