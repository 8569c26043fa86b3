"""Who QEMU runs as. When hyperrun runs as root and the host has the
`hyperrun-vmm` system user (`make setup` creates it), QEMU is started as
that user, with no supplementary groups and no_new_privs: the privileges
are dropped before QEMU is executed (by util-linux's setpriv), so QEMU
never runs as root at all. QEMU's own `-runas` would drop them only after
its initialisation, and cannot be combined with the seccomp filter's
`elevateprivileges=deny` (QEMU 7.2 is killed by SIGSYS at its setgid).

QEMU serves the VM's 9p shares itself, as its own uid; what a VM's shares
need decides the capabilities it keeps (ambient, and nothing else in its
bounding set):

- no share (direct mode): none;
- read-only shares only: CAP_DAC_READ_SEARCH, to read a tree as root does;
- a writable share (every pod's shared directory, which carries its
  volumes; `run --rootfs DIR`) or a template's memory file (QEMU 7.2 opens
  it read-write even for a private mapping): CAP_CHOWN, CAP_DAC_OVERRIDE,
  CAP_FOWNER, CAP_FSETID, which 9p's `security_model=passthrough` needs to
  write as the guest's users. CAP_DAC_OVERRIDE is root's power over host
  files: for these VMs the drop takes away the rest of root (mount,
  modules, raw I/O, devices, the network, other users' processes), not
  file access. See docs/SECURITY.md.

Each VM's QEMU has a uid of its own, taken from a reserved range
(`VM_UIDS`, named by no user), with `hyperrun-vmm`'s group: QEMUs of one
uid could ptrace, signal or `process_vm_writev` each other, so a guest that
took over its QEMU would reach the other VMs' (Firecracker's jailer gives
each microVM its uid for the same reason). A uid is held by a lock on a
file in `UID_LOCKS`, whose descriptor QEMU inherits: it is taken for as
long as that QEMU lives, by any process of the host (a daemon, a
restarted one, an embedded `hyperrun run`), and freed when it exits,
however it ends.

Without the user, or when not root, QEMU runs as the caller, as before;
`reason` says why.
"""
from __future__ import annotations

import fcntl
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import VMConfig

USER = os.environ.get("HYPERRUN_VMM_USER", "hyperrun-vmm")
# Above systemd's container ranges (up to 0x6FFFFFFF) and below 2^31 (which
# some tools read as negative): a user namespace or a login never has these.
VM_UIDS = range(0x70000000, 0x70000000 + 65536)
UID_LOCKS = Path("/run/hyperrun-vmm-uids")
READ_CAPS = ("dac_read_search",)
WRITE_CAPS = ("chown", "dac_override", "fowner", "fsetid")


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    caps: tuple[str, ...]
    groups: tuple[int, ...] = ()  # of the devices QEMU opens (/dev/kvm), where needed
    uid_lock: int = -1  # the fd holding the uid: QEMU's to inherit, then closed here

    def wrapper(self, keep_pdeathsig: bool) -> list[str]:
        """The setpriv command that becomes this identity and execs what follows."""
        caps = ",".join(["-all"] + [f"+{c}" for c in self.caps])
        argv = [shutil.which("setpriv") or "/usr/bin/setpriv",
                f"--reuid={self.uid}", f"--regid={self.gid}",
                f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups",
                f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
                "--no-new-privs"]
        if keep_pdeathsig:  # a credential change clears it; setpriv sets it again
            argv.append("--pdeathsig=keep")
        return argv + ["--"]


def caps_for(config: VMConfig) -> tuple[str, ...]:
    if config.memory_file is not None or config.writes_shares:
        return WRITE_CAPS
    return READ_CAPS if config.shares else ()


def identity(config: VMConfig) -> tuple[Identity | None, str]:
    """(the identity QEMU is to run as, or None for the caller's; why not)."""
    if not config.unprivileged:
        return None, "unprivileged QEMU turned off for this VM"
    if os.geteuid() != 0:
        return None, ""  # hyperrun itself is not root: QEMU has no more than it
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        return None, f"no user {USER!r} (`make setup` creates it): QEMU runs as root"
    if pw.pw_uid == 0:
        return None, f"user {USER!r} is root"
    if shutil.which("setpriv") is None:
        return None, "setpriv (util-linux) not found: QEMU runs as root"
    caps = caps_for(config)
    groups = []
    for device in _devices(config):
        if "dac_override" in caps:
            continue
        try:
            st = os.stat(device)
        except OSError as exc:
            return None, f"{device}: {exc.strerror}"
        if st.st_mode & 0o060 != 0o060 or st.st_gid == 0:
            return None, f"{device} is not open to a group QEMU could be given: QEMU runs as root"
        groups.append(st.st_gid)
    try:
        uid, lock = take_uid()
    except OSError as exc:
        return None, f"no uid free for QEMU in {UID_LOCKS}: {exc}; QEMU runs as root"
    return Identity(USER, uid, pw.pw_gid, caps, tuple(groups), lock), ""


def take_uid() -> tuple[int, int]:
    """A uid of VM_UIDS no running QEMU has, and the descriptor whose lock
    holds it (read-only, inheritable: QEMU gets it)."""
    UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    for uid in VM_UIDS:
        fd = os.open(UID_LOCKS / str(uid), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise OSError(f"all {len(VM_UIDS)} uids are taken")


def _devices(config: VMConfig) -> list[str]:
    """Host devices QEMU opens by name."""
    return (["/dev/kvm"] if config.accel == "kvm" else []) + \
        (["/dev/vhost-vsock"] if config.channel.kind == "vsock" else [])


_logged: set[str] = set()


def log_reason(reason: str) -> None:
    """Log why QEMU runs as root, once per reason and process, where a log is
    set up (the CLI's stdout is the container's: never before its setup)."""
    from hyperrun import log

    if not reason or reason in _logged or not log.is_set_up():
        return
    _logged.add(reason)
    log.get("vm").warning("QEMU runs as root", reason=reason)
