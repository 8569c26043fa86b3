"""Virtual machines. `VM` is the hypervisor interface the sandbox layer
uses (as Kata's hypervisor interface); QEMU (vm.qemu) is behind it."""
from __future__ import annotations

import abc
from pathlib import Path


class VMError(Exception):
    """The VM could not be started, or died."""


class VM(abc.ABC):
    id: str
    run_dir: Path

    @abc.abstractmethod
    async def launch(self) -> None:
        """Start the VM; returns once the hypervisor answers on its control channel."""

    @abc.abstractmethod
    async def status(self) -> str:
        """The hypervisor's run state, e.g. "running"."""

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: ask the hypervisor to quit; force it after timeout."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Forced stop."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Stop if needed and delete every file of the VM."""

    @property
    @abc.abstractmethod
    def agent_socket(self) -> Path: ...

    @abc.abstractmethod
    async def wait_exited(self) -> int:
        """Waits for the hypervisor process to end; returns its exit status."""

    @property
    @abc.abstractmethod
    def exited(self) -> bool: ...

    @abc.abstractmethod
    def busy_ns(self) -> int | None:
        """The hypervisor's time spent running or waiting to run, in ns:
        grows while the VM works, stands while it idles or hangs."""
