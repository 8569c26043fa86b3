"""Host-side pieces that need no VM: accelerator choice, QEMU command
line, run directories, generated code."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperrun.vm import accel, rundir
from hyperrun.vm.config import Channel, Share, VMConfig
from hyperrun.vm.qemu import command_line

ROOT = Path(__file__).resolve().parents[2]


def test_accel_override(monkeypatch):
    monkeypatch.setenv("HYPERRUN_ACCEL", "kvm")
    assert accel.choose().name == "kvm"
    monkeypatch.setenv("HYPERRUN_ACCEL", "tcg")
    assert accel.choose().name == "tcg"
    monkeypatch.setenv("HYPERRUN_ACCEL", "xen")
    with pytest.raises(ValueError):
        accel.choose()


def test_accel_needs_vmx_or_svm(monkeypatch):
    monkeypatch.delenv("HYPERRUN_ACCEL", raising=False)
    monkeypatch.setattr(accel, "_kvm_opens", lambda: (True, ""))
    monkeypatch.setattr(accel, "_cpu_has_virt", lambda: False)
    monkeypatch.setattr(accel, "_pvm_host", lambda: False)
    assert accel.choose().name == "tcg"
    monkeypatch.setattr(accel, "_pvm_host", lambda: True)  # says which kernel KVM would need
    assert accel.choose().name == "tcg" and "PVM" in accel.choose().reason
    monkeypatch.setattr(accel, "_cpu_has_virt", lambda: True)
    assert accel.choose().name == "kvm"
    monkeypatch.setattr(accel, "_kvm_opens", lambda: (False, "/dev/kvm: No such file"))
    assert accel.choose().name == "tcg"


def test_command_line_microvm(tmp_path):
    cfg = VMConfig(kernel=Path("/k"), root_image=Path("/img"), vcpus=2, memory_mib=300,
                   shares=[Share("rootfs", Path("/data"), readonly=True)])
    argv = command_line(cfg, tmp_path, qmp_fd=5, agent_fd=6)
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1].startswith("microvm,acpi=off")
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "300"
    assert "virtio-blk-device,drive=root" in joined
    assert "socket,id=agent,fd=6,server=on,wait=off" in joined
    assert "virtserialport,chardev=agent,name=hyperrun.agent" in joined
    assert "socket,id=qmp,fd=5,server=on,wait=off" in joined
    assert "mount_tag=rootfs" in joined and "readonly=on" in joined
    assert "-no-reboot" in argv
    assert "virtio-balloon-device,free-page-reporting=on" in argv
    append = argv[argv.index("-append") + 1]
    assert "root=/dev/vda" in append and "init=/sbin/init" in append and "reboot=t" in append


def test_ram_in_a_file_gets_no_free_page_reporting(tmp_path):
    """QEMU 7.2 would punch freed pages out of the file: a template's, under
    its clones. Only anonymous RAM gets the balloon."""
    for shared in (True, False):
        cfg = VMConfig(kernel=Path("/k"), root_image=Path("/img"),
                       memory_file=tmp_path / "mem", memory_shared=shared)
        argv = command_line(cfg, tmp_path, qmp_fd=5, agent_fd=6)
        assert not any("balloon" in a for a in argv)


def test_command_line_q35_vsock(tmp_path):
    cfg = VMConfig(kernel=Path("/k"), root_image=Path("/img"), machine="q35",
                   channel=Channel("vsock", cid=7), accel="kvm")
    argv = command_line(cfg, tmp_path, qmp_fd=5, agent_fd=None)
    assert "vhost-vsock-pci,guest-cid=7" in argv
    assert "virtio-blk-pci,drive=root" in argv
    assert "virtio-balloon-pci,free-page-reporting=on" in argv
    assert argv[argv.index("-cpu") + 1] == "host"


def test_rundir_private_and_collect(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERRUN_RUN_DIR", str(tmp_path))
    path = rundir.create(tmp_path / "vm" / "abc")
    assert path.stat().st_mode & 0o777 == 0o700
    (path / rundir.PID_FILE).write_text("999999999")  # no such process
    fresh = rundir.create(tmp_path / "vm" / "fresh")  # no pid file yet: being set up
    assert rundir.collect_stale() == [path]
    assert fresh.exists() and not path.exists()


def test_generated_proto_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "hyperrun/proto/generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_qmp_tolerates_events_before_the_greeting(tmp_path):
    """QEMU may send VSERPORT_CHANGE before its greeting (seen under load)."""
    import asyncio
    import json

    from hyperrun.vm.qmp import QMPClient

    async def main():
        async def serve(reader, writer):
            writer.write(json.dumps({"event": "VSERPORT_CHANGE", "data": {"id": "agent", "open": True},
                                     "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n")
            writer.write(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                         "package": ""}, "capabilities": []}}).encode() + b"\n")
            await writer.drain()
            buf = b""
            while True:  # QMP is a JSON stream: no newline after a command
                buf += await reader.read(4096)
                try:
                    command = json.loads(buf)
                    break
                except ValueError:
                    continue
            assert command["execute"] == "qmp_capabilities"
            writer.write(json.dumps({"return": {}}).encode() + b"\n")
            await writer.drain()
            await reader.read()

        path = str(tmp_path / "qmp.sock")
        server = await asyncio.start_unix_server(serve, path)
        client = QMPClient("t")
        await asyncio.wait_for(client.connect(path), 5)
        await client.disconnect()
        server.close()
    asyncio.run(main())


def test_unfinished_templates_are_swept(tmp_path):
    """The work directory of a template whose maker died (its memory file
    is RAM in /dev/shm) goes at the next making; one whose maker still
    holds the lock stays."""
    import fcntl

    from hyperrun.sandbox.templates import TemplateStore

    store = TemplateStore(tmp_path)
    dead, alive = tmp_path / "aaaa.new", tmp_path / "bbbb.new"
    for work in (dead, alive):
        work.mkdir()
        (work / "mem").write_bytes(b"\0" * 4096)
    with open(tmp_path / ".bbbb.lock", "w") as maker:  # another maker, at work
        fcntl.flock(maker, fcntl.LOCK_EX)
        assert store.sweep_unfinished() == [dead]
        assert not dead.exists() and (alive / "mem").exists()
    assert store.sweep_unfinished() == [alive]


def test_a_failed_template_leaves_no_work_directory(tmp_path):
    """A template VM that dies while being made (here: its kernel is not
    one) takes its work directory, memory file and all, with it."""
    import asyncio
    import dataclasses

    from hyperrun.sandbox.config import SandboxConfig
    from hyperrun.vm import VMError
    from hyperrun.sandbox.templates import TemplateStore

    store = TemplateStore(tmp_path / "templates")
    try:
        config = SandboxConfig().vm_config()
    except Exception as exc:  # no guest kernel or image built here
        pytest.skip(f"no VM assets: {exc}")
    (tmp_path / "not-a-kernel").write_bytes(b"not a kernel\n" * 100)
    config = dataclasses.replace(config, kernel=tmp_path / "not-a-kernel")
    # The reason, whether QEMU's exit or its closed QMP socket is seen first
    with pytest.raises(VMError, match="QEMU exited during start-up: .*invalid kernel header"):
        asyncio.run(store.get(config, tmp_path / "run"))
    assert list(store.root.glob("*.new")) == [] and list(store.root.glob("*/")) == []


def test_setid_filter_refuses_setid_modes_only(tmp_path):
    """The filter QEMU's 9p server runs under (vm/setid.py), in a child of
    this process: every way to give a file a set-ID mode fails with EPERM,
    and nothing else does."""
    import errno
    import stat

    from hyperrun.vm import setid

    install = setid.Installer()
    f = tmp_path / "f"
    f.touch()
    calls = {
        "chmod 4755": lambda: os.chmod(f, 0o4755),
        "chmod 2755": lambda: os.chmod(f, 0o2755),
        "fchmod 4755": lambda: os.fchmod(os.open(f, os.O_RDONLY), 0o4755),
        "open O_CREAT 4755": lambda: os.open(tmp_path / "g", os.O_CREAT | os.O_WRONLY, 0o4755),
        "mkfifo 2644": lambda: os.mkfifo(tmp_path / "p", 0o2644),
        "mkdir 2775": lambda: os.mkdir(tmp_path / "d", 0o2775),
        "chmod 755": lambda: os.chmod(f, 0o755),
        "open O_CREAT 644": lambda: os.open(tmp_path / "h", os.O_CREAT | os.O_WRONLY, 0o644),
        "open, no O_CREAT": lambda: os.open(f, os.O_RDONLY),
        "mkdir 755": lambda: os.mkdir(tmp_path / "e", 0o755),
    }
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        install()
        results = []
        for name, call in calls.items():
            try:
                call()
                results.append("ok")
            except OSError as exc:
                results.append(errno.errorcode[exc.errno])
        os.write(w, " ".join(results).encode())
        os._exit(0)
    os.close(w)
    got = dict(zip(calls, os.read(r, 4096).decode().split()))
    os.close(r)
    os.waitpid(pid, 0)
    assert got == {name: "EPERM" if i < 6 else "ok" for i, name in enumerate(calls)}, got
    assert stat.S_IMODE(f.stat().st_mode) == 0o755


def test_a_vm_is_idle_while_its_busy_time_stands(monkeypatch):
    """The boot's deadline counts idleness: a fifth of a CPU or more of
    QEMU's run and run-queue time is work; less (an idle guest's timers)
    adds to the idle span; a QEMU gone counts as idle."""
    from types import SimpleNamespace

    from hyperrun.sandbox import sandbox as sandbox_mod

    clock, busy = [0.0], [0]
    monkeypatch.setattr(sandbox_mod, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    activity = sandbox_mod.Activity(SimpleNamespace(busy_ns=lambda: busy[0]))

    def tick(seconds: float, cpu_share: float | None) -> float:
        clock[0] += seconds
        busy[0] = None if cpu_share is None else busy[0] + int(cpu_share * seconds * 1e9)
        return activity.idle_s()

    assert tick(1, 1.0) == 0  # booting: a whole CPU
    assert tick(1, 0.3) == 0  # starved or slow, still working
    assert [tick(1, 0.05) for _ in range(3)] == [1, 2, 3]  # idle guest: timers only
    assert tick(1, 0.5) == 0  # worked again
    assert tick(2, 0.1) == 2
    assert tick(1, None) == 3  # QEMU gone: nothing more is done


def test_direct_mode_reads_init_exit_from_the_kernel_and_quotes_its_command():
    from hyperrun.sandbox import direct

    panic = b"hi\n[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000700\n"
    assert direct.exit_status(panic) == 7
    assert direct.exit_status(b"Attempted to kill init! exitcode=0x0000000f") == 128 + 15
    assert direct.exit_status(b"no panic here") is None
    assert direct.kernel_command(["a b", "c"], ["K=v w"]) == ['"K=v w"', "--", '"a b"', "c"]
    with pytest.raises(direct.DirectError, match="cannot carry it"):
        direct.kernel_command(['say "hi"'], [])
    with pytest.raises(direct.DirectError, match="not passable"):
        direct.kernel_command([], ["console=x"])
    assert direct.virtio_mmio_params(2) == ["virtio_mmio.device=512@0xfeb00e00:12",
                                            "virtio_mmio.device=512@0xfeb00c00:11"]
