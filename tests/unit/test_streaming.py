"""The streaming server (Exec/Attach/PortForward URLs) against a fake
backend: WebSocket clients (the `websockets` library) and a small SPDY/3
client written here; the server under test is real."""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hyperrun.api.streaming import (AttachRequestInfo, ExecRequestInfo, InvalidRequest,
                                    PortForwardRequestInfo, StreamingServer)
from hyperrun.api.streaming.spdy import SPDY_DICTIONARY
from tests.framework import await_event, wait_until

# ------------------------------------------------------------ fake backend


class FakeProcess:
    """Writes a line to stderr (stdout with a tty), echoes stdin to stdout,
    and exits with `code` when stdin closes (at once when it has none)."""

    def __init__(self, tty: bool, stdin: bool, code: int, output: bytes = b"",
                 hang: bool = False) -> None:
        self.queues = {"stdout": asyncio.Queue(), "stderr": asyncio.Queue()}
        self.code = code
        self.resizes: list[tuple[int, int]] = []
        self.events: list[tuple] = []  # resizes and writes, in the order they reached it
        self.stdin_closed = False
        self.waited = False
        self.abandoned = asyncio.Event()
        self._done = asyncio.Event()
        self.queues["stdout" if tty else "stderr"].put_nowait(b"to stderr\n")
        for off in range(0, len(output), 65536):
            self.queues["stdout"].put_nowait(output[off:off + 65536])
        self.hang = hang  # runs until abandoned, whatever its stdin does
        if not stdin and not hang:
            self._finish()

    def _finish(self) -> None:
        if not self._done.is_set():
            for queue in self.queues.values():
                queue.put_nowait(b"")
            self._done.set()

    async def read(self, stream: str) -> bytes:
        return await self.queues[stream].get()

    async def write(self, data: bytes) -> None:
        self.events.append(("write", data))
        if not self._done.is_set():
            self.queues["stdout"].put_nowait(data)

    async def close_stdin(self) -> None:
        self.stdin_closed = True
        if not self.hang:
            self._finish()

    async def resize(self, rows: int, cols: int) -> None:
        for _ in range(5):  # a round trip to the guest: other tasks run meanwhile
            await asyncio.sleep(0)
        self.resizes.append((rows, cols))
        self.events.append(("resize", rows, cols))

    async def wait(self) -> int:
        await self._done.wait()
        self.waited = True
        return self.code

    async def abandon(self) -> None:
        """As a killed exec (or a let-go attach): its output ends."""
        self.abandoned.set()
        self.code = 137
        self._finish()


class FakeBackend:
    """exec: cmd ["fake", CODE], ["big", CODE] (300 kB of output) or
    ["hang", CODE] (runs until abandoned);
    container "missing" fails. port_forward: to a local echo server, which
    answers in upper case; port 9 is refused."""

    def __init__(self, echo_port: int = 0) -> None:
        self.procs: list[FakeProcess] = []
        self.calls: list[tuple] = []
        self.echo_port = echo_port
        self.forward_ended = asyncio.Event()  # the echo server saw a connection end

    async def exec(self, container_id, cmd, tty, stdin):
        self.calls.append(("exec", container_id, cmd, tty, stdin))
        if container_id == "missing":
            raise LookupError("container missing not found")
        output = b"x" * 300_000 if cmd[0] == "big" else b""
        proc = FakeProcess(tty, stdin, int(cmd[-1]), output, hang=cmd[0] == "hang")
        self.procs.append(proc)
        return proc

    async def attach(self, container_id, tty, stdin):
        self.calls.append(("attach", container_id, tty, stdin))
        proc = FakeProcess(tty, stdin, 7, hang=container_id == "hang")
        self.procs.append(proc)
        return proc

    async def port_forward(self, sandbox_id, port):
        self.calls.append(("port_forward", sandbox_id, port))
        if port == 9:
            raise ConnectionRefusedError(f"connect to port {port}: connection refused")
        return await asyncio.open_connection("127.0.0.1", self.echo_port)


async def echo_server(ended: asyncio.Event):
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()
        ended.set()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def run(coro_fn, **server_kw):
    """Run coro_fn(server, backend) against a started server."""
    async def main():
        backend = FakeBackend()
        echo = await echo_server(backend.forward_ended)
        backend.echo_port = echo.sockets[0].getsockname()[1]
        async with StreamingServer(backend, **server_kw) as server:
            await asyncio.wait_for(coro_fn(server, backend), 20)
        echo.close()
    asyncio.run(main())


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1)


async def ws_collect(ws) -> dict[int, bytes]:
    """Every message until the server closes, joined per channel."""
    out: dict[int, bytes] = {}
    try:
        async for message in ws:
            out[message[0]] = out.get(message[0], b"") + message[1:]
    except ConnectionClosed:
        pass
    return out


# ------------------------------------------------------------- SPDY client


class SpdyClient:
    """Just enough SPDY/3.1 to act as client-go's remotecommand/portforward."""

    def __init__(self) -> None:
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                        SPDY_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        self.next_id = 1
        self.streams: dict[int, dict] = {}
        self.window_updates: dict[int, int] = {}
        self.goaway = asyncio.Event()
        self.eof = asyncio.Event()

    async def connect(self, url: str, protocols: list[str], method: str = "POST"):
        hostport, path = url.removeprefix("http://").split("/", 1)
        host, port = hostport.split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        lines = [f"{method} /{path} HTTP/1.1", f"Host: {hostport}", "Connection: Upgrade",
                 "Upgrade: SPDY/3.1", "User-Agent: test"]
        lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *header_lines = head.split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in filter(None, header_lines):
            name, _, value = line.partition(":")
            headers.setdefault(name.lower(), []).append(value.strip())
        status = int(status_line.split()[1])
        if status == 101:
            self.task = asyncio.create_task(self._read_loop())
        return status, headers

    def _control(self, ftype: int, flags: int, payload: bytes) -> None:
        self.writer.write(struct.pack(">HHI", 0x8003, ftype, (flags << 24) | len(payload))
                          + payload)

    def create_stream(self, **headers: str) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.streams[sid] = {"data": bytearray(), "fin": asyncio.Event(),
                             "reply": asyncio.Event(), "reset": None}
        pairs = [struct.pack(">I", len(headers))]
        for name, value in headers.items():
            pairs += [struct.pack(">I", len(name)), name.lower().encode(),
                      struct.pack(">I", len(value)), value.encode()]
        block = self.deflate.compress(b"".join(pairs)) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self._control(1, 0, struct.pack(">IIBB", sid, 0, 0, 0) + block)
        return sid

    def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        self.writer.write(struct.pack(">II", sid, (int(fin) << 24) | len(data)) + data)

    def ping(self, ping_id: int) -> None:
        self._control(6, 0, struct.pack(">I", ping_id))

    async def _read_loop(self) -> None:
        try:
            while True:
                word, rest = struct.unpack(">II", await self.reader.readexactly(8))
                flags, payload = rest >> 24, await self.reader.readexactly(rest & 0xFFFFFF)
                if not word & 0x80000000:
                    stream = self.streams[word]
                    stream["data"] += payload
                    if flags & 1:
                        stream["fin"].set()
                    continue
                ftype = word & 0xFFFF
                if ftype == 2:  # SYN_REPLY
                    (sid,) = struct.unpack_from(">I", payload)
                    assert self.inflate.decompress(payload[4:]) == b"\0\0\0\0"  # no headers
                    self.streams[sid]["reply"].set()
                elif ftype == 3:  # RST_STREAM
                    sid, status = struct.unpack(">II", payload)
                    self.streams[sid]["reset"] = status
                    self.streams[sid]["reply"].set()
                    self.streams[sid]["fin"].set()
                elif ftype == 6:  # PING
                    self.pong = struct.unpack(">I", payload)[0]
                elif ftype == 7:  # GOAWAY
                    self.goaway.set()
                elif ftype == 9:  # WINDOW_UPDATE
                    sid, delta = struct.unpack(">II", payload)
                    self.window_updates[sid] = self.window_updates.get(sid, 0) + delta
        except asyncio.IncompleteReadError:
            self.eof.set()

    async def replied(self, *sids: int) -> None:
        for sid in sids:
            await self.streams[sid]["reply"].wait()
            assert self.streams[sid]["reset"] is None

    async def read_all(self, sid: int) -> bytes:
        await self.streams[sid]["fin"].wait()
        return bytes(self.streams[sid]["data"])

    def close(self) -> None:
        self.writer.close()


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    hostport, path = url.removeprefix("http://").split("/", 1)
    host, port = hostport.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"GET /{path} HTTP/1.1", f"Host: {hostport}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = (await reader.read()).decode()
    writer.close()
    return int(response.split()[1]), response


# ------------------------------------------------------------------- tests


def test_spdy_dictionary_is_the_spdy3_one():
    # Size and Adler-32 (the DICTID a zlib stream names it by) of the SPDY/3
    # header dictionary, as Go's spdy package has it.
    assert len(SPDY_DICTIONARY) == 1423
    assert zlib.adler32(SPDY_DICTIONARY) == 0xE3C6A7C2


def test_register_validates_like_the_kubelet():
    server = StreamingServer(FakeBackend())
    with pytest.raises(InvalidRequest, match="container_id"):
        server.register_exec(ExecRequestInfo("", ["ls"]))
    with pytest.raises(InvalidRequest, match="tty and stderr"):
        server.register_exec(ExecRequestInfo("c", ["sh"], tty=True, stderr=True))
    with pytest.raises(InvalidRequest, match="one of stdin, stdout, or stderr"):
        server.register_attach(AttachRequestInfo("c", stdout=False, stderr=False))
    with pytest.raises(InvalidRequest, match="pod_sandbox_id"):
        server.register_port_forward(PortForwardRequestInfo(""))


def test_from_cri_messages():
    from hyperrun.proto import cri_api_pb2 as cri
    info = ExecRequestInfo.from_cri(cri.ExecRequest(container_id="c", cmd=["ls", "-l"], tty=True,
                                                    stdin=True, stdout=True))
    assert info == ExecRequestInfo("c", ["ls", "-l"], True, True, True, False)
    assert PortForwardRequestInfo.from_cri(
        cri.PortForwardRequest(pod_sandbox_id="p", port=[80])) == PortForwardRequestInfo("p", [80])


def test_tokens_are_single_use_expire_and_match_their_kind(monkeypatch):
    # The tokens' clock is the test's: a token expires when the test moves
    # the clock past its TTL, never because the test ran slowly (a 404
    # below is then the named rule's, not a late request's).
    from types import SimpleNamespace

    from hyperrun.api.streaming import server as streaming

    now = [1000.0]
    monkeypatch.setattr(streaming, "time", SimpleNamespace(monotonic=lambda: now[0]))

    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        assert url.startswith(f"http://127.0.0.1:{server.port}/exec/")
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
            await ws_collect(ws)
        status, _ = await http_get(url)
        assert status == 404  # used once already

        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        now[0] += 0.2  # the TTL
        assert (await http_get(url))[0] == 404  # expired

        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        assert (await http_get(url.replace("/exec/", "/attach/")))[0] == 404
        assert (await http_get(url))[0] == 404  # consumed by the wrong-kind attempt
        assert (await http_get(f"{server.base_url}/exec/nosuchtoken"))[0] == 404
        assert (await http_get(f"{server.base_url}/other/x"))[0] == 404
        assert len(backend.calls) == 1
    run(body, token_ttl=0.2)


def test_websocket_v4_exec_output_and_exit_code():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c1", ["fake", "3"]))
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
            assert ws.subprotocol == "v4.channel.k8s.io"
            first = await ws.recv()
            assert first == b"\x01"  # the kubelet's "streams ready" empty stdout message
            out = await ws_collect(ws)
        assert out[2] == b"to stderr\n"
        status = json.loads(out[3])
        assert status == {
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": "command terminated with non-zero exit code: error executing command "
                       "[fake 3], exit code 3",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}
        assert backend.calls == [("exec", "c1", ["fake", "3"], False, False)]
    run(body)


def test_websocket_v5_stdin_close_signal_and_resize():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c1", ["fake", "0"], tty=True, stdin=True,
                                                   stdout=True, stderr=False))
        async with ws_connect(ws_url(url), subprotocols=["v5.channel.k8s.io",
                                                         "v4.channel.k8s.io"]) as ws:
            assert ws.subprotocol == "v5.channel.k8s.io"
            assert await ws.recv() == b"\x01"
            await ws.send(b"\x04" + b'{"Width":100,"Height":30}')
            await ws.send(b"\x00hello\n")
            stdout = b""
            while b"hello\n" not in stdout:
                stdout += (await ws.recv())[1:]
            await ws.send(b'\x04{"Width":120,')  # a resize split over two messages
            await ws.send(b'\x04"Height":40}')
            await ws.send(bytes([255, 0]))  # v5: close stdin
            out = await ws_collect(ws)
        assert json.loads(out[3]) == {"metadata": {}, "status": "Success"}
        assert stdout + out.get(1, b"") == b"to stderr\nhello\n"  # tty: one stream
        proc = backend.procs[0]
        assert proc.stdin_closed and proc.waited
        assert proc.resizes == [(30, 100), (40, 120)]
        # The first size reached the process before the input sent after it.
        assert proc.events[:2] == [("resize", 30, 100), ("write", b"hello\n")]
    run(body)


def test_websocket_base64_and_unversioned_protocols():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["fake", "2"]))
        async with ws_connect(ws_url(url), subprotocols=["v4.base64.channel.k8s.io"]) as ws:
            messages = [m async for m in ws]
        assert all(isinstance(m, str) for m in messages)
        assert "2dG8gc3RkZXJyCg==" in messages  # channel '2', base64 of "to stderr\n"
        assert json.loads(base64.b64decode(messages[-1][1:]))["reason"] == "NonZeroExitCode"

        # channel.k8s.io (before v4): a failure's message only, as text
        url = server.register_exec(ExecRequestInfo("c", ["fake", "4"]))
        async with ws_connect(ws_url(url), subprotocols=["channel.k8s.io"]) as ws:
            out = await ws_collect(ws)
        assert out[3].startswith(b"command terminated with non-zero exit code")

        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(ws_url(url), subprotocols=["nope.k8s.io"]):
                pass
        assert refused.value.response.status_code == 400
        assert backend.calls == [("exec", "c", ["fake", "2"], False, False),
                                 ("exec", "c", ["fake", "4"], False, False)]
    run(body)


def test_websocket_backend_failure_goes_to_the_error_channel():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("missing", ["fake", "0"]))
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
            out = await ws_collect(ws)
        status = json.loads(out[3])
        assert status["status"] == "Failure" and status["reason"] == "InternalError"
        assert "error executing command in container: container missing not found" \
            in status["message"]
    run(body)


def test_websocket_attach_reports_success():
    async def body(server, backend):
        url = server.register_attach(AttachRequestInfo("c2"))
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
            out = await ws_collect(ws)
        assert out[2] == b"to stderr\n"
        assert json.loads(out[3])["status"] == "Success"  # no exit code for attach
        assert backend.calls == [("attach", "c2", False, False)]
        assert backend.procs[0].waited  # released
    run(body)


def test_a_client_gone_abandons_its_exec_or_attach():
    """A process whose client's connection ends (a dropped websocket, a
    closed SPDY connection) is abandoned: an exec's killed, an attach let
    go; one whose client stays is not."""
    async def body(server, backend):
        for url in (server.register_exec(ExecRequestInfo("c1", ["hang", "0"])),
                    server.register_attach(AttachRequestInfo("hang"))):
            ws = await ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"])
            assert await ws.recv() == b"\x01"
            proc = backend.procs[-1]
            assert not proc.abandoned.is_set()  # its client is there: it runs on
            await ws.close()
            await asyncio.wait_for(proc.abandoned.wait(), 5)
        url = server.register_exec(ExecRequestInfo("c1", ["hang", "0"]))
        client = SpdyClient()
        await client.connect(url, ["v4.channel.k8s.io"])
        streams = [client.create_stream(streamType=t) for t in ("error", "stdout", "stderr")]
        await client.replied(*streams)
        proc = backend.procs[-1]
        assert not proc.abandoned.is_set()
        client.close()
        await asyncio.wait_for(proc.abandoned.wait(), 5)
    run(body)


def test_spdy_exec_stdin_stdout_stderr_and_exit_code():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c1", ["fake", "3"], stdin=True))
        client = SpdyClient()
        status, headers = await client.connect(url, ["v4.channel.k8s.io", "v3.channel.k8s.io",
                                                     "v2.channel.k8s.io", "channel.k8s.io"])
        assert status == 101
        assert headers["upgrade"] == ["SPDY/3.1"]
        assert headers["x-stream-protocol-version"] == ["v4.channel.k8s.io"]
        # as client-go: error first, then stdin, stdout, stderr
        error = client.create_stream(streamType="error")
        stdin = client.create_stream(streamType="stdin")
        stdout = client.create_stream(streamType="stdout")
        stderr = client.create_stream(streamType="stderr")
        await client.replied(error, stdin, stdout, stderr)
        client.ping(1)
        client.send(stdin, b"line one\n")
        client.send(stdin, b"x" * 40_000)
        while len(client.streams[stdout]["data"]) < 40_009:
            await asyncio.sleep(0.01)
        given_back = lambda: client.window_updates.get(stdin, 0) >= 32 * 1024  # noqa: E731
        await asyncio.to_thread(wait_until, given_back, 5, "the stdin window given back",
                                interval=0.01)
        assert client.window_updates[stdin] >= 32 * 1024  # stdin window given back
        client.send(stdin, b"", fin=True)
        assert await client.read_all(stdout) == b"line one\n" + b"x" * 40_000
        assert await client.read_all(stderr) == b"to stderr\n"
        status = json.loads(await client.read_all(error))
        assert status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        assert client.pong == 1
        client.close()
    run(body)


def test_spdy_tty_resize_and_large_output_without_window_updates():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["big", "0"], tty=True, stdin=True,
                                                   stderr=False))
        client = SpdyClient()
        status, headers = await client.connect(url, ["v5.channel.k8s.io", "v4.channel.k8s.io"])
        assert headers["x-stream-protocol-version"] == ["v5.channel.k8s.io"]
        error = client.create_stream(streamType="error")
        stdin = client.create_stream(streamType="stdin")
        stdout = client.create_stream(streamType="stdout")
        resize = client.create_stream(streamType="resize")
        await client.replied(error, stdin, stdout, resize)
        client.send(resize, b'{"Width":80,"Height":24}\n{"Width":81,')
        client.send(resize, b'"Height":25}\n')
        # Resized before stdin closes (which ends the process and its resizes).
        resized = lambda: backend.procs and len(backend.procs[0].resizes) == 2  # noqa: E731
        await asyncio.to_thread(wait_until, resized, 5, "both resizes taken", interval=0.01)
        client.send(stdin, b"", fin=True)
        # 300 kB through a 64 kB initial window: spdystream never sends
        # WINDOW_UPDATE, and neither do we here
        out = await client.read_all(stdout)
        assert out == b"to stderr\n" + b"x" * 300_000
        assert json.loads(await client.read_all(error)) == {"metadata": {}, "status": "Success"}
        assert backend.procs[0].resizes == [(24, 80), (25, 81)]
        client.close()
    run(body)


def test_spdy_v2_reports_failures_as_text_and_waits_for_streams():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["fake", "5"]))
        client = SpdyClient()
        _, headers = await client.connect(url, ["v2.channel.k8s.io"])
        assert headers["x-stream-protocol-version"] == ["v2.channel.k8s.io"]
        error = client.create_stream(streamType="error")
        # The server replies to a stream as it takes it, and decides then
        # whether it has them all: after the reply, it has decided.
        await await_event(client.replied(error), 5, "the server's reply to the error stream")
        assert backend.calls == []  # still waiting for stdout and stderr
        stdout = client.create_stream(streamType="stdout")
        stderr = client.create_stream(streamType="stderr")
        await client.replied(error, stdout, stderr)
        assert await client.read_all(stderr) == b"to stderr\n"
        assert (await client.read_all(error)).startswith(
            b"command terminated with non-zero exit code")
        late = client.create_stream(streamType="stdin")
        await client.streams[late]["reply"].wait()
        assert client.streams[late]["reset"] == 3  # REFUSED_STREAM
        client.close()
    run(body)


def test_spdy_negotiation_failures():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        status, headers = await SpdyClient().connect(url, ["v9.channel.k8s.io"])
        assert status == 403
        assert "v4.channel.k8s.io" in headers["x-accepted-stream-protocol-versions"]
        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        status, _ = await http_get(url)
        assert status == 400  # neither SPDY nor WebSocket
        url = server.register_port_forward(PortForwardRequestInfo("pod"))
        status, _ = await SpdyClient().connect(url, ["v4.channel.k8s.io"])
        assert status == 403
    run(body)


def test_spdy_stream_creation_timeout():
    async def body(server, backend):
        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"]))
        client = SpdyClient()
        await client.connect(url, ["v4.channel.k8s.io"])
        client.create_stream(streamType="error")
        await asyncio.wait_for(client.eof.wait(), 5)
        assert client.goaway.is_set() and backend.calls == []
    run(body, stream_creation_timeout=0.3, linger=0.1)


def test_spdy_port_forward():
    async def body(server, backend):
        url = server.register_port_forward(PortForwardRequestInfo("pod1", [8080]))
        client = SpdyClient()
        status, headers = await client.connect(url, ["portforward.k8s.io"])
        assert status == 101 and headers["x-stream-protocol-version"] == ["portforward.k8s.io"]

        async def connection(port: int, request_id: str, payload: bytes):
            # as client-go: the error stream (closed at once), then data
            error = client.create_stream(streamType="error", port=str(port),
                                         requestID=request_id)
            await client.replied(error)
            client.send(error, b"", fin=True)
            data = client.create_stream(streamType="data", port=str(port), requestID=request_id)
            await client.replied(data)
            if payload:
                client.send(data, payload)
                client.send(data, b"", fin=True)
            return await client.read_all(data), await client.read_all(error)

        assert await connection(8080, "0", b"hello pod") == (b"HELLO POD", b"")
        assert await connection(8080, "1", b"again") == (b"AGAIN", b"")
        data, error = await connection(9, "2", b"")
        assert data == b"" and error.startswith(b"error forwarding port 9 to pod pod1")
        assert b"connection refused" in error
        bad = client.create_stream(streamType="data", port="0", requestID="3")
        await client.streams[bad]["reply"].wait()
        assert client.streams[bad]["reset"] is not None
        assert [c[2] for c in backend.calls] == [8080, 8080, 9]
        client.close()
    run(body)


def test_websocket_port_forward():
    async def body(server, backend):
        url = server.register_port_forward(PortForwardRequestInfo("pod1", [80]))
        async with ws_connect(ws_url(url) + "?port=8080",
                              subprotocols=["v4.channel.k8s.io"]) as ws:
            # each channel starts with its port, little-endian
            assert {await ws.recv(), await ws.recv()} == {b"\x00\x90\x1f", b"\x01\x90\x1f"}
            await ws.send(b"\x00ping")
            assert await ws.recv() == b"\x00PING"
        # The client gone, the server ends the connection it forwarded to.
        await await_event(backend.forward_ended.wait(), 5,
                          "the forwarded connection ended once the client left")
        assert backend.calls == [("port_forward", "pod1", 8080)]
    run(body)


def test_stop_ends_sessions_in_progress():
    async def main():
        backend = FakeBackend()
        server = StreamingServer(backend)
        await server.start()
        url = server.register_exec(ExecRequestInfo("c", ["fake", "0"], stdin=True))
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
            await ws.recv()
            await asyncio.wait_for(server.stop(), 5)
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
    asyncio.run(main())


def test_spdy_header_blocks_are_bounded_when_inflated():
    """A small compressed block must not inflate without limit in the daemon."""
    import zlib

    from hyperrun.api.streaming import spdy

    conn = spdy.Connection.__new__(spdy.Connection)
    conn._inflate = zlib.decompressobj(zdict=spdy.SPDY_DICTIONARY)
    deflate = zlib.compressobj(zdict=spdy.SPDY_DICTIONARY)
    bomb = deflate.compress(b"\0" * (4 << 20)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 8192
    with pytest.raises(spdy.ProtocolError, match="inflates past"):
        conn._headers(bomb)
