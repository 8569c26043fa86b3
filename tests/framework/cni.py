"""A CNI network of a test module's own: a conf dir for the Debian plugins
(bridge, host-local, portmap, firewall), and what it made on the host
removed afterwards."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hyperrun.network import cni_available, default_conflist

from .host import remove_new_chains, sh

# (network name, bridge, subnet) unless a module sets CNI_NETWORK: modules
# that must not share a bridge with concurrent runs of another name theirs.
DEFAULT = ("hrpod", "hrpod0", "10.214.0.0/24")


def cni_network(tmp_path_factory, network: str, bridge: str, subnet: str):
    """Yields (conf dir, host-local leases dir), skipping without root or
    the plugins; then removes the bridge and the chains the network made."""
    if os.geteuid() != 0:
        pytest.skip("not root: netns, CNI plugins and taps need CAP_NET_ADMIN")
    root = tmp_path_factory.mktemp("podnet")
    conf_dir = root / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-test.conflist").write_text(json.dumps(default_conflist(
        name=network, bridge=bridge, subnet=subnet, data_dir=str(root / "ipam"))))
    ok, reason = cni_available(conf_dir)
    if not ok:
        pytest.skip(f"CNI not available: {reason}")
    v4, v6 = sh("iptables-save"), sh("ip6tables-save")
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    yield conf_dir, root / "ipam" / network
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    # Only chains of this network: concurrent runs of other tests share the
    # plugins' chains and have their own.
    mentioning = (f'\\"{network}\\"', subnet.rsplit(".", 1)[0] + ".")
    remove_new_chains("iptables", v4, mentioning)
    remove_new_chains("ip6tables", v6, mentioning)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)
