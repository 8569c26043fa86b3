"""A seccomp filter that keeps set-user-ID and set-group-ID bits out of the
host's files, for a QEMU that serves a writable 9p share.

9p's `security_model=passthrough` writes as the guest's users: QEMU keeps
CAP_CHOWN, CAP_FOWNER and CAP_FSETID for it (privileges.py). So a guest's
root could make a file in a volume root's and mode 4755, and a user of the
host could run that setuid-root file from the volume's host path. QEMU
applies a guest's mode with chmod (after the file's creation, and for a
later chmod), or gives it at creation (open, mknod, mkdir); under this
filter each of those calls fails with EPERM when the mode carries a set-ID
bit, and the guest sees "Operation not permitted". That includes a
set-group-ID directory (`mkdir -m 2775`, `chmod g+s`), which gives no one
privileges: QEMU applies every mode with chmod, and a filter cannot tell a
directory's path from a file's. A file capability (`security.capability`)
needs CAP_SETFCAP, which QEMU does not have.

The filter is compiled by libseccomp (QEMU's own dependency: always
installed with it) once per process, through ctypes, and installed in the
forked child before QEMU is executed (with no_new_privs, which needs no
privilege); it stacks with QEMU's own `-sandbox` filter.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat

_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000  # | errno
_MASKED_EQ = 7       # SCMP_CMP_MASKED_EQ: (arg & datum_a) == datum_b
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
# Newer calls with a mode or flags the filter cannot read (a struct, a
# syscall libseccomp 2.5 does not name): refused as unknown, so that a
# libc would fall back to the ones above.
_UNREADABLE = {"openat2": 437, "fchmodat2": 452}

CREATING = (os.O_CREAT, 0o20000000)  # O_CREAT, __O_TMPFILE


class FilterError(Exception):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def rules() -> list[tuple[str, int, list[tuple[int, int]]]]:
    """(syscall, errno, [(argument, bit)]): the call fails with errno when
    every (argument & bit) is set."""
    out = []

    def refuse(name: str, mode_arg: int, flags_arg: int | None = None):
        for bit in (stat.S_ISUID, stat.S_ISGID):
            for flag in CREATING if flags_arg is not None else (None,):
                cmp = [(mode_arg, bit)] + ([(flags_arg, flag)] if flag else [])
                out.append((name, errno.EPERM, cmp))

    refuse("chmod", 1)
    refuse("fchmod", 1)
    refuse("fchmodat", 2)
    refuse("creat", 1)
    refuse("open", 2, flags_arg=1)
    refuse("openat", 3, flags_arg=2)
    refuse("mknod", 1)
    refuse("mknodat", 2)
    refuse("mkdir", 1)
    refuse("mkdirat", 2)
    out += [(name, errno.ENOSYS, []) for name in _UNREADABLE]
    return out


@functools.lru_cache(maxsize=1)
def program() -> bytes:
    """The filter as a classic BPF program (struct sock_filter[])."""
    try:  # by its soname: find_library would run ldconfig (~10 ms on the first VM's start)
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise FilterError("libseccomp is not installed (Debian's libseccomp2, which QEMU "
                          "needs)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise FilterError("seccomp_init failed")
    try:
        for name, err, cmps in rules():
            nr = _UNREADABLE.get(name) or lib.seccomp_syscall_resolve_name(name.encode())
            args = (_ArgCmp * max(len(cmps), 1))(*(_ArgCmp(a, _MASKED_EQ, bit, bit)
                                                   for a, bit in cmps))
            rc = lib.seccomp_rule_add_array(ctx, _ERRNO | err, nr, len(cmps), args)
            if rc < 0:
                raise FilterError(f"seccomp rule for {name}: {os.strerror(-rc)}")
        fd = os.memfd_create("setid-filter", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise FilterError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    return data


class Installer:
    """What the forked child calls before QEMU is executed: everything it
    needs (the program's buffer, libc) is made here, in the parent, so the
    child allocates nothing."""

    def __init__(self) -> None:
        code = program()
        self._buffer = ctypes.create_string_buffer(code, len(code))
        self._prog = _SockFprog(len(code) // 8, ctypes.addressof(self._buffer))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def __call__(self) -> None:
        if self._prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
                            ctypes.addressof(self._prog), 0, 0) != 0:
            os._exit(126)  # not executing QEMU unfiltered
