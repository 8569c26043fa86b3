"""ttRPC client session over an asyncio stream (host side).

Shaped after qemu.qmp's protocol.py: one session object with an explicit
run state (IDLE -> CONNECTING -> RUNNING -> DISCONNECTING -> IDLE), a
reader task that routes each Response to the caller waiting on its stream
id, and a clear failure when the peer goes away: every pending call ends
with ConnectionLost instead of hanging.
"""
from __future__ import annotations

import asyncio
import enum
import random
from typing import Awaitable, Callable, TypeVar

from google.protobuf.message import DecodeError, Message

from hyperrun import errdefs
from hyperrun.proto import ttrpc_pb2

from . import frame

M = TypeVar("M", bound=Message)
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


CLOSE_FLUSH_S = 2.0  # a closing session's buffered requests may take this to leave


class Runstate(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"


class TtrpcError(Exception):
    """The remote method failed; ``code`` is a gRPC status code."""

    def __init__(self, code: int, message: str, method: str = "") -> None:
        super().__init__(f"{method}: {message}" if method else message)
        self.code = code
        self.remote_message = message


class ConnectionLost(ConnectionError, errdefs.Unavailable):
    """The channel closed before the reply arrived."""


class TtrpcClient:
    def __init__(self, name: str = "ttrpc") -> None:
        self.name = name
        self.runstate = Runstate.IDLE
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._sent: set[int] = set()  # calls written whole, their reply awaited
        # Start at a random odd id: a reply the guest still owes a previous
        # host session can then not be mistaken for one of ours.
        self._next_id = random.randrange(1, 1 << 30) | 1
        self._write_lock = asyncio.Lock()
        self._lost: BaseException | None = None
        # When the peer last answered (the loop's clock): a health check
        # need not ask an agent that just did.
        self.last_reply = 0.0

    async def connect(self, opener: Opener) -> None:
        if self.runstate is not Runstate.IDLE:
            raise RuntimeError(f"{self.name}: connect while {self.runstate.value}")
        self.runstate = Runstate.CONNECTING
        try:
            self._reader, self._writer = await opener()
        except BaseException:
            self.runstate = Runstate.IDLE
            raise
        self._lost = None
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"{self.name}-reader")
        self.runstate = Runstate.RUNNING

    async def call(self, service: str, method: str, request: Message, response_type: type[M],
                   timeout: float | None = None) -> M:
        if self.runstate is not Runstate.RUNNING:
            raise ConnectionLost(f"{self.name}: not connected ({self.runstate.value})")
        stream_id = self._next_id
        self._next_id = (self._next_id + 2) & 0xFFFFFFFF or 1
        envelope = ttrpc_pb2.Request(service=service, method=method,
                                     payload=request.SerializeToString(),
                                     timeout_nano=int(timeout * 1e9) if timeout else 0)
        data = frame.encode(stream_id, frame.TYPE_REQUEST, envelope.SerializeToString())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with self._write_lock:
                assert self._writer is not None
                self._writer.write(data)
                await self._writer.drain()
            self._sent.add(stream_id)
            response: ttrpc_pb2.Response = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            # Since 3.11 TimeoutError is an OSError: kept apart, or a slow
            # peer would read as a lost channel (with an empty message).
            raise TimeoutError(f"{self.name}: {method}: no reply within {timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"{self.name}: {method}: {exc}") from exc
        finally:
            self._pending.pop(stream_id, None)
            self._sent.discard(stream_id)
        if response.status.code != frame.OK:
            raise TtrpcError(response.status.code, response.status.message, method)
        try:
            return response_type.FromString(response.payload)
        except DecodeError as exc:  # a guest can lie: a typed error, not protobuf's
            raise TtrpcError(frame.INTERNAL, f"malformed reply: {exc}", method) from None

    async def _read_loop(self) -> None:
        assert self._reader is not None
        error: BaseException
        try:
            while True:
                header = await self._reader.readexactly(frame.HEADER_SIZE)
                length, stream_id, mtype, _flags = frame.decode_header(header)
                payload = await self._reader.readexactly(length)
                if mtype != frame.TYPE_RESPONSE:
                    continue
                self.last_reply = asyncio.get_running_loop().time()
                future = self._pending.get(stream_id)
                if future is not None and not future.done():
                    try:
                        future.set_result(ttrpc_pb2.Response.FromString(payload))
                    except DecodeError as exc:  # a guest can lie: fail that call, not the reader
                        future.set_exception(TtrpcError(frame.INTERNAL,
                                                        f"malformed response: {exc}"))
        except asyncio.IncompleteReadError:
            error = ConnectionLost(f"{self.name}: channel closed by the peer")
        except frame.FrameError as exc:
            error = ConnectionLost(f"{self.name}: {exc}")
        except (ConnectionError, OSError) as exc:
            error = ConnectionLost(f"{self.name}: {exc}")
        except asyncio.CancelledError:
            error = ConnectionLost(f"{self.name}: channel closed")
            self._fail_pending(error)
            raise
        self._fail_pending(error)

    def _fail_pending(self, error: BaseException) -> None:
        self._lost = error
        if self.runstate is Runstate.RUNNING:
            self.runstate = Runstate.DISCONNECTING
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    @property
    def in_flight(self) -> int:
        """Calls sent to the peer whose reply has not come."""
        return len(self._sent)

    @property
    def connected(self) -> bool:
        return self.runstate is Runstate.RUNNING

    async def close(self) -> None:
        if self.runstate is Runstate.IDLE:
            return
        self.runstate = Runstate.DISCONNECTING
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._writer.close()
            try:
                # A close flushes what is buffered first: a peer that reads
                # no more (a wedged guest's channel) would hold it for ever.
                await asyncio.wait_for(self._writer.wait_closed(), CLOSE_FLUSH_S)
            except TimeoutError:
                self._writer.transport.abort()
            except (ConnectionError, OSError):
                pass
        self._reader = self._writer = self._reader_task = None
        self.runstate = Runstate.IDLE
