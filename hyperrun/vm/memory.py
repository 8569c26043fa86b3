"""Memory figures of a VM's QEMU process, from /proc: its proportional set
size (PSS: pages shared with other processes, such as the guest image and
kernel in the page cache or a template's memory, count in part), and the
resident parts that are the VM's own. Read by the bench and by `hyperrun
stats`."""
from __future__ import annotations


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the guest image and kernel in
    the page cache, a template's memory) count once, split among users."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _anonymous_kib(pid: int, wanted, field: str = "Pss:") -> int:
    """field summed over pid's anonymous mappings (no path) for which
    wanted(permissions, size in KiB) holds."""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    total, counted = 0, False
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            counted = len(fields) == 5 and wanted(fields[1], (end - start) // 1024)
        elif counted and line.startswith(field):
            total += int(fields[1])
    return total


def tcg_cache_kib(pid: int) -> int:
    """The PSS of QEMU's TCG translation cache: its one anonymous mapping
    that is writable and executable (`-accel tcg,tb-size`). Private to each
    VM and filled as the guest runs new code; a KVM guest has none."""
    return _anonymous_kib(pid, lambda perms, _: perms == "rwxp")


def guest_ram_kib(pid: int, memory_mib: int) -> int:
    """How much of a booted VM's RAM (anonymous, `-m memory_mib`) is resident:
    what the guest has touched and not handed back (free page reporting)."""
    return _anonymous_kib(pid, lambda perms, size: perms == "rw-p" and size == memory_mib * 1024,
                          "Rss:")
