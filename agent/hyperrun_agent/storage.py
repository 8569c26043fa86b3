"""Filesystems the host hands the guest (9p/virtio-fs shares, block
devices), each mounted once and shared by the containers that use it.

A virtio 9p channel serves one mount only, and a read-only image used by
several containers need not be mounted twice: containers get a bind mount
(or an overlay) of the one mount, and the last to go unmounts it.
"""
import os
import threading

from . import syscalls
from .errors import invalid, not_found

ROOT = "/run/hyperrun/storage"

# fstype -> default mount options
_OPTIONS = {
    "9p": ["trans=virtio", "version=9p2000.L", "msize=262144", "cache=mmap"],
    "virtiofs": [],
    "erofs": [],
    "ext4": [],
}


def _disk_serial(name: str) -> str | None:
    """virtio-blk shows its serial in sysfs; a SCSI disk in its VPD page
    0x80 (unit serial number: a 4-byte header, then the serial)."""
    try:
        with open(f"/sys/block/{name}/serial") as f:
            return f.read().strip()
    except OSError:
        pass
    try:
        with open(f"/sys/block/{name}/device/vpd_pg80", "rb") as f:
            page = f.read()
        return page[4:4 + page[3]].decode(errors="replace").strip()
    except (OSError, IndexError):
        return None


def block_device_by_serial(serial: str, timeout: float = 5.0) -> str:
    """/dev/vdX (virtio-blk) or /dev/sdX (hot-plugged SCSI) with this serial.
    A disk hot-plugged a moment ago may still be being scanned: wait a bit."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/block")):
            if _disk_serial(name) == serial and os.path.exists("/dev/" + name):
                return "/dev/" + name
        if time.monotonic() >= deadline:
            raise not_found(f"disk with serial {serial!r}")
        time.sleep(0.02)


class Storages:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mounts: dict[tuple, list] = {}  # key -> [path, users]
        self._next = 0

    @staticmethod
    def key(storage) -> tuple:
        readonly = storage.overlay or storage.fstype == "erofs"
        return (storage.fstype, storage.source, tuple(storage.options), readonly)

    def acquire(self, storage) -> str:
        """Mount storage unless mounted already; returns its mount point."""
        if storage.fstype not in _OPTIONS:
            raise invalid(f"unsupported storage type {storage.fstype!r}")
        if not storage.source:
            raise invalid("storage has no source")
        source = storage.source
        if source.startswith("serial:"):
            source = block_device_by_serial(source[len("serial:"):])
        key = self.key(storage)
        with self._lock:
            entry = self._mounts.get(key)
            if entry is None:
                path = f"{ROOT}/{self._next}"
                self._next += 1
                os.makedirs(path)
                flags = syscalls.MS_RDONLY if key[3] else 0
                options = _OPTIONS[storage.fstype] + list(storage.options)
                try:
                    syscalls.mount(source, path, storage.fstype, flags, ",".join(options))
                except OSError:
                    os.rmdir(path)
                    raise
                entry = self._mounts[key] = [path, 0]
            entry[1] += 1
            return entry[0]

    def release(self, key: tuple) -> None:
        with self._lock:
            entry = self._mounts.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._mounts[key]
        syscalls.umount(entry[0])
        os.rmdir(entry[0])
