"""A CNI client (spec 1.0.0, as libcni): load a network configuration
list, exec its plugins for ADD/DEL/CHECK, cache ADD results, parse them.

Spec facts this relies on:
- a plugin is exec'd with its network config JSON on stdin and the
  CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and
  CNI_PATH environment variables (and the rest of ours: plugins find
  iptables on PATH);
- a list's plugins run in order for ADD and CHECK, in reverse for DEL;
  each gets the list's `name` and `cniVersion`, and `prevResult`: the
  previous plugin's result for ADD, the cached ADD result for DEL/CHECK;
- capability args (`portMappings`, ...) go into `runtimeConfig` of the
  plugins whose `capabilities` declare them;
- a failure is a non-zero exit with {"code", "msg", "details"} on stdout.

The cache (libcni keeps it in /var/lib/cni/results) holds what DEL needs
after a daemon restart: the config used, the args, the capability args
and the result. It is written before the first plugin runs and after each
one, so a crash in the middle of ADD still leaves DEL enough to undo it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from hyperrun import errdefs

SPEC_VERSION = "1.0.0"
DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
CONF_SUFFIXES = (".conflist", ".conf", ".json")
PLUGIN_TIMEOUT_S = 60.0
CACHE_KIND = "hyperrun-cni-cache-v1"
# The spec's rule for container ids; ifnames are the kernel's (< 16 bytes).
CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class CNIError(errdefs.Unavailable):
    """A plugin failed, or the configuration is unusable."""

    def __init__(self, msg: str, *, plugin: str = "", command: str = "", code: int = 0,
                 details: str = ""):
        self.plugin, self.command, self.code = plugin, command, code
        self.msg, self.details = msg, details
        where = f"CNI plugin {plugin!r} {command}: " if plugin else ""
        text = f"{where}{msg}" + (f" ({details})" if details else "")
        super().__init__(text + (f" [code {code}]" if code else ""))


# -- configuration -----------------------------------------------------------

@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: tuple[dict, ...]
    disable_check: bool = False
    source: str = ""  # the file it came from

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> NetworkConfigList:
        """A .conflist's JSON, or a single plugin's (.conf), wrapped in a
        list as libcni's ConfListFromConf does."""
        if not isinstance(data, dict):
            raise CNIError(f"{source or 'config'}: not a JSON object")
        if "plugins" not in data:
            data = {"cniVersion": data.get("cniVersion", ""), "name": data.get("name", ""),
                    "plugins": [data]}
        name, version, plugins = data.get("name"), data.get("cniVersion"), data.get("plugins")
        if not name or not isinstance(name, str):
            raise CNIError(f"{source or 'config'}: no network name")
        if not version or not isinstance(version, str):
            raise CNIError(f"{source or 'config'}: no cniVersion")
        if not isinstance(plugins, list) or not plugins:
            raise CNIError(f"{source or 'config'}: no plugins")
        for p in plugins:
            if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
                raise CNIError(f"{source or 'config'}: a plugin without a type")
        return cls(name=name, cni_version=version, plugins=tuple(plugins),
                   disable_check=bool(data.get("disableCheck", False)), source=source)

    def to_dict(self) -> dict:
        d = {"cniVersion": self.cni_version, "name": self.name, "plugins": list(self.plugins)}
        if self.disable_check:
            d["disableCheck"] = True
        return d


def config_files(conf_dir: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    return [conf_dir / n for n in names
            if n.endswith(CONF_SUFFIXES) and (conf_dir / n).is_file()]


def load_config(conf_dir: Path = DEFAULT_CONF_DIR) -> NetworkConfigList:
    """The first valid config file in lexical order, as kubelet and
    containerd choose; invalid ones are skipped (and named if none is)."""
    skipped = []
    for path in config_files(conf_dir):
        try:
            return NetworkConfigList.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, ValueError, CNIError) as e:
            skipped.append(f"{path.name}: {e}")
    if skipped:
        raise CNIError(f"no valid network config in {conf_dir}: " + "; ".join(skipped))
    raise CNIError(f"no network config in {conf_dir}")


def find_plugin(plugin_type: str, bin_dirs: tuple[str, ...] | list[str]) -> Path:
    if "/" in plugin_type:
        raise CNIError(f"bad plugin type {plugin_type!r}")
    for d in bin_dirs:
        path = Path(d) / plugin_type
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise CNIError(f"plugin {plugin_type!r} not found in {':'.join(bin_dirs)}")


def plugin_versions(path: Path) -> list[str]:
    """The spec versions a plugin supports (CNI_COMMAND=VERSION)."""
    env = _environ({"CNI_COMMAND": "VERSION"})
    out = subprocess.run([str(path)], input=b"{}", env=env, capture_output=True,
                         timeout=PLUGIN_TIMEOUT_S)
    if out.returncode != 0:
        raise _plugin_error(path.name, "VERSION", out)
    return json.loads(out.stdout).get("supportedVersions", [])


# -- results -----------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path; empty for host-side interfaces


@dataclass(frozen=True)
class IPConfig:
    address: str          # with prefix, "10.89.0.5/16"
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str = ""


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        """A 0.3.x/0.4.0/1.0.0 result (the same shape; 0.3/0.4 add a
        per-IP "version", ignored). 0.1/0.2 results ("ip4") are refused."""
        if "ip4" in data or "ip6" in data:
            raise CNIError(f"result version {data.get('cniVersion')!r} is not supported "
                           "(use cniVersion 0.3.0 or later)")
        ifaces = tuple(Interface(i.get("name", ""), i.get("mac", ""), i.get("sandbox", ""))
                       for i in data.get("interfaces") or ())
        ips = tuple(IPConfig(ip["address"], ip.get("gateway", ""), ip.get("interface"))
                    for ip in data.get("ips") or ())
        routes = tuple(Route(r["dst"], r.get("gw", "")) for r in data.get("routes") or ())
        d = data.get("dns") or {}
        dns = DNS(tuple(d.get("nameservers") or ()), d.get("domain", ""),
                  tuple(d.get("search") or ()), tuple(d.get("options") or ()))
        return cls(data.get("cniVersion", ""), ifaces, ips, routes, dns)

    def sandbox_interface(self, ifname: str, netns: str) -> int | None:
        """The index of the interface inside the netns (the pod's eth0)."""
        for i, iface in enumerate(self.interfaces):
            if iface.name == ifname and iface.sandbox == netns:
                return i
        for i, iface in enumerate(self.interfaces):  # a plugin that names no sandbox path
            if iface.name == ifname and iface.sandbox:
                return i
        return None

    def sandbox_ips(self, ifname: str, netns: str) -> tuple[IPConfig, ...]:
        """The IPs of the pod's interface; IPs that name no interface count
        as the pod's (the spec lets plugins omit the index)."""
        idx = self.sandbox_interface(ifname, netns)
        return tuple(ip for ip in self.ips if ip.interface is None or ip.interface == idx)

    def resolved_routes(self) -> tuple[Route, ...]:
        """Routes with their gateway filled in: a route without `gw` goes
        through the gateway of the first IP of its family, as the plugins
        (ipam.ConfigureIface) configure it in the netns."""
        gws: dict[int, str] = {}
        for ip in self.ips:
            if ip.gateway:
                gws.setdefault(ipaddress.ip_interface(ip.address).version, ip.gateway)
        out = []
        for r in self.routes:
            version = ipaddress.ip_network(r.dst, strict=False).version
            out.append(Route(r.dst, r.gw or gws.get(version, "")))
        return tuple(out)


# -- running plugins -----------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """One container's attachment to one network: libcni's RuntimeConf."""
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS, in order
    capability_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if not CONTAINER_ID.match(self.container_id):
            raise CNIError(f"bad container id {self.container_id!r}")
        if not self.ifname or len(self.ifname) > 15 or "/" in self.ifname:
            raise CNIError(f"bad interface name {self.ifname!r}")
        for k, v in self.args:
            if any(c in s for s in (k, v) for c in ";="):
                raise CNIError(f"bad CNI_ARGS entry {k}={v}")

    def to_dict(self) -> dict:
        return {"containerId": self.container_id, "netns": self.netns, "ifName": self.ifname,
                "cniArgs": [list(a) for a in self.args],
                "capabilityArgs": self.capability_args}

    @classmethod
    def from_dict(cls, d: dict) -> Attachment:
        return cls(d["containerId"], d["netns"], d["ifName"],
                   tuple((k, v) for k, v in d.get("cniArgs") or ()),
                   dict(d.get("capabilityArgs") or {}))


def _environ(cni: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(cni)
    return env


def _plugin_error(plugin: str, command: str, out: subprocess.CompletedProcess) -> CNIError:
    stderr = out.stderr.decode(errors="replace").strip()
    try:
        err = json.loads(out.stdout)
        return CNIError(err.get("msg") or stderr or f"exit status {out.returncode}",
                        plugin=plugin, command=command, code=int(err.get("code") or 0),
                        details=err.get("details") or "")
    except (ValueError, AttributeError):
        text = (out.stdout.decode(errors="replace").strip() + "\n" + stderr).strip()
        return CNIError(text or f"exit status {out.returncode}", plugin=plugin,
                        command=command)


def plugin_config(netlist: NetworkConfigList, plugin: dict, prev_result: dict | None,
                  capability_args: dict) -> dict:
    """The stdin of one plugin: its own config, the list's name and
    version, prevResult, and the capability args it declares."""
    conf = dict(plugin)
    conf["name"] = netlist.name
    conf["cniVersion"] = netlist.cni_version
    if prev_result is not None:
        conf["prevResult"] = prev_result
    caps = plugin.get("capabilities") or {}
    runtime = {k: v for k, v in capability_args.items() if caps.get(k)}
    if runtime:  # as libcni: replaces a static runtimeConfig, else leaves it
        conf["runtimeConfig"] = runtime
    return conf


class Client:
    """Runs a network's plugins for attachments, with a result cache."""

    def __init__(self, bin_dirs: tuple[str, ...] | list[str] = DEFAULT_BIN_DIRS,
                 cache_dir: Path | None = None, timeout: float = PLUGIN_TIMEOUT_S):
        self.bin_dirs = tuple(bin_dirs)
        self.cache_dir = cache_dir
        self.timeout = timeout

    def _exec(self, command: str, netlist: NetworkConfigList, plugin: dict, att: Attachment,
              prev_result: dict | None) -> dict | None:
        ptype = plugin["type"]
        path = find_plugin(ptype, self.bin_dirs)
        conf = plugin_config(netlist, plugin, prev_result, att.capability_args)
        env = _environ({
            "CNI_COMMAND": command, "CNI_CONTAINERID": att.container_id,
            "CNI_NETNS": att.netns, "CNI_IFNAME": att.ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in att.args),
            "CNI_PATH": ":".join(self.bin_dirs)})
        try:
            out = subprocess.run([str(path)], input=json.dumps(conf).encode(), env=env,
                                 capture_output=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise CNIError(f"no answer in {self.timeout:.0f} s", plugin=ptype,
                           command=command) from None
        if out.returncode != 0:
            raise _plugin_error(ptype, command, out)
        if command != "ADD":
            return None
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise CNIError(f"result is not JSON: {out.stdout[:200]!r}", plugin=ptype,
                           command=command) from None

    def add(self, netlist: NetworkConfigList, att: Attachment) -> Result:
        """ADD each plugin in order. On failure the cache keeps what DEL
        needs; the caller undoes with delete()."""
        self._store(netlist, att, None)
        result = None
        for plugin in netlist.plugins:
            result = self._exec("ADD", netlist, plugin, att, result)
            self._store(netlist, att, result)
        return Result.from_dict(result or {})

    def delete(self, netlist: NetworkConfigList, att: Attachment,
               cached_result: dict | None) -> None:
        """DEL each plugin in reverse order, each given the cached ADD
        result. Every plugin is called even when one fails (a failed
        portmap must not keep host-local from releasing the address); the
        first error is raised after."""
        errors = []
        for plugin in reversed(netlist.plugins):
            try:
                self._exec("DEL", netlist, plugin, att, cached_result)
            except CNIError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def check(self, netlist: NetworkConfigList, att: Attachment, cached_result: dict) -> None:
        """CHECK each plugin in order (spec 0.4.0 and later; skipped when
        the list says disableCheck)."""
        if netlist.disable_check or _version_tuple(netlist.cni_version) < (0, 4, 0):
            return
        for plugin in netlist.plugins:
            self._exec("CHECK", netlist, plugin, att, cached_result)

    # The cache: one file per attachment.

    def _cache_path(self, container_id: str, ifname: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{container_id}-{ifname}.json"

    def _store(self, netlist: NetworkConfigList, att: Attachment, result: dict | None) -> None:
        path = self._cache_path(att.container_id, att.ifname)
        if path is None:
            return
        entry = {"kind": CACHE_KIND, **att.to_dict(), "config": netlist.to_dict(),
                 "result": result}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def cached(self, container_id: str, ifname: str = "eth0") -> CacheEntry | None:
        path = self._cache_path(container_id, ifname)
        if path is None:
            return None
        try:
            return CacheEntry.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, CNIError) as e:
            raise CNIError(f"unreadable cache {path}: {e}") from None

    def forget(self, container_id: str, ifname: str = "eth0") -> None:
        path = self._cache_path(container_id, ifname)
        if path is not None:
            path.unlink(missing_ok=True)

    def cached_attachments(self) -> list[tuple[str, str]]:
        """(container id, ifname) of every cache entry."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        out = []
        for path in sorted(self.cache_dir.glob("*.json")):
            try:
                d = json.loads(path.read_text())
                out.append((d["containerId"], d["ifName"]))
            except (OSError, ValueError, KeyError):
                continue
        return out


@dataclass(frozen=True)
class CacheEntry:
    attachment: Attachment
    config: NetworkConfigList
    result: dict | None  # None: ADD started but no plugin finished

    @classmethod
    def from_dict(cls, d: dict) -> CacheEntry:
        if d.get("kind") != CACHE_KIND:
            raise CNIError(f"unknown cache kind {d.get('kind')!r}")
        return cls(Attachment.from_dict(d), NetworkConfigList.from_dict(d["config"]),
                   d.get("result"))


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)
