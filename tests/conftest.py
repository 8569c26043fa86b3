import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperrun import assets
from hyperrun.vm import rundir

ROOT = Path(__file__).resolve().parents[1]
HYPERRUN = str(Path(sys.executable).parent / "hyperrun")


def qemu_pids(under: Path | None = None) -> set[int]:
    """Live (not zombie) QEMU processes started by hyperrun; with under,
    only those whose run directory is below it (QEMU runs in its run
    directory): other checkouts' VMs on the same machine then do not count."""
    root = str(under.resolve()) + "/" if under else "/"
    out = subprocess.run(["pgrep", "-f", "qemu-system.* -name hyperrun"], capture_output=True,
                         text=True)
    pids = set()
    for pid in out.stdout.split():
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            cwd = root  # cannot tell: counted
        if state != "Z" and cwd.startswith(root):
            pids.add(int(pid))
    return pids


@pytest.fixture(scope="session")
def vm_assets():
    """Skip VM tests (with the reason) when the guest assets are missing;
    `make test` builds them first, so there they always run."""
    missing = [str(p) for p in (assets.kernel_path(), assets.guest_image_path()) if not p.exists()]
    if missing:
        pytest.skip(f"guest assets not built ({', '.join(missing)}): run `make assets`")


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory, vm_assets):
    from hyperrun.busybox import make_rootfs

    return make_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def no_leaks():
    """Asserts that a test leaves no QEMU, run directory or mount behind."""
    from hyperrun.paths import run_root

    before_qemu = qemu_pids(run_root())
    before_dirs = set(rundir.vm_root().iterdir()) if rundir.vm_root().is_dir() else set()
    before_mounts = _mounts()
    yield
    import time

    deadline = time.monotonic() + 10
    while qemu_pids(run_root()) - before_qemu and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids(run_root()) - before_qemu == set(), "QEMU processes left behind"
    after_dirs = set(rundir.vm_root().iterdir()) if rundir.vm_root().is_dir() else set()
    assert after_dirs - before_dirs == set(), "run directories left behind"
    assert _mounts() == before_mounts, "mounts changed"


def _mounts() -> list[str]:
    """/proc/mounts, but for /run/netns itself: made a shared mount once
    (as `ip netns add` does) when the first pod network is created."""
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[1] != "/run/netns"]


def hyperrun(*args: str, input: bytes | None = None, timeout: float = 120,
             **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([HYPERRUN, *args], input=input, capture_output=True,
                          timeout=timeout, **kwargs)


def in_terminal(argv: list[str], rows: int, cols: int, env: dict | None = None,
                answer=None, timeout: float = 120) -> tuple[int, bytes]:
    """Run `hyperrun ...` on a pty of rows x cols: (its exit code, all it
    wrote). answer(output so far) may return bytes to type, once."""
    import fcntl
    import pty
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([HYPERRUN, *argv], env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every slave end is closed
                break
            if not chunk:
                break
            out += chunk
            if answer is not None and (typed := answer(out)):
                os.write(master, typed)
                answer = None
        return proc.wait(30), out
    finally:
        os.close(master)


# Registry and test-image fixtures (real docker-registry, umoci, skopeo).
pytest_plugins = ["tests.registry"]


# Measurements a test reports at the end of the run (`make test` shows them
# without -s): section title -> lines. The soak's numbers go here.
REPORTS: dict[str, list[str]] = {}


def pytest_terminal_summary(terminalreporter):
    for title, lines in REPORTS.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
