"""The CNI client without root: config loading, what each plugin is given
(stdin and environment, checked with a recording stand-in plugin), result
parsing, the cache, errors; and the NetworkInfo record."""
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from hyperrun.network import cni, default_config
from hyperrun.network.sandbox_net import NetworkInfo, PortMapping

RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
                   {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
                   {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x"}],
    "ips": [{"interface": 2, "address": "10.89.0.5/16", "gateway": "10.89.0.1"},
            {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"},
            {"interface": 0, "address": "10.89.0.1/16"}],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "192.168.0.0/16", "gw": "10.89.0.9"}],
    "dns": {"nameservers": ["10.89.0.1"], "search": ["svc.local"]},
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# -- configuration ---------------------------------------------------------------

def test_load_config_takes_the_first_file_in_lexical_order(tmp_path):
    write(tmp_path / "20-b.conflist", {"cniVersion": "1.0.0", "name": "b",
                                       "plugins": [{"type": "bridge"}]})
    write(tmp_path / "10-a.conflist", {"cniVersion": "1.0.0", "name": "a",
                                       "plugins": [{"type": "bridge"}, {"type": "portmap"}]})
    write(tmp_path / "05-ignored.txt", "not a config")
    nl = cni.load_config(tmp_path)
    assert (nl.name, [p["type"] for p in nl.plugins]) == ("a", ["bridge", "portmap"])
    assert nl.source == str(tmp_path / "10-a.conflist")


def test_a_single_conf_is_wrapped_into_a_list(tmp_path):
    write(tmp_path / "10-one.conf", {"cniVersion": "0.4.0", "name": "one", "type": "bridge",
                                     "bridge": "br9"})
    nl = cni.load_config(tmp_path)
    assert (nl.name, nl.cni_version) == ("one", "0.4.0")
    assert nl.plugins == ({"cniVersion": "0.4.0", "name": "one", "type": "bridge",
                           "bridge": "br9"},)


def test_invalid_configs_are_skipped_and_named_when_none_is_valid(tmp_path):
    write(tmp_path / "01-broken.conflist", "{not json")
    write(tmp_path / "02-noname.conflist", {"cniVersion": "1.0.0", "plugins": [{"type": "x"}]})
    write(tmp_path / "03-notype.json", {"cniVersion": "1.0.0", "name": "n", "plugins": [{}]})
    with pytest.raises(cni.CNIError) as e:
        cni.load_config(tmp_path)
    for name in ("01-broken", "02-noname", "03-notype"):
        assert name in str(e.value)
    write(tmp_path / "04-good.conf", {"cniVersion": "1.0.0", "name": "good", "type": "ptp"})
    assert cni.load_config(tmp_path).name == "good"


def test_no_config(tmp_path):
    with pytest.raises(cni.CNIError, match="no network config"):
        cni.load_config(tmp_path / "missing")


def test_plugin_config_injects_name_version_prev_result_and_capabilities():
    nl = cni.NetworkConfigList.from_dict(default_config.default_conflist())
    caps = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 1}}
    bridge, portmap, firewall = nl.plugins
    first = cni.plugin_config(nl, bridge, None, caps)
    assert first["name"] == "hyperrun" and first["cniVersion"] == "1.0.0"
    assert "prevResult" not in first and "runtimeConfig" not in first
    second = cni.plugin_config(nl, portmap, RESULT_1_0, caps)
    assert second["prevResult"] == RESULT_1_0
    # Only the capabilities the plugin declares.
    assert second["runtimeConfig"] == {"portMappings": caps["portMappings"]}
    assert "runtimeConfig" not in cni.plugin_config(nl, firewall, RESULT_1_0, caps)
    # The list's plugins themselves are left as they were.
    assert "name" not in portmap and "prevResult" not in portmap


def test_default_conflist_and_install(tmp_path):
    conf = default_config.default_conflist()
    bridge, portmap, firewall = conf["plugins"]
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "hyperrun")
    assert (bridge["bridge"], bridge["isGateway"], bridge["ipMasq"], bridge["hairpinMode"]) == \
        ("hyperrun0", True, True, True)
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.89.0.0/16"}]]
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    assert firewall["type"] == "firewall"

    path = default_config.install(tmp_path / "net.d")
    assert path == tmp_path / "net.d" / "10-hyperrun.conflist"
    assert json.loads(path.read_text()) == conf
    assert os.listdir(tmp_path / "net.d") == ["10-hyperrun.conflist"]
    # Any config already there wins.
    other = tmp_path / "other"
    other.mkdir()
    write(other / "99-admin.conf", {"cniVersion": "1.0.0", "name": "admin", "type": "ptp"})
    assert default_config.install(other) is None
    assert os.listdir(other) == ["99-admin.conf"]


# -- results -----------------------------------------------------------------------

def test_result_parsing_picks_the_sandbox_interface_and_its_ips():
    r = cni.Result.from_dict(RESULT_1_0)
    assert r.sandbox_interface("eth0", "/run/netns/x") == 2
    assert [ip.address for ip in r.sandbox_ips("eth0", "/run/netns/x")] == \
        ["10.89.0.5/16", "fd00::5/64"]
    assert r.interfaces[2].mac == "aa:aa:aa:aa:aa:03"
    assert r.dns.nameservers == ("10.89.0.1",) and r.dns.search == ("svc.local",)
    # Routes without a gw go through their family's gateway (as the plugins
    # configure the netns).
    assert [(x.dst, x.gw) for x in r.resolved_routes()] == [
        ("0.0.0.0/0", "10.89.0.1"), ("::/0", "fd00::1"), ("192.168.0.0/16", "10.89.0.9")]


def test_older_results():
    r = cni.Result.from_dict({"cniVersion": "0.4.0", "ips": [
        {"version": "4", "address": "10.1.0.2/24", "gateway": "10.1.0.1"}]})
    assert r.sandbox_ips("eth0", "/x")[0].address == "10.1.0.2/24"
    with pytest.raises(cni.CNIError, match="not supported"):
        cni.Result.from_dict({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/24"}})


def test_network_info_is_json_serialisable():
    info = NetworkInfo(sandbox_id="s1", network="hyperrun", netns="/run/netns/hyperrun-s1",
                       interface="eth0", tap="tap0", mac="aa:aa:aa:aa:aa:03", mtu=1500,
                       ips=["10.89.0.5/16"], gateway="10.89.0.1",
                       routes=[{"dst": "0.0.0.0/0", "gw": "10.89.0.1"}],
                       dns={"nameservers": [], "domain": "", "search": [], "options": []})
    assert NetworkInfo.from_json(info.to_json()) == info
    assert info.pod_ips == ["10.89.0.5"]
    # A record written by a newer version (an extra field) still loads.
    assert NetworkInfo.from_dict({**info.to_dict(), "future": 1}) == info


def test_port_mappings_as_cni_wants_them():
    assert PortMapping(8080, 80).to_cni() == {"hostPort": 8080, "containerPort": 80,
                                              "protocol": "tcp"}
    assert PortMapping(53, 53, "UDP", "127.0.0.1").to_cni() == {
        "hostPort": 53, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}


def test_attachment_validates_ids_and_args():
    with pytest.raises(cni.CNIError):
        cni.Attachment("../x", "/n")
    with pytest.raises(cni.CNIError):
        cni.Attachment("ok", "/n", ifname="a-very-long-ifname")
    with pytest.raises(cni.CNIError):
        cni.Attachment("ok", "/n", args=(("K8S_POD_NAME", "a;b"),))


# -- running plugins (a recording stand-in plugin) ------------------------------------

PLUGIN = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    conf = json.load(sys.stdin)
    env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"plugin": os.path.basename(sys.argv[0]), "env": env,
                            "conf": conf}}) + "\\n")
    if conf.get("fail") == env["CNI_COMMAND"]:
        print(json.dumps({{"code": 11, "msg": "it failed", "details": "on purpose"}}))
        sys.exit(1)
    if env["CNI_COMMAND"] == "ADD":
        result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"],
                                             "interfaces": [], "ips": []}}
        result["interfaces"] = result["interfaces"] + [{{"name": conf["type"]}}]
        print(json.dumps(result))
    """)


@pytest.fixture
def plugins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name in ("one", "two", "three"):
        p = bin_dir / name
        p.write_text(PLUGIN.format(python=sys.executable, log=str(log)))
        p.chmod(0o755)

    def calls():
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [json.loads(line) for line in lines]
    return bin_dir, calls


def netlist(**extra):
    return cni.NetworkConfigList.from_dict({"cniVersion": "1.0.0", "name": "net", "plugins": [
        {"type": "one", **extra.get("one", {})},
        {"type": "two", "capabilities": {"portMappings": True}, **extra.get("two", {})},
        {"type": "three", **extra.get("three", {})}]})


ATT = cni.Attachment("sb1", "/run/netns/sb1", "eth0",
                     (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web")),
                     {"portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}]})


def test_add_del_check_order_env_prev_result_and_cache(tmp_path, plugins):
    bin_dir, calls = plugins
    client = cni.Client([str(tmp_path / "nothing"), str(bin_dir)], tmp_path / "cache")
    nl = netlist()
    result = client.add(nl, ATT)
    assert [i.name for i in result.interfaces] == ["one", "two", "three"]
    add = calls()
    assert [c["plugin"] for c in add] == ["one", "two", "three"]
    assert add[0]["env"] == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "sb1",
                             "CNI_NETNS": "/run/netns/sb1", "CNI_IFNAME": "eth0",
                             "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
                             "CNI_PATH": f"{tmp_path / 'nothing'}:{bin_dir}"}
    assert "prevResult" not in add[0]["conf"]
    assert [i["name"] for i in add[2]["conf"]["prevResult"]["interfaces"]] == ["one", "two"]
    assert "runtimeConfig" in add[1]["conf"] and "runtimeConfig" not in add[2]["conf"]

    entry = client.cached("sb1")
    assert entry.attachment == ATT and entry.config == nl
    assert [i["name"] for i in entry.result["interfaces"]] == ["one", "two", "three"]
    assert client.cached_attachments() == [("sb1", "eth0")]

    client.check(entry.config, entry.attachment, entry.result)
    check = calls()
    assert [c["plugin"] for c in check] == ["one", "two", "three"]
    assert all(c["conf"]["prevResult"] == entry.result for c in check)

    client.delete(entry.config, entry.attachment, entry.result)
    dels = calls()
    assert [c["plugin"] for c in dels] == ["three", "two", "one"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in dels)
    assert all(c["conf"]["prevResult"] == entry.result for c in dels)
    assert dels[1]["conf"]["runtimeConfig"] == ATT.capability_args  # portmap needs it on DEL
    client.forget("sb1")
    assert client.cached("sb1") is None and client.cached_attachments() == []


def test_a_failed_add_leaves_the_cache_for_del(tmp_path, plugins):
    bin_dir, _ = plugins
    client = cni.Client([str(bin_dir)], tmp_path / "cache")
    with pytest.raises(cni.CNIError) as e:
        client.add(netlist(three={"fail": "ADD"}), ATT)
    assert (e.value.plugin, e.value.command, e.value.code) == ("three", "ADD", 11)
    assert "it failed" in str(e.value) and "on purpose" in str(e.value)
    # What the plugins before it did is cached for DEL.
    assert [i["name"] for i in client.cached("sb1").result["interfaces"]] == ["one", "two"]


def test_del_calls_every_plugin_and_raises_the_first_error(tmp_path, plugins):
    bin_dir, calls = plugins
    client = cni.Client([str(bin_dir)], tmp_path / "cache")
    with pytest.raises(cni.CNIError, match="'two' DEL"):
        client.delete(netlist(two={"fail": "DEL"}), ATT, None)
    assert [c["plugin"] for c in calls()] == ["three", "two", "one"]


def test_missing_plugin_and_version_query(tmp_path, plugins):
    bin_dir, _ = plugins
    client = cni.Client([str(bin_dir)], tmp_path / "cache")
    nl = cni.NetworkConfigList.from_dict({"cniVersion": "1.0.0", "name": "n",
                                          "plugins": [{"type": "nope"}]})
    with pytest.raises(cni.CNIError, match="'nope' not found"):
        client.add(nl, ATT)
    for real in ("bridge", "portmap", "firewall", "host-local"):
        try:
            path = cni.find_plugin(real, cni.DEFAULT_BIN_DIRS)
        except cni.CNIError:
            continue
        assert "1.0.0" in cni.plugin_versions(path)
