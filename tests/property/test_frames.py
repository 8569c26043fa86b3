"""ttRPC framing under hostile bytes, on both sides of the channel.

The host must survive a lying guest (the guest is the untrusted side of the
VM boundary), and the agent a broken host: any byte stream ends in a
response, a typed error (TtrpcError, ConnectionLost, FrameError) or a closed
session, never in a hang, an untyped exception or a buffer the peer sized.
"""
from __future__ import annotations

import asyncio
import struct
import sys
import threading
from pathlib import Path

from google.protobuf.message import DecodeError
from hypothesis import given, strategies as st

from hyperrun.channel import frame
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcClient, TtrpcError
from hyperrun.proto import agent_pb2 as pb
from hyperrun.proto import ttrpc_pb2

from . import FUZZ, budget, counted

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
from hyperrun_agent.server import Connection, Server  # noqa: E402

MAX = frame.MAX_MESSAGE
TYPES = (frame.TYPE_REQUEST, frame.TYPE_RESPONSE, frame.TYPE_DATA)

u32 = st.integers(0, 0xFFFFFFFF)
u8 = st.integers(0, 0xFF)
small_payload = st.binary(max_size=300)


def header(length: int, stream_id: int, mtype: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, mtype, flags)


def reference_parse(data: bytes):
    """The framing as specified, on a whole stream at once: (frames, end)
    with end "error" (a header no reader may accept), "partial" (ends inside
    a frame) or "clean"."""
    frames, pos = [], 0
    while len(data) - pos >= frame.HEADER_SIZE:
        length, sid, mtype, flags = struct.unpack_from(">IIBB", data, pos)
        if length > MAX or mtype not in TYPES:
            return frames, "error"
        if len(data) - pos - frame.HEADER_SIZE < length:
            return frames, "partial"
        start = pos + frame.HEADER_SIZE
        frames.append((sid, mtype, flags, data[start:start + length]))
        pos = start + length
    return frames, "clean" if pos == len(data) else "partial"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


# Pieces of a hostile stream: good frames, frames of unknown type, headers
# announcing more than MAX_MESSAGE, raw garbage (which desynchronises the
# framing from there on).
good_frame = st.builds(lambda sid, t, f, p: frame.encode(sid, t, p, f),
                       u32, st.sampled_from(TYPES), u8, small_payload)
bad_type = st.builds(lambda n, sid, t, f: header(n, sid, t, f),
                     st.integers(0, 64), u32, u8.filter(lambda t: t not in TYPES), u8)
oversized = st.builds(lambda n, sid, t: header(n, sid, t),
                      st.integers(MAX + 1, 0xFFFFFFFF), u32, st.sampled_from(TYPES))
garbage = st.binary(min_size=1, max_size=40)
stream_piece = st.one_of(good_frame, good_frame, good_frame, bad_type, oversized, garbage)
hostile_stream = st.lists(stream_piece, max_size=12).map(b"".join)
cuts = st.lists(st.integers(0, 1 << 16), max_size=20)


# ---------------------------------------------------------------------------
# the shared codec (hyperrun/channel/frame.py)


@FUZZ
@given(sid=u32, mtype=st.sampled_from(TYPES), flags=u8, payload=st.binary(max_size=2000),
       cuts=cuts)
@counted
def test_encode_decode_round_trip(sid, mtype, flags, payload, cuts):
    data = frame.encode(sid, mtype, payload, flags)
    assert len(data) == frame.HEADER_SIZE + len(payload)
    decoder = frame.Decoder()
    got = []
    for chunk in split(data, cuts):
        got += decoder.feed(chunk)
    assert got == [(sid, mtype, flags, payload)]
    assert decoder.pending == 0


@FUZZ
@given(head=st.binary(min_size=frame.HEADER_SIZE, max_size=frame.HEADER_SIZE))
@counted
def test_decode_header_any_ten_bytes(head):
    length, sid, mtype, flags = struct.unpack(">IIBB", head)
    try:
        got = frame.decode_header(head)
    except frame.FrameError:
        assert length > MAX or mtype not in TYPES
    else:
        assert got == (length, sid, mtype, flags)
        assert length <= MAX and mtype in TYPES


@FUZZ
@given(length=st.integers(MAX + 1, 0xFFFFFFFF), sid=u32, mtype=st.sampled_from(TYPES))
@counted
def test_oversized_frame_refused_from_its_header(length, sid, mtype):
    """Refused on the 10 header bytes alone: nothing of the announced size
    is ever awaited or buffered."""
    decoder = frame.Decoder()
    try:
        decoder.feed(header(length, sid, mtype))
    except frame.FrameError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("an oversized frame was accepted")
    try:
        frame.encode(sid, mtype, b"\0" * (MAX + 1))
    except frame.FrameError:
        pass
    else:
        raise AssertionError("an oversized message was encoded")


@FUZZ
@given(data=hostile_stream, cuts=cuts)
@counted
def test_decoder_matches_the_specified_framing(data, cuts):
    """Fed in any chunks, the incremental decoder yields a prefix of the
    frames the specification gives, raises FrameError exactly when the stream
    holds an unacceptable header, and never holds more than one frame and one
    read chunk."""
    want, end = reference_parse(data)
    decoder = frame.Decoder()
    got, raised = [], False
    chunks = split(data, cuts)
    for chunk in chunks:
        try:
            got += decoder.feed(chunk)
        except frame.FrameError:
            raised = True
            break
        assert decoder.pending <= frame.HEADER_SIZE + MAX + len(chunk)
    assert got == want[:len(got)]
    assert raised == (end == "error")
    if not raised:
        assert got == want
        assert (decoder.pending == 0) == (end == "clean")


# ---------------------------------------------------------------------------
# the host's client (hyperrun/channel/ttrpc.py) against a lying guest


class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        pass


def _envelope(code: int, message: str, payload: bytes) -> bytes:
    r = ttrpc_pb2.Response(payload=payload)
    r.status.code = code
    r.status.message = message
    return r.SerializeToString()


OURS = object()   # placeholder: the stream id of the call under test

# A guest's answer: replies to our call (good, failed, with a garbage
# envelope or payload), to other streams, of other types, plus the pieces
# of hostile_stream.
reply_payload = st.one_of(st.just(pb.HealthResponse(status=1).SerializeToString()),
                          st.binary(max_size=40))
reply = st.builds(
    lambda sid, t, f, env: (sid, t, f, env),
    st.one_of(st.just(OURS), st.just(OURS), u32),
    st.sampled_from(TYPES + (frame.TYPE_RESPONSE,) * 3), u8,
    st.one_of(st.builds(_envelope, st.integers(0, 16), st.text(max_size=20), reply_payload),
              st.binary(max_size=60)))
guest_piece = st.one_of(reply, reply, reply, bad_type, oversized, garbage)


def render(pieces, sid: int) -> bytes:
    out = b""
    for piece in pieces:
        if isinstance(piece, tuple):
            psid, t, f, env = piece
            out += frame.encode(sid if psid is OURS else psid, t, env, f)
        else:
            out += piece
    return out


def expected_outcome(data: bytes, sid: int):
    """What the call must end with, from the specified framing: the first
    response frame on its stream decides; a stream that breaks or ends first
    loses the connection."""
    frames, _end = reference_parse(data)
    for fsid, mtype, _flags, payload in frames:
        if fsid != sid or mtype != frame.TYPE_RESPONSE:
            continue
        try:
            response = ttrpc_pb2.Response.FromString(payload)
        except DecodeError:
            return TtrpcError
        if response.status.code != frame.OK:
            return TtrpcError
        try:
            return pb.HealthResponse.FromString(response.payload)
        except DecodeError:
            return TtrpcError
    return ConnectionLost


async def _connected_client(first_id: int) -> tuple[TtrpcClient, asyncio.StreamReader, "FakeWriter"]:
    """A client connected to a stream this test feeds (reader) and records
    (writer), numbering its next call first_id."""
    reader = asyncio.StreamReader()
    writer = FakeWriter()
    client = TtrpcClient("fuzz")

    async def opener():
        return reader, writer

    await client.connect(opener)
    client._next_id = first_id
    return client, reader, writer


async def _call_against(data: bytes, chunks: list[bytes], sid: int, eof: bool):
    client, reader, writer = await _connected_client(sid)
    call = asyncio.ensure_future(client.call("hyperrun.agent.v1.Agent", "Health",
                                             pb.HealthRequest(), pb.HealthResponse))
    await asyncio.sleep(0)
    for chunk in chunks:
        reader.feed_data(chunk)
        await asyncio.sleep(0)
    if eof:
        reader.feed_eof()
    try:
        try:
            result = await asyncio.wait_for(call, 2)
        except (TtrpcError, ConnectionLost) as exc:
            result = exc
        reader_task = client._reader_task
        sent = bytes(writer.data)
        return result, reader_task, sent
    finally:
        await client.close()


@FUZZ
@given(pieces=st.lists(guest_piece, max_size=8), sid=u32.map(lambda n: n | 1), cuts=cuts)
@counted
def test_client_against_a_lying_guest(pieces, sid, cuts):
    data = render(pieces, sid)
    want = expected_outcome(data, sid)

    async def run():
        result, reader_task, sent = await _call_against(data, split(data, cuts), sid, eof=True)
        # the request went out on the call's own (odd) stream id
        (rsid, mtype, _f, _p), = frame.Decoder().feed(sent)
        assert rsid == sid and rsid % 2 == 1 and mtype == frame.TYPE_REQUEST
        if want is TtrpcError or want is ConnectionLost:
            assert isinstance(result, want), (want, result)
        else:
            assert result == want
        # the reader ends by itself (end of stream, broken frame) or keeps
        # reading; it never dies of an exception nobody handles
        if reader_task.done() and not reader_task.cancelled():
            assert reader_task.exception() is None, reader_task.exception()

    asyncio.run(run())


@FUZZ
@given(length=st.integers(MAX + 1, 0xFFFFFFFF), junk=st.binary(max_size=64),
       sid=u32.map(lambda n: n | 1))
@counted
def test_client_refuses_oversized_frame_without_waiting(length, junk, sid):
    """No end of stream follows: a reader that waited for the announced
    payload would hang; it must give up on the header."""
    data = header(length, sid, frame.TYPE_RESPONSE) + junk

    async def run():
        result, reader_task, _ = await _call_against(data, [data], sid, eof=False)
        assert isinstance(result, ConnectionLost), result
        assert "exceeds" in str(result)
        assert reader_task.done() and reader_task.exception() is None

    asyncio.run(run())


@budget(0.5)
@given(start=st.integers(0, 0xFFFFFFFF).map(lambda n: n | 1), calls=st.integers(1, 6))
@counted
def test_client_stream_ids_stay_odd(start, calls):
    """Clients number streams with odd ids (ttRPC), wrapping within u32."""
    async def run():
        client, reader, writer = await _connected_client(start)
        tasks = [asyncio.ensure_future(client.call("s", "m", pb.HealthRequest(),
                                                   pb.HealthResponse)) for _ in range(calls)]
        await asyncio.sleep(0)
        reader.feed_eof()
        for t in tasks:
            try:
                await asyncio.wait_for(t, 5)
            except ConnectionLost:
                pass
        await client.close()
        ids = [sid for sid, _t, _f, _p in frame.Decoder().feed(bytes(writer.data))]
        assert len(ids) == calls and len(set(ids)) == calls
        assert all(i % 2 == 1 and 0 < i <= 0xFFFFFFFF for i in ids)

    asyncio.run(run())


# ---------------------------------------------------------------------------
# the guest agent's server (agent/hyperrun_agent/server.py) against a broken host

SERVICE = "hyperrun.test.Echo"


def _echo(request: pb.HealthRequest) -> pb.HealthResponse:
    return pb.HealthResponse(status=pb.HealthResponse.SERVING)


def _request(service: str, method: str, payload: bytes) -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload).SerializeToString()


request_envelope = st.one_of(
    st.builds(_request, st.sampled_from([SERVICE, "other.Service", ""]),
              st.sampled_from(["Echo", "Nope", ""]),
              st.one_of(st.just(b""), st.binary(max_size=30))),
    st.binary(max_size=60))
host_frame = st.builds(lambda sid, t, f, p: frame.encode(sid, t, p, f),
                       u32, st.sampled_from((frame.TYPE_REQUEST,) * 4 + TYPES), u8,
                       request_envelope)
host_piece = st.one_of(host_frame, host_frame, host_frame, bad_type, oversized, garbage)


class FakeConn(Connection):
    """Hands out the host's bytes; at the end, waits (bounded) for the
    replies still owed before it reports end of stream."""

    def __init__(self, chunks: list[bytes], owed: int) -> None:
        self.chunks = list(chunks)
        self.owed = owed
        self.out = bytearray()
        self.replies = 0
        self.cond = threading.Condition()

    def read(self, size: int) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        with self.cond:
            self.cond.wait_for(lambda: self.replies >= self.owed, timeout=5)
        return b""

    def write(self, data: bytes) -> None:
        with self.cond:
            self.out += data
            self.replies += 1
            self.cond.notify_all()


def expected_reply(sid: int, payload: bytes) -> int:
    """The status code the agent must answer a request frame with."""
    if sid % 2 == 0:
        return frame.INVALID_ARGUMENT     # clients use odd stream ids
    try:
        request = ttrpc_pb2.Request.FromString(payload)
    except DecodeError:
        return frame.INVALID_ARGUMENT
    if request.service != SERVICE or request.method != "Echo":
        return frame.UNIMPLEMENTED
    try:
        pb.HealthRequest.FromString(request.payload)
    except DecodeError:
        return frame.INVALID_ARGUMENT
    return frame.OK


@FUZZ
@given(pieces=st.lists(host_piece, max_size=10), cuts=cuts)
@counted
def test_agent_server_against_a_broken_host(pieces, cuts):
    data = b"".join(pieces)
    frames, end = reference_parse(data)
    requests = [(sid, payload) for sid, mtype, _f, payload in frames
                if mtype == frame.TYPE_REQUEST]
    conn = FakeConn(split(data, cuts), owed=len(requests) if end != "error" else 0)
    server = Server(SERVICE, {"Echo": (pb.HealthRequest, _echo)})
    server.serve(conn)   # returns (never raises) whatever the host sent
    with conn.cond:
        out = bytes(conn.out)
    replies = frame.Decoder().feed(out)
    want = {}
    for sid, payload in requests:
        want.setdefault(sid, []).append(expected_reply(sid, payload))
    for sid, mtype, _flags, payload in replies:
        assert mtype == frame.TYPE_RESPONSE
        assert sid in want, f"a reply on stream {sid}, which no request used"
        code = ttrpc_pb2.Response.FromString(payload).status.code
        assert code in want[sid], (sid, code, want[sid])
        want[sid].remove(code)
    if end != "error":
        # a host that ends cleanly (or mid-frame) gets every reply it asked for
        assert len(replies) == len(requests)
