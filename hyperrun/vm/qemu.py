"""QEMU behind the VM interface: the command line from a VMConfig, QMP
through qemu.qmp, and a watch on the QEMU process.

The QMP and agent sockets are created and bound here and handed to QEMU
as listening file descriptors: connecting to them then succeeds at once,
with no polling for QEMU to create them, and they stay at their paths in
the run directory for as long as QEMU lives.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import socket
from pathlib import Path

from qemu.qmp import QMPClient

from . import VM, VMError, rundir
from .config import VMConfig

QEMU_BINARY = os.environ.get("HYPERRUN_QEMU", "qemu-system-x86_64")
AGENT_PORT_NAME = "hyperrun.agent"

# qemu.qmp logs every negotiation at INFO/WARNING; the VM's own errors are
# reported by this module instead.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def new_id() -> str:
    return secrets.token_hex(6)


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def machine_args(config: VMConfig) -> tuple[list[str], str]:
    """(-M/-accel/-cpu arguments, the virtio device suffix for the machine)."""
    if config.machine == "microvm":
        # acpi=off: QEMU then lists its virtio-mmio devices on the kernel
        # command line, and the guest kernel needs no ACPI.
        machine, bus = "microvm,acpi=off,x-option-roms=off,pit=off,pic=off,rtc=off", "device"
    elif config.machine in ("q35", "pc"):
        machine, bus = config.machine, "pci"
    else:
        raise VMError(f"unsupported machine type {config.machine!r}")
    accel = f"tcg,tb-size={config.tb_size_mib}" if config.accel == "tcg" else config.accel
    cpu = "host" if config.accel == "kvm" else "max"
    return ["-M", machine, "-accel", accel, "-cpu", cpu], bus


def command_line(config: VMConfig, run_dir: Path, qmp_fd: int | None, agent_fd: int | None) -> list[str]:
    machine, bus = machine_args(config)
    argv = [QEMU_BINARY, "-name", "hyperrun", *machine,
            "-smp", str(config.vcpus), "-m", str(config.memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(config.kernel), "-append", config.cmdline(),
            "-chardev", f"file,id=console,path={run_dir / rundir.CONSOLE_LOG}",
            "-serial", "chardev:console",
            "-drive", f"id=root,file={config.root_image},format=raw,if=none,readonly=on",
            "-device", f"virtio-blk-{bus},drive=root",
            "-pidfile", str(run_dir / rundir.PID_FILE)]
    if config.channel.kind == "vsock":
        argv += ["-device", f"vhost-vsock-{bus},guest-cid={config.channel.cid}"]
    elif agent_fd is not None:
        argv += ["-device", f"virtio-serial-{bus},max_ports=2",
                 "-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off",
                 "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}"]
    security = "passthrough" if os.geteuid() == 0 else "none"
    for i, share in enumerate(config.shares):
        ro = ",readonly=on" if share.readonly else ""
        argv += ["-fsdev", f"local,id=fs{i},path={share.path},security_model={security}{ro}",
                 "-device", f"virtio-9p-{bus},fsdev=fs{i},mount_tag={share.tag}"]
    if qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
    return argv


def _die_with_parent(parent: int) -> None:
    """In the forked child: SIGKILL QEMU when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class QemuVM(VM):
    def __init__(self, config: VMConfig, vm_id: str | None = None) -> None:
        self.config = config
        self.id = vm_id or new_id()
        self.run_dir = rundir.vm_root() / self.id
        self.qmp: QMPClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_task: asyncio.Task | None = None

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / rundir.AGENT_SOCKET

    @property
    def console_log(self) -> Path:
        return self.run_dir / rundir.CONSOLE_LOG

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def launch(self) -> None:
        self.run_dir = rundir.create(self.id)
        try:
            await self._launch()
        except BaseException:
            await self.remove()
            raise

    async def _launch(self) -> None:
        qmp_sock = _listen(self.run_dir / rundir.QMP_SOCKET)
        agent_sock = _listen(self.agent_socket) if self.config.channel.kind == "serial" else None
        fds = [qmp_sock.fileno()] + ([agent_sock.fileno()] if agent_sock else [])
        argv = command_line(self.config, self.run_dir, qmp_sock.fileno(),
                            agent_sock.fileno() if agent_sock else None)
        parent = os.getpid()
        try:
            with open(self.run_dir / "qemu.log", "wb") as errlog:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                    pass_fds=fds, start_new_session=True,
                    preexec_fn=(lambda: _die_with_parent(parent)) if self.config.die_with_parent else None)
        finally:
            qmp_sock.close()
            if agent_sock:
                agent_sock.close()
        self._exit_task = asyncio.create_task(self._proc.wait(), name=f"qemu-{self.id}-exit")
        self.qmp = QMPClient(f"qemu-{self.id}")
        connect = asyncio.create_task(self.qmp.connect(str(self.run_dir / rundir.QMP_SOCKET)))
        await asyncio.wait({connect, self._exit_task}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
            raise VMError(f"QEMU exited during start-up: {self.failure_reason()}")
        connect.result()

    def failure_reason(self) -> str:
        """QEMU's own error output, or the end of the console log."""
        for name in ("qemu.log", rundir.CONSOLE_LOG):
            try:
                lines = (self.run_dir / name).read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            if lines:
                return " | ".join(lines[-5:])
        code = self._proc.returncode if self._proc else None
        return f"exit status {code}"

    @property
    def exited(self) -> bool:
        return self._exit_task is None or self._exit_task.done()

    async def wait_exited(self) -> int:
        if self._exit_task is None:
            return 0
        return await asyncio.shield(self._exit_task)

    async def status(self) -> str:
        if self.exited or self.qmp is None:
            return "exited"
        result = await self.qmp.execute("query-status")
        return result["status"]

    async def stop(self, timeout: float = 5.0) -> None:
        if self.exited:
            return
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), timeout)
            except Exception:
                pass  # QEMU may close QMP before it replies
        try:
            await asyncio.wait_for(self.wait_exited(), timeout)
        except asyncio.TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        if self.exited or self._proc is None:
            return
        try:
            self._proc.kill()
        except ProcessLookupError:
            pass
        await self.wait_exited()

    async def remove(self) -> None:
        await self.kill()
        if self.qmp is not None:
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
            self.qmp = None
        rundir.remove(self.run_dir)
