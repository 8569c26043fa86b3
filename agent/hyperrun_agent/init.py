"""PID 1 duties: kernel filesystems, cgroup controllers, the maps of the
programs the agent starts, power-off."""
import os

from . import syscalls
from .log import log

NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC

# (source, target, fstype, flags, data)
KERNEL_MOUNTS = [
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", syscalls.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
     "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("tmpfs", "/dev/shm", "tmpfs", NOSUID_NODEV_NOEXEC, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC, "nsdelegate"),
]


def mount_kernel_filesystems() -> None:
    for source, target, fstype, flags, data in KERNEL_MOUNTS:
        os.makedirs(target, exist_ok=True)
        try:
            syscalls.mount(source, target, fstype, flags, data)
        except OSError as exc:
            # devtmpfs may already be mounted by the kernel (DEVTMPFS_MOUNT).
            if exc.errno != 16:  # EBUSY
                raise
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")):
        if not os.path.lexists(link):
            os.symlink(target, link)


def enable_cgroup_controllers() -> list[str]:
    """Delegate every controller to child cgroups, where crun puts containers."""
    with open("/sys/fs/cgroup/cgroup.controllers") as f:
        controllers = f.read().split()
    if controllers:
        try:
            with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
                f.write(" ".join("+" + c for c in controllers))
        except OSError as exc:
            log("cannot enable cgroup controllers:", exc)
    return controllers


FIXED_MAPS_PARAM = "hyperrun.fixed_maps=1"


def fix_child_maps(cmdline: str) -> bool:
    """Under TCG (the host says so on the kernel command line), start crun
    and every other program the agent runs at the same addresses each
    time. TCG finds a translated block by its virtual address: with
    randomised maps each crun ran translated crun and its libraries again
    (12 MiB of host code, ~90 ms of a container start); at fixed ones the
    warm-up's translations serve every later crun. Containers get
    randomised maps back from their spec (oci.py: personality LINUX)."""
    if FIXED_MAPS_PARAM not in cmdline.split():
        return False
    syscalls.personality(syscalls.personality() | syscalls.ADDR_NO_RANDOMIZE)
    return True


def setup() -> None:
    mount_kernel_filesystems()
    enable_cgroup_controllers()
    with open("/proc/cmdline") as f:
        if fix_child_maps(f.read()):
            log("programs started with fixed maps (TCG)")
    os.makedirs("/run/hyperrun/containers", exist_ok=True)
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("hyperrun")
    except OSError:
        pass
