"""A fake VM: every method of hyperrun.vm.VM, in process, with no QEMU.

What runs while it runs is a `FakeGuest`: a fake agent (tests/fakes/agent.py)
serving on the VM's agent socket, and what the hypervisor would know (the
disks plugged, forwards added, states saved, how it ended). A guest
outlives the VM object that started it, as a QEMU process outlives the
daemon: the `FakeHost` keeps them by run directory, and a new FakeVM of
the same directory adopts the one running there.

A test makes a VM end of itself (`die`: a guest panic, a QEMU crash) or
its guest stop answering (`hang`: a deadlock; its busy time then stands).

Not modelled: vsock (the agent is always on a serial channel: a config
asking for vsock gets serial), a process (pid and process are None),
a console, memory, CPUs, and the guest seeing its disks or forwards.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun.vm import VM, VMError, VMState, rundir
from hyperrun.vm.config import Channel, Disk, VMConfig

from .agent import FakeAgent

KILLED = -9  # the exit status of a killed hypervisor (as Popen reports SIGKILL)


@dataclass
class FakeGuest:
    """A running fake VM's inside, and the hypervisor's records of it."""
    agent: FakeAgent
    paused: bool = False  # launched to restore a saved state, not restored yet
    status: int | None = None  # its exit status, once ended
    reason: str = ""
    disks: dict[str, Disk] = field(default_factory=dict)  # plugged, by serial
    unplugged: list[str] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    restored: bool = False
    watchers: list[Callable[[int], None]] = field(default_factory=list)

    def end(self, status: int, reason: str) -> None:
        if self.status is not None:
            return
        self.status, self.reason = status, reason
        self.agent.stop()
        for watcher in list(self.watchers):
            watcher(status)


class FakeHost:
    """The machine fake VMs run on. new_vm has vm.new's signature: pass it
    as PodService's new_vm."""

    def __init__(self, root: Path) -> None:
        self.root = root  # for VMs made without one
        self.guests: dict[Path, FakeGuest] = {}
        self.vms: list[FakeVM] = []  # every VM object made, in order

    def new_vm(self, config: VMConfig, vm_id: str | None = None,
               root: Path | None = None) -> FakeVM:
        vm = FakeVM(self, config, vm_id, root or self.root)
        self.vms.append(vm)
        return vm

    def vm(self, vm_id: str) -> FakeVM:
        """The latest VM object of that id (after a restart: the adopter)."""
        return next(vm for vm in reversed(self.vms) if vm.id == vm_id)

    def close(self) -> None:
        """End every guest (and so every container process) still running."""
        for guest in self.guests.values():
            guest.watchers.clear()  # their event loops may be closed
            guest.end(KILLED, "the test ended")


class FakeVM(VM):
    def __init__(self, host: FakeHost, config: VMConfig, vm_id: str | None,
                 root: Path) -> None:
        if config.channel.kind != "serial":
            config = dataclasses.replace(config, channel=Channel("serial"))
        self.config = config
        self.id = vm_id or secrets.token_hex(6)
        self.run_dir = root / self.id
        self.host = host
        self.guest: FakeGuest | None = None
        self._detached = False
        self._exit: asyncio.Future[int] | None = None  # while launched or adopted
        self._watcher: Callable[[int], None] | None = None

    # --- test controls
    def die(self, reason: str = "guest kernel panic: fake", status: int = 0) -> None:
        """The VM ends of itself (with panic=-1 and -no-reboot a guest's
        panic ends QEMU with status 0)."""
        self._running_guest().end(status, reason)

    def hang(self) -> None:
        """The guest stops answering; the hypervisor runs on."""
        self._running_guest().agent.hang()

    @property
    def agent(self) -> FakeAgent:
        return self._running_guest().agent

    def _running_guest(self) -> FakeGuest:
        if self.guest is None or self.guest.status is not None:
            raise VMError(f"VM {self.id} is {self.state.value}")
        return self.guest

    # --- life
    @property
    def state(self) -> VMState:
        if self.guest is None:
            return VMState.NEW
        if self.guest.status is not None:
            return VMState.EXITED
        return VMState.DETACHED if self._detached else VMState.RUNNING

    def spawn(self) -> None:
        rundir.create(self.run_dir)
        for share in self.config.shares:  # as QemuVM: a share the VM owns lives in its run dir
            if share.path.parent == self.run_dir:
                share.path.mkdir(mode=0o700, exist_ok=True)
        self.guest = self.host.guests[self.run_dir] = FakeGuest(
            FakeAgent(self.agent_socket), paused=self.config.incoming)

    async def launch(self) -> None:
        if self.guest is None:
            self.spawn()
        self._follow()

    async def adopt(self) -> None:
        guest = self.host.guests.get(self.run_dir)
        if guest is None or guest.status is not None:
            raise VMError(f"VM {self.id}: its QEMU is not running")
        self.guest = guest
        self._follow()

    def _follow(self) -> None:
        """Watch the guest's end: its exit future is set by the end, not polled."""
        loop = asyncio.get_running_loop()
        exit_ = self._exit = loop.create_future()

        def ended(status: int) -> None:
            loop.call_soon_threadsafe(lambda: exit_.done() or exit_.set_result(status))

        self._watcher = ended
        self.guest.watchers.append(ended)
        if self.guest.status is not None:
            ended(self.guest.status)
        self._detached = False

    async def detach(self) -> None:
        if self.guest is not None and self._watcher in self.guest.watchers:
            self.guest.watchers.remove(self._watcher)
        self._exit = self._watcher = None
        self._detached = True

    async def stop(self, timeout: float = 5.0) -> None:
        await self._end(0, "stopped")  # QEMU's quit: status 0

    async def kill(self) -> None:
        await self._end(KILLED, "killed")

    async def _end(self, status: int, reason: str) -> None:
        if self.exited:
            return
        self.guest.end(status, reason)
        if self._exit is not None:
            await self.wait_exited()

    async def remove(self) -> None:
        await self.kill()
        rundir.remove(self.run_dir)
        self.host.guests.pop(self.run_dir, None)

    async def wait_exited(self) -> int:
        if self._exit is None:
            raise VMError(f"VM {self.id} is not launched or adopted: its exit is not watched")
        return await asyncio.shield(self._exit)

    @property
    def exited(self) -> bool:
        return self.guest is None or self.guest.status is not None  # as QemuVM: NEW counts

    # --- facts
    async def status(self) -> str:
        if self.exited:
            return "exited"
        return "paused" if self.guest.paused else "running"

    @property
    def pid(self) -> int | None:
        return None

    @property
    def process(self):
        return None

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / rundir.AGENT_SOCKET

    @property
    def console_log(self) -> Path:
        return self.run_dir / rundir.CONSOLE_LOG  # never written: the fake has no console

    def busy_ns(self) -> int | None:
        return None if self.exited else self.guest.agent.busy_ns

    def failure_reason(self) -> str:
        if self.guest is None or self.guest.status is None:
            return ""
        return self.guest.reason or f"exit status {self.guest.status}"

    # --- devices and state
    def _controlled(self) -> FakeGuest:
        if self.state is not VMState.RUNNING:
            raise VMError(f"VM {self.id} is {self.state.value}")
        return self.guest

    async def hotplug_disk(self, disk: Disk) -> None:
        self._controlled().disks[disk.serial] = disk  # plugged already: taken as it is

    async def unplug_disk(self, serial: str) -> None:
        guest = self._controlled()
        if guest.disks.pop(serial, None) is None:
            raise VMError(f"Device 'dev-{serial}' not found")
        guest.unplugged.append(serial)

    async def add_host_forward(self, rule: str) -> None:
        self._controlled().forwards.append(rule)

    async def save_state(self, path: Path) -> None:
        guest = self._controlled()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"fake saved state\n")
        guest.saved.append(path)

    async def restore_state(self) -> None:
        guest = self._controlled()
        if not guest.paused:
            raise VMError(f"VM {self.id} was not launched to restore a saved state")
        guest.paused, guest.restored = False, True
