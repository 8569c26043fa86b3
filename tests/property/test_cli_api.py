"""The CLI's requests (hyperrun/cli_api.py) under hostile input: what a client of
the daemon's CLI socket sends is either a well-typed request and
well-formed frames, or a ProtocolError the daemon answers with an error;
never another exception, never a frame over the limit."""
from __future__ import annotations

import json
import socket

from hypothesis import given, strategies as st

from hyperrun import cli_api
from hyperrun.cli_api import ProtocolError, RunOptions

from . import FUZZ, counted

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
REQUESTS = [cli_api.RunOptions, cli_api.ExecOptions, cli_api.LogsOptions, cli_api.ListOptions,
            cli_api.NamesOptions, cli_api.PullOptions]


def request_fields(cls):
    names = st.sampled_from(list(cls.__dataclass_fields__)) | st.text(max_size=10)
    return st.tuples(st.just(cls), st.dictionaries(names, values, max_size=25))


@FUZZ
@given(request=st.sampled_from(REQUESTS).flatmap(request_fields))
@counted
def test_requests_are_typed_or_refused(request):
    cls, fields = request
    try:
        opts = cls.from_json(json.dumps(fields).encode())
    except ProtocolError:
        return
    for name, kind in cls.FIELDS.items():
        value = getattr(opts, name)
        assert cli_api._is(list(value) if name == "console" and value else value, kind), name
    if cls is RunOptions:
        assert opts.cpus is None or (type(opts.cpus) is int and opts.cpus >= 0)
    assert cls.from_json(opts.to_json()) == opts


@FUZZ
@given(data=st.binary(max_size=64))
@counted
def test_raw_requests_are_refused_cleanly(data):
    try:
        RunOptions.from_json(data)
    except ProtocolError:
        pass


@FUZZ
@given(data=st.binary(max_size=256), cut=st.integers(min_value=1, max_value=64))
@counted
def test_frame_reader_on_any_bytes(data, cut):
    """The CLI's reader, fed in pieces: whole frames, then end of stream or
    a ProtocolError (a length over the limit)."""
    a, b = socket.socketpair()
    try:
        for i in range(0, len(data), cut):
            a.sendall(data[i:i + cut])
        a.close()
        reader = cli_api.FrameReader(b)
        used = 0
        try:
            while (f := reader.next()) is not None:
                kind, payload = f
                assert 0 <= kind < 256 and len(payload) <= cli_api.MAX_FRAME
                used += cli_api.HEADER.size + len(payload)
        except ProtocolError:
            return
        assert used <= len(data)
    finally:
        b.close()


@FUZZ
@given(kind=st.integers(min_value=0, max_value=255), payload=st.binary(max_size=2048))
@counted
def test_frames_round_trip(kind, payload):
    a, b = socket.socketpair()
    try:
        a.sendall(cli_api.frame(kind, payload))
        a.close()
        assert cli_api.FrameReader(b).next() == (kind, payload)
    finally:
        b.close()


@FUZZ
@given(entries=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
       partial=st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
       tail=st.integers(min_value=0, max_value=40), block=st.sampled_from([1, 3, 64, 65536]))
@counted
def test_logs_tail_starts_at_the_last_entries(entries, partial, tail, block):
    """`logs --tail N`: the offset of the last N entries of any log (an
    entry still being written counts as one), read backwards a block at a
    time."""
    import io

    from hyperrun.sandbox.logs import tail_offset

    whole = [e + b"\n" for e in entries] + ([partial] if partial else [])
    kept = whole[len(whole) - min(tail, len(whole)):] if tail else []
    data = b"".join(whole)
    assert tail_offset(io.BytesIO(data), tail, block) == len(data) - len(b"".join(kept))
