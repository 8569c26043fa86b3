"""The tap device that is a VM's network card on the host, joined to the
CNI veth inside the sandbox's netns by tc mirred redirects (Kata's
"tcfilter" model): every frame arriving on the veth leaves through the
tap (to QEMU, so the guest), every frame QEMU writes to the tap leaves
through the veth (to the bridge). The netns's own IP stack sees none of
them; the addresses CNI put on the veth stay (so CNI CHECK holds) but
belong to the guest.

Functions named *_inside run in the netns (see netns.run_in).
"""
from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path


from . import netns

TAP_NAME = "tap0"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# QEMU's tap fd= mode probes IFF_VNET_HDR with TUNGETIFF and then sets the
# header size (TUNSETVNETHDRSZ) and offloads itself; without the flag it
# still works, with no checksum/GSO offloads.
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR

INGRESS = 0xFFFF0000  # the ingress qdisc's handle, ffff:
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Link:
    """What the VM takes from the veth: its MAC (the guest NIC's, so the
    bridge and its neighbours see one MAC for the pod) and its MTU."""
    mac: str
    mtu: int


def _tunsetiff(fd: int, name: str, flags: int) -> None:
    ifr = struct.pack("16sH22x", name.encode(), flags)
    fcntl.ioctl(fd, TUNSETIFF, ifr)


def _open_tun() -> int:
    return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)


def create_tap_inside(tap: str = TAP_NAME) -> int:
    """Create the persistent tap `tap` (down, no address, IPv6 off) and
    return the fd it was made with, attached: QEMU's `-netdev tap,fd=N`
    (close-on-exec; the caller closes it once QEMU has it). Using that fd,
    rather than closing it and opening the tap again, matters: a thread
    forking at that moment (a CNI plugin for another pod) holds the closed
    fd until its exec, the tap stays attached, and the second TUNSETIFF
    fails with EBUSY (seen once in 200 soak lifecycles from 4 clients)."""
    fd = _open_tun()
    try:
        _tunsetiff(fd, tap, TAP_FLAGS)
        # Persistent: the device outlives this fd, and so a daemon restart
        # (QEMU keeps its own fd); it goes when the netns goes.
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        _disable_ipv6(tap)
    except BaseException:
        os.close(fd)
        raise
    return fd


def join_tap_inside(ifname: str = "eth0", tap: str = TAP_NAME) -> Link:
    """Give the tap the veth `ifname`'s MTU, bring it up, and redirect each
    one's ingress to the other's egress. QEMU may have the tap open already
    (a VM started before its network was added: see podnet)."""
    from pyroute2 import IPRoute  # ~65 ms: only where a tap or a CNI network is made

    with IPRoute() as ipr:
        veth = ipr.link("get", ifname=ifname)[0]
        link = Link(mac=veth.get("IFLA_ADDRESS"), mtu=veth.get("IFLA_MTU"))
        veth_index = veth["index"]
        tap_index = ipr.link_lookup(ifname=tap)[0]
        ipr.link("set", index=tap_index, mtu=link.mtu, state="up")
        for src, dst in ((veth_index, tap_index), (tap_index, veth_index)):
            ipr.tc("add", "ingress", src)
            ipr.tc("add-filter", "u32", src, parent=INGRESS, prio=1, protocol=ETH_P_ALL,
                   keys=["0x0/0x0+0"], target=0,  # match all; no class
                   action={"kind": "mirred", "direction": "egress", "action": "redirect",
                           "ifindex": dst})
    return link


def _disable_ipv6(dev: str) -> None:
    """The netns's stack would give the tap a link-local address and send
    its DAD/router solicitations to the guest: none of its business."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:  # a kernel without IPv6
        pass


def open_tap_inside(tap: str = TAP_NAME, flags: int = TAP_FLAGS) -> int:
    fd = _open_tun()
    try:
        _tunsetiff(fd, tap, flags)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_tap(netns_path: str | Path, tap: str = TAP_NAME, flags: int = TAP_FLAGS) -> int:
    """Open the sandbox's tap as QEMU's `-netdev tap,fd=N`: /dev/net/tun
    opened inside the netns (a tun file belongs to the netns it was opened
    in) and attached with TUNSETIFF. The fd is close-on-exec; hand it to
    QEMU with pass_fds. The tap is single-queue: a second open while one is
    attached fails with EBUSY."""
    return netns.run_in(Path(netns_path), open_tap_inside, tap, flags)


def tap_flags(fd: int) -> int:
    """The IFF_* flags of an open tap fd (what QEMU reads with TUNGETIFF)."""
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return struct.unpack_from("16sH", ifr)[1]

