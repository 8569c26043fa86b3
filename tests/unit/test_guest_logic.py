"""Agent logic that runs the same on the host: user resolution, OCI specs."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from hyperrun_agent import oci, users  # noqa: E402


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


def test_privileged_and_host_pid_spec():
    """CRI privileged and pid NODE (the guest's namespace, the agent as PID 1)."""
    proc = oci.process_spec(["true"], [], "/", 0, 0, [], "/", False, privileged=True)
    assert "CAP_SYS_PTRACE" in proc["capabilities"]["effective"] and len(
        proc["capabilities"]["bounding"]) == 41
    spec = oci.container_spec("abc", proc, "", False, privileged=True, host_pid=True)
    assert "pid" not in {n["type"] for n in spec["linux"]["namespaces"]}
    assert spec["linux"]["maskedPaths"] == spec["linux"]["readonlyPaths"] == []
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert all("ro" not in m["options"] for m in spec["mounts"])
    plain = oci.container_spec("abc", proc, "", False)
    assert plain["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "/proc/sysrq-trigger" in plain["linux"]["readonlyPaths"]
