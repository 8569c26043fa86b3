"""The ttRPC client (host) against the real agent server (guest code),
over a socketpair: framing, multiplexing, errors, reconnection."""
import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from hyperrun.channel import frame  # noqa: E402
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcClient, TtrpcError  # noqa: E402
from hyperrun.proto import agent_pb2 as pb  # noqa: E402
from hyperrun_agent.errors import not_found  # noqa: E402
from hyperrun_agent.server import Server  # noqa: E402
from hyperrun_agent.transport import SocketConnection  # noqa: E402
from tests.framework import await_event, wait_until  # noqa: E402

SERVICE = "hyperrun.agent.v1.Agent"


def make_server():
    """(server, release, waiting): WaitProcess blocks in the server until
    release is set; waiting is set once a WaitProcess is in its handler."""
    release, waiting = threading.Event(), threading.Event()

    def health(req):
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    def slow_wait(req):
        waiting.set()
        release.wait(10)
        return pb.WaitProcessResponse(exit_code=int(req.exec_id or 0))

    def missing(req):
        raise not_found("container 'x'")

    def crash(req):
        raise RuntimeError("boom")

    server = Server(SERVICE, {
        "Health": (pb.HealthRequest, health),
        "WaitProcess": (pb.ProcessRequest, slow_wait),
        "RemoveContainer": (pb.ContainerRequest, missing),
        "StartContainer": (pb.ContainerRequest, crash),
    })
    return server, release, waiting


def serve_in_thread(server, sock):
    conn = SocketConnection(sock)
    t = threading.Thread(target=server.serve, args=(conn,), daemon=True)
    t.start()
    return t


async def in_handler(waiting: threading.Event) -> None:
    """Until the server runs the WaitProcess handler (on its thread)."""
    await asyncio.to_thread(wait_until, waiting.is_set, 5, "WaitProcess in the server's handler",
                            interval=0.01)


async def connected_client(sock):
    client = TtrpcClient("test")
    await client.connect(lambda: asyncio.open_connection(sock=sock))
    return client


def test_frame_roundtrip_and_limits():
    data = frame.encode(7, frame.TYPE_REQUEST, b"abc")
    assert data[:10] == b"\x00\x00\x00\x03\x00\x00\x00\x07\x01\x00"
    dec = frame.Decoder()
    assert dec.feed(data[:5]) == []
    assert dec.feed(data[5:] + data) == [(7, 1, 0, b"abc"), (7, 1, 0, b"abc")]
    with pytest.raises(frame.FrameError):
        frame.Decoder().feed(b"\xff\xff\xff\xff\x00\x00\x00\x01\x01\x00")
    with pytest.raises(frame.FrameError):
        frame.Decoder().feed(b"\x00\x00\x00\x00\x00\x00\x00\x01\x09\x00")


async def test_calls_multiplex_and_errors():
    server, release, waiting = make_server()
    host, guest = socket.socketpair()
    serve_in_thread(server, guest)
    client = await connected_client(host)
    # A blocked call does not hold up the ones after it.
    slow = asyncio.create_task(client.call(SERVICE, "WaitProcess",
                                           pb.ProcessRequest(exec_id="42"), pb.WaitProcessResponse))
    await in_handler(waiting)
    t0 = time.monotonic()
    for _ in range(20):
        resp = await client.call(SERVICE, "Health", pb.HealthRequest(), pb.HealthResponse)
        assert resp.status == pb.HealthResponse.SERVING
    assert not slow.done()
    assert time.monotonic() - t0 < 5
    release.set()
    assert (await slow).exit_code == 42

    with pytest.raises(TtrpcError) as err:
        await client.call(SERVICE, "RemoveContainer", pb.ContainerRequest(), pb.Empty)
    assert err.value.code == frame.NOT_FOUND and "not found" in str(err.value)
    with pytest.raises(TtrpcError) as err:
        await client.call(SERVICE, "StartContainer", pb.ContainerRequest(), pb.Empty)
    assert err.value.code == frame.INTERNAL and "boom" in str(err.value)
    with pytest.raises(TtrpcError) as err:
        await client.call(SERVICE, "Nope", pb.Empty(), pb.Empty)
    assert err.value.code == frame.UNIMPLEMENTED
    await client.close()


async def test_pending_call_fails_when_peer_goes_away():
    server, release, waiting = make_server()
    host, guest = socket.socketpair()
    serve_in_thread(server, guest)
    client = await connected_client(host)
    pending = asyncio.create_task(client.call(SERVICE, "WaitProcess", pb.ProcessRequest(),
                                              pb.WaitProcessResponse))
    await in_handler(waiting)  # pending: sent, and not answered
    guest.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectionLost):
        await await_event(pending, 5, "the pending call ended by the lost connection")
    release.set()
    await client.close()


async def test_call_timeout_stays_a_timeout():
    """A peer that is slow to answer is not a lost channel: the call
    raises TimeoutError (an OSError since 3.11, which once turned it into
    ConnectionLost with an empty message), and the session stays usable."""
    server, release, waiting = make_server()
    host, guest = socket.socketpair()
    serve_in_thread(server, guest)
    client = await connected_client(host)
    with pytest.raises(TimeoutError, match="WaitProcess: no reply within 0.2s") as err:
        await client.call(SERVICE, "WaitProcess", pb.ProcessRequest(),
                          pb.WaitProcessResponse, timeout=0.2)
    assert not isinstance(err.value, ConnectionLost)
    release.set()
    assert client.connected
    resp = await client.call(SERVICE, "Health", pb.HealthRequest(), pb.HealthResponse, 5)
    assert resp.status == pb.HealthResponse.SERVING
    await client.close()


async def test_serial_agent_wait_reconnects_after_a_silent_session(tmp_path, monkeypatch):
    """A serial channel whose first session is never read (QEMU dropped
    the guest's port-open message) is given up after one health attempt
    and a new connection is answered."""
    from types import SimpleNamespace

    from hyperrun.channel.agent import AgentClient
    from hyperrun.sandbox import sandbox as sandbox_mod

    monkeypatch.setattr(sandbox_mod, "HEALTH_ATTEMPT_S", 0.3)
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    server, _, _ = make_server()
    sessions = []

    def accept():
        silent, _ = listener.accept()  # read by nobody
        sessions.append(silent)
        answered, _ = listener.accept()
        sessions.append(answered)
        server.serve(SocketConnection(answered))

    threading.Thread(target=accept, daemon=True).start()
    vm = SimpleNamespace(id="test", config=SimpleNamespace(channel=SimpleNamespace(kind="serial")),
                         agent_socket=path)

    sandbox = sandbox_mod.Sandbox(vm, AgentClient("agent-test"))
    assert await sandbox._connect_agent(timeout=10)
    await sandbox.agent.close()
    assert len(sessions) == 2
    listener.close()


async def test_server_survives_host_reconnect():
    """The same server object serves a second host session after the first
    one disconnects, as the agent does across a daemon restart."""
    server, release, waiting = make_server()
    release.set()
    for _ in range(3):
        host, guest = socket.socketpair()
        serve_in_thread(server, guest)
        client = await connected_client(host)
        assert (await client.call(SERVICE, "Health", pb.HealthRequest(),
                                  pb.HealthResponse)).status == 1
        await client.close()


def test_server_ends_session_on_garbage():
    server, _, _ = make_server()
    host, guest = socket.socketpair()
    t = serve_in_thread(server, guest)
    host.sendall(b"\xff" * 10)
    t.join(5)
    assert not t.is_alive()


def test_agent_vsock_listener_binds():
    """The agent's vsock side, as far as this host allows: AF_VSOCK listen
    on the agent port. End to end needs /dev/vhost-vsock (see
    tests/integration/test_sandbox.py::test_vsock_channel)."""
    from hyperrun_agent import transport

    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this Python has no AF_VSOCK")
    try:
        sock = transport.vsock_listener(port=40000 + os.getpid() % 20000)
    except OSError as exc:
        pytest.skip(f"AF_VSOCK not usable on this host kernel: {exc}")
    try:
        assert sock.family == socket.AF_VSOCK
        assert sock.getsockname()[1] == 40000 + os.getpid() % 20000
    finally:
        sock.close()
