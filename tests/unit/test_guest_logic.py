"""Agent logic that runs the same on the host: user resolution, OCI specs."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from hyperrun_agent import oci, seccomp, users  # noqa: E402
from hyperrun.proto import agent_pb2 as pb  # noqa: E402


@pytest.fixture
def rootfs(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n"
        "# comment\nweird:x:7:7::\n")
    (tmp_path / "etc/group").write_text(
        "root:x:0:\nstaff:x:50:app,other\napp:x:1001:\nwheel:x:10:root,app\n")
    return str(tmp_path)


def test_resolve_names_numbers_and_groups(rootfs):
    assert users.resolve(rootfs, "") == (0, 0, [10], "/root")
    assert users.resolve(rootfs, "app") == (1000, 1001, [50, 10], "/home/app")
    assert users.resolve(rootfs, "1000") == (1000, 1001, [50, 10], "/home/app")
    assert users.resolve(rootfs, "app:staff") == (1000, 50, [10], "/home/app")
    assert users.resolve(rootfs, "4242") == (4242, 0, [], "/")
    assert users.resolve(rootfs, "4242:99") == (4242, 99, [], "/")
    assert users.resolve(rootfs, "weird") == (7, 7, [], "/")


def test_resolve_errors(rootfs, tmp_path):
    with pytest.raises(users.UserError, match="unable to find user bob"):
        users.resolve(rootfs, "bob")
    with pytest.raises(users.UserError, match="unable to find group nogroup"):
        users.resolve(rootfs, "app:nogroup")
    # No /etc/passwd at all: numbers still work, names do not.
    assert users.resolve(str(tmp_path / "empty"), "0") == (0, 0, [], "/")


def test_process_spec_defaults():
    spec = oci.process_spec(["sh"], ["A=1"], "", 5, 6, [7], "/home/x", terminal=True,
                            rows=24, cols=80)
    assert spec["env"][0].startswith("PATH=/usr/local/sbin")
    assert "HOME=/home/x" in spec["env"] and "TERM=xterm" in spec["env"]
    assert spec["cwd"] == "/"
    assert spec["user"] == {"uid": 5, "gid": 6, "additionalGids": [7]}
    assert spec["consoleSize"] == {"height": 24, "width": 80}
    assert "CAP_SYS_ADMIN" not in spec["capabilities"]["bounding"]
    # The image's own PATH wins.
    assert oci.process_spec(["sh"], ["PATH=/x"], "/", 0, 0, [], "/", False)["env"][0] == "PATH=/x"


def test_container_spec_isolation():
    spec = oci.container_spec("abc", oci.process_spec(["true"], [], "/", 0, 0, [], "/", False),
                              "", readonly=True)
    assert {n["type"] for n in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount",
                                                                "cgroup"}
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["hostname"] == "abc"
    assert spec["linux"]["cgroupsPath"] == "/hyperrun/abc"
    assert spec["linux"]["personality"] == {"domain": "LINUX"}  # randomised maps


def test_privileged_and_shared_namespaces_spec():
    """CRI privileged; pid NODE (the guest's namespace, the agent as PID 1)
    and ipc POD (a namespace the pod's containers share)."""
    proc = oci.process_spec(["true"], [], "/", 0, 0, [], "/", False, privileged=True)
    assert "CAP_SYS_PTRACE" in proc["capabilities"]["effective"] and len(
        proc["capabilities"]["bounding"]) == 41
    spec = oci.container_spec("abc", proc, "", False, privileged=True,
                              joined={"pid": "", "ipc": "/proc/7/ns/ipc"})
    assert "pid" not in {n["type"] for n in spec["linux"]["namespaces"]}
    assert {"type": "ipc", "path": "/proc/7/ns/ipc"} in spec["linux"]["namespaces"]
    assert spec["linux"]["maskedPaths"] == spec["linux"]["readonlyPaths"] == []
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert all("ro" not in m["options"] for m in spec["mounts"])
    plain = oci.container_spec("abc", proc, "", False)
    assert plain["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "/proc/sysrq-trigger" in plain["linux"]["readonlyPaths"]


# The agent's rtnetlink requests against the real kernel, in a network
# namespace of their own (a fresh one has only lo, down).
NETLINK_SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from hyperrun_agent import network
from hyperrun_agent.rtnetlink import Netlink, NetlinkError
subprocess.run(["ip", "tuntap", "add", "eth7", "mode", "tap"], check=True)
out = {}
with Netlink() as nl:
    nl.set_link(network._index("lo"), up=True)
    # The one card other than lo takes the MAC it is asked for.
    name = network._interface_by_mac(nl, "02:00:00:aa:bb:cc")
    index = network._index(name)
    nl.set_link(index, mtu=1400)
    nl.add_address(index, "10.77.0.5/24")
    nl.add_address(index, "fd00:77::5/64")
    nl.set_link(index, up=True)
    nl.replace_route("0.0.0.0/0", "10.77.0.1")
    nl.replace_route("10.99.0.0/16", "", index)
    nl.replace_route("0.0.0.0/0", "10.77.0.254")  # replaced, not added
    try:
        nl.add_address(index, "10.77.0.5/24")
    except NetlinkError as exc:
        out["again"] = exc.errno
    try:
        nl.replace_route("10.98.0.0/16", "10.200.0.1")
    except NetlinkError as exc:
        out["unreachable"] = str(exc)
out["name"] = name
for what in (["-j", "link", "show"], ["-j", "addr", "show", name], ["-j", "route", "show"]):
    out[what[1]] = json.loads(subprocess.run(["ip", *what], capture_output=True,
                                            check=True).stdout)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")
def test_rtnetlink_configures_a_real_interface():
    agent = str(Path(__file__).resolve().parents[2] / "agent")
    # A mount namespace too: /sys/class/net shows the namespace of the
    # sysfs mount, which is remounted there.
    r = subprocess.run(["unshare", "--net", "--mount", "sh", "-c",
                        'mount -t sysfs sysfs /sys && exec "$@"', "-",
                        sys.executable, "-c", NETLINK_SCRIPT, agent],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    links = {link["ifname"]: link for link in out["link"]}
    assert out["name"] == "eth7"
    assert "UP" in links["lo"]["flags"]
    eth = links["eth7"]
    assert eth["address"] == "02:00:00:aa:bb:cc" and eth["mtu"] == 1400
    assert "UP" in eth["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in out["addr"][0]["addr_info"]}
    assert {("10.77.0.5", 24), ("fd00:77::5", 64)} <= addrs
    routes = {(r["dst"], r.get("gateway", ""), r.get("dev")) for r in out["route"]}
    assert ("default", "10.77.0.254", "eth7") in routes
    assert not any(r[0] == "default" and r[1] == "10.77.0.1" for r in routes)
    assert ("10.99.0.0/16", "", "eth7") in routes
    assert out["again"] == errno.EEXIST
    assert "route 10.98.0.0/16 via 10.200.0.1: Network is unreachable" in out["unreachable"]


FIXED_MAPS_CHILD = """
import subprocess, sys
sys.path.insert(0, {agent!r})
from hyperrun_agent import init
print(init.fix_child_maps({cmdline!r}))
print(open("/proc/self/maps").read().count("[stack]"))
for _ in range(2):
    print(subprocess.run(["sh", "-c", "cat /proc/self/personality; grep stack /proc/self/maps"],
                         capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.parametrize("cmdline", ["quiet hyperrun.fixed_maps=1 ro", "quiet ro"])
def test_fixed_maps_for_the_agents_children_only_when_asked(cmdline):
    """The flag the host sets under TCG: the agent's children then start at
    the same addresses every time (their stacks do not move); without it
    they are randomised."""
    agent = str(Path(__file__).resolve().parents[2] / "agent")
    out = subprocess.run([sys.executable, "-c", FIXED_MAPS_CHILD.format(agent=agent, cmdline=cmdline)],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    fixed = out[0] == "True"
    assert fixed == ("hyperrun.fixed_maps=1" in cmdline)
    (persona1, stack1), (persona2, stack2) = (out[2:4], out[5:7])
    assert int(persona1, 16) == int(persona2, 16) == (0x0040000 if fixed else 0)
    assert (stack1 == stack2) == fixed



def test_an_exec_runs_as_the_containers_process():
    """issue 16: an exec'd process was uid 0 with no groups, env or cwd,
    whatever the container's; it inherits them now, each replaced where the
    exec sets it."""
    from hyperrun.proto import agent_pb2 as pb
    from hyperrun_agent.containers import _inherited

    init = pb.Process(args=["server"], env=["PATH=/bin", "FOO=bar"], cwd="/srv",
                      user=pb.User(spec="1001:1001", additional_gids=[5]), terminal=True)
    plain = _inherited(init, pb.Process(args=["id"]))
    assert (list(plain.args), plain.user.spec, list(plain.user.additional_gids), plain.cwd,
            list(plain.env), plain.terminal) == (["id"], "1001:1001", [5], "/srv",
                                                 ["PATH=/bin", "FOO=bar"], False)
    own = _inherited(init, pb.Process(args=["sh"], env=["FOO=baz"], cwd="/tmp", stdin=True,
                                      user=pb.User(spec="0", additional_gids=[7])))
    assert (own.user.spec, list(own.user.additional_gids), own.cwd, list(own.env), own.stdin) == \
        ("0", [5, 7], "/tmp", ["PATH=/bin", "FOO=baz"], True)
    assert list(init.args) == ["server"]  # the container's own is untouched


def test_capabilities_add_and_drop_as_docker():
    """issue 16: --cap-add/--cap-drop (the CRI's capabilities) were ignored."""
    caps = oci.capabilities
    assert caps(False) == oci.DEFAULT_CAPS
    assert caps(True) == oci.ALL_CAPS
    assert "CAP_SYS_ADMIN" in caps(False, add=["SYS_ADMIN"])
    assert "CAP_CHOWN" not in caps(False, drop=["chown"])
    assert caps(False, drop=["ALL"]) == []
    assert caps(False, add=["NET_ADMIN"], drop=["ALL"]) == ["CAP_NET_ADMIN"]
    assert sorted(caps(False, add=["ALL"], drop=["CAP_SYS_ADMIN"])) == \
        sorted(c for c in oci.ALL_CAPS if c != "CAP_SYS_ADMIN")
    with pytest.raises(ValueError, match="unknown capability 'CAP_NOPE'"):
        caps(False, add=["NOPE"])
    spec = oci.process_spec(["sh"], [], "/", 0, 0, [], "/", False, caps=["CAP_KILL"])
    assert spec["capabilities"]["bounding"] == ["CAP_KILL"]


def _denied(spec: dict) -> set[str]:
    return {n for rule in spec.get("syscalls", []) if rule["action"] == "SCMP_ACT_ERRNO"
            for n in rule["names"]}


def test_seccomp_default_and_profiles():
    """issue 16: seccomp was never applied. The runtime's default denies
    what Docker's does, and gives back what a capability makes safe."""
    default = seccomp.runtime_default(oci.DEFAULT_CAPS)
    assert default["defaultAction"] == "SCMP_ACT_ALLOW"
    assert {"mount", "unshare", "keyctl", "reboot", "bpf", "kexec_load"} <= _denied(default)
    assert not {"chroot", "sethostname", "clone", "personality"} & _denied(default)
    admin = seccomp.runtime_default([*oci.DEFAULT_CAPS, "CAP_SYS_ADMIN"])
    assert "mount" not in _denied(admin) and "keyctl" in _denied(admin)

    profile = json.dumps({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
        "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                     {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
                      "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                     {"names": ["chmod"], "action": "SCMP_ACT_ALLOW",
                      "excludes": {"caps": ["CAP_SYS_ADMIN"]}}]})
    spec = seccomp.from_profile(profile, oci.DEFAULT_CAPS)
    if os.uname().machine == "x86_64":
        assert spec["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert (spec["defaultAction"], spec["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    assert [r["names"] for r in spec["syscalls"]] == [["read", "write"], ["chmod"]]
    spec = seccomp.from_profile(profile, ["CAP_SYS_ADMIN"])
    assert [r["names"] for r in spec["syscalls"]] == [["read", "write"], ["mount"]]
    for bad, message in (("{", "not JSON"), ("[]", "no defaultAction"),
                         ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"]}]}',
                          "without an action")):
        with pytest.raises(seccomp.ProfileError, match=message):
            seccomp.from_profile(bad, [])


def test_seccomp_as_the_request_asks():
    asked = pb.CreateContainerRequest(seccomp=pb.Seccomp())
    assert seccomp.linux_seccomp(pb.CreateContainerRequest(), [], False) is None  # unconfined
    assert seccomp.linux_seccomp(asked, [], True) is None  # privileged: none
    assert "mount" in _denied(seccomp.linux_seccomp(asked, [], False))
    spec = oci.container_spec("c", {}, "h", False, seccomp={"defaultAction": "SCMP_ACT_ALLOW"},
                              masked_paths=["/x"], readonly_paths=["/y"])
    assert spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ALLOW"}
    assert (spec["linux"]["maskedPaths"], spec["linux"]["readonlyPaths"]) == (["/x"], ["/y"])
    spec = oci.container_spec("c", {}, "h", False)
    assert "seccomp" not in spec["linux"] and spec["linux"]["maskedPaths"] == oci.MASKED_PATHS
    privileged = oci.container_spec("c", {}, "h", False, privileged=True, masked_paths=["/x"])
    assert privileged["linux"]["maskedPaths"] == []
    proc = oci.process_spec(["sh"], [], "/", 0, 0, [], "/", False, no_new_privileges=True)
    assert proc["noNewPrivileges"] is True
