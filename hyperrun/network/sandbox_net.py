"""A sandbox's network on the host: a named netns, the CNI network's
interface in it (ADD), and a tap joined to that interface, for QEMU.

    networks = SandboxNetworks(cache_dir=...)
    fd = networks.prepare(sandbox_id)        # the netns and its tap: -netdev tap,fd=N
    info = networks.add(sandbox_id, pod_name=..., pod_namespace=...,
                        port_mappings=[PortMapping(8080, 80)])  # during or after the boot
    ...
    networks.teardown(sandbox_id)          # idempotent; works from the cache alone

The functions block (they exec plugins): call them off the event loop.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from collections.abc import Iterable


from hyperrun import log
from hyperrun.paths import data_root
from hyperrun.specs import PortMapping

from . import cni, default_config, netns, tap
from .projects import ProjectNetworks

logger = log.get("network")

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "hyperrun-"
IFNAME = "eth0"


@dataclass
class NetworkInfo:
    """What the sandbox's VM needs, JSON-serialisable (to_dict/from_dict).
    The guest NIC takes `mac` and `mtu`, the addresses `ips` (with their
    prefix), and `routes` (every one with its gateway)."""
    sandbox_id: str
    network: str          # the CNI network's name
    netns: str            # path of the netns
    interface: str        # the CNI interface in the netns (eth0)
    tap: str              # the tap next to it (open with open_tap)
    mac: str              # the interface's MAC, for the guest NIC
    mtu: int
    ips: list[str] = field(default_factory=list)      # "10.89.0.5/16"
    gateway: str = ""     # of the first IP that has one (IPv4 first)
    routes: list[dict] = field(default_factory=list)  # {"dst": "0.0.0.0/0", "gw": "10.89.0.1"}
    dns: dict = field(default_factory=dict)  # nameservers, domain, search, options

    @property
    def pod_ips(self) -> list[str]:
        return [ip.split("/")[0] for ip in self.ips]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetworkInfo:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> NetworkInfo:
        return cls.from_dict(json.loads(text))


def open_tap(netns_path: str | Path, tap_name: str = tap.TAP_NAME) -> int:
    return tap.open_tap(netns_path, tap_name)


class SandboxNetworks:
    """The networks of this host's sandboxes: where their netns files,
    CNI config, plugins and cache are."""

    def __init__(self, *, conf_dir: Path = cni.DEFAULT_CONF_DIR,
                 bin_dirs: Iterable[str] = cni.DEFAULT_BIN_DIRS,
                 cache_dir: Path | None = None, netns_dir: Path = NETNS_DIR,
                 netns_prefix: str | None = None, ifname: str = IFNAME,
                 tap_name: str = tap.TAP_NAME):
        self.conf_dir = Path(conf_dir)
        self.bin_dirs = tuple(bin_dirs)
        # Persistent, as libcni's: host-local leases survive a reboot, and
        # DEL (from this cache) is what releases them.
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cni"
        self.netns_dir = Path(netns_dir)
        # Each data root's own names: a daemon collects the netns with its
        # prefix and no sandbox as stale, and must not take another
        # daemon's (two on one host: a test instance, say) for its own.
        self.netns_prefix = netns_prefix or \
            f"{NETNS_PREFIX}{hashlib.sha256(str(self.cache_dir).encode()).hexdigest()[:6]}-"
        self.ifname = ifname
        self.tap_name = tap_name
        self.client = cni.Client(self.bin_dirs, self.cache_dir)
        # Compose projects' own networks, beside the cache: in the data root.
        self.projects = ProjectNetworks(self.cache_dir.parent / "networks", self.conf_dir,
                                        self.client, self.ifname)

    def netns_path(self, sandbox_id: str) -> Path:
        return self.netns_dir / f"{self.netns_prefix}{sandbox_id}"

    def setup(self, sandbox_id: str, *, pod_name: str = "", pod_namespace: str = "",
              pod_uid: str = "", port_mappings: Iterable[PortMapping] = ()) -> NetworkInfo:
        """prepare, then add: netns, tap, CNI ADD and the redirects (the tap
        fd is closed: open the tap with open_tap)."""
        os.close(self.prepare(sandbox_id))
        return self.add(sandbox_id, pod_name=pod_name, pod_namespace=pod_namespace,
                        pod_uid=pod_uid, port_mappings=port_mappings)

    def prepare(self, sandbox_id: str) -> int:
        """The sandbox's netns with its tap in it (down, joined to nothing);
        returns the tap's fd, for QEMU (the caller's to close). The CNI
        network comes with add(), which may run while the VM boots, or long
        after (a pooled VM)."""
        path = self.netns_path(sandbox_id)
        if os.path.lexists(path) or self.client.cached(sandbox_id, self.ifname):
            raise FileExistsError(f"sandbox {sandbox_id} already has a network; tear it down first")
        netns.create(path)
        try:
            return netns.run_in(path, tap.create_tap_inside, self.tap_name)
        except BaseException:
            netns.remove(path)
            raise

    def add(self, sandbox_id: str, *, pod_name: str = "", pod_namespace: str = "",
            pod_uid: str = "", port_mappings: Iterable[PortMapping] = (),
            netlist: cni.NetworkConfigList | None = None) -> NetworkInfo:
        """CNI ADD in the prepared netns, and the tap joined to the new
        interface; on the conf dir's network unless netlist is given (a
        project's: projects.py). On any failure, the network (netns
        included) is torn down before the error is raised."""
        path = self.netns_path(sandbox_id)
        args = [("IgnoreUnknown", "1"),  # else bridge and host-local refuse the K8S_ args
                ("K8S_POD_NAMESPACE", pod_namespace), ("K8S_POD_NAME", pod_name),
                ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id)]
        if pod_uid:
            args.append(("K8S_POD_UID", pod_uid))
        ports = [p.to_cni() for p in port_mappings if p.host_port > 0]  # as the kubelet
        att = cni.Attachment(sandbox_id, str(path), self.ifname, tuple(args),
                             {"portMappings": ports} if ports else {})
        try:
            netlist = netlist or cni.load_config(self.conf_dir)
            if not netns.is_netns(path):
                raise FileNotFoundError(f"sandbox {sandbox_id} has no prepared netns at {path}")
            result = self.client.add(netlist, att)
            link = netns.run_in(path, tap.join_tap_inside, self.ifname, self.tap_name)
        except BaseException as e:
            try:
                self.teardown(sandbox_id)
            except Exception as undo:
                e.add_note(f"undoing the network setup failed too: {undo}")
            raise
        return self._info(sandbox_id, netlist.name, str(path), result, link)

    def _info(self, sandbox_id: str, network: str, path: str, result: cni.Result,
              link: tap.Link) -> NetworkInfo:
        ips = result.sandbox_ips(self.ifname, path)
        by_family = sorted(ips, key=lambda ip: ipaddress.ip_interface(ip.address).version)
        gateway = next((ip.gateway for ip in by_family if ip.gateway), "")
        d = result.dns
        return NetworkInfo(
            sandbox_id=sandbox_id, network=network, netns=path, interface=self.ifname,
            tap=self.tap_name, mac=link.mac, mtu=link.mtu, ips=[ip.address for ip in ips],
            gateway=gateway,
            routes=[{"dst": r.dst, "gw": r.gw} for r in result.resolved_routes()],
            dns={"nameservers": list(d.nameservers), "domain": d.domain,
                 "search": list(d.search), "options": list(d.options)})

    def check(self, sandbox_id: str) -> None:
        """CNI CHECK with the cached result; raises CNIError if a plugin
        finds its part missing. (portmap 1.1.1 fails CHECK of an IPv4-only
        pod with port mappings: it looks for the ip6tables chain too.)"""
        entry = self.client.cached(sandbox_id, self.ifname)
        if entry is None or entry.result is None:
            raise cni.CNIError(f"sandbox {sandbox_id} has no network")
        self.client.check(entry.config, entry.attachment, entry.result)

    def teardown(self, sandbox_id: str) -> str:
        """CNI DEL (from the cache: the config, args and result of ADD),
        then the netns, which takes the tap and its filters along; returns
        the name of the CNI network it left ("" if none was cached).
        Idempotent; fine when the netns, the interface or the cache is
        already gone. If a plugin fails, the cache and netns stay so that a
        later teardown can try again."""
        entry = self.client.cached(sandbox_id, self.ifname)
        path = Path(entry.attachment.netns) if entry else self.netns_path(sandbox_id)
        if entry is not None:
            placeholder = not netns.is_netns(path)
            if placeholder:
                # Plugins need a netns to DEL in: the bridge plugin, finding
                # none, releases the IP but leaves its masquerade rules.
                netns.remove(path)
                netns.create(path)
            if entry.result is not None:
                self._stand_in_interface(path, entry)
            self.client.delete(entry.config, entry.attachment, entry.result)
            self.client.forget(sandbox_id, self.ifname)
            logger.info("network deleted", sandbox=sandbox_id, placeholder_netns=placeholder)
        netns.remove(path)
        return entry.config.name if entry is not None else ""

    def _stand_in_interface(self, path: Path, entry: cni.CacheEntry) -> None:
        """If the CNI interface is gone from the netns, put a stand-in with
        the cached addresses there: the bridge and ptp plugins learn which
        masquerade rules to delete from the addresses of the interface they
        delete, and without one they delete none."""
        result = cni.Result.from_dict(entry.result)
        ifname = entry.attachment.ifname
        ips = [ip.address for ip in result.sandbox_ips(ifname, entry.attachment.netns)]
        if ips:
            netns.run_in(path, _add_stand_in, ifname, ips)

    def leftovers(self) -> set[str]:
        """Sandbox ids that have a netns file or a CNI cache entry here."""
        ids = {sid for sid, ifname in self.client.cached_attachments() if ifname == self.ifname}
        try:
            names = os.listdir(self.netns_dir)
        except FileNotFoundError:
            names = []
        ids |= {n[len(self.netns_prefix):] for n in names if n.startswith(self.netns_prefix)}
        return ids

    def collect_stale(self, known_ids: Iterable[str]) -> list[str]:
        """Tear down the networks of sandboxes nobody knows (a crash between
        setup and the record, a record lost); return their ids."""
        stale = sorted(self.leftovers() - set(known_ids))
        collected = []
        for sid in stale:
            try:
                self.teardown(sid)
                collected.append(sid)
            except Exception as e:
                logger.error("stale network kept", sandbox=sid, error=str(e))
        return collected


def _add_stand_in(ifname: str, addresses: list[str]) -> None:
    from pyroute2 import IPRoute  # ~65 ms: only where a tap or a CNI network is made

    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=ifname):
            return
        # A veth pair: always there where the CNI bridge plugin works (no
        # need for the dummy driver, which not every kernel has).
        ipr.link("add", ifname=ifname, kind="veth", peer=f"{ifname}-gone"[:15])
        index = ipr.link_lookup(ifname=ifname)[0]
        for a in addresses:
            iface = ipaddress.ip_interface(a)
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def cni_available(conf_dir: Path = cni.DEFAULT_CONF_DIR,
                  bin_dirs: Iterable[str] = cni.DEFAULT_BIN_DIRS) -> tuple[bool, str]:
    """Whether sandboxes can get CNI networks here, and why (not)."""
    bin_dirs = tuple(bin_dirs)
    if os.geteuid() != 0:
        return False, "not root (netns, CNI plugins and taps need CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return False, "no /dev/net/tun"
    try:
        netlist = cni.load_config(conf_dir)
        where = f"network {netlist.name!r} from {netlist.source}"
    except cni.CNIError as e:
        if cni.config_files(conf_dir):
            return False, str(e)
        existing = next(d for d in (conf_dir, *conf_dir.parents) if d.exists())
        if not os.access(existing, os.W_OK):
            return False, f"no network config in {conf_dir}, and it is not writable"
        netlist = cni.NetworkConfigList.from_dict(default_config.default_conflist())
        where = f"no config in {conf_dir} yet: the default {netlist.name!r} would be installed"
    types = []
    for p in netlist.plugins:
        types.append(p["type"])
        if isinstance(p.get("ipam"), dict) and p["ipam"].get("type"):
            types.append(p["ipam"]["type"])
    for t in dict.fromkeys(types):
        try:
            path = cni.find_plugin(t, bin_dirs)
            versions = cni.plugin_versions(path)
        except (cni.CNIError, OSError, ValueError) as e:
            return False, str(e)
        if netlist.cni_version not in versions:
            return False, (f"plugin {t!r} ({path}) does not support cniVersion "
                           f"{netlist.cni_version} (it does {', '.join(versions)})")
    return True, where
