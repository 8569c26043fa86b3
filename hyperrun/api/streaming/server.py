"""The streaming server: tokens, URLs, and the HTTP requests that use them."""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, Sequence

from hyperrun import errdefs
from hyperrun import log

from . import portforward, remotecommand, spdy, websocket
from .remotecommand import ProcessIO

# ----------------------------------------------------------------- the seam


class Backend(Protocol):
    """How the server reaches containers and pods (the daemon implements it
    over the guest agent)."""

    async def exec(self, container_id: str, cmd: list[str], tty: bool,
                   stdin: bool) -> ProcessIO: ...

    async def attach(self, container_id: str, tty: bool, stdin: bool) -> ProcessIO: ...

    async def port_forward(self, sandbox_id: str, port: int
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


@dataclass
class ExecRequestInfo:
    """A CRI ExecRequest, kept until its URL is used."""
    container_id: str
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True

    @classmethod
    def from_cri(cls, req) -> ExecRequestInfo:
        return cls(req.container_id, list(req.cmd), req.tty, req.stdin, req.stdout, req.stderr)


@dataclass
class AttachRequestInfo:
    """A CRI AttachRequest, kept until its URL is used."""
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True

    @classmethod
    def from_cri(cls, req) -> AttachRequestInfo:
        return cls(req.container_id, req.tty, req.stdin, req.stdout, req.stderr)


@dataclass
class PortForwardRequestInfo:
    """A CRI PortForwardRequest. Over SPDY the client names the port of each
    connection; ``ports`` serve the WebSocket protocol when the URL has no
    ``?port=``."""
    sandbox_id: str
    ports: list[int] = field(default_factory=list)

    @classmethod
    def from_cri(cls, req) -> PortForwardRequestInfo:
        return cls(req.pod_sandbox_id, list(req.port))


class InvalidRequest(ValueError, errdefs.Invalid):
    """The request cannot be served (answer INVALID_ARGUMENT)."""


class TooManyRequests(RuntimeError, errdefs.Exhausted):
    """Too many URLs handed out and not used yet (answer RESOURCE_EXHAUSTED)."""


# ------------------------------------------------------------- the server

# SPDY's upgrade: the client offers subprotocols, the server names its choice.
_PROTOCOL_HEADER = "X-Stream-Protocol-Version"
_ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"

_log = log.get("streaming")


class _RequestCache:
    """One-time tokens, as the kubelet's request cache: each valid for
    ``ttl`` seconds and consumed by its first use."""

    def __init__(self, ttl: float, max_in_flight: int) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._entries: dict[str, tuple[str, object, float]] = {}

    def _expire(self, now: float) -> None:
        for token in [t for t, (_, _, exp) in self._entries.items() if exp <= now]:
            del self._entries[token]

    def insert(self, kind: str, info: object) -> str:
        now = time.monotonic()
        self._expire(now)
        if len(self._entries) >= self.max_in_flight:
            raise TooManyRequests("too many streaming requests in flight")
        token = secrets.token_urlsafe(16)
        self._entries[token] = (kind, info, now + self.ttl)
        return token

    def consume(self, kind: str, token: str) -> object | None:
        entry = self._entries.pop(token, None)
        if entry is None or entry[2] <= time.monotonic() or entry[0] != kind:
            return None
        return entry[1]


@dataclass
class _HttpRequest:
    method: str
    target: str
    headers: dict[str, list[str]]  # lower-case names

    def get(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def tokens(self, name: str) -> list[str]:
        """A comma-separated header's values, all occurrences."""
        return [t.strip() for v in self.headers.get(name.lower(), []) for t in v.split(",")
                if t.strip()]


def _parse_head(head: bytes) -> _HttpRequest:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise ValueError("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    return _HttpRequest(parts[0], parts[1], headers)


def _http_response(status: int, body: str = "", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    data = body.encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             *(f"{k}: {v}" for k, v in headers)]
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class StreamingServer:
    """The kubelet-style streaming server (see the package docstring).

    ``register_*`` return the URL to answer the RPC with; ``start()`` binds
    ``host:port`` (port 0: a free one, see ``base_url``); ``stop()`` closes
    the listener and ends the connections in progress."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, *,
                 token_ttl: float = 60.0, max_in_flight: int = 1000,
                 stream_creation_timeout: float = 30.0, handshake_timeout: float = 30.0,
                 linger: float = 5.0) -> None:
        self.backend = backend
        self.host, self.port = host, port
        self.stream_creation_timeout = stream_creation_timeout
        self.handshake_timeout = handshake_timeout
        self.linger = linger
        self.token_ttl = token_ttl
        self._cache = _RequestCache(token_ttl, max_in_flight)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    # ---- lifecycle
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        _log.info("streaming server listening", url=self.base_url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> StreamingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ---- registration (kubelet's validation, then a one-time URL)
    def register_exec(self, request: ExecRequestInfo) -> str:
        self._validate_stdio(request, "exec")
        return self._url("exec", request)

    def register_attach(self, request: AttachRequestInfo) -> str:
        self._validate_stdio(request, "attach")
        return self._url("attach", request)

    def register_port_forward(self, request: PortForwardRequestInfo) -> str:
        if not request.sandbox_id:
            raise InvalidRequest("missing required pod_sandbox_id")
        return self._url("portforward", request)

    @staticmethod
    def _validate_stdio(request, what: str) -> None:
        if not request.container_id:
            raise InvalidRequest("missing required container_id")
        if request.tty and request.stderr:
            raise InvalidRequest("tty and stderr cannot both be true")
        if not (request.stdin or request.stdout or request.stderr):
            raise InvalidRequest(f"{what}: one of stdin, stdout, or stderr must be set")

    def _url(self, kind: str, info: object) -> str:
        return f"{self.base_url}/{kind}/{self._cache.insert(kind, info)}"

    # ---- HTTP
    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio would log it)
            pass
        except Exception:
            _log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def respond(status: int, body: str = "", headers=()) -> None:
            writer.write(_http_response(status, body, headers))
            await writer.drain()

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.handshake_timeout)
        except asyncio.LimitOverrunError:
            return await respond(431, "request header too large\n")
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            return
        try:
            req = _parse_head(head)
        except ValueError as exc:
            return await respond(400, f"{exc}\n")
        path, _, query = req.target.partition("?")
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            return await respond(404, "404 page not found\n")
        if req.method not in ("GET", "POST"):
            return await respond(405, "method not allowed\n", [("Allow", "GET, POST")])
        kind, token = parts
        info = self._cache.consume(kind, token)
        if info is None:
            return await respond(404, "404 page not found\n")
        upgrade_to_websocket = (req.get("Upgrade").lower() == "websocket"
                                and "upgrade" in [t.lower() for t in req.tokens("Connection")])
        if upgrade_to_websocket:
            if req.method != "GET":
                return await respond(405, "a WebSocket handshake must be a GET\n",
                                     [("Allow", "GET")])
            return await self._serve_websocket(kind, info, head, query, reader, writer)

        offered = req.tokens(_PROTOCOL_HEADER)
        supported = (portforward.SPDY_PROTOCOLS if kind == "portforward"
                     else remotecommand.SPDY_PROTOCOLS)
        if not offered:
            return await respond(400, f"unable to upgrade: {_PROTOCOL_HEADER} is required\n")
        protocol = next((p for p in supported if p in offered), None)
        if protocol is None:
            return await respond(
                403, f"unable to upgrade: unable to negotiate protocol: client supports "
                     f"{offered}, server accepts {list(supported)}\n",
                [(_ACCEPTED_HEADER, p) for p in supported])
        if ("upgrade" not in req.get("Connection").lower()
                or "spdy/3.1" not in req.get("Upgrade").lower()):
            return await respond(400, "unable to upgrade: missing upgrade headers in request\n")
        await respond(101, headers=[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                    (_PROTOCOL_HEADER, protocol)])
        conn = spdy.Connection(reader, writer)
        conn.start()
        try:
            if kind == "portforward":
                # until the client hangs up
                await portforward.serve_spdy(self.backend, info, conn,
                                             self.stream_creation_timeout)
            else:
                await remotecommand.serve_spdy(self.backend, kind, info, protocol, conn,
                                               self.stream_creation_timeout)
                await conn.finish(self.linger)
        finally:
            await conn.close()

    # ---- WebSocket
    async def _serve_websocket(self, kind: str, info, head: bytes, query: str,
                               reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        ports: list[int] = []
        if kind == "portforward":
            try:
                ports = portforward.websocket_ports(query, info.ports)
            except ValueError as exc:
                writer.write(_http_response(400, f"{exc}\n"))
                return await writer.drain()
        available = (portforward.WEBSOCKET_PROTOCOLS if kind == "portforward"
                     else remotecommand.WEBSOCKET_PROTOCOLS)
        conn = await websocket.accept(head, reader, writer, available)
        if conn is None:
            return
        conn.start()
        try:
            if kind == "portforward":
                await portforward.serve_websocket(self.backend, info, ports, conn)
            else:
                await remotecommand.serve_websocket(self.backend, kind, info, conn)
            await conn.finish(self.linger)
        finally:
            await conn.close()
