"""The streaming server: where the CRI's Exec, Attach and PortForward point.

Those three RPCs carry no data. The daemon registers the request here and
answers with a one-time URL (``http://127.0.0.1:PORT/exec/<token>``); the
client (crictl, critest, the kubelet proxying ``kubectl exec``) connects to
that URL and speaks one of the kubelet's streaming protocols, the ones
``k8s.io/kubelet/pkg/cri/streaming`` serves for containerd and CRI-O:

- **SPDY/3.1** (``Upgrade: SPDY/3.1``), negotiated with
  ``X-Stream-Protocol-Version``: remote command ``v5``/``v4``/``v3``/``v2``
  ``.channel.k8s.io`` and ``channel.k8s.io`` (the client opens streams
  typed ``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``), port
  forward ``portforward.k8s.io`` (a ``data`` and an ``error`` stream per
  forwarded connection, with ``port`` and ``requestID`` headers). This is
  what client-go's ``NewSPDYExecutor`` and ``portforward`` use, so crictl
  and critest.
- **WebSocket** with the ``channel.k8s.io`` framing (first byte of each
  message = channel: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize):
  subprotocols ``v5.channel.k8s.io`` (adds the close signal ``[255, ch]``),
  ``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, ``channel.k8s.io``,
  ``base64.channel.k8s.io``; port forward over WebSocket as the kubelet
  (``?port=`` or the request's ports; channel 2i data, 2i+1 error).

The v4/v5 ``error`` stream ends with a JSON ``metav1.Status`` carrying the
exit code; older versions send only a failure's message.

Containers are reached through :class:`Backend` (the daemon implements it
over the guest agent). The HTTP request head is parsed here (a loopback
server with one kind of request); WebSocket framing is the ``websockets``
library's sans-I/O protocol; SPDY/3 framing and header compression are
here, as SPDY has no maintained Python implementation.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import secrets
import struct
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, Sequence

from websockets.exceptions import InvalidState, NegotiationError
from websockets.frames import Opcode
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from hyperrun import log

# ----------------------------------------------------------------- the seam


class ProcessIO(Protocol):
    """One process's stdio, as an exec or an attach hands it over."""

    async def read(self, stream: str) -> bytes:
        """Next output of ``"stdout"`` or ``"stderr"``; ``b""`` at its end."""

    async def write(self, data: bytes) -> None:
        """Feed the process's stdin."""

    async def close_stdin(self) -> None:
        """The client's stdin ended (for an attach, the backend decides, as
        a container's ``stdin_once`` does, whether that closes it)."""

    async def resize(self, rows: int, cols: int) -> None:
        """The client's terminal changed size (tty only)."""

    async def wait(self) -> int:
        """The exit code (128+N if killed by signal N). Called once, after
        the output ended; for an attach, to release it (code not reported)."""


class Backend(Protocol):
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


class InvalidRequest(ValueError):
    """The request cannot be served (answer INVALID_ARGUMENT)."""


class TooManyRequests(RuntimeError):
    """Too many URLs handed out and not used yet (answer RESOURCE_EXHAUSTED)."""


# ------------------------------------------------------ protocol constants

REMOTE_COMMAND_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                            "v2.channel.k8s.io", "channel.k8s.io")  # SPDY, best first
PORT_FORWARD_PROTOCOLS = ("portforward.k8s.io",)
_WS_REMOTE_COMMAND = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                      "channel.k8s.io", "base64.channel.k8s.io")
_WS_PORT_FORWARD = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
_WS_CLOSE_SIGNAL = 255
_PROTOCOL_HEADER = "X-Stream-Protocol-Version"
_ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"

# The zlib dictionary of SPDY/3 header blocks (SPDY Protocol draft 3,
# section 2.6.10.1): length-prefixed words, then a run of common strings.
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505"
    "203 Non-Authoritative Information"
    "204 No Content"
    "301 Moved Permanently"
    "400 Bad Request"
    "401 Unauthorized"
    "403 Forbidden"
    "404 Not Found"
    "500 Internal Server Error"
    "501 Not Implemented"
    "503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,"
    "text/plain,text/javascript,public"
    "privatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
SPDY_DICTIONARY = (b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICTIONARY_WORDS)
                   + _DICTIONARY_TAIL.encode())

SPDY_VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9)
FLAG_FIN, FLAG_UNIDIRECTIONAL = 0x01, 0x02
RST_PROTOCOL_ERROR, RST_INVALID_STREAM, RST_REFUSED_STREAM, RST_CANCEL = 1, 2, 3, 5
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1
_INITIAL_WINDOW = 64 * 1024  # SPDY/3's default per-stream window
_CHUNK = 32 * 1024           # largest DATA frame / WebSocket message we send
_INBOX_LIMIT = 1 << 20       # stop reading the connection while a stream holds this much

_log = log.get("streaming")


class _StreamClosed(ConnectionError):
    """Writing to a stream or connection that is gone."""


# ------------------------------------------------------------------ inboxes


class _Inbox:
    """Bytes received for one stream or channel, read by the application.
    ``aborted`` tells a reset or a lost connection from a clean end."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False
        self._discarding = False
        self.aborted = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def _put(self, data: bytes) -> None:
        if self._ended or not data:
            return
        if self._discarding:
            self._consumed(len(data))
            return
        self._chunks.append(data)
        self._size += len(data)
        self._readable.set()
        if self._size >= _INBOX_LIMIT:
            self._room.clear()

    def _end(self, aborted: bool = False) -> None:
        if not self._ended:
            self._ended = True
            self.aborted = aborted
        self._readable.set()

    def discard(self) -> None:
        """Nobody will read this any more: drop what came and what comes."""
        self._discarding = True
        self._chunks.clear()
        self._size = 0
        self._room.set()

    async def _wait_room(self) -> None:
        await self._room.wait()

    def _consumed(self, n: int) -> None:
        pass

    async def read(self) -> bytes:
        """Next chunk; ``b""`` at the end."""
        while not self._chunks:
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size < _INBOX_LIMIT:
            self._room.set()
        self._consumed(len(data))
        return data


class _QuietSink:
    """A client-facing writer for a remote command: once the client is gone,
    writes are dropped, so the process is still drained and waited for."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.broken = False

    async def write(self, data: bytes) -> None:
        if not self.broken and data:
            try:
                await self.sink.write(data)
            except (ConnectionError, OSError):
                self.broken = True

    async def close(self) -> None:
        if not self.broken:
            try:
                await self.sink.close()
            except (ConnectionError, OSError):
                self.broken = True


# --------------------------------------------------------------------- SPDY


def encode_header_block(headers: dict[str, list[str]]) -> bytes:
    """An uncompressed SPDY/3 name/value block; names lower-case, several
    values of one name joined by NUL."""
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        n, v = name.lower().encode(), "\0".join(values).encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_header_block(block: bytes) -> dict[str, list[str]]:
    (count,), pos, headers = struct.unpack_from(">I", block), 4, {}
    for _ in range(count):
        (n,) = struct.unpack_from(">I", block, pos)
        name = block[pos + 4:pos + 4 + n].decode("latin-1").lower()
        pos += 4 + n
        (n,) = struct.unpack_from(">I", block, pos)
        value = block[pos + 4:pos + 4 + n].decode("latin-1")
        if pos + 4 + n > len(block):
            raise ValueError("truncated header block")
        pos += 4 + n
        headers.setdefault(name, []).extend(value.split("\0"))
    return headers


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | SPDY_VERSION, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


HEADER_BLOCK_MAX = 1 << 20


class _SpdyProtocolError(Exception):
    pass


class _SpdyStream(_Inbox):
    """A client-opened SPDY stream: an inbox for its DATA, a writer for ours."""

    def __init__(self, session: _SpdySession, stream_id: int, headers: dict[str, list[str]],
                 fin: bool, unidirectional: bool) -> None:
        super().__init__()
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.local_closed = unidirectional
        self.reset_done = False
        self._unacked = 0
        if fin:
            self._end()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def _consumed(self, n: int) -> None:
        # Flow control, receiving side: give the window back as the data is
        # used. (spdystream ignores WINDOW_UPDATE, and never sends one.)
        self._unacked += n
        if self._unacked >= _INITIAL_WINDOW // 2 and not self._ended:
            delta, self._unacked = self._unacked, 0
            try:
                self.session._send(control_frame(WINDOW_UPDATE, 0,
                                                 struct.pack(">II", self.id, delta)))
            except _StreamClosed:
                pass

    def reply(self) -> None:
        self.session._send_headers(SYN_REPLY, self.id, {})

    async def write(self, data: bytes) -> None:
        for off in range(0, len(data), _CHUNK):
            if self.local_closed:
                raise _StreamClosed(f"stream {self.id} is closed")
            self.session._send(data_frame(self.id, 0, data[off:off + _CHUNK]))
            await self.session._drain()

    async def close(self) -> None:
        """Half-close: DATA with FIN."""
        if self.local_closed:
            return
        self.local_closed = True
        self.session._send(data_frame(self.id, FLAG_FIN, b""))
        self.session._forget_if_done(self)
        await self.session._drain()

    def reset(self, status: int = RST_CANCEL) -> None:
        if self.reset_done:
            return
        self.reset_done = self.local_closed = True
        self._end(aborted=True)
        self.discard()
        self.session.streams.pop(self.id, None)
        try:
            self.session._send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        except _StreamClosed:
            pass

    def _peer_reset(self) -> None:
        self.reset_done = self.local_closed = True
        self._end(aborted=True)
        self._room.set()


class _SpdySession:
    """The server side of a SPDY/3.1 connection (after the HTTP upgrade).

    Send-side flow control is not enforced: spdystream (the Go client in
    crictl, kubectl and the kubelet) never sends WINDOW_UPDATE, so a sender
    waiting for one would stall after 64 KiB; the kubelet's server does not
    wait either. TCP carries the back-pressure."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.streams: dict[int, _SpdyStream] = {}
        self.accepting = True
        self.closed = asyncio.Event()       # the client is gone (EOF, error)
        self._new: asyncio.Queue[_SpdyStream | None] = asyncio.Queue()
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                         zlib.Z_DEFAULT_STRATEGY, SPDY_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        self._last_peer_id = 0
        self._dead = False
        self._goaway_sent = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop())

    # ---- writing
    def _send(self, frame: bytes) -> None:
        if self._dead or self.writer.is_closing():
            raise _StreamClosed("connection closed")
        self.writer.write(frame)

    def _send_headers(self, ftype: int, stream_id: int, headers: dict[str, list[str]],
                      flags: int = 0) -> None:
        # Compress and write in one step: the zlib context is shared by all
        # header blocks of the connection, in the order they go out.
        block = self._deflate.compress(encode_header_block(headers))
        block += self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self._send(control_frame(ftype, flags, struct.pack(">I", stream_id) + block))

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self._dead = True
            raise _StreamClosed(str(exc)) from exc

    def _forget_if_done(self, stream: _SpdyStream) -> None:
        if stream.local_closed and stream._ended:
            self.streams.pop(stream.id, None)

    # ---- reading
    async def accept(self, timeout: float | None = None) -> _SpdyStream | None:
        """The next stream the client opens; None at the end or on timeout."""
        if self._new.empty() and self.closed.is_set():
            return None
        try:
            return await asyncio.wait_for(self._new.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(8)
                word, rest = struct.unpack(">II", head)
                flags, length = rest >> 24, rest & 0xFFFFFF
                payload = await self.reader.readexactly(length)
                if word & 0x80000000:
                    version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
                    if version != SPDY_VERSION:
                        raise _SpdyProtocolError(f"SPDY version {version}")
                    await self._on_control(ftype, flags, payload)
                else:
                    await self._on_data(word & 0x7FFFFFFF, flags, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except (_SpdyProtocolError, zlib.error, struct.error, ValueError) as exc:
            _log.warning("spdy protocol error", error=str(exc))
            try:
                self._goaway(GOAWAY_PROTOCOL_ERROR)
            except _StreamClosed:
                pass
        finally:
            self._dead = True
            for stream in list(self.streams.values()):
                stream._peer_reset()
            self.streams.clear()
            self.closed.set()
            self._new.put_nowait(None)

    def _headers(self, block: bytes) -> dict[str, list[str]]:
        # A small block may inflate to a huge one: bounded, as Go's spdy
        # reader bounds header blocks (a protocol error past the limit).
        headers = self._inflate.decompress(block, HEADER_BLOCK_MAX)
        if self._inflate.unconsumed_tail:
            raise _SpdyProtocolError(f"header block inflates past {HEADER_BLOCK_MAX} bytes")
        return decode_header_block(headers)

    async def _on_control(self, ftype: int, flags: int, payload: bytes) -> None:
        if ftype == SYN_STREAM:
            stream_id, _assoc = struct.unpack_from(">II", payload)
            stream_id &= 0x7FFFFFFF
            headers = self._headers(payload[10:])  # always, to keep zlib in step
            if stream_id % 2 == 0 or stream_id <= self._last_peer_id:
                self._send(control_frame(RST_STREAM, 0,
                                         struct.pack(">II", stream_id, RST_PROTOCOL_ERROR)))
                return
            self._last_peer_id = stream_id
            if not self.accepting:
                self._send(control_frame(RST_STREAM, 0,
                                         struct.pack(">II", stream_id, RST_REFUSED_STREAM)))
                return
            stream = _SpdyStream(self, stream_id, headers, bool(flags & FLAG_FIN),
                                 bool(flags & FLAG_UNIDIRECTIONAL))
            self.streams[stream_id] = stream
            self._new.put_nowait(stream)
        elif ftype in (SYN_REPLY, HEADERS):
            (stream_id,) = struct.unpack_from(">I", payload)
            self._headers(payload[4:])
            if flags & FLAG_FIN and (stream := self.streams.get(stream_id & 0x7FFFFFFF)):
                stream._end()
                self._forget_if_done(stream)
        elif ftype == RST_STREAM:
            stream_id, _status = struct.unpack_from(">II", payload)
            if stream := self.streams.pop(stream_id & 0x7FFFFFFF, None):
                stream._peer_reset()
        elif ftype == PING:
            (ping_id,) = struct.unpack_from(">I", payload)
            if ping_id % 2 == 1:  # the client's; ours would be even
                self._send(control_frame(PING, 0, payload[:4]))
        elif ftype == GOAWAY:
            self.accepting = False
        # SETTINGS, WINDOW_UPDATE and unknown types: nothing to do

    async def _on_data(self, stream_id: int, flags: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_peer_id:
                self._send(control_frame(RST_STREAM, 0,
                                         struct.pack(">II", stream_id, RST_INVALID_STREAM)))
            return
        stream._put(data)
        if flags & FLAG_FIN:
            stream._end()
            self._forget_if_done(stream)
        await stream._wait_room()

    # ---- ending
    def _goaway(self, status: int = GOAWAY_OK) -> None:
        if not self._goaway_sent:
            self._goaway_sent = True
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_peer_id, status)))

    async def finish(self, linger: float) -> None:
        """Half-close every stream, let the client read and hang up (it does
        once the error stream ends), then close."""
        self.accepting = False
        for stream in list(self.streams.values()):
            stream.discard()
            try:
                await stream.close()
            except _StreamClosed:
                break
        try:
            await asyncio.wait_for(self.closed.wait(), linger)
        except asyncio.TimeoutError:
            pass
        await self.close()

    async def close(self) -> None:
        try:
            self._goaway()
        except _StreamClosed:
            pass
        self._dead = True
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# ---------------------------------------------------------------- WebSocket


class _WsSession:
    """A server WebSocket in the channel.k8s.io framing, over the
    ``websockets`` sans-I/O protocol."""

    def __init__(self, proto: ServerProtocol, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proto, self.reader, self.writer = proto, reader, writer
        self.inboxes: dict[int, _Inbox] = {}
        self.closed = asyncio.Event()
        self._fragments: list[bytes] = []
        self._task: asyncio.Task | None = None

    @property
    def base64(self) -> bool:
        return "base64" in (self.proto.subprotocol or "")

    @property
    def v5(self) -> bool:
        return (self.proto.subprotocol or "").startswith("v5.")

    def inbox(self, channel: int) -> _Inbox:
        return self.inboxes.setdefault(channel, _Inbox())

    def sink(self, channel: int) -> _WsSink:
        return _WsSink(self, channel)

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop())

    async def flush(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk:
                self.writer.write(chunk)
            elif self.writer.can_write_eof() and not self.writer.is_closing():
                try:
                    self.writer.write_eof()
                except OSError:
                    pass
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _StreamClosed(str(exc)) from exc

    async def send(self, channel: int, data: bytes) -> None:
        try:
            if self.base64:
                self.proto.send_text(bytes([0x30 + channel]) + base64.b64encode(data))
            else:
                self.proto.send_binary(bytes([channel]) + data)
        except InvalidState as exc:
            raise _StreamClosed(str(exc)) from exc
        await self.flush()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if data:
                    self.proto.receive_data(data)
                else:
                    self.proto.receive_eof()
                for frame in self.proto.events_received():
                    await self._on_frame(frame)
                await self.flush()
                if not data or self.proto.state is WsState.CLOSED:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            for inbox in self.inboxes.values():
                inbox._end(aborted=True)
            self.closed.set()

    async def _on_frame(self, frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                message, self._fragments = b"".join(self._fragments), []
                await self._on_message(message)

    async def _on_message(self, message: bytes) -> None:
        if not message:
            return
        if self.v5 and message[0] == _WS_CLOSE_SIGNAL:
            if len(message) > 1 and (inbox := self.inboxes.get(message[1])):
                inbox._end()
            return
        channel, payload = message[0], message[1:]
        if self.base64:
            channel -= 0x30
            try:
                payload = base64.b64decode(payload)
            except (binascii.Error, ValueError):
                _log.warning("bad base64 websocket message", channel=channel)
                return
        if inbox := self.inboxes.get(channel):
            inbox._put(payload)
            await inbox._wait_room()

    async def finish(self, linger: float) -> None:
        """Close with 1000 and wait (a while) for the client's close."""
        for inbox in self.inboxes.values():
            inbox.discard()
        try:
            self.proto.send_close(1000)
            await self.flush()
            await asyncio.wait_for(self.closed.wait(), linger)
        except (InvalidState, _StreamClosed, asyncio.TimeoutError):
            pass
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class _WsSink:
    def __init__(self, session: _WsSession, channel: int) -> None:
        self.session, self.channel = session, channel

    async def write(self, data: bytes) -> None:
        for off in range(0, len(data), _CHUNK):
            await self.session.send(self.channel, data[off:off + _CHUNK])

    async def close(self) -> None:
        pass  # no per-channel end from the server in channel.k8s.io


# ------------------------------------------------------------ statuses


def _status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def _status_exit(code: int, cmd: Sequence[str]) -> dict:
    """metav1.Status for a non-zero exit, as the kubelet's ServeExec writes
    it (the message in containerd's words)."""
    return {"metadata": {}, "status": "Failure",
            "message": ("command terminated with non-zero exit code: error executing command "
                        f"[{' '.join(cmd)}], exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def _status_internal(message: str) -> dict:
    """apierrors.NewInternalError."""
    return {"metadata": {}, "status": "Failure",
            "message": f"Internal error occurred: {message}", "reason": "InternalError",
            "details": {"causes": [{"message": message}]}, "code": 500}


def _exit_code(code: int) -> int:
    if code < 0:  # killed by signal -code
        code = 128 - code
    return code & 0xFF


@dataclass
class _Channels:
    """The client's side of one remote command, whatever the transport."""
    error: object                  # sink: the status goes here
    json_status: bool              # v4+: JSON metav1.Status; else a failure's text
    stdin: _Inbox | None = None
    stdout: object | None = None   # sinks: write(bytes), close()
    stderr: object | None = None
    resize: _Inbox | None = None


# -------------------------------------------------------------------- server


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
    """The kubelet-style streaming server (see the module docstring).

    ``register_*`` return the URL to answer the RPC with; ``start()`` binds
    ``host:port`` (port 0: a free one, see ``base_url``); ``stop()`` closes
    the listener and ends the sessions in progress."""

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
        websocket = (req.get("Upgrade").lower() == "websocket"
                     and "upgrade" in [t.lower() for t in req.tokens("Connection")])
        if websocket:
            if req.method != "GET":
                return await respond(405, "a WebSocket handshake must be a GET\n",
                                     [("Allow", "GET")])
            return await self._serve_websocket(kind, info, head, query, reader, writer)

        offered = req.tokens(_PROTOCOL_HEADER)
        supported = PORT_FORWARD_PROTOCOLS if kind == "portforward" else REMOTE_COMMAND_PROTOCOLS
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
        session = _SpdySession(reader, writer)
        session.start()
        try:
            if kind == "portforward":
                await self._spdy_port_forward(info, session)  # until the client hangs up
            else:
                await self._spdy_remote_command(kind, info, protocol, session)
                await session.finish(self.linger)
        finally:
            await session.close()

    # ---- remote command over SPDY
    async def _spdy_remote_command(self, kind: str, info, protocol: str,
                                   session: _SpdySession) -> None:
        version = 1 if protocol == "channel.k8s.io" else int(protocol[1])
        kinds = {"error", "stdin", "stdout", "stderr"} | ({"resize"} if version >= 3 else set())
        expected = (1 + info.stdin + info.stdout + info.stderr
                    + (1 if info.tty and version >= 3 else 0))
        streams: dict[str, _SpdyStream] = {}
        received = 0
        deadline = asyncio.get_running_loop().time() + self.stream_creation_timeout
        while received < expected:
            stream = await session.accept(deadline - asyncio.get_running_loop().time())
            if stream is None:
                if not session.closed.is_set():
                    _log.warning("timed out waiting for client to create streams", kind=kind)
                return
            stream.reply()
            stype = stream.header("streamType")
            if stype in kinds:
                streams[stype] = stream
                received += 1
            else:
                _log.warning("unexpected stream type", stream_type=stype)
                stream.discard()
        session.accepting = False
        if "error" not in streams:
            return
        quiet = {k: _QuietSink(s) for k, s in streams.items() if k in ("error", "stdout", "stderr")}
        channels = _Channels(error=quiet["error"], json_status=version >= 4,
                             stdin=streams.get("stdin") if info.stdin else None,
                             stdout=quiet.get("stdout") if info.stdout else None,
                             stderr=quiet.get("stderr") if info.stderr and not info.tty else None,
                             resize=streams.get("resize") if info.tty else None)
        for name in ("stdout", "stderr"):
            if name in streams and getattr(channels, name) is None:
                await quiet[name].close()  # not wanted: end it at once
        await self._run_remote_command(kind, info, channels)

    # ---- port forward over SPDY
    async def _spdy_port_forward(self, info: PortForwardRequestInfo,
                                 session: _SpdySession) -> None:
        pairs: dict[str, dict[str, _SpdyStream]] = {}  # request id → streams so far
        timers: dict[str, asyncio.Task] = {}
        tasks: set[asyncio.Task] = set()

        async def expire(request_id: str) -> None:
            await asyncio.sleep(self.stream_creation_timeout)
            timers.pop(request_id, None)
            pair = pairs.pop(request_id, {})
            if error := pair.get("error"):
                await _QuietSink(error).write(
                    f"timed out waiting for streams of request {request_id}".encode())
                await _QuietSink(error).close()
            if data := pair.get("data"):
                data.reset()

        def spawn(coro) -> asyncio.Task:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        try:
            while (stream := await session.accept()) is not None:
                port_text, stype = stream.header("port"), stream.header("streamType")
                if (not port_text.isdigit() or not 0 < int(port_text) < 65536
                        or stype not in ("error", "data")):
                    _log.warning("port forward stream rejected", port=port_text,
                                 stream_type=stype)
                    stream.reset()
                    continue
                stream.reply()
                request_id = stream.header("requestID") or str(
                    stream.id if stype == "error" else stream.id - 2)  # clients before 1.6
                if request_id not in pairs:
                    pairs[request_id] = {}
                    timers[request_id] = spawn(expire(request_id))
                pair = pairs[request_id]
                if stype in pair:
                    stream.reset()
                    if error := pair.get("error"):
                        await _QuietSink(error).write(
                            f"error processing stream for request {request_id}: "
                            f"{stype} stream already assigned".encode())
                    continue
                pair[stype] = stream
                if len(pair) == 2:
                    del pairs[request_id]
                    timers.pop(request_id).cancel()
                    spawn(self._forward(info.sandbox_id, int(pair["data"].header("port")),
                                        pair["data"], pair["data"], pair["error"]))
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- WebSocket
    async def _serve_websocket(self, kind: str, info, head: bytes, query: str,
                               reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        params = urllib.parse.parse_qs(query)
        ports: list[int] = []
        if kind == "portforward":
            try:
                ports = [int(p) for v in params.get("port", []) for p in v.split(",")]
            except ValueError:
                ports = [0]
            ports = ports or list(info.ports)
            if not ports or not all(0 < p < 65536 for p in ports):
                writer.write(_http_response(400, "query parameter \"port\" is required "
                                                 "(1-65535)\n"))
                return await writer.drain()
        available = _WS_PORT_FORWARD if kind == "portforward" else _WS_REMOTE_COMMAND

        def select(_proto, offered: Sequence[str]) -> str | None:
            if not offered:
                return None  # no subprotocol: binary channel.k8s.io
            for candidate in offered:  # the client's order, as the kubelet
                if candidate in available:
                    return candidate
            raise NegotiationError(f"requested protocol(s) are not supported: {list(offered)}; "
                                   f"supports {list(available)}")

        proto = ServerProtocol(subprotocols=list(available), select_subprotocol=select)
        proto.receive_data(head)
        events = proto.events_received()
        session = _WsSession(proto, reader, writer)
        if not events:  # not a valid handshake request: websockets closes
            return await session.flush()
        proto.send_response(proto.accept(events[0]))
        await session.flush()
        if proto.state is not WsState.OPEN:
            return
        session.start()
        try:
            if kind == "portforward":
                await self._ws_port_forward(info, ports, session)
            else:
                await self._ws_remote_command(kind, info, session)
            await session.finish(self.linger)
        finally:
            await session.close()

    async def _ws_remote_command(self, kind: str, info, session: _WsSession) -> None:
        channels = _Channels(
            error=_QuietSink(session.sink(ERROR)),
            json_status=session.proto.subprotocol in ("v5.channel.k8s.io", "v4.channel.k8s.io",
                                                      "v4.base64.channel.k8s.io"),
            stdin=session.inbox(STDIN) if info.stdin else None,
            stdout=_QuietSink(session.sink(STDOUT)) if info.stdout else None,
            stderr=_QuietSink(session.sink(STDERR)) if info.stderr and not info.tty else None,
            resize=session.inbox(RESIZE) if info.tty else None)
        # As the kubelet: an empty message on the lowest writable channel
        # tells the client the streams are ready.
        await _ws_hello(session, info)
        await self._run_remote_command(kind, info, channels)

    async def _ws_port_forward(self, info: PortForwardRequestInfo, ports: list[int],
                               session: _WsSession) -> None:
        tasks = []
        for i, port in enumerate(ports):
            data_ch, error_ch = 2 * i, 2 * i + 1
            for ch in (data_ch, error_ch):
                await session.send(ch, struct.pack("<H", port))
            tasks.append(self._forward(info.sandbox_id, port, session.inbox(data_ch),
                                       session.sink(data_ch), session.sink(error_ch)))
        await asyncio.gather(*tasks)

    # ---- the transport-independent parts
    async def _run_remote_command(self, kind: str, info, ch: _Channels) -> None:
        """Run an exec or attach between the client's channels and the
        backend; end with the status on the error channel."""

        async def send_status(status: dict) -> None:
            if ch.json_status:
                await ch.error.write(json.dumps(status, separators=(",", ":")).encode())
            elif status["status"] != "Success":
                await ch.error.write(status["message"].encode())
            await ch.error.close()

        what = "executing command in" if kind == "exec" else "attaching to"
        try:
            if kind == "exec":
                proc = await self.backend.exec(info.container_id, list(info.cmd), info.tty,
                                               info.stdin)
            else:
                proc = await self.backend.attach(info.container_id, info.tty, info.stdin)
        except Exception as exc:
            _log.warning(f"{kind} failed", container=info.container_id, error=str(exc))
            return await send_status(_status_internal(f"error {what} container: {exc}"))

        failures: list[Exception] = []

        async def pump_out(name: str, sink) -> None:
            try:
                while data := await proc.read(name):
                    if sink is not None:
                        await sink.write(data)
            except Exception as exc:
                failures.append(exc)
            finally:
                if sink is not None:
                    await sink.close()

        async def pump_stdin(inbox: _Inbox) -> None:
            try:
                while data := await inbox.read():
                    await proc.write(data)
            except Exception as exc:
                _log.info("stdin copy ended", error=str(exc))
            try:
                await proc.close_stdin()
            except Exception as exc:
                _log.info("closing stdin failed", error=str(exc))

        async def pump_resize(inbox: _Inbox) -> None:
            decoder, buffer = json.JSONDecoder(), ""
            while data := await inbox.read():
                buffer += data.decode("utf-8", "replace")
                while buffer := buffer.lstrip():
                    try:
                        event, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        if len(buffer) > 4096:  # not JSON after all: stop, as the kubelet
                            return
                        break
                    buffer = buffer[end:]
                    size = {str(k).lower(): v for k, v in event.items()} \
                        if isinstance(event, dict) else {}
                    width, height = size.get("width"), size.get("height")
                    if isinstance(width, int) and isinstance(height, int) and width and height:
                        try:
                            await proc.resize(rows=height, cols=width)
                        except Exception as exc:
                            _log.info("resize failed", error=str(exc))

        side = []
        if ch.stdin is not None:
            side.append(asyncio.create_task(pump_stdin(ch.stdin)))
        if ch.resize is not None:
            side.append(asyncio.create_task(pump_resize(ch.resize)))
        outs = [pump_out("stdout", ch.stdout)]
        if not info.tty:
            outs.append(pump_out("stderr", ch.stderr))
        code = 0
        try:
            await asyncio.gather(*outs)
            try:
                code = _exit_code(await proc.wait())
            except Exception as exc:
                failures.append(exc)
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        if failures:
            status = _status_internal(f"error {what} container: {failures[0]}")
        elif kind == "exec" and code != 0:
            status = _status_exit(code, info.cmd)
        else:
            status = _status_success()  # an attach reports no exit code, as the kubelet's
        await send_status(status)

    async def _forward(self, sandbox_id: str, port: int, source: _Inbox, sink, error_sink) -> None:
        """One forwarded connection: the client's data stream to and from
        the port in the sandbox; a failure's message on the error stream."""
        message = ""
        try:
            try:
                reader, writer = await self.backend.port_forward(sandbox_id, port)
            except Exception as exc:
                message = str(exc)
                return

            async def upstream() -> None:  # client → pod
                while data := await source.read():
                    writer.write(data)
                    await writer.drain()
                if not source.aborted and writer.can_write_eof():
                    writer.write_eof()

            async def downstream() -> None:  # pod → client
                while data := await reader.read(_CHUNK):
                    await sink.write(data)
                await sink.close()

            up, down = asyncio.create_task(upstream()), asyncio.create_task(downstream())
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if down.done():
                    # the pod's side ended: give the client a moment to finish
                    await asyncio.wait({up}, timeout=1.0)
                elif up.exception() is None and not source.aborted:
                    await asyncio.wait({down})  # the client is done sending; read the rest
                for task in (up, down):
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        exc = task.exception()
                        if not isinstance(exc, _StreamClosed):  # not the client hanging up
                            message = message or str(exc) or type(exc).__name__
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                writer.close()
        finally:
            if message:
                _log.info("port forward failed", sandbox=sandbox_id, port=port, error=message)
                await _QuietSink(error_sink).write(
                    f"error forwarding port {port} to pod {sandbox_id}: {message}".encode())
            await _QuietSink(error_sink).close()
            await _QuietSink(sink).close()


async def _ws_hello(session: _WsSession, info) -> None:
    channel = STDOUT if info.stdout else STDERR if info.stderr else ERROR
    try:
        await session.send(channel, b"")
    except _StreamClosed:
        pass
