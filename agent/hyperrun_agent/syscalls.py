"""The few syscalls Python's os module lacks: mount, umount2, reboot,
personality."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_PRIVATE = 1 << 18
MS_REC = 16384
MNT_DETACH = 2

RB_AUTOBOOT = 0x01234567
ADDR_NO_RANDOMIZE = 0x0040000
PERSONALITY_QUERY = 0xffffffff


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target} ({data}): {os.strerror(err)}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def reboot() -> None:
    """Restart the guest; the kernel runs with reboot=t and QEMU with
    -no-reboot, so this ends the VM (microvm has no ACPI power-off)."""
    os.sync()
    _libc.reboot(RB_AUTOBOOT)


def personality(persona: int = PERSONALITY_QUERY) -> int:
    """Set the process's execution domain and flags (children inherit them
    across exec); the query value only returns the current ones."""
    old = _libc.personality(ctypes.c_ulong(persona))
    if old == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"personality: {os.strerror(err)}")
    return old
