"""Typed VM configuration, turned into a QEMU command line by vm.qemu."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Kernel command line shared by every guest (see kernel-config/README.md):
# reboot=t + QEMU's -no-reboot make a guest restart end the VM (microvm has
# no ACPI power-off); panic=-1 does the same on a panic. tsc=reliable keeps
# the TSC clocksource when vCPUs look unsynchronised (TCG, SMP).
BASE_CMDLINE = ["console=ttyS0", "reboot=t", "panic=-1", "random.trust_cpu=on", "quiet",
                "tsc=reliable"]


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, which is the guest's under TCG."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags = next((l for l in text.splitlines() if l.startswith("flags")), "")
    if "constant_tsc" not in flags.split():
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def tcg_cmdline(vcpus: int, lapic_timer: bool = False) -> list[str]:
    """Boot-time savings that only apply under TCG (measured in
    kernel-config/README.md): the LAPIC timer calibration takes ~0.24 s of
    emulated time (skipped with one vCPU unless lapic_timer; with more,
    high-resolution timers need it), and a known TSC frequency avoids a
    calibration that fails on a busy host and leaves the guest on a 4 ms
    jiffies clock. Without the LAPIC timer the guest's clock events come
    from the PIT, whose one-shot reach is ~27 ms: an idle guest wakes
    ~36 times a second instead of sleeping (VMConfig.lapic_timer)."""
    args = ["nolapic_timer"] if vcpus == 1 and not lapic_timer else []
    # The agent then starts crun at fixed addresses, where TCG's
    # translations of it are found again (agent init.fix_child_maps).
    args.append("hyperrun.fixed_maps=1")
    if khz := host_tsc_khz():
        args += [f"tsc_early_khz={khz}", f"lpj={khz * 4}"]  # lpj = kHz * 1000 / HZ(250)
    return args


@dataclass(frozen=True)
class Disk:
    """A host file attached as a virtio-blk disk; the guest finds it by
    serial (/sys/block/*/serial), not by name, which depends on order."""
    path: Path
    serial: str
    readonly: bool = True


@dataclass(frozen=True)
class Share:
    """A host directory shared into the guest over virtio-9p."""
    tag: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class Nic:
    """The VM's network card: a tap opened by the host in the sandbox's
    netns (kind "tap", passed to QEMU as an fd), or QEMU's own user-mode
    network (kind "user", with host port forwards "tcp:HOSTIP:PORT-:PORT")."""
    kind: str
    mac: str
    tap_fd: int = -1
    forwards: tuple[str, ...] = ()
    restrict: bool = False  # user mode with no way out (a card that must exist)


def vsock_available() -> bool:
    """vsock to guests needs the vhost-vsock device on the host."""
    return os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)


@dataclass(frozen=True)
class Channel:
    """The agent channel: "serial" (virtio-serial port) or "vsock"."""
    kind: str = "serial"
    cid: int = 0  # vsock guest CID (>= 3)


@dataclass(frozen=True)
class VMConfig:
    """What a VM is made of. Immutable: a VM's config is fixed before it is
    made (a clone's, a pod's with its card and shares: dataclasses.replace)."""
    kernel: Path
    root_image: Path
    machine: str = "microvm"
    vcpus: int = 1
    memory_mib: int = 256
    accel: str = "tcg"
    init: str = "/sbin/init"
    cmdline_extra: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    disks: tuple[Disk, ...] = ()
    # A virtio-scsi bus for disks that arrive after boot (a pod's images).
    hotplug_disks: bool = False
    channel: Channel = field(default_factory=Channel)
    nic: Nic | None = None
    # Guest RAM in a file (VM templates, vm/template.py): shared while a
    # template is made, private copy-on-write in its clones.
    memory_file: Path | None = None
    memory_shared: bool = False
    # Start paused, waiting for a migration stream (a clone of a template),
    # read from this fd (the saved state, opened by the host: QEMU's seccomp
    # filter forbids it to spawn `cat`). QEMU's spawn takes it over.
    incoming: bool = False
    incoming_fd: int = -1
    # microvm lists its virtio-mmio devices at the end of the kernel command
    # line; off, the caller places them (direct mode: before `--`).
    auto_cmdline: bool = True
    # A cgroup capping QEMU's memory and CPU (vm/cgroup.py), where possible.
    cgroup: bool = True
    # QEMU's seccomp filter: no obsolete syscalls, no privilege changes,
    # no fork/exec, no resource-control calls.
    seccomp: bool = True
    # QEMU as the unprivileged `hyperrun-vmm` user where the host has it
    # (vm/privileges.py says with which capabilities, and why).
    unprivileged: bool = True
    # End QEMU when the launching process dies (embedded `hyperrun run`).
    die_with_parent: bool = False
    # TCG translation cache in MiB; small VMs do not need QEMU's 1 GiB default.
    tb_size_mib: int = 64
    # Under TCG with one vCPU, keep the LAPIC timer (tcg_cmdline): its
    # calibration costs a boot ~0.24 s, and the guest idles without a tick.
    # Templates (so their clones and spares) are made so: they boot once.
    lapic_timer: bool = False

    @property
    def writes_shares(self) -> bool:
        """A 9p share the guest writes through to the host: QEMU then keeps
        the file capabilities for it (privileges.py) and runs under the
        set-ID filter (setid.py)."""
        return any(not s.readonly for s in self.shares)

    def cmdline(self) -> str:
        parts = list(BASE_CMDLINE)
        if self.accel == "tcg":
            parts += tcg_cmdline(self.vcpus, self.lapic_timer)
        parts += ["root=/dev/vda", "ro", "rootfstype=erofs", f"init={self.init}"]
        return " ".join(parts + list(self.cmdline_extra))
