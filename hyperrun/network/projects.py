"""A compose project's own CNI network, as docker compose's "one network
per project": made at its first pod, removed with its last one.

Each is the daemon's default conflist (default_config.py) with its own
name (hyperrun-<project>), bridge (hr-<hash>: the kernel's 15 characters,
the hash of the data root and project so that two daemons never share
one) and /24 subnet, taken from POOL so that it overlaps neither the
default network, another project's, nor a route the host has. The
choices are recorded in <root>/state.json (a restarted daemon keeps
them), the conflists beside it, host-local's leases under <root>/ipam.

Pods of two projects do not reach each other: the bridge plugin routes
between bridges, and the firewall plugin accepts whatever a pod sends, so
each network has rules of its own in CNI-ADMIN (_rules) that drop new
connections into its bridge from any other interface and from it to the
default network, unless DNAT'd (published ports stay reachable; replies
and outbound NAT are untouched).

Blocking (plugins, iptables): call off the event loop.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

from hyperrun import log

from . import cni, default_config

logger = log.get("network")
POOL = ipaddress.ip_network("10.90.0.0/16")
NAME_PREFIX = "hyperrun-"
BRIDGE_PREFIX = "hr-"
ADMIN_CHAIN = "CNI-ADMIN"


def network_name(project: str) -> str:
    return NAME_PREFIX + (re.sub(r"[^a-zA-Z0-9_.\-]", "-", project) or "-")


def bridge_name(root: Path | str, project: str) -> str:
    """hr- and 12 hex digits: 15 characters, the kernel's most."""
    digest = hashlib.sha256(f"{root}\0{project}".encode()).hexdigest()
    return BRIDGE_PREFIX + digest[:15 - len(BRIDGE_PREFIX)]


def allocate_subnet(taken: Iterable[str], pool=POOL, prefix: int = 24) -> str:
    """The first /prefix of pool that overlaps no network in taken."""
    used = [ipaddress.ip_network(t, strict=False) for t in taken]
    for subnet in pool.subnets(new_prefix=prefix):
        if not any(subnet.overlaps(u) for u in used if u.version == subnet.version):
            return str(subnet)
    raise RuntimeError(f"no free /{prefix} left in {pool} for a project network")


def conflist_subnets(conflist: dict) -> list[str]:
    """Every subnet a conflist's host-local IPAM hands out."""
    out = []
    for plugin in conflist.get("plugins", [conflist]):
        ipam = plugin.get("ipam") or {}
        if ipam.get("subnet"):
            out.append(ipam["subnet"])
        for rng in ipam.get("ranges") or []:
            out.extend(r["subnet"] for r in rng if r.get("subnet"))
    return out


def host_routes(path: Path = Path("/proc/net/route")) -> list[str]:
    """The host's IPv4 routes (but the default one) as networks."""
    out = []
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) < 8:
            continue
        dst = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(f[7], 16).to_bytes(4, "little"))
        if int(mask):
            out.append(str(ipaddress.ip_network(f"{dst}/{mask}", strict=False)))
    return out


def _iptables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)


class ProjectNetworks:
    def __init__(self, root: Path, default_conf_dir: Path, client: cni.Client,
                 ifname: str = "eth0") -> None:
        """root: where the conflists, state and leases go; client: the
        CNI cache, which tells which pods a network still has."""
        self.root = Path(root)
        self.default_conf_dir = Path(default_conf_dir)
        self.client = client
        self.ifname = ifname
        self._lock = threading.RLock()

    @property
    def _state_path(self) -> Path:
        return self.root / "state.json"

    def _state(self) -> dict:
        try:
            return json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self._state_path)

    def conflist_path(self, name: str) -> Path:
        return self.root / f"{name}.conflist"

    def names(self) -> set[str]:
        return set(self._state())

    def _default(self) -> dict:
        try:
            return cni.load_config(self.default_conf_dir).to_dict()
        except cni.CNIError:
            return default_config.default_conflist()

    def ensure(self, project: str) -> cni.NetworkConfigList:
        """The project's network config, made (and recorded) if new. Hold
        lock() around it and the ADD that uses it."""
        name = network_name(project)
        state = self._state()
        entry = state.get(name)
        if entry is None:
            default = self._default()
            taken = [*conflist_subnets(default), *host_routes(),
                     *(e["subnet"] for e in state.values())]
            mtu = next((p.get("mtu") for p in default.get("plugins", [])
                        if p.get("type") == "bridge"), None)
            entry = {"project": project, "subnet": allocate_subnet(taken),
                     "bridge": bridge_name(self.root, project), "mtu": mtu,
                     "isolated_from": [n for n in conflist_subnets(default) if ":" not in n]}
            state[name] = entry
            self._save(state)
            logger.info("project network made", network=name, bridge=entry["bridge"],
                        subnet=entry["subnet"])
        conflist = default_config.default_conflist(
            name=name, bridge=entry["bridge"], subnet=entry["subnet"], mtu=entry.get("mtu"),
            data_dir=str(self.root / "ipam"))
        path = self.conflist_path(name)
        if not path.exists():
            tmp = self.root / f".{name}.tmp"
            tmp.write_text(json.dumps(conflist, indent=2) + "\n")
            os.replace(tmp, path)
        self._isolate(entry, add=True)
        return cni.NetworkConfigList.from_dict(conflist, str(path))

    def lock(self) -> threading.RLock:
        return self._lock

    def _rules(self, entry: dict) -> list[list[str]]:
        """In CNI-ADMIN, the chain the firewall plugin leaves to admins and
        jumps to before its accepts of each pod: new connections into the
        bridge from any other interface, and out of it to the default
        network's subnets, dropped; DNAT'd ones (published ports) pass."""
        bridge = entry["bridge"]
        new = ["-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT",
               "-m", "comment", "--comment", f"hyperrun project network {bridge}", "-j", "DROP"]
        rules = [[ADMIN_CHAIN, "-o", bridge, "!", "-i", bridge, *new]]
        rules += [[ADMIN_CHAIN, "-i", bridge, "-d", subnet, *new]
                  for subnet in entry.get("isolated_from", [])]
        return rules

    def _isolate(self, entry: dict, *, add: bool) -> None:
        if add:
            _iptables("-N", ADMIN_CHAIN)  # the firewall plugin's, if not made yet
        for rule in self._rules(entry):
            present = _iptables("-C", *rule).returncode == 0
            if add and not present:
                r = _iptables("-I", *rule)
                if r.returncode != 0:
                    raise cni.CNIError(f"iptables: cannot isolate {entry['bridge']}: "
                                       f"{r.stderr.strip()}")
            elif not add:
                while present and _iptables("-D", *rule).returncode == 0:
                    present = _iptables("-C", *rule).returncode == 0

    def in_use(self, name: str) -> bool:
        for sid, ifname in self.client.cached_attachments():
            try:
                entry = self.client.cached(sid, ifname)
            except cni.CNIError:
                continue
            if entry is not None and entry.config.name == name:
                return True
        return False

    def release(self, name: str) -> bool:
        """Remove the network if it is a project's and no pod has it;
        True if removed."""
        with self._lock:
            state = self._state()
            entry = state.get(name)
            if entry is None or self.in_use(name):
                return False
            self._isolate(entry, add=False)
            subprocess.run(["ip", "link", "del", entry["bridge"]], capture_output=True)
            shutil.rmtree(self.root / "ipam" / name, ignore_errors=True)
            self.conflist_path(name).unlink(missing_ok=True)
            del state[name]
            self._save(state)
            logger.info("project network removed", network=name, bridge=entry["bridge"])
            return True

    def gateway(self, name: str) -> str:
        entry = self._state().get(name)
        if entry is None:
            return ""
        return str(next(ipaddress.ip_network(entry["subnet"]).hosts()))

    def release_unused(self) -> list[str]:
        """Every project network with no pod left removed (at start-up)."""
        return [name for name in sorted(self.names()) if self.release(name)]
