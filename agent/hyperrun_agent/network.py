"""The sandbox's network inside the guest: interfaces (by MAC), addresses,
routes, loopback, and the name files every container of the pod shares.

Containers share the guest's network namespace (the pod's network, as in
Kubernetes), so the interfaces are configured once, over rtnetlink.
"""
import os
import socket

from .errors import failed, invalid
from .log import log
from .rtnetlink import Netlink, NetlinkError

SANDBOX_DIR = "/run/hyperrun/sandbox"
# Files bound into each container at these paths, if the sandbox has them.
SHARED_FILES = {"hostname": "/etc/hostname", "hosts": "/etc/hosts",
                "resolv.conf": "/etc/resolv.conf"}


def _index(name: str) -> int:
    return socket.if_nametoindex(name)


def _interface_by_mac(nl: Netlink, mac: str) -> str:
    """The interface with this MAC. A VM restored from a template has the
    template's MAC on its one card: that card is given this MAC."""
    others = []
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/address") as f:
                if f.read().strip().lower() == mac.lower():
                    return name
        except OSError:
            continue
        if name != "lo":
            others.append(name)
    if len(others) != 1:
        raise invalid(f"no network interface with MAC {mac}")
    index = _index(others[0])
    # Down first, in a request of its own: the kernel sets an address
    # before it applies flags, and a running card may refuse a new one.
    nl.set_link(index, up=False, what=f"{others[0]} down")
    nl.set_link(index, mac=mac, what=f"{others[0]} address {mac}")
    return others[0]


def _write(name: str, text: str) -> None:
    os.makedirs(SANDBOX_DIR, exist_ok=True)
    path = os.path.join(SANDBOX_DIR, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.chmod(path + ".tmp", 0o644)
    os.rename(path + ".tmp", path)


def setup(req) -> None:
    from . import identity

    identity.reseed(req.entropy)
    identity.set_clock(req.time_ns)
    own_ips = []
    try:
        with Netlink() as nl:
            nl.set_link(_index("lo"), up=True, what="lo up")
            index = 0
            for iface in req.interfaces:
                name = _interface_by_mac(nl, iface.mac)
                index = _index(name)
                if iface.mtu:
                    nl.set_link(index, mtu=iface.mtu, what=f"{name} mtu {iface.mtu}")
                for address in iface.addresses:
                    nl.add_address(index, address)
                    own_ips.append(address.split("/")[0])
                nl.set_link(index, up=True, what=f"{name} up")
            for route in req.routes:
                nl.replace_route(route.destination, route.gateway, 0 if route.gateway else index)
    except NetlinkError as exc:
        raise failed(f"network: {exc.strerror}") from None
    except ValueError as exc:  # an address or a route the host got wrong
        raise invalid(f"network: {exc}") from None
    if not req.hostname:  # identity only (a direct run's clone): no name files
        return
    hostname = req.hostname
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(hostname)
    except OSError as exc:
        log("hostname", exc)
    _write("hostname", hostname + "\n")
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts += [f"{ip}\t{hostname}" for ip in own_ips]
    _write("hosts", "\n".join(hosts + list(req.hosts)) + "\n")
    dns = req.dns
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    _write("resolv.conf", "\n".join(lines) + "\n" if lines else "")


def container_mounts(only_over: str | None = None) -> list[dict]:
    """Bind mounts of the sandbox's name files, for a container's spec;
    with only_over (a container's root), only onto files it has."""
    mounts = []
    for name, destination in SHARED_FILES.items():
        source = os.path.join(SANDBOX_DIR, name)
        if only_over is not None and not os.path.lexists(only_over + destination):
            continue
        if os.path.exists(source):
            mounts.append({"destination": destination, "type": "bind", "source": source,
                           "options": ["rbind", "rprivate"]})  # shared by the pod, as containerd
    return mounts
