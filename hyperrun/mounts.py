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
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind(source: Path, target: Path, readonly: bool = False,
         propagation: str = "private") -> None:
    """Bind source (file or directory, recursively) on target; read-only
    needs a second, remounting call (the kernel ignores MS_RDONLY on the
    first). propagation "private": mounts made later under source do not
    follow; "rslave" or "rshared": they do (the bind a slave of source's
    peer group, which must be shared, or a slave for rslave, as containerd
    requires), and the guest sees them through the share. Nothing flows
    back: the guest's mounts are not the host's."""
    if propagation != "private":
        check_propagation(source, propagation)
    _check(_libc.mount(str(source).encode(), str(target).encode(), None,
                       MS_BIND | MS_REC, None), f"bind {source} on {target}")
    try:
        flag, what = (MS_PRIVATE, "private") if propagation == "private" else (MS_SLAVE, "a slave")
        _check(_libc.mount(None, str(target).encode(), None, flag | MS_REC, None),
               f"make {target} {what}")
        if readonly:
            _check(_libc.mount(None, str(target).encode(), None,
                               MS_BIND | MS_REMOUNT | MS_RDONLY, None),
                   f"remount {target} read-only")
    except OSError:
        unmount(target)
        raise


def _mount_of(path: Path) -> tuple[str, list[str]]:
    """The mount point holding path and its mountinfo optional fields
    ("shared:N", "master:N"...)."""
    real = os.path.realpath(path)
    best, fields = "/", []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = _unescape(parts[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fields = point, parts[6:parts.index("-")]
    return best, fields


def check_propagation(source: Path, propagation: str) -> None:
    """containerd's rule: an rshared volume's source on a shared mount, an
    rslave one's on a shared or slave mount; else ValueError."""
    point, fields = _mount_of(source)
    shared = any(f.startswith("shared:") for f in fields)
    slave = any(f.startswith("master:") for f in fields)
    if propagation == "rshared" and not shared:
        raise ValueError(f"path {source} is mounted on {point} but it is not a shared mount")
    if propagation == "rslave" and not (shared or slave):
        raise ValueError(f"path {source} is mounted on {point} but it is not a shared "
                         f"or slave mount")


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
