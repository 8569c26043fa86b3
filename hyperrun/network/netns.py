"""Named, persistent network namespaces, made as `ip netns add` makes them:
a new netns bind-mounted on a file in a directory whose mounts propagate
(shared), so `ip netns` and `ip netns exec` see ours too.

Entering a netns is per thread (setns(2) with CLONE_NEWNET moves only the
calling thread), so the work runs on a short-lived thread of its own and
the caller's thread (perhaps an event loop's) never changes namespace. No
process is forked: pyroute2's own netns support forks a helper per socket,
which a threaded daemon had better avoid.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str, path: Path | str = "") -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(path))


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def is_netns(path: Path) -> bool:
    """Whether `path` is a live netns mount (not a stale or missing file).
    Namespace files live on nsfs, whose device the process's own shares."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def _share(directory: Path) -> None:
    """Make `directory` a shared mount (bound on itself first if it is not a
    mount point), as iproute2 does: an unmount of a netns file then reaches
    every mount namespace that copied it, so none of them pins the netns."""
    directory.mkdir(parents=True, exist_ok=True)
    d = bytes(directory)
    if _libc.mount(b"none", d, None, MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "bind netns dir", directory)
    _check(_libc.mount(b"none", d, None, MS_SHARED | MS_REC, None), "share netns dir", directory)


def create(path: Path) -> None:
    """Create a new netns and bind it on `path` (which must not exist)."""
    _share(path.parent)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        _on_thread(_unshare_and_bind, path)
    except BaseException:
        os.unlink(path)
        raise


def _unshare_and_bind(path: Path) -> None:
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare")
        try:
            _check(_libc.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", MS_BIND, None),
                   "bind netns", path)
        finally:
            _setns(back)
    finally:
        os.close(back)


def remove(path: Path) -> None:
    """Unmount and unlink `path`. Idempotent: a missing file, or a stale one
    (left by a crash between unmount and unlink), is fine."""
    if _libc.umount2(bytes(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted / no file
            raise OSError(err, f"umount netns: {os.strerror(err)}", str(path))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def entered(path: Path):
    """Move the *calling thread* into the netns at `path`, and back after.
    Use run_in() unless the thread is yours alone."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(back)


def run_in(path: Path, fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn(*args, **kwargs) on a new thread inside the netns at `path`;
    sockets and tap devices fn opens belong to that netns."""
    def inside():
        with entered(path):
            return fn(*args, **kwargs)
    return _on_thread(inside)


def _on_thread(fn: Callable[..., T], *args) -> T:
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e
    t = threading.Thread(target=target, name="netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
