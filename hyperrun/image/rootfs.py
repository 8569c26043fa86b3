"""The read-only root filesystem image of an unpacked image: erofs, made by
`mkfs.erofs` (erofs-utils). Uncompressed, so the guest reads its pages
straight from the host page cache, shared by every VM that runs the image.

Reproducible: the superblock timestamp and the UUID are fixed, so the same
tree gives the same bytes. The timestamp is given as SOURCE_DATE_EPOCH, not
`-T`: erofs-utils 1.5 applies `-T` to every inode (all mtimes 0, and then
Python finds every .pyc stale and recompiles it on each start), whereas
SOURCE_DATE_EPOCH only clamps mtimes newer than it and keeps the rest (with
extended inodes, which carry their own mtime). Hence a timestamp far in the
future. Ownership, modes (setuid, setgid, sticky), xattrs, device nodes and
hard links are kept as they are in the tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MKFS = "mkfs.erofs"
# any fixed value does; this one reads "hyperrun" in its first bytes
FIXED_UUID = "68797065-7272-756e-0000-000000000000"
# superblock time, and the newest mtime kept (later ones are clamped to it)
BUILD_TIME = 4102444800   # 2100-01-01T00:00:00Z


class RootfsError(Exception):
    """mkfs.erofs is missing or failed."""


def build_rootfs_image(tree: Path, out: Path, *, uuid: str = FIXED_UUID) -> int:
    """Make the erofs image of `tree` at `out` (replacing it atomically: a
    temporary file next to `out`, fsynced, renamed); returns its size."""
    mkfs = shutil.which(MKFS)
    if mkfs is None:
        raise RootfsError(f"{MKFS} not found (Debian: apt-get install erofs-utils)")
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [mkfs, f"-U{uuid}", "--quiet", tmp, str(tree)]
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(BUILD_TIME), LC_ALL="C")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise RootfsError(f"mkfs.erofs failed ({proc.returncode}) for {tree}: {detail}")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            os.fchmod(fd, 0o644)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.rename(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size
