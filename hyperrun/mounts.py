"""Host mounts hyperrun makes (bind mounts of volumes into a sandbox's
shared directory), and the guard that keeps a recursive delete from ever
walking through one into a host directory."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind(source: Path, target: Path, readonly: bool = False) -> None:
    """Bind source (file or directory, recursively) on target; read-only
    needs a second, remounting call (the kernel ignores MS_RDONLY on the
    first). Private, so mounts made later under source do not follow."""
    _check(_libc.mount(str(source).encode(), str(target).encode(), None,
                       MS_BIND | MS_REC, None), f"bind {source} on {target}")
    try:
        _check(_libc.mount(None, str(target).encode(), None, MS_PRIVATE | MS_REC, None),
               f"make {target} private")
        if readonly:
            _check(_libc.mount(None, str(target).encode(), None,
                               MS_BIND | MS_REMOUNT | MS_RDONLY, None),
                   f"remount {target} read-only")
    except OSError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Detach target (lazily: a guest may still hold files open through 9p)."""
    _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"unmount {target}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path, deepest first."""
    root = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if point == root or point.startswith(root.rstrip("/") + "/"):
                    found.append(Path(point))
    except OSError:
        return []
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> list[Path]:
    """Unmount everything at or below path; returns what is still mounted."""
    for point in mounts_under(path):
        try:
            unmount(point)
        except OSError:
            pass
    return mounts_under(path)
