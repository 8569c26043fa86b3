"""Typed VM configuration, turned into a QEMU command line by vm.qemu."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Kernel command line shared by every guest (see kernel-config/README.md):
# reboot=t + QEMU's -no-reboot make a guest restart end the VM (microvm has
# no ACPI power-off); panic=-1 does the same on a panic.
BASE_CMDLINE = [
    "console=ttyS0", "reboot=t", "panic=-1", "random.trust_cpu=on", "quiet",
    "8250.nr_uarts=1", "cryptomgr.notests", "tsc=reliable", "no_timer_check",
]


@dataclass(frozen=True)
class Share:
    """A host directory shared into the guest over virtio-9p."""
    tag: str
    path: Path
    readonly: bool = False


def vsock_available() -> bool:
    """vsock to guests needs the vhost-vsock device on the host."""
    return os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)


@dataclass(frozen=True)
class Channel:
    """The agent channel: "serial" (virtio-serial port) or "vsock"."""
    kind: str = "serial"
    cid: int = 0  # vsock guest CID (>= 3)


@dataclass
class VMConfig:
    kernel: Path
    root_image: Path
    machine: str = "microvm"
    vcpus: int = 1
    memory_mib: int = 256
    accel: str = "tcg"
    init: str = "/sbin/init"
    cmdline_extra: list[str] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    channel: Channel = field(default_factory=Channel)
    # End QEMU when the launching process dies (embedded `hyperrun run`).
    die_with_parent: bool = False
    # TCG translation cache in MiB; small VMs do not need QEMU's 1 GiB default.
    tb_size_mib: int = 64

    def cmdline(self) -> str:
        parts = list(BASE_CMDLINE)
        parts += ["root=/dev/vda", "ro", "rootfstype=erofs", f"init={self.init}"]
        return " ".join(parts + self.cmdline_extra)
