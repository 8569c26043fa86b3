"""Virtual machines. `VM` is the hypervisor interface every layer above
uses (as Kata's hypervisor interface is); QEMU (vm.qemu) is behind it, and
`new()` is the one place that picks it. Nothing outside this package
speaks QMP.

A VM's run state is explicit (`VMState`): NEW until it is launched (or
adopted, after a daemon restart), RUNNING while this process controls it,
DETACHED once let go (it runs on, for a later process to adopt), EXITED
once its hypervisor is gone.
"""
from __future__ import annotations

import abc
import enum
from pathlib import Path
from typing import TYPE_CHECKING

from hyperrun import errdefs

if TYPE_CHECKING:
    import subprocess

    from .config import Disk, VMConfig


class VMError(errdefs.Unavailable):
    """The VM could not be started, or died."""


class VMState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DETACHED = "detached"
    EXITED = "exited"


class VM(abc.ABC):
    id: str
    run_dir: Path
    config: "VMConfig"  # immutable: a changed VM is a new config (dataclasses.replace)

    @property
    @abc.abstractmethod
    def state(self) -> VMState: ...

    # --- life
    @abc.abstractmethod
    def spawn(self) -> None:
        """Start the hypervisor now, synchronously and import-light, so that
        a caller loads the rest of its code while the guest boots; launch()
        then connects to it."""

    @abc.abstractmethod
    async def launch(self) -> None:
        """Start the VM; returns once the hypervisor answers on its control
        channel. A config made to restore a saved state (vm.template) starts
        paused: restore_state() then brings it back."""

    @abc.abstractmethod
    async def adopt(self) -> None:
        """Take over the running VM of this run directory, started by an
        earlier process (a daemon that was restarted)."""

    @abc.abstractmethod
    async def detach(self) -> None:
        """Let go of the VM without stopping it (a daemon shutting down)."""

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: ask the hypervisor to quit; force it after timeout."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Forced stop."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Stop if needed and delete every file of the VM."""

    @abc.abstractmethod
    async def wait_exited(self) -> int:
        """Waits for the hypervisor process to end; returns its exit status."""

    @property
    @abc.abstractmethod
    def exited(self) -> bool: ...

    # --- facts
    @abc.abstractmethod
    async def status(self) -> str:
        """The hypervisor's run state, e.g. "running"."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def process(self) -> "subprocess.Popen | None":
        """The hypervisor's process, if this process spawned it (the bench
        waits on it without asyncio)."""

    @property
    @abc.abstractmethod
    def agent_socket(self) -> Path:
        """The host end of a virtio-serial agent channel."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path:
        """The guest's serial console, as a file the hypervisor appends to
        (a direct-mode VM's output is read from it)."""

    @abc.abstractmethod
    def busy_ns(self) -> int | None:
        """The hypervisor's time spent running or waiting to run, in ns:
        grows while the VM works, stands while it idles or hangs."""

    @abc.abstractmethod
    def failure_reason(self) -> str:
        """Why the VM ended or failed, from its console and hypervisor log."""

    # --- devices and state, while it runs
    @abc.abstractmethod
    async def hotplug_disk(self, disk: "Disk") -> None:
        """Attach a disk; the guest finds it by serial."""

    @abc.abstractmethod
    async def unplug_disk(self, serial: str) -> None:
        """Detach a hot-plugged disk; the guest must have unmounted it."""

    @abc.abstractmethod
    async def add_host_forward(self, rule: str) -> None:
        """A user-mode network forward, "tcp:HOSTIP:PORT-:PORT"."""

    @abc.abstractmethod
    async def save_state(self, path: Path) -> None:
        """Save the device state to a new file (RAM stays in the config's
        memory file): what a template is made of."""

    @abc.abstractmethod
    async def restore_state(self) -> None:
        """Bring a VM launched from a saved state (vm.template.clone_config)
        to where it was saved, running."""


def new(config: "VMConfig", vm_id: str | None = None, root: Path | None = None) -> VM:
    """A VM of config, not started. Import-light (the CLI spawns QEMU
    before it loads asyncio)."""
    from .qemu import QemuVM

    return QemuVM(config, vm_id, root)
