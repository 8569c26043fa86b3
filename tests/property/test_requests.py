"""CRI request helpers under hostile input: the pure functions between a
request (or a CLI argument) and the VM, called without daemons or VMs.

  -p / CRI port mappings     hyperrun.cli_server.parse_port
  -v / CRI mounts            hyperrun.cli_server.parse_volume
  -u                         hyperrun.cli_server.check_user
  pod hostname               hyperrun.specs.PodSpec.pod_hostname
  SPDY header blocks         hyperrun.api.streaming.spdy.decode_header_block
  streaming requests         hyperrun.api.streaming.*RequestInfo.from_cri

Each either gives a well-formed result or raises the typed error its caller
maps to a status (RunError, Invalid, ValueError/struct.error for the SPDY
reader). Properties that found a bug in code outside this change are strict
xfails while a probe with the input that shows it still fails; once that
code is fixed, the mark lifts and the property runs in full.
"""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, strategies as st

from hyperrun.api import cli_server
from hyperrun.api import streaming
from hyperrun.api.streaming import spdy
from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.specs import PodSpec

from . import FUZZ, counted, still_failing

port_text = st.one_of(
    st.text(max_size=30),
    st.builds(lambda ip, hp, cp, proto: f"{ip}{hp}:{cp}{proto}",
              st.sampled_from(["", "127.0.0.1:", "0.0.0.0:", "[::1]:", "::1:", "x:", ":", "a:b:",
                               "999.1.1.1:", "1.2.3.4:5:"]),
              st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["", " 80", "8_0", "٨٠",
                                                                             "+80", "0x50"])),
              st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["", "80 ", "1e3"])),
              st.sampled_from(["", "/tcp", "/udp", "/sctp", "/TCP", "/icmp", "/", "/tcp/udp"])))


@FUZZ
@given(text=port_text)
@counted
def test_parse_port(text):
    try:
        m = cli_server.parse_port(text)
    except cli_server.RunError:
        return
    assert 0 < m.host_port < 65536 and 0 < m.container_port < 65536
    assert m.protocol in ("tcp", "udp", "sctp")


def _host_ip_probe():
    ipaddress.ip_address(cli_server.parse_port("[::1]:8080:80").host_ip)


@pytest.mark.xfail(still_failing(_host_ip_probe), strict=True, raises=ValueError, reason=(
    "found here, not fixed here (then in hyperrun/client.py): the host IP of "
    "-p is not checked, and Docker's IPv6 form [::1]:8080:80 keeps its brackets"))
@FUZZ
@example(text="[::1]:8080:80")
@given(text=port_text)
@counted
def test_parse_port_host_ip_is_an_address(text):
    try:
        m = cli_server.parse_port(text)
    except cli_server.RunError:
        return
    if m.host_ip:
        ipaddress.ip_address(m.host_ip)


volume_text = st.one_of(
    st.text(max_size=30),
    st.builds(lambda h, c, mode: f"{h}:{c}{mode}",
              st.sampled_from(["/data", "data", "", "/", "/a/../..", "//x", "/a b", "~/x",
                               "/with:colon"]),
              st.sampled_from(["/mnt", "mnt", "", "/", "/a/..", "/x:y"]),
              st.sampled_from(["", ":ro", ":rw", ":RO", ":z", ":", ":ro:rw"])))


@FUZZ
@given(text=volume_text)
@counted
def test_parse_volume(text):
    try:
        m = cli_server.parse_volume(text)
    except cli_server.RunError:
        return
    assert m.host_path.startswith("/")
    assert m.container_path
    assert m.readonly == text.endswith(":ro")


user_text = st.one_of(st.text(max_size=12), st.sampled_from(
    ["0", "1000:1000", "root", "nobody:nogroup", ":", "1:", ":1", "-1", "1:-1",
     "99999999999999999999", "1:99999999999999999999", "²", "1:²", "１２"]))


def _user_probe():
    for text in ("²", "99999999999999999999"):
        try:
            cli_server.check_user(text)
        except cli_server.RunError:
            pass


@pytest.mark.xfail(still_failing(_user_probe), strict=True, raises=ValueError, reason=(
    "found here, not fixed here (then in hyperrun/client.py): -u takes any "
    "str.isdigit() text as a number, so ids past int64 (ValueError from protobuf) and "
    "non-ASCII digits such as '²' (ValueError from int) escape as untyped errors"))
@FUZZ
@example(text="99999999999999999999")
@given(text=user_text)
@counted
def test_user_option(text):
    try:
        user = cli_server.check_user(text)
    except cli_server.RunError:
        return
    assert user == text  # passed whole to the guest, which resolves it in the image
    for part in text.split(":", 1):
        if part.isdigit():
            assert part.isascii() and int(part) < 1 << 32


def _hostname_probe():
    name = PodSpec("é" * 40).pod_hostname()
    assert len(name.encode()) <= 63


@pytest.mark.xfail(still_failing(_hostname_probe), strict=True, raises=AssertionError, reason=(
    "found here, not fixed here (hyperrun/sandbox/manager.py is outside this change): a pod "
    "name is cut to 63 characters, not bytes, so a non-ASCII name gives a hostname "
    "sethostname refuses (the guest fails the pod)"))
@FUZZ
@example(name="é" * 40)
@given(name=st.text(min_size=0, max_size=100))
@counted
def test_pod_hostname_from_name(name):
    hostname = PodSpec(name).pod_hostname()
    assert hostname
    assert len(hostname.encode()) <= 63
    assert not hostname.endswith(("-", "."))


@FUZZ
@given(hostname=st.text(min_size=1, max_size=80), name=st.text(max_size=80))
@counted
def test_pod_hostname_given(hostname, name):
    """A hostname the pod asks for is its own (the guest checks it)."""
    assert PodSpec(name, hostname=hostname).pod_hostname() == hostname


# -- the streaming server's SPDY header blocks (before any auth of the stream)

# header names and values are ASCII (HTTP); blocks are written as UTF-8 and
# read as Latin-1, which agree only there
ascii_ = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_name = st.text(alphabet=ascii_, min_size=1, max_size=12).map(str.lower)
header_values = st.lists(st.text(alphabet=ascii_, max_size=12), min_size=1, max_size=3)


@FUZZ
@given(headers=st.dictionaries(header_name, header_values, max_size=5))
@counted
def test_spdy_header_block_round_trip(headers):
    assert spdy.decode_header_block(spdy.encode_header_block(headers)) == headers


@FUZZ
@given(block=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, parts: struct.pack(">I", n) + b"".join(parts),
              st.integers(0, 0xFFFFFFFF),
              st.lists(st.one_of(st.integers(0, 0xFFFFFFFF).map(lambda n: struct.pack(">I", n)),
                                 st.binary(max_size=10)), max_size=8))))
@counted
def test_spdy_header_block_garbage(block):
    """Garbage ends in the errors the session's reader turns into GOAWAY."""
    try:
        headers = spdy.decode_header_block(block)
    except (ValueError, struct.error):
        return
    assert isinstance(headers, dict)
    assert all(isinstance(k, str) and all(isinstance(v, str) for v in vs)
               for k, vs in headers.items())


@FUZZ
@given(cid=st.text(max_size=70), cmd=st.lists(st.text(max_size=10), max_size=4),
       flags=st.lists(st.booleans(), min_size=4, max_size=4),
       ports=st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=4))
@counted
def test_streaming_requests_kept_as_sent(cid, cmd, flags, ports):
    tty, stdin, stdout, stderr = flags
    e = streaming.ExecRequestInfo.from_cri(cri.ExecRequest(
        container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr))
    assert (e.container_id, e.cmd, e.tty, e.stdin, e.stdout, e.stderr) == \
        (cid, cmd, tty, stdin, stdout, stderr)
    a = streaming.AttachRequestInfo.from_cri(cri.AttachRequest(
        container_id=cid, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr))
    assert (a.container_id, a.tty, a.stdin) == (cid, tty, stdin)
    p = streaming.PortForwardRequestInfo.from_cri(cri.PortForwardRequest(
        pod_sandbox_id=cid, port=ports))
    assert (p.sandbox_id, p.ports) == (cid, ports)
