"""`make test-kvm`: the real-VM tests marked `kvm`, run with KVM and the
vsock agent channel, the mode every user with a KVM host gets.

Where this host can run it (KVM with vmx/svm, /dev/vhost-vsock), pytest
runs here. Otherwise in an L1 VM (image.py) under TCG with `-cpu max`
(L1_CPU, L1_ACCEL), whose stock kernel gets a working /dev/kvm (kvm_amd, nested paging) and
/dev/vhost-vsock: the checkout and the built guest assets are shared in,
the tests' output comes back on L1's console as it is written, and one
hard deadline holds for the whole lane; when it runs out, the report says
which test was running and for how long.

L2 VMs "with KVM" in L1 are still translated by the outer TCG: this lane
shows that the mode works, never how fast it is.

    python -m tests.nested.lane [--deadline MIN] [PYTEST ARGS...]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hyperrun import assets  # noqa: E402
from hyperrun.vm import accel  # noqa: E402
from hyperrun.vm.config import vsock_available  # noqa: E402

from tests.nested import image  # noqa: E402

DEFAULT_DEADLINE_MIN = 50
L1_MEMORY = "8G"
L1_CPUS = 1
# max: AMD's SVM with nested paging, which L1's kvm_amd needs. Without
# 5-level paging: with it, L1's kernel died within minutes of nested
# guests (a page fault on its per-CPU area right after a VM exit, in
# __svm_vcpu_run), an outer-TCG matter, not the project's. Without the
# TSC-deadline timer: with it, L1 once halted for good (HLT, interrupts
# on, its QEMU using no CPU: the timer's interrupt never came).
L1_CPU = "max,-la57,-tsc-deadline"
# One vCPU. With two, both froze for good in 2 of 5 runs (one instruction
# each, interrupts off: an outer-TCG defect with nested SVM), and with two
# under single-threaded TCG every IPI one vCPU spins on waited for the
# round-robin's next turn: tests took 15 minutes each.
L1_ACCEL = "tcg,thread=multi"
MIN_TESTS = 15  # the lane must run at least this many kvm tests
# No console line for this long while a test runs: look inside L1 (the
# slowest test took 100 s; a test's own deadline is pytest's 900 s).
STALL_S = 300
# No console line for this long: is L1 frozen (FROZEN_SAMPLES of its vCPUs'
# registers, FROZEN_EVERY_S apart, all the same, interrupts off)?
PROBE_S = 120
FROZEN_SAMPLES = 3
FROZEN_EVERY_S = 10
QMP_SOCKET = "qmp.sock"
PYTEST = ["-m", "kvm", "-p", "tests.nested.plugin", "-v", "-rfEs", "--timeout=900",
          "-p", "no:cacheprovider", "tests/integration"]


def host_has_kvm_vsock() -> tuple[bool, str]:
    chosen = accel.choose() if not os.environ.get("HYPERRUN_ACCEL") else None
    if chosen is not None and chosen.name != "kvm":
        return False, chosen.reason
    if not vsock_available():
        return False, "no /dev/vhost-vsock"
    return True, "KVM and /dev/vhost-vsock on this host"


class Report:
    """The lane's progress, from the "@@lane" events."""

    def __init__(self) -> None:
        self.running: tuple[str, float] | None = None
        self.results: list[tuple[str, str, str]] = []  # nodeid, outcome, seconds
        self.exit: int | None = None
        self.check_ok = False
        self.panic = ""  # L1's own kernel panic, if any
        self.frozen = ""  # L1's vCPUs, when they froze for good

    def l1_died(self) -> str:
        """Why L1 itself (not a test) ended the run, if it did."""
        if self.exit is not None:
            return ""
        return "L1's kernel panicked" if self.panic else (
            f"L1's vCPUs froze ({self.frozen})" if self.frozen else "")

    def feed(self, line: str) -> None:
        words = line.split()
        if words[:1] == ["start"] and len(words) == 2:
            self.running = (words[1], time.monotonic())
        elif words[:1] == ["end"] and len(words) == 4:
            self.results.append((words[1], words[2], words[3]))
            self.running = None
        elif words[:1] == ["checked"]:
            self.check_ok = words[1:] == ["0"]
        elif words[:1] == ["exit"]:
            self.exit = int(words[1])

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for _, outcome, _ in self.results:
            counts[outcome] = counts.get(outcome, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"


def run_here(pytest_args: list[str], deadline_s: float) -> int:
    events = os.dup(1)  # a copy of stdout that pytest's capture does not replace
    env = dict(os.environ, HYPERRUN_ACCEL="kvm", HYPERRUN_LANE_FD=str(events))
    print("test-kvm: on this host (KVM and vhost-vsock)", flush=True)
    try:
        return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO, env=env,
                              pass_fds=(events,), timeout=deadline_s).returncode
    finally:
        os.close(events)


def l1_command(run: Path, built: Path, checkout: Path) -> list[str]:
    def share(tag: str, path: Path, ro: bool) -> list[str]:
        return ["-fsdev", f"local,id={tag},path={path},security_model=none"
                          + (",readonly=on" if ro else ""),
                "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]

    # Not "hyperrun...": the tests' leak checks look for QEMUs named so.
    return ["qemu-system-x86_64", "-name", "kvm-lane-l1",
            "-M", "q35", "-accel", L1_ACCEL, "-cpu", L1_CPU,
            "-smp", str(L1_CPUS), "-m", L1_MEMORY,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-kernel", str(built / "vmlinuz"), "-initrd", str(built / "initrd.img"),
            # softlockup_panic: a CPU of L1 stuck in its kernel ends L1 (and is
            # reported) instead of hanging the lane; sysrq for a look inside
            # (`stall_report`).
            "-append", f"root=/dev/vda rw console=ttyS0 init={image.STUB_INIT} quiet "
                       "loglevel=3 random.trust_cpu=on panic=-1 softlockup_panic=1 "
                       "sysrq_always_enabled nokaslr",
            "-qmp", f"unix:{run / QMP_SOCKET},server=on,wait=off",
            "-drive", f"file={run / 'root.qcow2'},format=qcow2,if=virtio,cache=unsafe",
            "-device", "virtio-rng-pci",
            *share("checkout", checkout, True), *share("assets", run / "assets", True),
            *share("results", run / "results", False)]


def run_nested(command: str, deadline_s: float, why: str,
               collect: tuple[str, ...] = (), log_name: str = "test-kvm.log"
               ) -> tuple[int, Report, dict[str, bytes]]:
    """command (a shell line) in L1: its status, the report, and the named
    files it left in /mnt/results."""
    t0 = time.monotonic()
    print(f"test-kvm: in an L1 VM ({why} here); nested emulation: its timings are not "
          "KVM timings", flush=True)
    for path in (assets.kernel_path(), assets.guest_image_path()):
        if not path.exists():
            print(f"test-kvm: {path} missing: run `make assets`", file=sys.stderr)
            return 2, Report(), {}
    built = image.ensure()
    print(f"test-kvm: L1 image ready ({time.monotonic() - t0:.0f}s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="hyperrun-l1-") as tmp:
        run = Path(tmp)
        (run / "assets").mkdir()
        (run / "results").mkdir()
        shutil.copy(assets.kernel_path(), run / "assets" / assets.KERNEL_FILE)
        shutil.copy(assets.guest_image_path(), run / "assets" / assets.GUEST_FILE)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(built / "root.img"), str(run / "root.qcow2")], check=True)
        (run / "results" / "lane.env").write_text(
            f"export HYPERRUN_ACCEL=kvm HYPERRUN_LANE_FD=3\n"
            f"export HYPERRUN_KERNEL=/mnt/assets/{assets.KERNEL_FILE}\n"
            f"export HYPERRUN_GUEST_IMAGE=/mnt/assets/{assets.GUEST_FILE}\n"
            f"LANE_COMMAND={shlex.quote(command)}\n")
        log_path = REPO / "build" / log_name
        log_path.parent.mkdir(exist_ok=True)
        code, report = _watch(l1_command(run, built, REPO), log_path, t0 + deadline_s, t0,
                              run / QMP_SOCKET)
        files = {name: (run / "results" / name).read_bytes() for name in collect
                 if (run / "results" / name).exists()}
        return code, report, files


def check_tests(code: int, report: Report) -> int:
    """The lane's verdict on a test run: every test passed (a skip did not
    run in the lane's mode), and enough of them."""
    if not_passed := [(n, o) for n, o, _ in report.results if o != "passed"]:
        print("test-kvm: FAILED: " + ", ".join(f"{n} {o}" for n, o in not_passed),
              file=sys.stderr)
        return code or 1
    if code != 0:
        return code
    if len(report.results) < MIN_TESTS:
        print(f"test-kvm: FAILED: only {len(report.results)} tests ran (at least {MIN_TESTS} "
              "expected)", file=sys.stderr)
        return 1
    return 0


def _hmp(qmp: Path, *commands: str) -> str:
    """Human monitor commands through L1's QMP socket; their output."""
    import json
    import socket

    out = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp))
        f = sock.makefile("rw")
        f.readline()  # greeting
        for request in [{"execute": "qmp_capabilities"}] + [
                {"execute": "human-monitor-command", "arguments": {"command-line": c}}
                for c in commands]:
            f.write(json.dumps(request) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            if isinstance(reply.get("return"), str):
                out.append(reply["return"])
    return "".join(out)


def stall_report(qmp: Path) -> str:
    """What L1 is doing when its console has been silent for STALL_S: its
    vCPUs' registers here, and its kernel's backtraces of every CPU and of
    the blocked tasks on its console (sysrq l and w)."""
    try:
        return _hmp(qmp, "info registers -a", "sendkey alt-sysrq-l", "sendkey alt-sysrq-w")
    except (OSError, ValueError) as exc:
        return f"(no answer from L1's monitor: {exc})"


def frozen_vcpus(qmp: Path, console: threading.Event, pid: int) -> str:
    """L1's vCPUs as "CPU#0 at RIP ..." when every one of them stood on one
    instruction and its console said nothing for the whole sampling, with
    interrupts off or with L1's QEMU (pid) using no CPU at all; else "".
    console is set on each line L1 writes.

    A kernel cannot stay there that long: with interrupts off its
    soft-lockup watchdog would fire and panic, and a halted one wakes for
    its timers (a running lane's L1 is never idle for 20 s). This is the
    outer TCG's freeze, not a test's hang."""
    samples = []
    cpu_at_start = _cpu_ticks(pid)
    console.clear()
    for i in range(FROZEN_SAMPLES):
        if i and console.wait(FROZEN_EVERY_S):
            return ""  # it spoke: alive
        try:
            text = _hmp(qmp, "info registers -a")
        except (OSError, ValueError):
            return ""
        samples.append(re.findall(r"RIP=([0-9a-f]+) RFL=([0-9a-f]+)", text))
    first = samples[0]
    if not first or any(s != first for s in samples[1:]):
        return ""
    interrupts_off = not any(int(rfl, 16) & 0x200 for _, rfl in first)
    if not interrupts_off and _cpu_ticks(pid) != cpu_at_start:
        return ""  # halted, but woken meanwhile: idle, not frozen
    return ", ".join(f"CPU#{n} at RIP {rip}" for n, (rip, _) in enumerate(first)) + (
        " with interrupts off" if interrupts_off else ", halted, its QEMU using no CPU")


def _cpu_ticks(pid: int) -> int | None:
    """User and system time of a process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _watch(argv: list[str], log_path: Path, deadline: float,
           t0: float, qmp: Path) -> tuple[int, Report]:
    """Run L1, echo its console, follow the events; kill it at the deadline
    or when it froze."""
    report = Report()
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    spoke = threading.Event()

    def reader() -> None:
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace").rstrip("\r\n"))
            spoke.set()
        lines.put(None)
        spoke.set()

    threading.Thread(target=reader, daemon=True).start()
    timed_out = False
    last_line = time.monotonic()
    with contextlib.ExitStack() as cleanup, open(log_path, "w") as log:
        cleanup.callback(proc.wait)
        cleanup.callback(proc.kill)  # also when this process is stopped (SIGTERM)
        while True:
            try:
                line = lines.get(timeout=min(max(deadline - time.monotonic(), 0), PROBE_S))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                where = f", in {report.running[0]}" if report.running else ""
                report.frozen = frozen_vcpus(qmp, spoke, proc.pid)
                if report.frozen:
                    print(f"test-kvm: L1 froze{where}: {report.frozen}, for "
                          f"{FROZEN_EVERY_S * (FROZEN_SAMPLES - 1)}s", flush=True)
                    log.write(f"L1 froze: {report.frozen}\n{stall_report(qmp)}\n")
                    break
                if time.monotonic() - last_line >= STALL_S:
                    print(f"test-kvm: L1's console silent for {STALL_S / 60:.0f} min{where}; "
                          "its vCPUs and kernel backtraces follow", flush=True)
                    log.write(f"silent{where}\n{stall_report(qmp)}\n")
                    last_line = time.monotonic()
                continue
            if line is None:
                break
            last_line = time.monotonic()
            log.write(line + "\n")
            log.flush()
            if m := re.search(r"@@lane (.*)", line):
                report.feed(m.group(1))
            elif "Kernel panic - not syncing" in line:
                report.panic = line
            print(line, flush=True)
    took = time.monotonic() - t0
    print(f"test-kvm: {report.summary()} in {took / 60:.1f} min (log {log_path})")
    if timed_out:
        if report.running:
            nodeid, since = report.running
            print(f"test-kvm: FAILED: the lane's deadline ran out while {nodeid} had run for "
                  f"{time.monotonic() - since:.0f}s", file=sys.stderr)
        else:
            print("test-kvm: FAILED: the lane's deadline ran out with no test running "
                  f"({len(report.results)} finished)", file=sys.stderr)
        return 1, report
    if report.exit is None:
        why = report.l1_died() or f"QEMU status {proc.returncode}"
        print(f"test-kvm: FAILED: L1 ended ({why}) without the command's exit status"
              + (f", during {report.running[0]}" if report.running else "")
              + f"; its console is in {log_path}", file=sys.stderr)
        return 1, report
    if not report.check_ok:
        print("test-kvm: FAILED: `hyperrun check` failed in L1", file=sys.stderr)
        return 1, report
    return report.exit, report


BENCH_NOTE = """# `hyperrun bench start` in the KVM lane's L1 VM: KVM against TCG

**Nested emulation.** These figures come from an L1 VM that itself runs
under TCG (software emulation) on a host without usable KVM. Its "KVM"
guests are still translated by the outer TCG: the ratios below say how the
two modes of the same runtime compare *inside that L1*, not what KVM gives
on real hardware, and none of the times is a KVM time. The host's own
figures are in `results.md`; do not mix the two tables.

Made by `python -m tests.nested.lane --bench N` ({runs} rounds each, one
after the other in the same L1: first `HYPERRUN_ACCEL=kvm`, then
`HYPERRUN_ACCEL=tcg`), {date}, L1 with {cpus} vCPUs and {memory} of RAM,
hyperrun at {commit}.

| variant | what runs | KVM in L1 | TCG in L1 | TCG / KVM |
| --- | --- | ---: | ---: | ---: |
"""


def bench(runs: int, deadline_s: float, why: str) -> int:
    """bench start in L1 with KVM, then with TCG; docs/bench/nested.md."""
    hr = "/opt/hyperrun-venv/bin/hyperrun"
    command = " && ".join(
        f"HYPERRUN_ACCEL={a} {hr} bench start -n {runs} --no-report --json /mnt/results/{a}.json"
        for a in ("kvm", "tcg"))
    code, report, files = run_nested(command, deadline_s, why, ("kvm.json", "tcg.json"))
    if code != 0 or len(files) != 2:
        return code or 1
    import json

    kvm, tcg = (json.loads(files[f])["start"]["variants"] for f in ("kvm.json", "tcg.json"))
    machine = json.loads(files["kvm.json"])["machine"]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # L1 has no git
    text = BENCH_NOTE.format(runs=runs, date=machine["date"], cpus=L1_CPUS, memory=L1_MEMORY,
                             commit=commit)
    for name, v in kvm.items():
        if name in tcg:
            k, t = v["median_s"], tcg[name]["median_s"]
            text += f"| {name} | {v['what']} | {k:.2f} s | {t:.2f} s | {t / k:.1f} |\n"
    out = REPO / "docs" / "bench" / "nested.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deadline", type=float, default=float(
        os.environ.get("HYPERRUN_KVM_DEADLINE_MIN", DEFAULT_DEADLINE_MIN)),
        help="minutes for the whole lane, the L1 image build included (default %(default)s)")
    ap.add_argument("--nested", action="store_true", help="use an L1 VM even if this host has KVM")
    ap.add_argument("--bench", type=int, metavar="ROUNDS",
                    help="instead of the tests: `hyperrun bench start` in L1, KVM then TCG "
                         "(docs/bench/nested.md)")
    args, extra = ap.parse_known_args(argv)
    # SIGTERM (CI's timeout, a kill) unwinds like Ctrl-C: L1 killed, its files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pytest_args = PYTEST[:-1] + extra if extra else PYTEST
    ok, why = host_has_kvm_vsock()
    try:
        if args.bench:
            return bench(args.bench, args.deadline * 60, why)
        if ok and not args.nested:
            return run_here(pytest_args, args.deadline * 60)

        def command(argv: list[str]) -> str:
            return shlex.join(["/opt/hyperrun-venv/bin/python", "-m", "pytest", *argv])

        end = time.monotonic() + args.deadline * 60
        code, report, _ = run_nested(command(pytest_args), end - time.monotonic(), why)
        if (died := report.l1_died()) and end - time.monotonic() > 15 * 60:
            # L1 itself (its kernel, or the outer TCG) failed, not a test:
            # the tests that had not finished run again in a new L1.
            done = [nodeid for nodeid, _, _ in report.results]
            print(f"test-kvm: {died} (nested emulation); the tests not finished run again "
                  f"in a new L1 ({len(done)} finished)", flush=True)
            code, again, _ = run_nested(
                command(pytest_args + [f"--deselect={n}" for n in done]),
                end - time.monotonic(), why, log_name="test-kvm-again.log")
            again.results[:0] = report.results
            report = again
        return check_tests(code, report)
    except image.BuildError as exc:
        print(f"test-kvm: {exc}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired:
        print("test-kvm: FAILED: the lane's deadline ran out", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
