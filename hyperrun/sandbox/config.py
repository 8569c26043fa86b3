"""What a sandbox VM is made of; turned into a VMConfig. Import-light:
the CLI builds it before loading asyncio and protobuf."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun import assets
from hyperrun.vm import VMError, accel
from hyperrun.vm.config import Channel, Disk, Share, VMConfig, vsock_available


class AssetMissing(VMError):
    pass


@dataclass
class SandboxConfig:
    vcpus: int = 1
    memory_mib: int = 256
    machine: str = "microvm"
    shares: list[Share] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    hotplug_disks: bool = False
    die_with_parent: bool = False
    kernel: Path | None = None
    root_image: Path | None = None
    init: str = "/sbin/init"
    cmdline_extra: list[str] = field(default_factory=list)
    # "serial", "vsock", or "auto": vsock where the host has vhost-vsock.
    channel: str = "auto"

    def channel_config(self) -> Channel:
        kind = self.channel
        if kind == "auto":
            kind = "vsock" if vsock_available() else "serial"
        if kind == "vsock":
            # Guest CIDs are host-wide; 3 and up are free for guests.
            return Channel("vsock", cid=secrets.randbelow(2**31 - 3) + 3)
        if kind != "serial":
            raise VMError(f"unknown channel {kind!r}: expected serial, vsock or auto")
        return Channel("serial")

    def vm_config(self) -> VMConfig:
        kernel = self.kernel or assets.kernel_path()
        image = self.root_image or assets.guest_image_path()
        if not kernel.exists():
            raise AssetMissing(f"guest kernel not found at {kernel}: run `make kernel`")
        if not image.exists():
            raise AssetMissing(f"guest image not found at {image}: run `make guest`")
        return VMConfig(kernel=kernel, root_image=image, machine=self.machine, vcpus=self.vcpus,
                        memory_mib=self.memory_mib, accel=accel.choose().name, init=self.init,
                        shares=tuple(self.shares), disks=tuple(self.disks),
                        hotplug_disks=self.hotplug_disks, channel=self.channel_config(),
                        die_with_parent=self.die_with_parent,
                        cmdline_extra=tuple(self.cmdline_extra))


