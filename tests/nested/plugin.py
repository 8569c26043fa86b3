"""pytest plugin of the KVM lane (`make test-kvm`, loaded with `-p`).

- Each test marked `kvm` must run its VMs with KVM and its agent channel
  over vsock: a watcher reads the command line of every hyperrun QEMU that
  appears while the test runs, and the test fails if it saw none, or one
  under TCG, or one with the virtio-serial agent port. A test whose VM has
  no agent (`@pytest.mark.kvm(channel=None)`, direct mode) is held to KVM
  only.
- The lane's events ("@@lane start NODEID", "@@lane end NODEID OUTCOME
  SECONDS") go to the fd named by HYPERRUN_LANE_FD as they happen, so the
  host knows which test runs when its deadline runs out.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

SCAN_S = 0.02  # a VM under test lives for seconds; one scan per 20 ms sees each


class QemuWatcher:
    """Command lines of hyperrun's QEMUs, by pid, as they appear."""

    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}
        self._scans = 0  # completed scans of /proc
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="qemu-watcher", daemon=True).start()

    def _run(self) -> None:
        while True:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) in self.seen:
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        argv = f.read().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if argv and argv[0].endswith("qemu-system-x86_64") and "hyperrun" in argv:
                    with self._cond:
                        self.seen[int(entry.name)] = argv
            with self._cond:
                self._scans += 1
                self._cond.notify_all()
            time.sleep(SCAN_S)

    def caught_up(self, timeout: float = 10) -> None:
        """Wait for a whole scan that began after this call."""
        with self._cond:
            target = self._scans + 2
            if not self._cond.wait_for(lambda: self._scans >= target, timeout):
                raise RuntimeError("the QEMU watcher stopped scanning")

    def since(self, pids: set[int]) -> dict[int, list[str]]:
        with self._cond:
            return {pid: argv for pid, argv in self.seen.items() if pid not in pids}

    def pids(self) -> set[int]:
        with self._cond:
            return set(self.seen)


def violations(argv: list[str], channel: str | None) -> list[str]:
    """What in a QEMU command line is not KVM (and vsock, if channel)."""
    found = []
    accel = argv[argv.index("-accel") + 1] if "-accel" in argv else ""
    if accel.split(",")[0] != "kvm":
        found.append(f"accelerator {accel or 'default'!r}, not kvm")
    if channel == "vsock":
        devices = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-device"]
        if not any(d.startswith("vhost-vsock") for d in devices):
            found.append("no vhost-vsock device")
        if any(d.startswith("virtserialport") and "hyperrun.agent" in d for d in devices):
            found.append("the agent on a virtio-serial port")
    return found


_watcher: QemuWatcher | None = None
_events = None


def pytest_configure(config):
    global _watcher, _events
    _watcher = QemuWatcher()
    if fd := os.environ.get("HYPERRUN_LANE_FD"):
        _events = os.fdopen(int(fd), "w", buffering=1)


def _event(line: str) -> None:
    if _events is not None:
        _events.write(f"@@lane {line}\n")


def pytest_runtest_logstart(nodeid, location):
    _event(f"start {nodeid}")


_started: dict[str, float] = {}
_outcome: dict[str, str] = {}
_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def pytest_runtest_logreport(report):
    """One "end" event per test, with its worst phase's outcome."""
    _started.setdefault(report.nodeid, time.monotonic())
    old = _outcome.get(report.nodeid, "passed")
    if _RANK[report.outcome] > _RANK[old]:
        _outcome[report.nodeid] = report.outcome
    if report.when == "teardown":
        took = time.monotonic() - _started.pop(report.nodeid)
        _event(f"end {report.nodeid} {_outcome.pop(report.nodeid, 'passed')} {took:.1f}")


@pytest.fixture(autouse=True)
def kvm_vsock_only(request):
    """A `kvm` test fails unless every VM it started ran with KVM (and its
    agent over vsock, unless the marker says channel=None)."""
    marker = request.node.get_closest_marker("kvm")
    if marker is None or _watcher is None:
        yield
        return
    channel = marker.kwargs.get("channel", "vsock")
    before = _watcher.pids()
    yield
    _watcher.caught_up()  # a VM started at the very end is seen too
    vms = _watcher.since(before)
    if not vms:
        pytest.fail("no hyperrun VM was seen: the test cannot show it ran with KVM and vsock")
    bad = {pid: v for pid, argv in vms.items() if (v := violations(argv, channel))}
    if bad:
        pytest.fail("VMs not in the lane's mode: " + "; ".join(
            f"QEMU {pid}: {', '.join(v)}" for pid, v in bad.items()))
