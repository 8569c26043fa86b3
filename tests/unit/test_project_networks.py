"""A compose project's own network (network/projects.py): names, subnets
apart from the default network, another project's and the host's routes,
kept across a restart, and everything removed with the last pod."""
import json

from hyperrun.network import cni, default_conflist, projects


def test_names_fit_the_kernel_and_differ_per_root_and_project():
    a = projects.bridge_name("/var/lib/hyperrun", "blog")
    assert len(a) == 15 and a.startswith("hr-")
    assert a == projects.bridge_name("/var/lib/hyperrun", "blog")
    assert a != projects.bridge_name("/tmp/other-root", "blog")
    assert a != projects.bridge_name("/var/lib/hyperrun", "blog2")
    assert len(projects.bridge_name("/r", "a-very-long-project-name" * 4)) == 15
    assert projects.network_name("my app/1") == "hyperrun-my-app-1"


def test_subnets_overlap_nothing_taken():
    assert projects.allocate_subnet([]) == "10.90.0.0/24"
    assert projects.allocate_subnet(["10.90.0.0/24", "10.90.1.0/24"]) == "10.90.2.0/24"
    # a wider network taken (the default's, a host route) takes all it covers
    assert projects.allocate_subnet(["10.90.0.0/23", "10.89.0.0/16", "fd00::/64"]) == \
        "10.90.2.0/24"


def test_a_full_pool_is_an_error():
    import pytest
    with pytest.raises(RuntimeError, match="no free"):
        projects.allocate_subnet(["10.90.0.0/16"])


def test_conflist_subnets_and_host_routes(tmp_path):
    conf = default_conflist(subnet="10.89.0.0/16")
    assert projects.conflist_subnets(conf) == ["10.89.0.0/16"]
    assert projects.conflist_subnets({"type": "bridge", "ipam": {"subnet": "10.1.0.0/16"}}) == \
        ["10.1.0.0/16"]
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "br0\t00005A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert projects.host_routes(route) == ["192.168.0.0/24", "10.90.0.0/24"]
    assert projects.host_routes(tmp_path / "missing") == []


class FakeClient:
    def __init__(self):
        self.entries = {}

    def cached_attachments(self):
        return [(sid, "eth0") for sid in self.entries]

    def cached(self, sid, ifname="eth0"):
        return self.entries.get(sid)


def test_made_at_first_use_kept_and_removed_with_the_last_pod(tmp_path, monkeypatch):
    calls = []
    rules = set()

    def iptables(*args):
        calls.append(args)
        op, rule = args[0], args[1:]
        rc = 0
        if op == "-C":
            rc = 0 if rule in rules else 1
        elif op == "-I":
            rules.add(rule)
        elif op == "-D":
            rc = 0 if rule in rules else 1
            rules.discard(rule)
        return type("R", (), {"returncode": rc, "stderr": ""})()
    monkeypatch.setattr(projects, "_iptables", iptables)
    monkeypatch.setattr(projects, "host_routes", lambda: ["10.90.0.0/24"])
    links = []
    monkeypatch.setattr(projects.subprocess, "run", lambda cmd, **kw: links.append(cmd))
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-x.conflist").write_text(json.dumps(default_conflist(
        name="x", bridge="x0", subnet="10.90.1.0/24", mtu=1400)))
    client = FakeClient()
    nets = projects.ProjectNetworks(tmp_path / "networks", conf_dir, client)

    one = nets.ensure("one")
    two = nets.ensure("two")
    state = json.loads((tmp_path / "networks" / "state.json").read_text())
    assert state["hyperrun-one"]["subnet"] == "10.90.2.0/24"  # not the route's, nor the default's
    assert state["hyperrun-two"]["subnet"] == "10.90.3.0/24"
    assert one.name == "hyperrun-one" and one.plugins[0]["bridge"] != two.plugins[0]["bridge"]
    assert one.plugins[0]["mtu"] == 1400
    assert one.plugins[0]["ipam"]["dataDir"] == str(tmp_path / "networks" / "ipam")
    assert (tmp_path / "networks" / "hyperrun-one.conflist").exists()
    assert len(rules) == 4  # into each bridge, and from each to the default network
    assert nets.gateway("hyperrun-one") == "10.90.2.1"

    # A restarted daemon (a new object) finds the same networks.
    again = projects.ProjectNetworks(tmp_path / "networks", conf_dir, client)
    assert again.ensure("one").plugins[0]["ipam"]["ranges"] == one.plugins[0]["ipam"]["ranges"]
    assert len(rules) == 4

    # A pod on it: kept; none: removed, with its rules, bridge, leases and config.
    (tmp_path / "networks" / "ipam" / "hyperrun-one").mkdir(parents=True)
    client.entries["sb"] = cni.CacheEntry(cni.Attachment("sb", "/n", "eth0"), one, None)
    assert not nets.release("hyperrun-one")
    del client.entries["sb"]
    assert nets.release("hyperrun-one")
    assert links == [["ip", "link", "del", one.plugins[0]["bridge"]]]
    assert not (tmp_path / "networks" / "ipam" / "hyperrun-one").exists()
    assert not (tmp_path / "networks" / "hyperrun-one.conflist").exists()
    assert len(rules) == 2 and nets.names() == {"hyperrun-two"}
    assert nets.release_unused() == ["hyperrun-two"] and not rules and nets.names() == set()
    assert not nets.release("hyperrun-one")  # idempotent; a default network's name: no-op
    # Its subnet free again for the next project.
    assert json.loads(json.dumps(nets.ensure("three").plugins[0]["ipam"]["ranges"])) == \
        [[{"subnet": "10.90.2.0/24"}]]
