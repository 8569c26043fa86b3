"""The network config hyperrun installs when the CNI conf dir has none:
a host bridge with NAT to the outside, host ports, and firewall rules that
let pod traffic through a FORWARD chain whose policy is DROP (Docker's)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import cni

NAME = "hyperrun"
FILE_NAME = "10-hyperrun.conflist"
BRIDGE = "hyperrun0"
SUBNET = "10.89.0.0/16"


def default_conflist(*, name: str = NAME, bridge: str = BRIDGE, subnet: str = SUBNET,
                     mtu: int | None = None, data_dir: str | None = None) -> dict:
    """bridge (gateway on the bridge, masquerade, hairpin; host-local IPAM
    with a default route) + portmap (hostPort DNAT, SNAT for hairpin and
    localhost) + firewall (iptables FORWARD accepts for the pod's IPs).
    `mtu` defaults to the plugin's (1500); `data_dir` to host-local's
    (/var/lib/cni/networks)."""
    ipam: dict = {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                  "routes": [{"dst": "0.0.0.0/0"}]}
    if data_dir:
        ipam["dataDir"] = data_dir
    bridge_conf: dict = {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True,
                         "hairpinMode": True, "ipam": ipam}
    if mtu:
        bridge_conf["mtu"] = mtu
    return {"cniVersion": cni.SPEC_VERSION, "name": name, "plugins": [
        bridge_conf,
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        {"type": "firewall"},
    ]}


def install(conf_dir: Path = cni.DEFAULT_CONF_DIR, conflist: dict | None = None) -> Path | None:
    """Write the default conflist into `conf_dir` if it holds no config
    (an admin's config always wins); return the path written, or None."""
    if cni.config_files(conf_dir):
        return None
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / FILE_NAME
    tmp = conf_dir / f".{FILE_NAME}.tmp"  # no config suffix: never read half-written
    tmp.write_text(json.dumps(conflist or default_conflist(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
