"""What a stream is on either transport (a SPDY stream, a WebSocket
channel): an inbox for the bytes it receives, the error of writing where
the client is gone, and a sink that drops writes once it is."""
from __future__ import annotations

import asyncio
import collections

CHUNK = 32 * 1024           # largest DATA frame / WebSocket message we send
_INBOX_LIMIT = 1 << 20      # stop reading the connection while a stream holds this much


class StreamClosed(ConnectionError):
    """Writing to a stream or connection that is gone."""


class Inbox:
    """Bytes received for one stream or channel, read by the application.
    The transport calls put() and end(), and waits for wait_room() before it
    reads on. ``aborted`` tells a reset or a lost connection from a clean end."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False
        self._discarding = False
        self.aborted = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def pending(self) -> bool:
        """Data received and not read yet."""
        return bool(self._chunks)

    def put(self, data: bytes) -> None:
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

    def end(self, aborted: bool = False) -> None:
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

    async def wait_room(self) -> None:
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


class QuietSink:
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
