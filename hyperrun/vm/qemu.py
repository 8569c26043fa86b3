"""QEMU behind the VM interface: the command line from a VMConfig, QMP
through qemu.qmp, and a watch on the QEMU process.

The QMP and agent sockets are created and bound here and handed to QEMU
as listening file descriptors: connecting to them then succeeds at once,
with no polling for QEMU to create them, and they stay at their paths in
the run directory for as long as QEMU lives.

asyncio and qemu.qmp are imported where first used: spawn() needs neither,
so the CLI can start QEMU before loading them (~0.1 s) while the guest boots.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path

from . import VM, VMError, VMState, rundir
from .config import Disk, VMConfig

QEMU_BINARY = os.environ.get("HYPERRUN_QEMU", "qemu-system-x86_64")
SCSI_BUS = "scsi0"  # for disks hot-plugged after boot
AGENT_PORT_NAME = "hyperrun.agent"



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
        machine, bus = "microvm,acpi=off", "device"
    elif config.machine in ("q35", "pc"):
        machine, bus = config.machine, "pci"
    else:
        raise VMError(f"unsupported machine type {config.machine!r}")
    accel = f"tcg,tb-size={config.tb_size_mib}" if config.accel == "tcg" else config.accel
    # Under TCG, -erms: glibc and the kernel then avoid `rep movsb`, which
    # TCG runs a byte per iteration (pipe throughput 2.7x, see kernel-config/).
    cpu = "host" if config.accel == "kvm" else "max,-erms"
    if config.machine == "microvm" and not config.auto_cmdline:
        machine += ",auto-kernel-cmdline=off"
    return ["-M", machine, "-accel", accel, "-cpu", cpu], bus


def command_line(config: VMConfig, run_dir: Path, qmp_fd: int | None, agent_fd: int | None,
                 files: dict[Path, int] | None = None) -> list[str]:
    """QEMU's arguments. QEMU runs in run_dir (its files there are named
    relative to it: an unprivileged QEMU cannot search the run root). files
    maps host files to fds the host opened for a QEMU that may not open
    them by name: the kernel is read through /proc/self/fd, disks through
    fd sets (QEMU duplicates the fd, and opens nothing)."""
    files = files or {}
    machine, bus = machine_args(config)
    fdsets: list[str] = []

    def image(path: Path) -> str:
        if path not in files:
            return str(path)
        fdsets.extend(["-add-fd", f"fd={files[path]},set={len(fdsets) // 2 + 1}"])
        return f"/dev/fdset/{len(fdsets) // 2}"

    if config.memory_file is not None:
        machine[1] += ",memory-backend=ram"
        machine += ["-object", f"memory-backend-file,id=ram,size={config.memory_mib}M,"
                               f"mem-path={config.memory_file},"
                               f"share={'on' if config.memory_shared else 'off'}"]
    if config.incoming:
        machine += ["-incoming", "defer"]
    if config.seccomp:
        machine += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                                "resourcecontrol=deny"]
    argv = [QEMU_BINARY, "-name", "hyperrun", *machine,
            "-smp", str(config.vcpus), "-m", str(config.memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", f"/proc/self/fd/{files[config.kernel]}" if config.kernel in files
            else str(config.kernel), "-append", config.cmdline(),
            "-chardev", f"file,id=console,path={rundir.CONSOLE_LOG}",
            "-serial", "chardev:console",
            "-drive", f"id=root,file={image(config.root_image)},format=raw,if=none,readonly=on",
            "-device", f"virtio-blk-{bus},drive=root"]
    if config.channel.kind == "vsock":
        argv += ["-device", f"vhost-vsock-{bus},guest-cid={config.channel.cid}"]
    elif agent_fd is not None:
        argv += ["-device", f"virtio-serial-{bus},max_ports=2",
                 "-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off",
                 "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}"]
    for i, disk in enumerate(config.disks):
        ro = ",readonly=on" if disk.readonly else ""
        argv += ["-drive", f"id=disk{i},file={image(disk.path)},format=raw,if=none{ro}",
                 "-device", f"virtio-blk-{bus},drive=disk{i},serial={disk.serial}"]
    if config.hotplug_disks:
        argv += ["-device", f"virtio-scsi-{bus},id={SCSI_BUS}"]
    security = "passthrough" if os.geteuid() == 0 else "none"
    for i, share in enumerate(config.shares):
        ro = ",readonly=on" if share.readonly else ""
        argv += ["-fsdev", f"local,id=fs{i},path={share.path},security_model={security}"
                 f",multidevs=remap{ro}",
                 "-device", f"virtio-9p-{bus},fsdev=fs{i},mount_tag={share.tag}"]
    if nic := config.nic:
        if nic.kind == "tap":  # no /dev/vhost-net assumed: vhost=off
            netdev = f"tap,id=net0,fd={nic.tap_fd},vhost=off"
        else:
            netdev = "user,id=net0" + (",restrict=on" if nic.restrict else "") + \
                "".join(f",hostfwd={f}" for f in nic.forwards)
        argv += ["-netdev", netdev, "-device", f"virtio-net-{bus},netdev=net0,mac={nic.mac}"]
    if config.memory_file is None:
        # Free page reporting: the guest reports the 2 MiB blocks it has
        # freed, and QEMU drops them from its RAM (MADV_DONTNEED). Not for
        # RAM in a file: QEMU 7.2 drops those pages with fallocate(PUNCH_HOLE)
        # even for a private mapping, which would zero a template's file
        # under its clones.
        argv += ["-device", f"virtio-balloon-{bus},free-page-reporting=on"]
    if qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
    return argv + fdsets


def _die_with_parent(parent: int) -> None:
    """In the forked child: SIGKILL QEMU when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _open_for_qemu(path: Path, readonly: bool) -> int:
    """A host file opened for a QEMU that may not open it by name
    (read-only where the guest only reads it)."""
    try:
        return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise VMError(f"cannot open {path} for QEMU: {exc.strerror}") from None


def _open_files(config: VMConfig) -> dict[Path, int]:
    """The kernel and disk images, opened for QEMU."""
    files: dict[Path, int] = {}
    try:
        for path, readonly in [(config.kernel, True), (config.root_image, True),
                               *((d.path, d.readonly) for d in config.disks)]:
            if path not in files:
                files[path] = _open_for_qemu(path, readonly)
    except VMError:
        for fd in files.values():
            os.close(fd)
        raise
    return files


class QemuVM(VM):
    """One QEMU process. spawn() is synchronous and light (no asyncio, no
    QMP) so that a caller can start QEMU first and load the rest of its
    code while the guest boots; launch() then attaches QMP."""

    def __init__(self, config: VMConfig, vm_id: str | None = None, root: Path | None = None) -> None:
        self.config = config
        self.id = vm_id or new_id()
        self.run_dir = (root or rundir.vm_root()) / self.id
        self.qmp = None  # qemu.qmp.QMPClient once launched
        self._proc: subprocess.Popen | None = None
        self._attached_pid: int | None = None  # a QEMU we re-attached to, not our child
        self._exit_task = None  # asyncio.Task resolving to QEMU's exit status
        self.cgroup_error = ""  # why QEMU runs without a cgroup, if it does
        self.privileges_note = ""  # why QEMU runs as root, if it does
        self._fd_lock = None  # asyncio.Lock: one fd in flight to QEMU at a time (_pass_fd)
        self._detached = False

    @property
    def state(self) -> VMState:
        if self._proc is None and self._attached_pid is None:
            return VMState.NEW
        if self.exited:
            return VMState.EXITED
        return VMState.DETACHED if self._detached else VMState.RUNNING

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / rundir.AGENT_SOCKET

    @property
    def console_log(self) -> Path:
        return self.run_dir / rundir.CONSOLE_LOG

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else self._attached_pid

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def busy_ns(self) -> int | None:
        """Nanoseconds QEMU's threads have run or waited for a CPU to run
        on (/proc/PID/task/*/schedstat): what a VM that works at something
        accumulates on any host, loaded or not, and a hung or idle one
        does not. None where QEMU is gone."""
        total, pid = 0, self.pid
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except (OSError, TypeError):
            return None
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ran, waited = f.read().split()[:2]
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
            total += int(ran) + int(waited)
        return total

    def spawn(self) -> None:
        """Create the run directory and start QEMU."""
        self.run_dir = rundir.create(self.run_dir)
        try:
            self._spawn()
        except BaseException:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
            rundir.remove(self.run_dir)
            raise

    def _spawn(self) -> None:
        from . import privileges

        who, self.privileges_note = privileges.identity(self.config)
        privileges.log_reason(self.privileges_note)
        try:
            self._spawn_as(who)
        finally:
            if who and who.uid_lock >= 0:
                os.close(who.uid_lock)  # QEMU holds the uid from here, or nobody does

    def _spawn_as(self, who) -> None:
        for share in self.config.shares:  # a share the VM owns lives in its run dir
            if share.path.parent == self.run_dir:
                share.path.mkdir(mode=0o700, exist_ok=True)
                if who:
                    os.chown(share.path, who.uid, who.gid)
        if who:  # what QEMU creates there (console log, pid file) is then its user's
            os.chown(self.run_dir, who.uid, who.gid)
        qmp_sock = _listen(self.run_dir / rundir.QMP_SOCKET)
        agent_sock = _listen(self.agent_socket) if self.config.channel.kind == "serial" else None
        fds = [qmp_sock.fileno()] + ([agent_sock.fileno()] if agent_sock else [])
        if self.config.nic and self.config.nic.kind == "tap":
            fds.append(self.config.nic.tap_fd)
        if self.config.incoming_fd >= 0:
            fds.append(self.config.incoming_fd)
        if who and who.uid_lock >= 0:
            fds.append(who.uid_lock)
        # A QEMU that may not read files as root does gets them opened here.
        files = _open_files(self.config) if who and not who.caps else {}
        fds += files.values()
        argv = command_line(self.config, self.run_dir, qmp_sock.fileno(),
                            agent_sock.fileno() if agent_sock else None, files)
        if who:
            argv = who.wrapper(keep_pdeathsig=self.config.die_with_parent) + argv
        try:
            with open(self.run_dir / "qemu.log", "wb") as errlog:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                    pass_fds=fds, close_fds=True, start_new_session=True, cwd=self.run_dir,
                    preexec_fn=self._before_exec())
            # Written here, not by QEMU's -pidfile: QEMU 7.2 resolves that
            # path from / and an unprivileged QEMU may not search the run root.
            rundir.write_pid(self.run_dir, self._proc.pid)
        except OSError as exc:
            raise VMError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            qmp_sock.close()
            if agent_sock:
                agent_sock.close()
            for fd in files.values():
                os.close(fd)
            if self.config.incoming_fd >= 0:  # QEMU's now
                os.close(self.config.incoming_fd)
        if self.config.cgroup:
            from . import cgroup  # after the start: not on the boot path
            try:
                cgroup.confine(self.id, self._proc.pid, self.config.memory_mib, self.config.vcpus)
            except cgroup.CgroupError as exc:
                self.cgroup_error = str(exc)

    def _before_exec(self):
        """What the forked child does before QEMU is executed, if anything
        (None lets subprocess use vfork): die with this process (an
        embedded host's VMs); no set-ID bits through a writable 9p share
        (setid.py)."""
        steps = []
        if self.config.die_with_parent:
            parent = os.getpid()
            steps.append(lambda: _die_with_parent(parent))
        if self.config.writes_shares:
            from . import setid
            try:
                steps.append(setid.Installer())
            except setid.FilterError as exc:
                raise VMError(f"cannot confine QEMU's 9p server: {exc}") from None
        if not steps:
            return None
        return lambda: [step() for step in steps]

    async def adopt(self) -> None:
        """Take over the QEMU of this VM's run directory, started by an
        earlier process (a daemon that was restarted): QMP and exit watch."""
        pid = rundir.qemu_pid(self.run_dir)
        if pid is None or not rundir.alive_qemu(pid):
            raise VMError(f"VM {self.id}: its QEMU is not running")
        self._attached_pid = pid
        await self.launch()

    async def launch(self) -> None:
        """Start QEMU (unless spawned or attached already) and connect QMP."""
        import asyncio

        from .qmp import QMPClient

        if self._proc is None and self._attached_pid is None:
            self.spawn()
        self._detached = False
        self._exit_task = asyncio.ensure_future(self._watch_exit())
        self.qmp = QMPClient(f"qemu-{self.id}")
        connect = asyncio.ensure_future(self.qmp.connect(str(self.run_dir / rundir.QMP_SOCKET)))
        try:
            await asyncio.wait({connect, self._exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if not connect.done():
                connect.cancel()
                # Its end retrieved here: qemu.qmp may end a cancelled connect
                # with an error of its own, which would otherwise be logged
                # whenever the task is collected (a traceback, at any time).
                await asyncio.gather(connect, return_exceptions=True)
                raise VMError(f"QEMU exited during start-up: {self.failure_reason()}")
            try:
                connect.result()
            except Exception as exc:
                # A QEMU that died at once closes its QMP socket: the refusal
                # can come before its exit is seen. Its log says why.
                try:
                    await asyncio.wait_for(asyncio.shield(self._exit_task), 2)
                except asyncio.TimeoutError:
                    raise VMError(f"QMP of VM {self.id}: {exc}") from exc
                raise VMError(f"QEMU exited during start-up: {self.failure_reason()}") from None
        except BaseException:
            await self.remove()
            raise

    async def _watch_exit(self) -> int:
        """QEMU's exit status, noticed through a pidfd (no polling)."""
        import asyncio

        assert self.pid is not None
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._proc.wait() if self._proc else -1
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        # An attached QEMU is not our child: its exit status is not ours to read.
        return self._proc.wait() if self._proc else -1

    def failure_reason(self) -> str:
        """A guest kernel panic if the console shows one (with panic=-1 and
        -no-reboot it ends QEMU), else QEMU's own error output, or the end
        of the console log."""
        console = self._tail(rundir.CONSOLE_LOG)
        marker = "Kernel panic - not syncing: "
        if marker in console:
            cause = console.rsplit(marker, 1)[1].splitlines()[0].strip()
            return f"guest kernel panic: {cause}"
        for text in (self._tail("qemu.log"), console):
            if lines := text.strip().splitlines():
                return " | ".join(lines[-5:])
        code = self._proc.returncode if self._proc else None
        return f"exit status {code}"

    def _tail(self, name: str, size: int = 65536) -> str:
        """The end of a file of the run dir (the end is what matters), or ""."""
        try:
            with open(self.run_dir / name, "rb") as f:
                f.seek(max(os.fstat(f.fileno()).st_size - size, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def exited(self) -> bool:
        if self._exit_task is not None:
            return self._exit_task.done()
        if self._attached_pid is not None:
            return not rundir.alive_qemu(self._attached_pid)
        return self._proc is None or self._proc.poll() is not None

    async def wait_exited(self) -> int:
        import asyncio

        if self._exit_task is not None:
            return await asyncio.shield(self._exit_task)
        if self.pid is None or self.exited:
            return self._proc.wait() if self._proc else 0
        return await self._watch_exit()  # detached: watched for this wait only

    async def status(self) -> str:
        if self.exited or self.qmp is None:
            return "exited"
        result = await self.qmp.execute("query-status")
        return result["status"]

    async def stop(self, timeout: float = 5.0) -> None:
        import asyncio

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
        if self.pid is None or self.exited:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.wait_exited()

    async def add_host_forward(self, rule: str) -> None:
        """A user-mode network forward added while the VM runs (a pooled VM
        learns its pod's host ports after it started): `hostfwd_add`,
        which QEMU 7.2 has only in the human monitor."""
        out = await self.qmp.execute("human-monitor-command",
                                     {"command-line": f"hostfwd_add net0 {rule}"})
        if out.strip():  # it answers only when it failed
            raise VMError(f"host port forward {rule}: {out.strip()}")

    async def detach(self) -> None:
        """Let go of QEMU, which runs on (its exit is no longer watched)."""
        await self._disconnect()
        if self._exit_task is not None:
            self._exit_task.cancel()
            self._exit_task = None
        self._detached = True

    async def save_state(self, path: Path) -> None:
        """Migrate the device state to a new file at path, RAM left out
        (x-ignore-shared: it is the memory file). The host opens the file
        and hands it over: QEMU's seccomp filter would not let it spawn
        `cat` for an exec: URI, and 7.2 has no file: URI."""
        await self._ignore_shared()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await self._pass_fd(fd, "getfd", {"fdname": "saved-state"})
        finally:
            os.close(fd)
        await self.qmp.execute("migrate", {"uri": "fd:saved-state"})
        await self._wait_migration()

    async def restore_state(self) -> None:
        """Load the saved state from the config's incoming fd (`-incoming
        defer`), then run: a clone needs an explicit `cont`."""
        await self._ignore_shared()
        await self.qmp.execute("migrate-incoming", {"uri": f"fd:{self.config.incoming_fd}"})
        await self._wait_migration()
        await self.qmp.execute("cont")

    async def _ignore_shared(self) -> None:
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})

    async def _wait_migration(self, timeout: float = 60) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = (await self.qmp.execute("query-migrate")).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or loop.time() > deadline:
                raise VMError(f"migration {status or 'did not finish'}: {self.failure_reason()}")
            await asyncio.sleep(0.005)

    async def _pass_fd(self, fd: int, command: str, args: dict) -> dict:
        """Send fd to QEMU (SCM_RIGHTS) and run the command that takes it
        (`getfd`, `add-fd`). QEMU keeps the last fd received until a command
        claims it, so sending and claiming are one step per VM. fd stays the
        caller's: QEMU has its own copy."""
        import asyncio

        if self._fd_lock is None:
            self._fd_lock = asyncio.Lock()
        async with self._fd_lock:
            self.qmp.send_fd_scm(fd)
            return await self.qmp.execute(command, args)

    async def hotplug_disk(self, disk: Disk) -> None:
        """Attach a disk to the running VM on its virtio-scsi bus (microvm's
        virtio-mmio devices cannot be hot-added; SCSI disks can). The guest
        finds it by serial. The host opens the image and hands QEMU the fd
        in an fd set (`add-fd`, tagged with the node's name so that unplug
        finds it, also after a re-attach): a QEMU without capabilities may
        not open it by name. QEMU opens /dev/fdset/N by duplicating the fd
        of the set whose access mode matches what it wants, hence O_RDONLY
        for a read-only disk."""
        from qemu.qmp import ExecuteError

        node, device = f"disk-{disk.serial}", f"dev-{disk.serial}"
        fd = _open_for_qemu(disk.path, disk.readonly)
        try:
            fdset = (await self._pass_fd(fd, "add-fd", {"opaque": node}))["fdset-id"]
        finally:
            os.close(fd)
        try:
            await self.qmp.execute("blockdev-add", {
                "node-name": node, "driver": "raw", "read-only": disk.readonly,
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}",
                         "read-only": disk.readonly}})
        except Exception as exc:
            # this set only: the node that exists has its own
            await self.qmp.execute("remove-fd", {"fdset-id": fdset})
            # Plugged already (in part or whole) by a daemon killed before
            # it recorded a container using the disk: take it as it is.
            if not isinstance(exc, ExecuteError) or "Duplicate nodes" not in str(exc):
                raise
            plugged = await self.qmp.execute("qom-list", {"path": "/machine/peripheral"})
            if any(p["name"] == device for p in plugged):
                return
        try:
            await self.qmp.execute("device_add", {"driver": "scsi-hd", "id": device,
                                                  "drive": node, "serial": disk.serial,
                                                  "bus": f"{SCSI_BUS}.0"})
        except Exception:
            await self.qmp.execute("blockdev-del", {"node-name": node})
            await self._remove_fdsets(node)
            raise

    async def _remove_fdsets(self, node: str) -> None:
        """Drop the fd sets add-fd made for node (QEMU closes their fds once
        no block node uses them)."""
        for fdset in await self.qmp.execute("query-fdsets"):
            if any(f.get("opaque") == node for f in fdset["fds"]):
                await self.qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})

    async def unplug_disk(self, serial: str, timeout: float = 10.0) -> None:
        """Detach a hot-plugged disk; the guest must have unmounted it."""
        import asyncio

        from qemu.qmp import EventListener

        events = EventListener(("DEVICE_DELETED",))
        with self.qmp.listen(events):
            await self.qmp.execute("device_del", {"id": f"dev-{serial}"})

            async def deleted():
                async for event in events:
                    if event["event"] == "DEVICE_DELETED" and \
                            event.get("data", {}).get("device") == f"dev-{serial}":
                        return
            await asyncio.wait_for(deleted(), timeout)
        await self.qmp.execute("blockdev-del", {"node-name": f"disk-{serial}"})
        await self._remove_fdsets(f"disk-{serial}")

    async def _disconnect(self) -> None:
        if self.qmp is not None:
            try:
                await self.qmp.disconnect()
            except Exception:
                pass  # a QEMU gone already
            self.qmp = None

    async def remove(self) -> None:
        await self.kill()
        await self._disconnect()
        from . import cgroup
        # The cgroup first: a run directory left by a crash in between is
        # what tells the next start-up (collect_stale) to release it.
        cgroup.release_vm(self.id)
        rundir.remove(self.run_dir)
