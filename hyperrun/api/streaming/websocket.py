"""WebSocket in the kubelet's channel.k8s.io framing: the first byte of
each message is its channel (0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize); the base64 subprotocols send it as an ASCII digit before base64
text; v5 adds the close signal ``[255, channel]``. The framing under it is
the ``websockets`` library's sans-I/O protocol."""
from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Sequence

from websockets.exceptions import InvalidState, NegotiationError
from websockets.frames import Opcode
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from hyperrun import log

from .stream import CHUNK, Inbox, StreamClosed

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
_CLOSE_SIGNAL = 255

_log = log.get("streaming")


async def accept(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 subprotocols: Sequence[str]) -> Connection | None:
    """The server's handshake for the request whose head is ``head``, with
    one of ``subprotocols`` (or none: binary channel.k8s.io): the open
    connection, not started yet; None if the handshake failed (answered)."""

    def select(_proto, offered: Sequence[str]) -> str | None:
        if not offered:
            return None  # no subprotocol: binary channel.k8s.io
        for candidate in offered:  # the client's order, as the kubelet
            if candidate in subprotocols:
                return candidate
        raise NegotiationError(f"requested protocol(s) are not supported: {list(offered)}; "
                               f"supports {list(subprotocols)}")

    proto = ServerProtocol(subprotocols=list(subprotocols), select_subprotocol=select)
    proto.receive_data(head)
    events = proto.events_received()
    conn = Connection(proto, reader, writer)
    if not events:  # not a valid handshake request: websockets closes
        await conn.flush()
        return None
    proto.send_response(proto.accept(events[0]))
    await conn.flush()
    return conn if proto.state is WsState.OPEN else None


class Connection:
    """A server WebSocket in the channel.k8s.io framing, over the
    ``websockets`` sans-I/O protocol."""

    def __init__(self, proto: ServerProtocol, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proto, self.reader, self.writer = proto, reader, writer
        self.inboxes: dict[int, Inbox] = {}
        self.closed = asyncio.Event()
        self._fragments: list[bytes] = []
        self._task: asyncio.Task | None = None

    @property
    def base64(self) -> bool:
        return "base64" in (self.proto.subprotocol or "")

    @property
    def v5(self) -> bool:
        return (self.proto.subprotocol or "").startswith("v5.")

    def inbox(self, channel: int) -> Inbox:
        return self.inboxes.setdefault(channel, Inbox())

    def sink(self, channel: int) -> Sink:
        return Sink(self, channel)

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
            raise StreamClosed(str(exc)) from exc

    async def send(self, channel: int, data: bytes) -> None:
        try:
            if self.base64:
                self.proto.send_text(bytes([0x30 + channel]) + base64.b64encode(data))
            else:
                self.proto.send_binary(bytes([channel]) + data)
        except InvalidState as exc:
            raise StreamClosed(str(exc)) from exc
        await self.flush()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if data:
                    self.proto.receive_data(data)
                else:
                    self.proto.receive_eof()
                peer_closed = False
                for frame in self.proto.events_received():
                    peer_closed |= frame.opcode is Opcode.CLOSE
                    await self._on_frame(frame)
                await self.flush()  # with the protocol's answer to a close
                # The client's close frame: it is gone, whether or not it
                # waits for the TCP connection to end.
                if not data or peer_closed or self.proto.state is WsState.CLOSED:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            for inbox in self.inboxes.values():
                inbox.end(aborted=True)
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
        if self.v5 and message[0] == _CLOSE_SIGNAL:
            if len(message) > 1 and (inbox := self.inboxes.get(message[1])):
                inbox.end()
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
            inbox.put(payload)
            await inbox.wait_room()

    async def finish(self, linger: float) -> None:
        """Close with 1000 and wait (a while) for the client's close."""
        for inbox in self.inboxes.values():
            inbox.discard()
        try:
            self.proto.send_close(1000)
            await self.flush()
            await asyncio.wait_for(self.closed.wait(), linger)
        except (InvalidState, StreamClosed, asyncio.TimeoutError):
            pass
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Sink:
    """One channel's writer."""

    def __init__(self, conn: Connection, channel: int) -> None:
        self.conn, self.channel = conn, channel

    async def write(self, data: bytes) -> None:
        for off in range(0, len(data), CHUNK):
            await self.conn.send(self.channel, data[off:off + CHUNK])

    async def close(self) -> None:
        pass  # no per-channel end from the server in channel.k8s.io
