"""A process's output across host sessions, in the agent (guest code):
each byte reaches exactly one delivered ReadStdout reply. A read pending
for a host that goes away takes nothing; output whose reply does not reach
its host goes back to the stream for the next one. Over the fake agent
(the real server, service and Stdio over host processes)."""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from hyperrun.channel import transport  # noqa: E402
from hyperrun.channel.agent import AgentClient  # noqa: E402
from hyperrun.channel.ttrpc import ConnectionLost  # noqa: E402
from hyperrun.proto import agent_pb2 as pb  # noqa: E402
from hyperrun_agent.stdio import Stream  # noqa: E402
from tests.fakes.agent import FakeAgent  # noqa: E402
from tests.framework import await_event  # noqa: E402

DEADLINE_S = 5.0


@pytest.fixture
def agent():
    # Short: the socket's path must fit a unix socket address.
    base = Path(tempfile.mkdtemp(prefix="hr-stdio-", dir="/tmp"))
    fake = FakeAgent(base / "agent.sock")
    yield fake
    fake.stop()
    (base / "agent.sock").unlink(missing_ok=True)
    base.rmdir()


async def session(agent: FakeAgent) -> AgentClient:
    client = AgentClient("test")
    await client.connect(transport.unix(str(agent.socket_path)))
    return client


async def started(client: AgentClient, script: str) -> str:
    await client.create_container("c", pb.Storage(), pb.Process(
        args=["/bin/sh", "-c", script], env=["PATH=/usr/bin:/bin"], cwd="/", stdin=True))
    await client.start_container("c")
    return "c"


async def read_all(client: AgentClient, cid: str) -> bytes:
    out = b""
    while chunk := await await_event(client.read_stream("stdout", cid), DEADLINE_S, "ReadStdout"):
        out += chunk
    return out


async def test_a_read_pending_for_a_host_that_went_away_takes_nothing(agent):
    first = await session(agent)
    cid = await started(first, "read x; echo got:$x")
    pending = asyncio.create_task(first.read_stream("stdout", cid))
    # Until the agent's reader is blocked on the empty stream.
    assert await asyncio.to_thread(agent.wait_handling, "ReadStdout", DEADLINE_S)
    await first.close()  # the host goes away (a daemon's restart)
    with pytest.raises(ConnectionLost):
        await pending
    second = await session(agent)
    await second.write_stdin(cid, "", b"hello\n")
    assert await read_all(second, cid) == b"got:hello\n"
    await second.close()


async def test_output_whose_reply_did_not_reach_the_host_goes_to_the_next(agent):
    first = await session(agent)
    cid = await started(first, "read x; echo got:$x; read y; echo then:$y")
    agent.break_reply("ReadStdout")
    pending = asyncio.create_task(first.read_stream("stdout", cid))
    try:
        await first.write_stdin(cid, "", b"one\n")
    except ConnectionLost:
        pass  # its reply came after the break: "one" was written all the same
    # The agent took "got:one" for this reply; the connection broke under it.
    with pytest.raises(ConnectionLost):
        await await_event(pending, DEADLINE_S, "the broken reply's call to fail")
    second = await session(agent)
    await second.write_stdin(cid, "", b"two\n")
    out = await read_all(second, cid)
    assert out == b"got:one\nthen:two\n"  # nothing lost, nothing twice, in order
    await second.close()


def test_a_stream_given_back_is_read_first_and_in_pieces():
    r, w = os.pipe()
    stream = Stream(r)
    os.write(w, b"abcdef")
    taken = stream.take(65536)
    assert taken == b"abcdef"
    os.write(w, b"gh")
    stream.settle(taken, delivered=False)
    assert stream.read(4) == b"abcd"  # a smaller read takes part of it
    assert stream.read(65536) == b"ef"
    assert stream.read(65536) == b"gh"
    os.close(w)
    assert stream.read(65536) == b"" and stream.fd is None
