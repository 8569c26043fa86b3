"""The sandbox API against a real VM: the agent's RPCs, QMP, reconnects."""
import asyncio
import os
import signal

import pytest

from hyperrun.channel import frame
from hyperrun.channel.agent import AgentClient
from hyperrun.channel.ttrpc import TtrpcError
from hyperrun.proto import agent_pb2 as pb
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.sandbox.sandbox import Sandbox
from hyperrun.vm.config import Share, vsock_available
from hyperrun.vm.qemu import QemuVM

ROOTFS = pb.Storage(source="rootfs", fstype="9p")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def booted(rootfs):
    return await Sandbox.boot(SandboxConfig(shares=[Share("rootfs", rootfs)]))


async def read_all(agent, stream, cid, eid=""):
    out = b""
    while data := await agent.read_stream(stream, cid, eid):
        out += data
    return out


def test_sandbox_lifecycle_and_agent_api(busybox_rootfs, no_leaks):
    async def main():
        sb = await booted(busybox_rootfs)
        try:
            assert await sb.vm.status() == "running"
            details = await sb.agent.guest_details()
            assert details.kernel_release.startswith("6.1")
            assert {"cpu", "memory", "pids"} <= set(details.cgroup_controllers)
            assert details.crun_version.startswith("crun version")
            assert sb.vm.run_dir.stat().st_mode & 0o777 == 0o700
            for name in ("qmp.sock", "agent.sock", "qemu.pid", "console.log"):
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
        finally:
            await sb.destroy()
        assert not sb.vm.run_dir.exists()
        assert sb.vm.exited
    run(main())


def test_agent_serves_a_reconnecting_host(busybox_rootfs, no_leaks):
    """The host side disconnects (as a restarting daemon would) and a new
    session on the same socket finds the agent and its containers."""
    async def main():
        sb = await booted(busybox_rootfs)
        try:
            await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
            await sb.agent.start_container("c")
            for _ in range(3):
                await sb.agent.close()
                sb.agent = AgentClient("again")
                await sb.agent.connect(sb.agent_opener())
                assert await sb.agent.health(timeout=30)
                await sb.agent.exec_process("c", f"e{os.urandom(3).hex()}", pb.Process(args=["true"]))
        finally:
            await sb.destroy()
    run(main())


def test_tty_exec_and_resize(busybox_rootfs, no_leaks):
    async def main():
        sb = await booted(busybox_rootfs)
        try:
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
        finally:
            await sb.destroy()
    run(main())


def test_vm_dying_is_noticed(busybox_rootfs, no_leaks):
    async def main():
        sb = await booted(busybox_rootfs)
        try:
            await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
            await sb.agent.start_container("c")
            wait = asyncio.create_task(sb.agent.wait_process("c"))
            await asyncio.sleep(0.2)
            os.kill(sb.vm.pid, signal.SIGKILL)
            await asyncio.wait_for(sb.vm.wait_exited(), 10)
            assert sb.vm.exited
            from hyperrun.channel.ttrpc import ConnectionLost
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(wait, 10)
        finally:
            await sb.destroy()
    run(main())


def test_graceful_stop_through_qmp(busybox_rootfs, no_leaks):
    async def main():
        sb = await booted(busybox_rootfs)
        await sb.vm.stop(timeout=10)
        assert sb.vm.exited
        assert await sb.vm.wait_exited() == 0  # QEMU quit on request, not killed
        await sb.destroy()
    run(main())


def test_vsock_channel(vm_assets):
    if not vsock_available():
        pytest.skip("no /dev/vhost-vsock on this host: vsock cannot be tested end to end "
                    "(virtio-serial is used and tested instead)")

    async def main():
        sb = await Sandbox.boot(SandboxConfig(channel="vsock"))
        try:
            assert sb.vm.config.channel.kind == "vsock"
            assert await sb.agent.health(timeout=10)
        finally:
            await sb.destroy()
    run(main())


def test_two_containers_share_one_rootfs(busybox_rootfs, no_leaks):
    """A 9p channel serves one mount: the agent mounts a share once and
    gives each container its own bind mount of it."""
    async def main():
        sb = await booted(busybox_rootfs)
        try:
            for c in ("a", "b"):
                await sb.agent.create_container(c, ROOTFS, pb.Process(
                    args=["sh", "-c", f"echo {c} > /tmp/from-{c}; sleep 300"]), hostname=c)
                await sb.agent.start_container(c)
            await sb.agent.exec_process("b", "cat", pb.Process(
                args=["sh", "-c", "sleep 0.2; cat /tmp/from-a /tmp/from-b; hostname"]))
            assert await read_all(sb.agent, "stdout", "b", "cat") == b"a\nb\nb\n"
            await sb.agent.remove_container("a")
            # b still has its rootfs after a is gone.
            await sb.agent.exec_process("b", "ls", pb.Process(args=["ls", "/bin/busybox"]))
            assert await read_all(sb.agent, "stdout", "b", "ls") == b"/bin/busybox\n"
            await sb.agent.remove_container("b")
        finally:
            for name in ("from-a", "from-b"):
                (busybox_rootfs / "tmp" / name).unlink(missing_ok=True)
            await sb.destroy()
    run(main())


def test_image_disk_hotplug_and_unplug(busybox_rootfs, tmp_path, no_leaks):
    """A pod's image arriving after boot: its erofs is hot-plugged on the
    virtio-scsi bus (QMP blockdev-add + device_add), found by serial,
    mounted with an overlay, and unplugged when no container uses it."""
    from hyperrun.image.rootfs import build_rootfs_image
    from hyperrun.vm.config import Disk

    image = tmp_path / "busybox.erofs"
    build_rootfs_image(busybox_rootfs, image)

    async def main():
        sb = await Sandbox.boot(SandboxConfig(hotplug_disks=True))
        try:
            await sb.vm.hotplug_disk(Disk(image, serial="img1"))
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
        finally:
            await sb.destroy()
    run(main())


def test_sandbox_survives_its_host_process(busybox_rootfs, no_leaks):
    """A restarted daemon re-attaches: QMP and the agent on the same VM,
    containers still there."""
    async def main():
        sb = await booted(busybox_rootfs)
        try:
            await sb.agent.create_container("c", ROOTFS, pb.Process(args=["sleep", "300"]))
            await sb.agent.start_container("c")
            await sb.detach()  # as if the daemon died: nothing stopped
            again = await Sandbox.reattach(QemuVM(sb.vm.config, vm_id=sb.vm.id))
            assert await again.vm.status() == "running"
            await again.agent.exec_process("c", "e", pb.Process(args=["echo", "still here"]))
            assert await read_all(again.agent, "stdout", "c", "e") == b"still here\n"
            sb = again
        finally:
            await sb.destroy()
    run(main())


def test_qemu_runs_confined(busybox_rootfs, no_leaks):
    """QEMU under its seccomp filter and in a cgroup of its own capping its
    memory (guest + QEMU's overhead) and CPU (the vCPUs + one); the cgroup goes
    with the VM."""
    from pathlib import Path

    from hyperrun.vm import cgroup

    if os.geteuid() != 0:
        pytest.skip("not root: no cgroup can be made for QEMU")

    async def main():
        config = SandboxConfig(vcpus=2, memory_mib=300,
                               shares=[Share("rootfs", busybox_rootfs)])
        sandbox = await Sandbox.boot(config)
        vm = sandbox.vm
        try:
            assert vm.cgroup_error == ""
            with open(f"/proc/{vm.pid}/status") as f:
                seccomp = next(line.split()[1] for line in f if line.startswith("Seccomp:"))
            assert seccomp == "2"  # filter mode
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
        finally:
            await sandbox.destroy()
        assert not any(d.exists() for d in cgroup._dirs(vm.id))

    asyncio.run(main())
