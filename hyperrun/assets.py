"""Where the built guest assets (kernel, guest root image) live.

Both are built once per machine and cached under the cache root, keyed by
a hash of their inputs; ``current`` symlinks name the most recent build.
"""
from __future__ import annotations

import os
from pathlib import Path

from hyperrun.paths import cache_root

KERNEL_FILE = "vmlinux"
GUEST_FILE = "rootfs.erofs"


def kernel_path() -> Path:
    """The guest kernel to boot: HYPERRUN_KERNEL, else the current build."""
    if env := os.environ.get("HYPERRUN_KERNEL"):
        return Path(env)
    return cache_root() / "kernel" / "current" / KERNEL_FILE


def guest_image_path() -> Path:
    """The guest root image: HYPERRUN_GUEST_IMAGE, else the current build."""
    if env := os.environ.get("HYPERRUN_GUEST_IMAGE"):
        return Path(env)
    return cache_root() / "guest" / "current" / GUEST_FILE


def publish(kind: str, key: str) -> Path:
    """Point ``<cache>/<kind>/current`` at build ``key`` atomically."""
    parent = cache_root() / kind
    tmp = parent / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(key)
    os.replace(tmp, parent / "current")
    return parent / key
