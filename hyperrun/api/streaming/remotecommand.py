"""Remote command: an exec or an attach between the client's streams and a
process, over SPDY or WebSocket (the kubelet's ``cri/streaming/
remotecommand``). Output goes to the client as it comes, stdin and
terminal sizes to the process; the error stream ends it with a status:
from v4 a JSON ``metav1.Status`` carrying the exit code, before that only
a failure's message."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from hyperrun import log

from . import spdy, websocket
from .stream import Inbox, QuietSink, StreamClosed

if TYPE_CHECKING:
    from .server import Backend

SPDY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                  "v2.channel.k8s.io", "channel.k8s.io")  # best first
WEBSOCKET_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                       "channel.k8s.io", "base64.channel.k8s.io")

_log = log.get("streaming")


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

    async def abandon(self) -> None:
        """The client is gone: an exec's process is killed, an attach lets
        go of the container; either way the output ends."""


@dataclass
class Channels:
    """The client's side of one remote command, whatever the transport."""
    error: object                  # sink: the status goes here
    json_status: bool              # v4+: JSON metav1.Status; else a failure's text
    stdin: Inbox | None = None
    stdout: object | None = None   # sinks: write(bytes), close()
    stderr: object | None = None
    resize: Inbox | None = None
    gone: asyncio.Event | None = None  # set when the client's connection ends


async def serve_spdy(backend: Backend, kind: str, info, protocol: str, conn: spdy.Connection,
                     stream_creation_timeout: float) -> None:
    """An exec or attach over SPDY: the streams the client opens (error, and
    the stdio and resize it asked for), then the command."""
    version = 1 if protocol == "channel.k8s.io" else int(protocol[1])
    kinds = {"error", "stdin", "stdout", "stderr"} | ({"resize"} if version >= 3 else set())
    expected = (1 + info.stdin + info.stdout + info.stderr
                + (1 if info.tty and version >= 3 else 0))
    streams: dict[str, spdy.Stream] = {}
    received = 0
    deadline = asyncio.get_running_loop().time() + stream_creation_timeout
    while received < expected:
        stream = await conn.accept(deadline - asyncio.get_running_loop().time())
        if stream is None:
            if not conn.closed.is_set():
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
    conn.accepting = False
    if "error" not in streams:
        return
    quiet = {k: QuietSink(s) for k, s in streams.items() if k in ("error", "stdout", "stderr")}
    channels = Channels(error=quiet["error"], json_status=version >= 4,
                        stdin=streams.get("stdin") if info.stdin else None,
                        stdout=quiet.get("stdout") if info.stdout else None,
                        stderr=quiet.get("stderr") if info.stderr and not info.tty else None,
                        resize=streams.get("resize") if info.tty else None,
                        gone=conn.closed)
    for name in ("stdout", "stderr"):
        if name in streams and getattr(channels, name) is None:
            await quiet[name].close()  # not wanted: end it at once
    await run(backend, kind, info, channels)


async def serve_websocket(backend: Backend, kind: str, info, conn: websocket.Connection) -> None:
    """An exec or attach over WebSocket: its channels, then the command."""
    channels = Channels(
        error=QuietSink(conn.sink(websocket.ERROR)),
        json_status=conn.proto.subprotocol in ("v5.channel.k8s.io", "v4.channel.k8s.io",
                                               "v4.base64.channel.k8s.io"),
        stdin=conn.inbox(websocket.STDIN) if info.stdin else None,
        stdout=QuietSink(conn.sink(websocket.STDOUT)) if info.stdout else None,
        stderr=QuietSink(conn.sink(websocket.STDERR)) if info.stderr and not info.tty else None,
        resize=conn.inbox(websocket.RESIZE) if info.tty else None,
        gone=conn.closed)
    # As the kubelet: an empty message on the lowest writable channel
    # tells the client the streams are ready.
    await _ws_hello(conn, info)
    await run(backend, kind, info, channels)


async def _ws_hello(conn: websocket.Connection, info) -> None:
    channel = (websocket.STDOUT if info.stdout else websocket.STDERR if info.stderr
               else websocket.ERROR)
    try:
        await conn.send(channel, b"")
    except StreamClosed:
        pass


async def run(backend: Backend, kind: str, info, ch: Channels) -> None:
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
            proc = await backend.exec(info.container_id, list(info.cmd), info.tty, info.stdin)
        else:
            proc = await backend.attach(info.container_id, info.tty, info.stdin)
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

    # A terminal's size goes to the process before any input that came
    # after it: a client sends the size first, then types, and a shell
    # asked `stty size` must not answer with the size it had before. The
    # two channels have pumps of their own; stdin waits for the resize
    # pump to have applied what it had been sent.
    sizes = asyncio.Condition()
    resizing = [False]

    def sizes_applied() -> bool:
        return ch.resize is None or ch.resize.ended or \
            not (ch.resize.pending or resizing[0])

    async def pump_stdin(inbox: Inbox) -> None:
        try:
            while data := await inbox.read():
                async with sizes:
                    await sizes.wait_for(sizes_applied)
                await proc.write(data)
        except Exception as exc:
            _log.info("stdin copy ended", error=str(exc))
        try:
            async with sizes:  # its end, too, after the sizes sent before it
                await sizes.wait_for(sizes_applied)
            await proc.close_stdin()
        except Exception as exc:
            _log.info("closing stdin failed", error=str(exc))

    async def pump_resize(inbox: Inbox) -> None:
        decoder, buffer = json.JSONDecoder(), ""
        try:
            while data := await inbox.read():
                resizing[0] = True  # set before any switch: stdin waits for it
                buffer += data.decode("utf-8", "replace")
                if not await apply_sizes(decoder, buffer := buffer.lstrip(), keep := []):
                    return  # not JSON after all: stop, as the kubelet
                buffer = keep[0]
                resizing[0] = False
                async with sizes:
                    sizes.notify_all()
        finally:
            resizing[0] = False
            async with sizes:
                sizes.notify_all()

    async def apply_sizes(decoder, buffer: str, keep: list) -> bool:
        """Apply every whole size message of buffer; keep what is left of it;
        False if it cannot be JSON."""
        while buffer := buffer.lstrip():
            try:
                event, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                if len(buffer) > 4096:
                    return False
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
        keep.append(buffer)
        return True

    side = []
    if ch.stdin is not None:
        side.append(asyncio.create_task(pump_stdin(ch.stdin)))
    if ch.resize is not None:
        side.append(asyncio.create_task(pump_resize(ch.resize)))
    outs = [pump_out("stdout", ch.stdout)]
    if not info.tty:
        outs.append(pump_out("stderr", ch.stderr))
    code = 0
    output = asyncio.ensure_future(asyncio.gather(*outs))
    try:
        abandoned = await _until_output_ends_or_client_gone(output, ch.gone)
        if abandoned:
            _log.info(f"client gone: {kind} abandoned", container=info.container_id)
            await proc.abandon()
        await output
        if not (abandoned and kind == "attach"):  # an abandoned attach has nothing to wait for
            try:
                code = _exit_code(await proc.wait())
            except Exception as exc:
                failures.append(exc)
    finally:
        output.cancel()
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


async def _until_output_ends_or_client_gone(output: asyncio.Future,
                                           gone: asyncio.Event | None) -> bool:
    """Wait for the output's end; True if the client went away first."""
    if gone is None:
        await asyncio.wait({output})
        return False
    watcher = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({output, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return gone.is_set() and not output.done()


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
