"""Choosing the accelerator: KVM only where it can really run a guest.

Some hosts expose /dev/kvm without VT-x or AMD-V in the CPU flags; a
standard guest started with KVM there hangs. So KVM needs both: /dev/kvm
opens read-write *and* the CPU shows vmx or svm. One such host is a PVM
host (the `kvm_pvm` module, "Pagetable-based Virtual Machine", which runs
guests in a VM without nested VT-x): its KVM runs only guest kernels built
for PVM, which ours is not (its patches are outside Linux and Debian). A
user with such a kernel forces KVM with HYPERRUN_KERNEL and HYPERRUN_ACCEL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Accel:
    name: str    # "kvm" or "tcg"
    reason: str  # why, for `hyperrun check` and logs


def _cpu_has_virt() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


def _pvm_host() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


def _kvm_opens() -> tuple[bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return True, ""


def choose() -> Accel:
    forced = os.environ.get("HYPERRUN_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return Accel(forced, "set by HYPERRUN_ACCEL")
    if forced:
        raise ValueError(f"HYPERRUN_ACCEL={forced!r}: expected 'kvm' or 'tcg'")
    ok, why = _kvm_opens()
    if not ok:
        return Accel("tcg", f"{why}; using TCG (software emulation)")
    if not _cpu_has_virt():
        if _pvm_host():
            return Accel("tcg", "/dev/kvm is PVM (kvm_pvm), which runs only guest kernels built "
                                "for PVM; the guest kernel is a standard one; using TCG (a PVM "
                                "guest kernel: HYPERRUN_KERNEL=... HYPERRUN_ACCEL=kvm)")
        return Accel("tcg", "/dev/kvm opens but the CPU shows no vmx/svm (a paravirtualised "
                            "host cannot run a standard guest); using TCG")
    return Accel("kvm", "/dev/kvm opens and the CPU has hardware virtualisation")
