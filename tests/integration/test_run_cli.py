"""`hyperrun run --rootfs` end to end: real QEMU, real guest kernel, the
agent as PID 1, crun in the guest."""
import os
import signal
import subprocess
import time

import pytest

from tests.framework import HYPERRUN, qemu_pids, wait_until
from tests.framework.host import run_dirs
from tests.framework.cli import TERM_TRAP


@pytest.mark.kvm
def test_stdout_stderr_and_exit_code(cli, busybox_rootfs, no_leaks):
    r = cli("run", "--rootfs", str(busybox_rootfs), "--",
            "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.stdout == b"out\n", r
    assert r.stderr == b"err\n", r
    assert r.returncode == 3


@pytest.mark.kvm
def test_stdin_is_relayed_with_eof(cli, busybox_rootfs, no_leaks):
    r = cli("run", "-i", "--rootfs", str(busybox_rootfs), "--", "cat", input=b"abc")
    assert (r.returncode, r.stdout) == (0, b"abc"), r


def test_stdin_closed_without_i(cli, busybox_rootfs):
    r = cli("run", "--rootfs", str(busybox_rootfs), "--", "cat", input=b"abc")
    assert (r.returncode, r.stdout) == (0, b""), r


def test_env_workdir_user(cli, busybox_rootfs):
    r = cli("run", "-e", "FOO=bar baz", "-w", "/tmp", "-u", "app",
            "--rootfs", str(busybox_rootfs), "--",
            "sh", "-c", 'echo "$FOO"; pwd; id -u; id -g; id -G; echo "$HOME"')
    assert r.returncode == 0, r
    assert r.stdout.decode().split("\n") == ["bar baz", "/tmp", "1000", "1000", "1000 100",
                                             "/home/app", ""]


def test_numeric_user_and_group(cli, busybox_rootfs):
    r = cli("run", "-u", "4242:4343", "--rootfs", str(busybox_rootfs), "--",
            "sh", "-c", "id -u; id -g")
    assert r.stdout == b"4242\n4343\n", r


def test_unknown_user_is_a_clear_error(cli, busybox_rootfs, no_leaks):
    r = cli("run", "-u", "nosuchuser", "--rootfs", str(busybox_rootfs), "--", "true")
    assert r.returncode == 125
    assert b"unable to find user nosuchuser" in r.stderr


def test_command_not_found(cli, busybox_rootfs, no_leaks):
    r = cli("run", "--rootfs", str(busybox_rootfs), "--", "/no/such/binary")
    assert r.returncode == 127, r
    assert b"/no/such/binary" in r.stderr


def test_writes_reach_the_rootfs(cli, busybox_rootfs):
    marker = busybox_rootfs / "tmp" / "written-in-vm"
    marker.unlink(missing_ok=True)
    r = cli("run", "--rootfs", str(busybox_rootfs), "--",
            "sh", "-c", "echo hi > /tmp/written-in-vm")
    assert r.returncode == 0, r
    assert marker.read_text() == "hi\n"
    marker.unlink()


def test_tty(cli, busybox_rootfs, no_leaks):
    """-t gives the process a pty of the local terminal's size."""
    code, out = cli.terminal(["run", "-t", "--rootfs", str(busybox_rootfs), "--",
                              "sh", "-c", "tty; stty size; exit 5"], 33, 101)
    assert code == 5, out
    assert b"/dev/pts/0" in out, out
    assert b"33 101" in out, out


@pytest.mark.kvm
def test_signal_proxied_to_container(cli, busybox_rootfs, no_leaks):
    """SIGTERM to `hyperrun run` reaches the container (docker's sig-proxy)."""
    r = cli.signalled(signal.SIGTERM, "run", "--rootfs", str(busybox_rootfs), "--",
                      "sh", "-c", TERM_TRAP)
    assert r.returncode == 7, r
    assert r.stdout == b"got TERM\n"


def test_twenty_runs_leave_nothing_behind(cli, busybox_rootfs, no_leaks):
    for i in range(20):
        r = cli("run", "--rootfs", str(busybox_rootfs), "--", "true")
        assert r.returncode == 0, (i, r)


def test_kill_9_of_run_leaves_no_qemu(cli, busybox_rootfs):
    from hyperrun.paths import run_root

    before = qemu_pids(run_root())  # not other checkouts' VMs
    dirs_before = run_dirs()
    proc = cli.popen("run", "--rootfs", str(busybox_rootfs), "--", "sh", "-c",
                     "echo started; sleep 600", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline() == b"started\n"
    assert qemu_pids(run_root()) - before, "no QEMU was started"
    proc.kill()
    proc.wait()
    wait_until(lambda: qemu_pids(run_root()) - before == set(), 10, "QEMU gone after kill -9")
    # The next run collects the run directory the killed one left.
    r = cli("run", "--rootfs", str(busybox_rootfs), "--", "true")
    assert r.returncode == 0
    assert run_dirs() - dirs_before == set()


def test_output_reader_going_away(busybox_rootfs, no_leaks):
    """`hyperrun run ... | head -1`: the run still ends with the container's
    exit code and leaves nothing behind."""
    r = subprocess.run(f"{HYPERRUN} run --rootfs {busybox_rootfs} -- "
                       "sh -c 'seq 1 200000; exit 4' | head -1; echo ${PIPESTATUS[0]}",
                       shell=True, executable="/bin/bash", capture_output=True, timeout=120)
    assert r.stdout.split() == [b"1", b"4"], r


def test_vm_killed_mid_run_is_reported(cli, busybox_rootfs, no_leaks):
    proc = cli.popen("run", "--rootfs", str(busybox_rootfs), "--", "sh", "-c",
                     "echo started; sleep 600", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    (vm_pid,) = [p for p in qemu_pids() if parent_pid(p) == proc.pid]
    os.kill(vm_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 125
    assert b"the VM ended while the container ran" in err, err


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.kvm
def test_runs_from_a_template_are_distinct_and_leave_nothing(cli, busybox_rootfs, no_leaks,
                                                            tmp_path, monkeypatch):
    """--template: the first run makes the template (a boot), the next ones
    restore it; each clone reseeds its RNG, and exit codes and output work."""
    monkeypatch.setenv("HYPERRUN_TEMPLATES", str(tmp_path / "templates"))
    uuids = set()
    for _ in range(3):
        r = cli("run", "--template", "--rootfs", str(busybox_rootfs), "--",
                "sh", "-c", "cat /proc/sys/kernel/random/uuid; date +%s; exit 3")
        assert r.returncode == 3, r
        uuid, clock = r.stdout.decode().split()
        uuids.add(uuid)
        assert abs(int(clock) - time.time()) < 30
    assert len(uuids) == 3
    (template,) = [p for p in (tmp_path / "templates").iterdir() if not p.name.startswith(".")]
    assert (template / "state").exists()
    assert not (busybox_rootfs / "etc" / "resolv.conf").exists()  # a direct run writes no name files
