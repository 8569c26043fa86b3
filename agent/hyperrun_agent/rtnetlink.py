"""The few rtnetlink requests the guest's network needs: a link up or
down, its MTU and MAC, an address, a route.

Spoken directly on a NETLINK_ROUTE socket rather than through `ip`: under
TCG each `ip` costs a fork and an exec, 10 ms in a warm guest and several
times that in a VM just restored from a template, whose translations all
start cold; a sandbox on a CNI network needs six or seven of them. A
library (pyroute2) would cost the guest image megabytes and its imports.
"""
import errno
import ipaddress
import os
import socket
import struct

NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")      # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")     # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")      # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")   # rtmsg: family, dst/src len, tos, table, protocol,
                                       # scope, type, flags
_RTATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel refused a request; errno and strerror are its answer."""


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _family(address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class Netlink:
    """One NETLINK_ROUTE socket; each request waits for its kernel ack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> None:
        self.seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind,
                                    flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EPROTO, f"{what}: malformed netlink reply")
                if mtype == NLMSG_ERROR and seq == self.seq:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code:
                        raise NetlinkError(-code, f"{what}: {os.strerror(-code)}")
                    return
                offset += (length + 3) & ~3

    def set_link(self, index: int, up: bool | None = None, mtu: int = 0,
                 mac: str = "", what: str = "") -> None:
        """`ip link set DEV [up|down] [mtu N] [address MAC]`."""
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        attrs = b""
        if mtu:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if mac:
            attrs += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        self.request(RTM_NEWLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)
                     + attrs, what or f"link {index}")

    def add_address(self, index: int, cidr: str) -> None:
        """`ip addr add CIDR dev DEV`."""
        iface = ipaddress.ip_interface(cidr)
        packed = iface.ip.packed
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                     _IFADDR.pack(_family(iface.ip), iface.network.prefixlen, 0,
                                  RT_SCOPE_UNIVERSE, index)
                     + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed),
                     f"address {cidr}")

    def replace_route(self, destination: str, gateway: str = "", index: int = 0) -> None:
        """`ip route replace DEST [via GW] [dev DEV]`: through a gateway, or
        on the link when there is none."""
        network = ipaddress.ip_network(destination, strict=False)
        attrs = b""
        if network.prefixlen:
            attrs += _attr(RTA_DST, network.network_address.packed)
        if gateway:
            attrs += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if index:
            attrs += _attr(RTA_OIF, struct.pack("=i", index))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
                     _RTMSG.pack(_family(network.network_address), network.prefixlen, 0, 0,
                                 RT_TABLE_MAIN, RTPROT_BOOT,
                                 RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK,
                                 RTN_UNICAST, 0) + attrs,
                     f"route {destination}" + (f" via {gateway}" if gateway else ""))
