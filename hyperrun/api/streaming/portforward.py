"""Port forward: connections to a port in the pod sandbox, over SPDY or
WebSocket (the kubelet's ``cri/streaming/portforward``). Over SPDY the
client opens a data and an error stream per connection (headers ``port``
and ``requestID``); over WebSocket the ports are the URL's ``?port=`` (else
the request's), port i on channels 2i (data) and 2i+1 (error), each
opened with the port number."""
from __future__ import annotations

import asyncio
import struct
import urllib.parse
from typing import TYPE_CHECKING, Sequence

from hyperrun import log

from . import spdy, websocket
from .stream import CHUNK, Inbox, QuietSink, StreamClosed

if TYPE_CHECKING:
    from .server import Backend, PortForwardRequestInfo

SPDY_PROTOCOLS = ("portforward.k8s.io",)
WEBSOCKET_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io")

_log = log.get("streaming")


def websocket_ports(query: str, default: Sequence[int]) -> list[int]:
    """The ports of a WebSocket port forward: the query's ``port`` values
    (comma-separated, repeatable), else default; ValueError if there are
    none or one is not a port."""
    params = urllib.parse.parse_qs(query)
    try:
        ports = [int(p) for v in params.get("port", []) for p in v.split(",")]
    except ValueError:
        ports = [0]
    ports = ports or list(default)
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError("query parameter \"port\" is required (1-65535)")
    return ports


async def serve_spdy(backend: Backend, info: PortForwardRequestInfo, conn: spdy.Connection,
                     stream_creation_timeout: float) -> None:
    """Forwarded connections as the client opens their stream pairs, until
    it hangs up."""
    pairs: dict[str, dict[str, spdy.Stream]] = {}  # request id → streams so far
    timers: dict[str, asyncio.Task] = {}
    tasks: set[asyncio.Task] = set()

    async def expire(request_id: str) -> None:
        await asyncio.sleep(stream_creation_timeout)
        timers.pop(request_id, None)
        pair = pairs.pop(request_id, {})
        if error := pair.get("error"):
            await QuietSink(error).write(
                f"timed out waiting for streams of request {request_id}".encode())
            await QuietSink(error).close()
        if data := pair.get("data"):
            data.reset()

    def spawn(coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    try:
        while (stream := await conn.accept()) is not None:
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
                    await QuietSink(error).write(
                        f"error processing stream for request {request_id}: "
                        f"{stype} stream already assigned".encode())
                continue
            pair[stype] = stream
            if len(pair) == 2:
                del pairs[request_id]
                timers.pop(request_id).cancel()
                spawn(forward(backend, info.sandbox_id, int(pair["data"].header("port")),
                              pair["data"], pair["data"], pair["error"]))
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_websocket(backend: Backend, info: PortForwardRequestInfo, ports: list[int],
                          conn: websocket.Connection) -> None:
    """One forwarded connection per port, on its pair of channels."""
    tasks = []
    for i, port in enumerate(ports):
        data_ch, error_ch = 2 * i, 2 * i + 1
        for ch in (data_ch, error_ch):
            await conn.send(ch, struct.pack("<H", port))
        tasks.append(forward(backend, info.sandbox_id, port, conn.inbox(data_ch),
                             conn.sink(data_ch), conn.sink(error_ch)))
    await asyncio.gather(*tasks)


async def forward(backend: Backend, sandbox_id: str, port: int, source: Inbox, sink,
                  error_sink) -> None:
    """One forwarded connection: the client's data stream to and from
    the port in the sandbox; a failure's message on the error stream."""
    message = ""
    try:
        try:
            reader, writer = await backend.port_forward(sandbox_id, port)
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
            while data := await reader.read(CHUNK):
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
                    if not isinstance(exc, StreamClosed):  # not the client hanging up
                        message = message or str(exc) or type(exc).__name__
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            writer.close()
    finally:
        if message:
            _log.info("port forward failed", sandbox=sandbox_id, port=port, error=message)
            await QuietSink(error_sink).write(
                f"error forwarding port {port} to pod {sandbox_id}: {message}".encode())
        await QuietSink(error_sink).close()
        await QuietSink(sink).close()
