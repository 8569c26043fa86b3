"""The sandbox API against a real VM: the agent's RPCs, QMP, reconnects.
The tests are async: `sandbox` (a booted VM with the busybox tree as its
"rootfs" share) and `sandbox_factory` boot on their event loop, and destroy
every VM at the end."""
import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from hyperrun.channel import frame
from hyperrun.channel.agent import AgentClient
from hyperrun.channel.ttrpc import TtrpcError
from hyperrun.proto import agent_pb2 as pb
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.sandbox.sandbox import Sandbox
from hyperrun.vm import VMError
from hyperrun.vm.config import Share, vsock_available
from hyperrun.vm.qemu import QemuVM
from tests.framework import await_condition, wait_until

ROOTFS = pb.Storage(source="rootfs", fstype="9p")


async def read_all(agent, stream, cid, eid=""):
    out = b""
    while data := await agent.read_stream(stream, cid, eid):
        out += data
    return out


@pytest.mark.kvm
async def test_sandbox_lifecycle_and_agent_api(sandbox, no_leaks):
    sb = sandbox
    assert await sb.vm.status() == "running"
    details = await sb.agent.guest_details()
    assert details.kernel_release.startswith("6.1")
    assert {"cpu", "memory", "pids"} <= set(details.cgroup_controllers)
    assert details.crun_version.startswith("crun version")
    assert sb.vm.run_dir.stat().st_mode & 0o777 == 0o700
    serial = sb.vm.config.channel.kind == "serial"  # vsock needs no socket file
    for name in ("qmp.sock", "qemu.pid", "console.log") + (("agent.sock",) if serial else ()):
        assert (sb.vm.run_dir / name).exists(), name

    # A long-running container, signalled to death inside the VM.
    await sb.agent.create_container("c1", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("c1")
    wait = asyncio.create_task(sb.agent.wait_process("c1"))

    # Exec while the init blocks in WaitProcess: calls multiplex.
    await sb.agent.exec_process("c1", "e1", pb.Process(
        args=["sh", "-c", "read x; echo got $x; echo oops >&2; exit 4"], stdin=True))
    await sb.agent.write_stdin("c1", "e1", b"hello\n")
    await sb.agent.close_stdin("c1", "e1")
    out, err = await asyncio.gather(read_all(sb.agent, "stdout", "c1", "e1"),
                                    read_all(sb.agent, "stderr", "c1", "e1"))
    assert (out, err) == (b"got hello\n", b"oops\n")
    assert (await sb.agent.wait_process("c1", "e1")).exit_code == 4
    # Waited and read to the end: the agent has forgotten it.
    with pytest.raises(TtrpcError) as e:
        await sb.agent.wait_process("c1", "e1")
    assert e.value.code == frame.NOT_FOUND

    # Concurrent execs, each with its own output.
    async def echo(i):
        await sb.agent.exec_process("c1", f"x{i}", pb.Process(args=["echo", str(i)]))
        data = await read_all(sb.agent, "stdout", "c1", f"x{i}")
        return data, (await sb.agent.wait_process("c1", f"x{i}")).exit_code
    results = await asyncio.gather(*(echo(i) for i in range(5)))
    assert results == [(f"{i}\n".encode(), 0) for i in range(5)]

    assert not wait.done()
    await sb.agent.signal_process("c1", "", signal.SIGKILL)
    status = await wait
    assert (status.exit_code, status.signal) == (137, 9)

    with pytest.raises(TtrpcError) as e:
        await sb.agent.start_container("nope")
    assert e.value.code == frame.NOT_FOUND
    with pytest.raises(TtrpcError) as e:
        await sb.agent.create_container("../x", ROOTFS, pb.Process(args=["true"]))
    assert e.value.code == frame.INVALID_ARGUMENT

    await sb.agent.remove_container("c1")
    with pytest.raises(TtrpcError):
        await sb.agent.wait_process("c1")
    await sb.destroy()
    assert not sb.vm.run_dir.exists()
    assert sb.vm.exited


async def test_freed_guest_memory_goes_back_to_the_host(sandbox, no_leaks):
    """Free page reporting: 60 MiB a container fills and frees leave QEMU's
    RAM again (without it, a booted VM keeps every page it ever touched)."""
    from hyperrun.vm.memory import guest_ram_kib

    sb = sandbox

    def resident_mib() -> float:
        return guest_ram_kib(sb.vm.pid, sb.vm.config.memory_mib) / 1024

    await sb.agent.create_container("c1", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("c1")
    before = resident_mib()

    async def sh(eid: str, script: str) -> None:
        await sb.agent.exec_process("c1", eid, pb.Process(args=["sh", "-c", script]))
        assert (await sb.agent.wait_process("c1", eid)).exit_code == 0

    # A file in the container's tmpfs holds its pages until removed.
    await sh("fill", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 2>/dev/null")
    filled = resident_mib()
    assert filled - before > 50, (before, filled)
    await sh("rm", "rm /dev/shm/fill")
    # The guest reports freed blocks 2 s after they are freed.
    await await_condition(lambda: resident_mib() <= before + 20, 30,
                          f"RAM back from {filled:.0f} MiB to {before:.0f} + 20",
                          interval=0.5, state=resident_mib)


async def test_setid_bits_do_not_reach_the_host(sandbox, busybox_rootfs, no_leaks):
    """A guest's root cannot leave a set-ID file in a writable share (a
    volume, a --rootfs tree) for the host's users to run: QEMU's 9p server
    runs under a filter that refuses set-ID modes (vm/setid.py), stacked
    on QEMU's own; other modes go through."""
    import stat

    sb = sandbox
    try:
        status = _status(sb.vm.pid)
        assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "2", status
        await sb.agent.create_container("c1", ROOTFS, pb.Process(args=["sleep", "300"]))
        await sb.agent.start_container("c1")
        script = ("cd /tmp && rm -rf sid sgd && touch sid && chmod 4755 sid; echo u=$?; "
                  "chmod 2755 sid; echo g=$?; chmod 0750 sid; echo plain=$?; "
                  "mkdir sgd && chmod 2775 sgd; echo dir=$?; chmod 0700 sgd; echo pdir=$?")
        await sb.agent.exec_process("c1", "e", pb.Process(args=["sh", "-c", script]))
        out, err = await asyncio.gather(read_all(sb.agent, "stdout", "c1", "e"),
                                        read_all(sb.agent, "stderr", "c1", "e"))
        assert out == b"u=1\ng=1\nplain=0\ndir=1\npdir=0\n", (out, err)
        assert err.count(b"Operation not permitted") == 3, err
        host = busybox_rootfs / "tmp"
        assert stat.S_IMODE((host / "sid").stat().st_mode) == 0o750
        assert stat.S_IMODE((host / "sgd").stat().st_mode) == 0o700
    finally:
        for name in ("sid", "sgd"):
            path = busybox_rootfs / "tmp" / name
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()


@pytest.mark.kvm
async def test_agent_serves_a_reconnecting_host(sandbox, no_leaks):
    """The host side disconnects (as a restarting daemon would) and a new
    session on the same socket finds the agent and its containers."""
    sb = sandbox
    await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("c")
    for _ in range(3):
        await sb.agent.close()
        sb.agent = AgentClient("again")
        await sb.agent.connect(sb.agent_opener())
        assert await sb.agent.health(timeout=30)
        await sb.agent.exec_process("c", f"e{os.urandom(3).hex()}", pb.Process(args=["true"]))


async def test_tty_exec_and_resize(sandbox, no_leaks):
    sb = sandbox
    await sb.agent.create_container("t", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("t")
    await sb.agent.exec_process("t", "sh", pb.Process(
        args=["sh"], terminal=True, stdin=True,
        console_size=pb.ConsoleSize(rows=20, cols=70)))
    await sb.agent.resize_tty("t", "sh", 40, 120)
    await sb.agent.write_stdin("t", "sh", b"stty size; exit 3\n")
    out = await read_all(sb.agent, "stdout", "t", "sh")
    assert b"40 120" in out, out
    assert (await sb.agent.wait_process("t", "sh")).exit_code == 3


@pytest.mark.kvm
async def test_vm_dying_is_noticed(sandbox, no_leaks):
    sb = sandbox
    await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("c")
    wait = asyncio.create_task(sb.agent.wait_process("c"))
    # The call is in the agent's hands (sent whole) before its VM dies.
    await await_condition(lambda: sb.agent.session.in_flight == 1, 10, "WaitProcess sent")
    os.kill(sb.vm.pid, signal.SIGKILL)
    await asyncio.wait_for(sb.vm.wait_exited(), 10)
    assert sb.vm.exited
    from hyperrun.channel.ttrpc import ConnectionLost
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(wait, 10)


@pytest.mark.kvm
async def test_a_vm_whose_agent_never_answers_fails_its_boot_once_idle(sandbox_factory, no_leaks):
    """A guest that boots but serves no agent (here its init is a shell
    waiting on the console) is reported once it has done nothing for
    BOOT_IDLE_S, with its console, and removed: the boot's deadline is
    the VM's idleness, not a time that only holds at one host's speed."""
    with pytest.raises(VMError, match=r"did not answer after \d+s \(the VM has done "
                                      r"nothing for \d+s\)"):
        await sandbox_factory.boot(init="/bin/sh")


async def test_graceful_stop_through_qmp(sandbox, no_leaks):
    await sandbox.vm.stop(timeout=10)
    assert sandbox.vm.exited
    assert await sandbox.vm.wait_exited() == 0  # QEMU quit on request, not killed


@pytest.mark.kvm
async def test_vsock_channel(sandbox_factory):
    if not vsock_available():
        pytest.skip("no /dev/vhost-vsock on this host: vsock cannot be tested end to end "
                    "(virtio-serial is used and tested instead)")
    sb = await sandbox_factory.boot(channel="vsock")
    assert sb.vm.config.channel.kind == "vsock"
    assert await sb.agent.health(timeout=10)


@pytest.mark.kvm
async def test_two_containers_share_one_rootfs(sandbox, busybox_rootfs, no_leaks):
    """A 9p channel serves one mount: the agent mounts a share once and
    gives each container its own bind mount of it."""
    sb = sandbox
    try:
        for c in ("a", "b"):
            await sb.agent.create_container(c, ROOTFS, pb.Process(
                args=["sh", "-c", f"echo {c} > /tmp/from-{c}; sleep 300"]), hostname=c)
            await sb.agent.start_container(c)
        # Once both containers have written their file (30 s at the most).
        await sb.agent.exec_process("b", "cat", pb.Process(args=["sh", "-c",
            "i=0; until [ -s /tmp/from-a ] && [ -s /tmp/from-b ] || [ $i = 600 ]; do "
            "sleep 0.05; i=$((i+1)); done; cat /tmp/from-a /tmp/from-b; hostname"]))
        assert await read_all(sb.agent, "stdout", "b", "cat") == b"a\nb\nb\n"
        await sb.agent.remove_container("a")
        # b still has its rootfs after a is gone.
        await sb.agent.exec_process("b", "ls", pb.Process(args=["ls", "/bin/busybox"]))
        assert await read_all(sb.agent, "stdout", "b", "ls") == b"/bin/busybox\n"
        await sb.agent.remove_container("b")
    finally:
        for name in ("from-a", "from-b"):
            (busybox_rootfs / "tmp" / name).unlink(missing_ok=True)


async def test_image_disk_hotplug_and_unplug(sandbox_factory, busybox_rootfs, tmp_path, no_leaks):
    """A pod's image arriving after boot: its erofs is hot-plugged on the
    virtio-scsi bus (QMP blockdev-add + device_add), found by serial,
    mounted with an overlay, and unplugged when no container uses it."""
    from hyperrun.image.rootfs import build_rootfs_image
    from hyperrun.vm.config import Disk

    image = tmp_path / "busybox.erofs"
    build_rootfs_image(busybox_rootfs, image)

    async def fdsets(vm):
        return {f.get("opaque") for s in await vm.qmp.execute("query-fdsets") for f in s["fds"]}

    def qemu_opens(vm):
        return sum(os.path.realpath(f"/proc/{vm.pid}/fd/{fd}") == str(image)
                   for fd in os.listdir(f"/proc/{vm.pid}/fd"))

    sb = await sandbox_factory.boot(hotplug_disks=True)
    host_fds = len(os.listdir("/proc/self/fd"))
    # QEMU opens nothing by name: the image comes as an fd in an fd
    # set, read-only, which a QEMU without capabilities can use.
    await sb.vm.hotplug_disk(Disk(image, serial="img1"))
    assert "disk-img1" in await fdsets(sb.vm)
    assert qemu_opens(sb.vm) >= 1
    # Plugged again (as by a daemon killed before it recorded the
    # disk's use): the disk is taken as it is, the new fd set dropped.
    await sb.vm.hotplug_disk(Disk(image, serial="img1"))
    assert len([s for s in await sb.vm.qmp.execute("query-fdsets")
                if any(f.get("opaque") == "disk-img1" for f in s["fds"])]) == 1
    storage = pb.Storage(source="serial:img1", fstype="erofs", overlay=True)
    await sb.agent.create_container("c", storage, pb.Process(
        args=["sh", "-c", "echo hi > /tmp/x; cat /tmp/x; ls /bin/busybox"]))
    await sb.agent.start_container("c")
    assert await read_all(sb.agent, "stdout", "c") == b"hi\n/bin/busybox\n"
    assert (await sb.agent.wait_process("c")).exit_code == 0
    await sb.agent.remove_container("c")
    await sb.vm.unplug_disk("img1")
    with pytest.raises(TtrpcError, match="disk with serial"):
        await sb.agent.create_container("d", storage, pb.Process(args=["true"]))
    assert "disk-img1" not in await fdsets(sb.vm)
    assert qemu_opens(sb.vm) == 0  # the fd set's fd and the node's copy closed
    assert len(os.listdir("/proc/self/fd")) == host_fds  # the host closed its own


async def test_sandbox_survives_its_host_process(sandbox_factory, sandbox, no_leaks):
    """A restarted daemon re-attaches: QMP and the agent on the same VM,
    containers still there."""
    sb = sandbox
    await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
    await sb.agent.start_container("c")
    await sb.detach()  # as if the daemon died: nothing stopped
    again = sandbox_factory.track(await Sandbox.adopt(QemuVM(sb.vm.config, vm_id=sb.vm.id)))
    assert await again.vm.status() == "running"
    await again.agent.exec_process("c", "e", pb.Process(args=["echo", "still here"]))
    assert await read_all(again.agent, "stdout", "c", "e") == b"still here\n"


def _vmm_user():
    """The unprivileged user QEMU runs as, made as `make setup` makes it."""
    import pwd
    import subprocess

    from hyperrun.vm import privileges

    try:
        return pwd.getpwnam(privileges.USER)
    except KeyError:
        pass
    r = subprocess.run(["make", "-s", "-C", str(Path(__file__).parents[2]), "vmm-user"],
                       capture_output=True, text=True)
    try:
        return pwd.getpwnam(privileges.USER)
    except KeyError:
        pytest.skip(f"no user {privileges.USER} and `make vmm-user` could not make it: "
                    f"{r.stdout}{r.stderr}")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


@pytest.fixture
def stray_fds():
    """Files of this process that QEMU must not inherit, even unmarked
    close-on-exec (as another VM's or a gRPC socket might be)."""
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stray.set_inheritable(True)
    yield leak_r, leak_w, stray.fileno()
    os.close(leak_r)
    os.close(leak_w)
    stray.close()


@pytest.mark.kvm
async def test_qemu_runs_confined(sandbox_factory, busybox_rootfs, stray_fds, no_leaks):
    """QEMU under its seccomp filter, in a cgroup of its own capping its
    memory (guest + QEMU's overhead) and CPU (the vCPUs + one), as an
    unprivileged uid of its own (hyperrun-vmm's group) with only the file
    capabilities its writable 9p share needs, in a 0700 run directory of
    that uid's, with no file descriptor but its own and those passed on
    purpose (the lock holding its uid among them); the cgroup goes with
    the VM."""
    from hyperrun.vm import cgroup, privileges, rundir

    if os.geteuid() != 0:
        pytest.skip("not root: no cgroup can be made for QEMU, nor a user switched to")
    user = _vmm_user()
    sandbox = await sandbox_factory.boot(vcpus=2, memory_mib=300,
                                         shares=[Share("rootfs", busybox_rootfs)])
    vm = sandbox.vm
    assert vm.cgroup_error == "" and vm.privileges_note == ""
    status = _status(vm.pid)
    assert status["Seccomp"] == "2"  # filter mode
    assert status["NoNewPrivs"] == "1"
    uid = int(status["Uid"].split()[0])  # its own, with hyperrun-vmm's group
    assert uid in privileges.VM_UIDS and status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(user.pw_gid)] * 4
    # no group, not even a device's: dac_override (for the writable
    # share) opens /dev/kvm and /dev/vhost-vsock where it uses them
    assert status["Groups"].strip() == ""
    devices = privileges._devices(vm.config)
    caps = sum(1 << n for n in (0, 1, 3, 4))  # chown dac_override fowner fsetid
    for kind in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[kind], 16) == caps, (kind, status[kind])
    st = vm.run_dir.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, user.pw_gid, 0o700)
    assert Path(os.readlink(f"/proc/{vm.pid}/cwd")) == vm.run_dir
    console = (vm.run_dir / rundir.CONSOLE_LOG).stat()  # QEMU made it
    assert (console.st_uid, console.st_gid) == (uid, user.pw_gid)
    fds = _fds(vm.pid)
    print("QEMU's fds:", fds)
    assert fds[0] == "/dev/null"
    assert fds[1] == fds[2] == str(vm.run_dir / "qemu.log")
    files = {t for t in fds.values() if t.startswith("/")}
    assert files == {"/dev/null", str(vm.run_dir / "qemu.log"), str(vm.console_log),
                     str(vm.config.root_image.resolve()), str(busybox_rootfs.resolve()),
                     str(privileges.UID_LOCKS / str(uid)), *devices}, files
    # and otherwise: sockets (QMP's and the agent's, listening and
    # connected), and QEMU's own eventfds and signalfd
    others = [t for t in fds.values() if not t.startswith("/")]
    assert all(t.startswith(("socket:", "anon_inode:")) for t in others), others
    assert sum(t.startswith("socket:") for t in others) <= 4
    mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in stray_fds}
    assert not mine & set(fds.values())
    groups = Path(f"/proc/{vm.pid}/cgroup").read_text()
    assert f"/{cgroup.GROUP}/{vm.id}" in groups
    dirs = cgroup._dirs(vm.id)
    limit = (300 + cgroup.QEMU_OVERHEAD_MIB) << 20
    if cgroup._v2_ready():
        assert (dirs[0] / "memory.max").read_text().strip() == str(limit)
        assert (dirs[0] / "cpu.max").read_text().split()[0] == "300000"
    else:
        assert (dirs[0] / "memory.limit_in_bytes").read_text().strip() == str(limit)
        assert (dirs[1] / "cpu.cfs_quota_us").read_text().strip() == "300000"
    await sandbox.destroy()
    assert not any(d.exists() for d in cgroup._dirs(vm.id))


def qemu_started(vms) -> None:
    """Until each QEMU has made its console log (or exited)."""
    wait_until(lambda: all(vm.console_log.exists() or vm.process.poll() is not None
                           for vm in vms), 30, "QEMU started", interval=0.05)


def test_qemu_without_shares_has_no_capabilities(sandbox_factory, no_leaks):
    """A VM with no 9p share (direct mode's shape) runs as its own uid with
    no capability at all; the kernel and root image it cannot open by name
    (under root's 0700 home here) are passed as fds."""
    from hyperrun.vm import privileges

    if os.geteuid() != 0:
        pytest.skip("not root: QEMU runs as the caller")
    _vmm_user()
    vm = sandbox_factory.spawn(SandboxConfig(channel="serial", init="/bin/sh"))
    assert vm.privileges_note == ""
    qemu_started([vm])
    assert vm.process.poll() is None, vm.failure_reason()
    status = _status(vm.pid)
    assert int(status["Uid"].split()[0]) in privileges.VM_UIDS
    for kind in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[kind], 16) == 0, (kind, status[kind])
    assert status["Seccomp"] == "2"
    files = {t for t in _fds(vm.pid).values() if t.startswith("/")}
    assert {str(vm.config.kernel.resolve()), str(vm.config.root_image.resolve())} <= files


@pytest.mark.kvm
def test_each_qemu_has_a_uid_of_its_own(sandbox_factory, no_leaks):
    """Two VMs' QEMUs run as two uids of the reserved range (a QEMU taken
    over by its guest cannot ptrace or signal another VM's), with the same
    group; a uid is free again once its QEMU has exited, however."""
    import fcntl

    from hyperrun.vm import privileges

    if os.geteuid() != 0:
        pytest.skip("not root: QEMU runs as the caller")
    user = _vmm_user()
    vms = [sandbox_factory.spawn(SandboxConfig(init="/bin/sh")) for _ in range(2)]
    qemu_started(vms)
    uids = [int(_status(vm.pid)["Uid"].split()[0]) for vm in vms]
    assert len(set(uids)) == 2 and all(u in privileges.VM_UIDS for u in uids), uids
    assert {_status(vm.pid)["Gid"].split()[0] for vm in vms} == {str(user.pw_gid)}
    with pytest.raises(PermissionError):  # as the first QEMU, towards the second
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(user.pw_gid)
                os.setuid(uids[0])
                os.kill(vms[1].pid, 0)
                os._exit(0)
            except PermissionError:
                os._exit(13)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 13:
            raise PermissionError("signal refused")
    vms[0].process.send_signal(signal.SIGKILL)
    vms[0].process.wait()

    def free(uid: int) -> bool:
        fd = os.open(privileges.UID_LOCKS / str(uid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
    assert free(uids[0]) and not free(uids[1])  # the dead QEMU's, the live one's


async def test_qemu_runs_as_root_without_the_user(sandbox_factory, busybox_rootfs, monkeypatch,
                                                  no_leaks):
    """Without the user, QEMU runs as root as before, and says why."""
    from hyperrun.vm import privileges

    if os.geteuid() != 0:
        pytest.skip("not root: QEMU runs as the caller")
    monkeypatch.setattr(privileges, "USER", "hyperrun-no-such-user")
    sb = await sandbox_factory.boot(shares=[Share("rootfs", busybox_rootfs)])
    assert "no user 'hyperrun-no-such-user'" in sb.vm.privileges_note
    assert _status(sb.vm.pid)["Uid"].split() == ["0"] * 4
