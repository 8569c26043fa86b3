"""Sandbox VMs (hyperrun.sandbox.Sandbox) booted for a test and destroyed
at its end, whatever the outcome, as Firecracker's microvm_factory does."""
from __future__ import annotations

import asyncio

from hyperrun.sandbox.config import SandboxConfig
from hyperrun.sandbox.sandbox import Sandbox
from hyperrun.vm import rundir
from hyperrun import vm as vms
from hyperrun.vm import VM, VMState

TEARDOWN_S = 60


class SandboxFactory:
    """Boots sandboxes on the test's event loop (runner: its
    asyncio.Runner); close() destroys all of them there."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self._sandboxes: list[Sandbox] = []
        self._qemus: list[VM] = []

    async def boot(self, config: SandboxConfig | None = None, **fields) -> Sandbox:
        """A booted sandbox (its agent answers): of config, or of a
        SandboxConfig of these fields."""
        return self.track(await Sandbox.boot(config or SandboxConfig(**fields)))

    def track(self, sandbox: Sandbox) -> Sandbox:
        """Destroy this sandbox too at the end (one the test adopted)."""
        self._sandboxes.append(sandbox)
        return sandbox

    def spawn(self, config: SandboxConfig) -> VM:
        """A QEMU started for config and not waited for (no QMP, no agent):
        killed and its run directory removed at the end."""
        vm = vms.new(config.vm_config())
        self._qemus.append(vm)
        vm.spawn()
        return vm

    def close(self) -> None:
        async def destroy_all() -> list:
            # A detached handle's VM may have been adopted by another tracked
            # handle: that one ends it first, the detached one then finds it gone.
            live = [sb for sb in self._sandboxes if sb.vm.state is not VMState.DETACHED]
            rest = [sb for sb in self._sandboxes if sb not in live]
            return [*await asyncio.gather(*(sb.destroy() for sb in live), return_exceptions=True),
                    *await asyncio.gather(*(sb.destroy() for sb in rest), return_exceptions=True)]
        try:
            failed = [r for r in self.runner.run(asyncio.wait_for(destroy_all(), TEARDOWN_S))
                      if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        finally:
            for vm in self._qemus:
                if vm.process is not None and vm.process.poll() is None:
                    vm.process.kill()
                    vm.process.wait()
                rundir.remove(vm.run_dir)
