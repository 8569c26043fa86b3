"""A pod's network, as the sandbox sees it: which kind it gets, the VM's
network card, and what the guest is told (addresses, routes, DNS).

Kinds:
- "cni":  a netns with the CNI network's interface and a tap joined to it
          (hyperrun/network, docs/NETWORK.md); the pod has an IP that the
          host and other pods reach.
- "user": QEMU's user-mode network (slirp): no root, no host devices; the
          pod reaches out through NAT and is reached only through host port
          forwards. Chosen explicitly, or by "auto" where CNI cannot work
          (the reason is logged).
- "none": loopback only.
"""
from __future__ import annotations

import errno
import ipaddress
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hyperrun import errdefs
from hyperrun import log
from hyperrun.network import NetworkInfo, SandboxNetworks, cni_available, install_default_config
from hyperrun.specs import PROJECT_LABEL, PodSpec, PortMapping
from hyperrun.proto import agent_pb2 as apb
from hyperrun.vm.config import Nic

logger = log.get("network")
KINDS = ("auto", "cni", "user", "none")

# QEMU's user-mode network: the guest's fixed address, gateway and DNS proxy.
USER_MAC = "52:54:00:12:34:56"
USER_IP, USER_GATEWAY, USER_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
# A tap card's MAC until the agent gives it the CNI interface's.
PREPARED_MAC = "52:54:00:00:00:02"


class NetworkUnavailable(errdefs.Conflict):
    pass


class PortAllocated(errdefs.Conflict):
    pass


@dataclass
class PodNetwork:
    """What one sandbox got: kept (as JSON) with the sandbox's record."""
    kind: str
    info: NetworkInfo | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "info": self.info.to_dict() if self.info else None}

    @classmethod
    def from_dict(cls, d: dict | None) -> PodNetwork:
        if not d:
            return cls("none")
        return cls(d["kind"], NetworkInfo.from_dict(d["info"]) if d.get("info") else None)

    @property
    def ip(self) -> str:
        return self.info.pod_ips[0] if self.info and self.info.pod_ips else ""


def host_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's nameservers a VM can reach: loopback ones (a local stub
    resolver) are not reachable from a guest, as Docker also finds."""
    servers = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    if not ipaddress.ip_address(parts[1]).is_loopback:
                        servers.append(parts[1])
                except ValueError:
                    continue
    except OSError:
        pass
    return servers


class PodNetworks:
    def __init__(self, kind: str = "auto", networks: SandboxNetworks | None = None) -> None:
        """kind: the pods' default. Whether CNI works here is found out at
        the first need of it (four plugin runs, ~15 ms): a run without a
        daemon whose pod has no network (direct mode, --network none) then
        never pays for it."""
        if kind not in KINDS:
            raise ValueError(f"network kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.networks = networks or SandboxNetworks()
        self._kind = kind
        self._cni: tuple[bool, str] | None = None
        self._probing = threading.Lock()  # kind_for runs in the loop, prepare in threads
        # Told the gateway of a project network removed (its name server goes).
        self.on_released: Callable[[str], None] = lambda gateway: None

    def _probe(self) -> tuple[bool, str]:
        with self._probing:
            if self._cni is None:
                cni = (False, "not used") if self._kind in ("user", "none") else \
                    cni_available(self.networks.conf_dir, self.networks.bin_dirs)
                if self._kind == "auto":
                    self._kind = "cni" if cni[0] else "user"
                    if not cni[0]:
                        logger.warning("CNI not available: pods get QEMU user-mode networking",
                                       reason=cni[1])
                if self._kind == "cni" and cni[0]:
                    if path := install_default_config(self.networks.conf_dir):
                        logger.info("installed the default CNI network config", path=str(path))
                self._cni = cni
            return self._cni

    @property
    def kind(self) -> str:
        """The pods' default kind ("auto" resolved)."""
        self._probe()
        return self._kind

    @property
    def cni_ok(self) -> bool:
        return self._probe()[0]

    @property
    def cni_reason(self) -> str:
        return self._probe()[1]

    def ready(self) -> tuple[bool, str]:
        """The CRI's NetworkReady condition."""
        if self.kind == "cni":
            return self.cni_ok, self.cni_reason
        return True, f"{self.kind} networking"

    def kind_for(self, spec: PodSpec) -> str:
        """The network kind this pod gets: its own, else the daemon's;
        user mode for a host-network pod."""
        kind = spec.network or self.kind
        if kind not in KINDS:
            raise NetworkUnavailable(f"network kind {kind!r}: expected one of {', '.join(KINDS)}")
        if kind == "auto":
            kind = self.kind
        if kind == "cni" and not self.cni_ok:
            raise NetworkUnavailable(f"CNI networking is not available: {self.cni_reason}")
        if spec.host_network:
            # A VM cannot share the host's network namespace; the nearest
            # thing is NAT out plus host ports, which user mode gives.
            kind = "user"
        return kind

    def prepare(self, sandbox_id: str, kind: str) -> Nic | None:
        """What the VM needs to start, before the pod is known: the card
        and its backend (for "cni", the netns with a tap, not yet joined to
        any network). Blocking: call off the event loop. The Nic's tap fd,
        if any, is the caller's to close once QEMU has it. Its MAC is a
        stand-in: the agent gives the card the pod's (SetupSandbox)."""
        if kind == "none":
            return None
        if kind == "user":
            return Nic("user", USER_MAC)
        return Nic("tap", PREPARED_MAC, tap_fd=self.networks.prepare(sandbox_id))

    def complete(self, sandbox_id: str, kind: str, spec: PodSpec) -> PodNetwork:
        """The pod's network on the prepared backend: CNI ADD and the tap
        joined to it, or the user-mode addresses (the VM adds the host
        port forwards: user_forwards()). Blocking; on failure the network
        (prepared part included) is gone before the error is raised."""
        if kind == "none":
            return PodNetwork("none")
        if kind == "user":
            info = NetworkInfo(sandbox_id, "user", netns="", interface="eth0", tap="",
                               mac=USER_MAC, mtu=1500, ips=[USER_IP], gateway=USER_GATEWAY,
                               routes=[{"dst": "0.0.0.0/0", "gw": USER_GATEWAY}],
                               dns={"nameservers": [USER_DNS]})
            return PodNetwork("user", info)
        add = dict(pod_name=spec.name, pod_namespace=spec.namespace, pod_uid=spec.uid,
                   port_mappings=spec.ports)
        project = spec.labels.get(PROJECT_LABEL)
        if not project:
            return PodNetwork("cni", self.networks.add(sandbox_id, **add))
        projects = self.networks.projects
        with projects.lock():  # not removed between its config and the ADD
            try:
                netlist = projects.ensure(project)
            except BaseException:
                self.networks.teardown(sandbox_id)  # the prepared netns
                raise
            try:
                info = self.networks.add(sandbox_id, netlist=netlist, **add)
            except BaseException:  # add undid its part; a network made for it goes
                self._release(netlist.name)
                raise
        return PodNetwork("cni", info)

    def teardown(self, sandbox_id: str, network: PodNetwork) -> None:
        """Blocking; idempotent. The VM must be gone (its tap fd holds the
        netns). A project's network goes with its last pod."""
        if network.kind == "cni":
            name = self.networks.teardown(sandbox_id)
            if not name and network.info:
                name = network.info.network
            if name:
                self._release(name)

    def _release(self, name: str) -> None:
        gateway = self.networks.projects.gateway(name)
        if self.networks.projects.release(name) and gateway:
            self.on_released(gateway)

    def collect_stale(self, known_ids) -> list[str]:
        stale = self.networks.collect_stale(known_ids)
        for name in sorted(self.networks.projects.names()):
            self._release(name)
        return stale


def _overlap(a: PortMapping, b: PortMapping) -> bool:
    any_ip = ("", "0.0.0.0", "::")
    return (a.protocol, a.host_port) == (b.protocol, b.host_port) and \
        (a.host_ip in any_ip or b.host_ip in any_ip or a.host_ip == b.host_ip)


def _bound_on_host(p: PortMapping) -> bool:
    """Whether a process of the host listens on the port already (QEMU's
    user-mode forwards do; CNI's portmap rules do not, hence the check of
    the pods' own ports as well)."""
    import socket

    kind = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}.get(p.protocol)
    if kind is None:
        return False
    ip = p.host_ip or "0.0.0.0"
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, kind) as s:
        try:
            s.bind((ip, p.host_port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def check_ports(spec: PodSpec, taken: Iterable[PortMapping]) -> None:
    """Refuse a host port another pod has (taken) or a host process
    listens on, as Docker does, rather than a pod that never gets its
    traffic."""
    taken = list(taken)
    for p in spec.ports:
        if p.host_port <= 0:
            continue
        if any(_overlap(p, t) for t in taken) or _bound_on_host(p):
            raise PortAllocated(f"Bind for {p.host_ip or '0.0.0.0'}:{p.host_port} failed: "
                                f"port is already allocated ({p.protocol})")


def user_forwards(network: PodNetwork, spec: PodSpec) -> list[str]:
    """The pod's host ports as QEMU user-mode forward rules
    (`hostfwd_add`'s, `-netdev user,hostfwd=`'s)."""
    if network.kind != "user":
        return []
    return [f"{p.protocol}:{p.host_ip}:{p.host_port}-:{p.container_port}"
            for p in spec.ports if p.host_port > 0 and p.protocol in ("tcp", "udp")]


def setup_request(network: PodNetwork, spec: PodSpec,
                  nameserver: str = "") -> apb.SetupSandboxRequest:
    """What the agent is told: its interfaces, routes and name files. DNS
    is the pod's DNS config; without one, the daemon's name server
    (nameserver: network/dns.py, which knows the pods' names), else the
    host's reachable servers (or QEMU's DNS proxy in user mode)."""
    req = apb.SetupSandboxRequest(hostname=spec.pod_hostname())  # identity: AgentClient.setup_sandbox
    info = network.info
    if info is not None:
        req.interfaces.append(apb.Interface(mac=info.mac, addresses=info.ips, mtu=info.mtu))
        for route in info.routes:
            req.routes.append(apb.Route(destination=route["dst"], gateway=route.get("gw", "")))
    dns = spec.dns
    if dns:
        req.dns.CopyFrom(apb.DNSConfig(servers=dns.servers, searches=dns.searches,
                                       options=dns.options))
    elif network.kind == "user":
        req.dns.servers.append(USER_DNS)
    elif nameserver:
        req.dns.servers.append(nameserver)
    elif network.kind == "cni":
        req.dns.servers.extend(host_nameservers())
    return req
