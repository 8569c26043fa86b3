"""How a pod gets its sandbox: a spare from the pool, a clone of the VM
shape's template, a boot; or, for a direct-mode pod, a VM whose init is
its container's program. The pod service decides when; the launcher
knows how, and owns what that takes (templates, the pool, where VMs run).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from hyperrun import config as hconfig
from hyperrun import log
from hyperrun.image.imageconfig import ProcessDefaults
from hyperrun.proto import agent_pb2 as apb
from hyperrun.specs import PodSpec
from hyperrun.vm import VM, new as new_vm, rundir
from hyperrun.vm.config import Channel, Disk, Share
from hyperrun.vm.template import clone_config

from hyperrun.sandbox import direct, podnet, volumes
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.sandbox.pool import SandboxPool, Spare
from hyperrun.sandbox.sandbox import Sandbox
from hyperrun.sandbox.templates import TemplateStore

logger = log.get("sandbox")


class Launcher:
    def __init__(self, defaults: hconfig.SandboxDefaults, networks: podnet.PodNetworks, *,
                 root: Path | None = None, die_with_parent: bool = False,
                 new_vm: Callable[..., VM] = new_vm) -> None:
        """root: where the VMs' run directories go (the daemon's by default);
        die_with_parent: VMs end with this process (embedded mode); new_vm:
        how a VM is made, as vm.new (unit tests pass a fake VM's)."""
        # "auto" left undecided (config.resolve: Services decides for its
        # host) means neither templates nor a pool.
        self.defaults = defaults = hconfig.resolve(defaults, daemon=False)
        self.networks = networks
        self.root = root or rundir.sandbox_root()
        self.die_with_parent = die_with_parent
        self.new_vm = new_vm
        self.templates = TemplateStore() if defaults.template else None
        self.pool = SandboxPool(defaults.pool_size, self._start_spare, self.discard_spare) \
            if defaults.pool_size > 0 else None
        self._recent_disk: Disk | None = None  # the latest container's image: see _preplug
        # Templates by default ("auto"): one that cannot be made turns them
        # off for this daemon, and its pods boot (the reason in the log).
        self.template_fallback = False

    def vm_config(self, vcpus: int | None = None, memory_mib: int | None = None):
        return SandboxConfig(vcpus=vcpus or self.defaults.vcpus,
                             memory_mib=memory_mib or self.defaults.memory_mib,
                             machine=self.defaults.machine, hotplug_disks=True,
                             die_with_parent=self.die_with_parent).vm_config()

    def adoptable(self, vm_id: str, channel: Channel) -> VM:
        """The VM of a record, to take over (after a daemon restart)."""
        return self.new_vm(dataclasses.replace(self.vm_config(), channel=channel),
                           vm_id=vm_id, root=self.root)

    def collect_stale(self, live: set[str]) -> None:
        """At start-up: end and remove this daemon's VMs (run directories,
        cgroups) of no live sandbox: a daemon killed inside a stop or
        remove, or while a spare or a pod's VM was starting, leaves them
        behind. Only its own: those under its root (another daemon's are
        under theirs)."""
        from hyperrun.vm import cgroup

        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name not in live:
                    pid = rundir.kill_and_remove(path)
                    cgroup.release_vm(path.name)
                    logger.info("removed a VM of no live sandbox", vm=path.name, pid=pid)

    def used_image(self, disk: Disk) -> None:
        """A container of this image was created: spares pre-plug it."""
        self._recent_disk = disk

    # ------------------------------------------------------------ the pool
    def start_pool(self) -> None:
        """Begin filling the pool of spare VMs (if one is configured)."""
        if self.pool is not None:
            self.pool.start()

    async def take_spare(self, kind: str, vcpus: int, memory: int) -> Spare | None:
        """A ready spare for a pod of the default shape and network kind."""
        if self.pool is None or kind != self.networks.kind or \
                (vcpus, memory) != (self.defaults.vcpus, self.defaults.memory_mib):
            return None
        self.pool.start()  # a pool of size "auto" begins at its first need
        return await self.pool.take()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    # ------------------------------------------------------------ starting
    async def start(self, sandbox_id: str, kind: str, vcpus: int, memory: int,
                    spec: PodSpec | None = None) -> tuple[Sandbox, podnet.PodNetwork | None]:
        """A sandbox VM with its network prepared, restored from the
        template or booted; with a pod config, the pod's network is added
        while the VM starts. On failure nothing of it is left."""
        vm_id = sandbox_id[:16]
        nic = await asyncio.to_thread(self.networks.prepare, sandbox_id, kind)
        config = dataclasses.replace(
            self.vm_config(vcpus, memory), nic=nic,
            shares=(Share(volumes.SHARE_TAG, self.root / vm_id / volumes.SHARE_DIR),))
        adding = None
        if spec is not None:
            adding = asyncio.create_task(
                asyncio.to_thread(self.networks.complete, sandbox_id, kind, spec))
        sandbox = None
        try:
            try:
                if self.templates is not None:  # made on first use of this VM shape
                    template = await self._template(config)
                    if template is not None:
                        # A spare (no pod yet) keeps the full TCG cache: see clone_config.
                        config = clone_config(
                            dataclasses.replace(config, lapic_timer=True), template,
                            cache_mib=None if spec is None else self.defaults.clone_cache_mib)
                sandbox = await Sandbox.start(self.new_vm(config, vm_id, self.root))
            finally:
                if nic is not None and nic.tap_fd >= 0:
                    os.close(nic.tap_fd)  # QEMU has its own
            network = await adding if adding is not None else None
        except BaseException:
            if sandbox is not None:
                await sandbox.destroy()
            if adding is not None:
                await asyncio.gather(adding, return_exceptions=True)
            await asyncio.to_thread(self.networks.teardown, sandbox_id, podnet.PodNetwork(kind))
            raise
        return sandbox, network

    async def _template(self, config):
        """The template of config's shape, made on first use. Booted once, so
        it can afford the LAPIC timer: its clones idle without a tick
        (vm/config.tcg_cmdline). None if templates are off by now."""
        try:
            return await self.templates.get(dataclasses.replace(config, lapic_timer=True),
                                            self.root)
        except Exception as exc:
            if not self.template_fallback or self.templates is None:
                raise
            logger.warning("cannot make a VM template: pods boot instead", error=str(exc))
            self.templates = None
            return None

    async def _start_spare(self) -> Spare:
        sandbox_id = secrets.token_hex(32)
        kind = self.networks.kind
        sandbox, _ = await self.start(sandbox_id, kind, self.defaults.vcpus,
                                      self.defaults.memory_mib)
        spare = Spare(sandbox_id, kind, sandbox)
        try:
            await sandbox.agent.warm_up()
            # Under TCG every path the guest runs first is translated first
            # (kernel and agent): an identity-only setup (entropy, clock,
            # loopback) in a clone took 0.3 s the first time, 0.03 s after.
            # The pod's own SetupSandbox repeats it with fresh entropy.
            await sandbox.agent.setup_sandbox(apb.SetupSandboxRequest())
        except BaseException:
            await self.discard_spare(spare)
            raise
        if (disk := self._recent_disk) is not None:
            await self._preplug(sandbox, disk)
        return spare

    async def _preplug(self, sandbox: Sandbox, disk: Disk) -> None:
        """Plug the image the latest container ran into a spare while it
        waits: the guest's scan of a new SCSI disk (~20 ms of a TCG guest's
        CPU) is then done before a pod of that image takes the spare, not
        during its CreateContainer. A pod of another image plugs its own;
        this one stays, unused, until the VM ends."""
        try:
            await sandbox.vm.hotplug_disk(disk)
        except Exception as exc:  # an image removed meanwhile: the spare is fine without
            logger.info("spare without a pre-plugged image", vm=sandbox.id, error=str(exc))
            return
        sandbox.disks.add(disk.serial)

    async def discard_spare(self, spare: Spare) -> None:
        await self.discard(spare.sandbox_id, spare.sandbox, podnet.PodNetwork(spare.kind))

    async def discard(self, sandbox_id: str, sandbox: Sandbox,
                      network: podnet.PodNetwork) -> None:
        """Remove a sandbox that no record holds: its VM, then its network
        (the VM's tap pins the netns; teardown is idempotent)."""
        await sandbox.destroy()
        await asyncio.to_thread(self.networks.teardown, sandbox_id, network)

    async def direct(self, vcpus: int, memory: int, erofs: Path, process: ProcessDefaults,
                     vm_id: str) -> Sandbox:
        """A direct-mode pod's sandbox, not started: a VM of that size
        booting the image erofs with the process's program as its init
        (sandbox/direct.py); a DirectError when direct mode cannot run it
        as asked."""
        shape = SandboxConfig(vcpus=vcpus, memory_mib=memory, machine=self.defaults.machine,
                              die_with_parent=self.die_with_parent)
        vm_config = await asyncio.to_thread(direct.vm_config, erofs, process, shape)
        return direct.sandbox(self.new_vm(vm_config, vm_id, self.root))
