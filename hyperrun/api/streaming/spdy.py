"""SPDY/3.1, as the kubelet's streaming server speaks it (through the Go
spdystream package): frames, header blocks compressed with SPDY's zlib
dictionary, and the server's side of a connection, whose streams the
client opens. Written here: SPDY has no maintained Python implementation
(aiohttp refuses the upgrade)."""
from __future__ import annotations

import asyncio
import struct
import zlib

from hyperrun import log

from .stream import CHUNK, Inbox, StreamClosed

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

_log = log.get("streaming")


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


class ProtocolError(Exception):
    """What the client sent breaks SPDY/3.1: the connection ends with GOAWAY."""


class Stream(Inbox):
    """A client-opened SPDY stream: an inbox for its DATA, a writer for ours."""

    def __init__(self, conn: Connection, stream_id: int, headers: dict[str, list[str]],
                 fin: bool, unidirectional: bool) -> None:
        super().__init__()
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.local_closed = unidirectional
        self.reset_done = False
        self._unacked = 0
        if fin:
            self.end()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def _consumed(self, n: int) -> None:
        # Flow control, receiving side: give the window back as the data is
        # used. (spdystream ignores WINDOW_UPDATE, and never sends one.)
        self._unacked += n
        if self._unacked >= _INITIAL_WINDOW // 2 and not self.ended:
            delta, self._unacked = self._unacked, 0
            try:
                self.conn._send(control_frame(WINDOW_UPDATE, 0,
                                              struct.pack(">II", self.id, delta)))
            except StreamClosed:
                pass

    def reply(self) -> None:
        self.conn._send_headers(SYN_REPLY, self.id, {})

    async def write(self, data: bytes) -> None:
        for off in range(0, len(data), CHUNK):
            if self.local_closed:
                raise StreamClosed(f"stream {self.id} is closed")
            self.conn._send(data_frame(self.id, 0, data[off:off + CHUNK]))
            await self.conn._drain()

    async def close(self) -> None:
        """Half-close: DATA with FIN."""
        if self.local_closed:
            return
        self.local_closed = True
        self.conn._send(data_frame(self.id, FLAG_FIN, b""))
        self.conn._forget_if_done(self)
        await self.conn._drain()

    def reset(self, status: int = RST_CANCEL) -> None:
        if self.reset_done:
            return
        self.reset_done = self.local_closed = True
        self.end(aborted=True)
        self.discard()
        self.conn.streams.pop(self.id, None)
        try:
            self.conn._send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        except StreamClosed:
            pass

    def _peer_reset(self) -> None:
        self.reset_done = self.local_closed = True
        self.end(aborted=True)
        self._room.set()


class Connection:
    """The server side of a SPDY/3.1 connection (after the HTTP upgrade).

    Send-side flow control is not enforced: spdystream (the Go client in
    crictl, kubectl and the kubelet) never sends WINDOW_UPDATE, so a sender
    waiting for one would stall after 64 KiB; the kubelet's server does not
    wait either. TCP carries the back-pressure."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.streams: dict[int, Stream] = {}
        self.accepting = True
        self.closed = asyncio.Event()       # the client is gone (EOF, error)
        self._new: asyncio.Queue[Stream | None] = asyncio.Queue()
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
            raise StreamClosed("connection closed")
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
            raise StreamClosed(str(exc)) from exc

    def _forget_if_done(self, stream: Stream) -> None:
        if stream.local_closed and stream.ended:
            self.streams.pop(stream.id, None)

    # ---- reading
    async def accept(self, timeout: float | None = None) -> Stream | None:
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
                        raise ProtocolError(f"SPDY version {version}")
                    await self._on_control(ftype, flags, payload)
                else:
                    await self._on_data(word & 0x7FFFFFFF, flags, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except (ProtocolError, zlib.error, struct.error, ValueError) as exc:
            _log.warning("spdy protocol error", error=str(exc))
            try:
                self._goaway(GOAWAY_PROTOCOL_ERROR)
            except StreamClosed:
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
            raise ProtocolError(f"header block inflates past {HEADER_BLOCK_MAX} bytes")
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
            stream = Stream(self, stream_id, headers, bool(flags & FLAG_FIN),
                                 bool(flags & FLAG_UNIDIRECTIONAL))
            self.streams[stream_id] = stream
            self._new.put_nowait(stream)
        elif ftype in (SYN_REPLY, HEADERS):
            (stream_id,) = struct.unpack_from(">I", payload)
            self._headers(payload[4:])
            if flags & FLAG_FIN and (stream := self.streams.get(stream_id & 0x7FFFFFFF)):
                stream.end()
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
        stream.put(data)
        if flags & FLAG_FIN:
            stream.end()
            self._forget_if_done(stream)
        await stream.wait_room()

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
            except StreamClosed:
                break
        try:
            await asyncio.wait_for(self.closed.wait(), linger)
        except asyncio.TimeoutError:
            pass
        await self.close()

    async def close(self) -> None:
        try:
            self._goaway()
        except StreamClosed:
            pass
        self._dead = True
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

