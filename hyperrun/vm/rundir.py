"""Per-VM run directories: private (0700), holding the QMP socket, the
agent channel socket, QEMU's pid file and the serial console log. A
directory whose QEMU is gone is stale and may be collected."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hyperrun.paths import run_root

QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
PID_FILE = "qemu.pid"
CONSOLE_LOG = "console.log"


def vm_root() -> Path:
    """Run directories of VMs made with no root of their own (vm.new's
    default: the tests' sandboxes, the bench's floor)."""
    return run_root() / "vm"


def sandbox_root() -> Path:
    """Run directories of the daemon's sandbox VMs, which outlive it: its
    own, under its data root's key (paths.owner), so that another
    daemon's start-up never takes them for stale."""
    from hyperrun.paths import owner

    return run_root() / "sandboxes" / owner()


def create(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.mkdir(mode=0o700)  # fails if it exists: ids are unique
    os.chmod(path, 0o700)   # whatever the umask
    return path


def remove(path: Path) -> bool:
    """Delete a run directory, after unmounting what a sandbox bound into
    it (volumes): a delete must never walk into a host directory. If a
    mount cannot be removed, the directory stays, and the log says why."""
    from hyperrun.mounts import unmount_under

    if left := unmount_under(path):
        from hyperrun import log

        log.get("vm").error("run directory kept: still mounted", path=str(path),
                            mounts=[str(p) for p in left])
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def kill_and_remove(path: Path) -> int | None:
    """End the QEMU of a run directory (if it still runs) and delete the
    directory; returns the pid it had, if any."""
    import signal
    import time

    pid = qemu_pid(path)
    killed = []
    for qemu in ({pid} if pid is not None else set()) | qemus_in(path):
        if alive_qemu(qemu):
            os.kill(qemu, signal.SIGKILL)
            killed.append(qemu)
    # Until they are gone: their cgroups can be removed only then (the
    # collection of strays that follows found one busy and left it).
    deadline = time.monotonic() + 5
    while any(alive_qemu(q) for q in killed) and time.monotonic() < deadline:
        time.sleep(0.01)
    remove(path)
    return pid


def qemus_in(path: Path) -> set[int]:
    """QEMUs running in the run directory path (QEMU's cwd is its run
    directory): one whose starter was killed before it wrote qemu.pid."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(path) and alive_qemu(int(entry)):
                    found.add(int(entry))
            except OSError:
                continue
    return found


def write_pid(path: Path, pid: int) -> None:
    tmp = path / f".{PID_FILE}.tmp"
    tmp.write_text(f"{pid}\n")
    os.rename(tmp, path / PID_FILE)


def qemu_pid(path: Path) -> int | None:
    try:
        return int((path / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def alive_qemu(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if argv[0].endswith(b"setpriv") and b"--" in argv:  # about to exec QEMU
        argv = argv[argv.index(b"--") + 1:]
    return b"qemu-system" in argv[0]


def collect_stale() -> list[Path]:
    """Remove run directories under vm_root() whose QEMU no longer runs
    (left by a killed process); a directory still being set up has a fresh
    mtime and is spared."""
    import time

    removed = []
    root = vm_root()
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        pid = qemu_pid(path)
        if pid is not None and alive_qemu(pid):
            continue
        try:
            if pid is None and time.time() - path.stat().st_mtime < 60:
                continue
        except OSError:
            continue
        remove(path)
        removed.append(path)
    return removed
