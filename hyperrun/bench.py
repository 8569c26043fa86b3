"""`make bench`: cold-start cost of `hyperrun run` against the floor.

The floor is the very VM `hyperrun run` boots — same QEMU command line,
machine, devices, kernel and root image — with an init that exits at once
(/bin/true): what any VM-based run pays at minimum on this host. Both are measured in the same invocation, interleaved, and
reported as medians and their ratio, never as absolute asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hyperrun.busybox import make_rootfs
from hyperrun.run import ROOTFS_TAG
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm import accel, rundir
from hyperrun.vm.config import Share
from hyperrun.vm.qemu import QemuVM

HYPERRUN = str(Path(sys.executable).parent / "hyperrun")


def timed_floor(rootfs: Path) -> float:
    config = SandboxConfig(shares=[Share(ROOTFS_TAG, rootfs.resolve())], init="/bin/true")
    vm = QemuVM(config.vm_config())
    start = time.perf_counter()
    vm.spawn()
    code = vm.process.wait()
    elapsed = time.perf_counter() - start
    rundir.remove(vm.run_dir)
    if code != 0:
        raise SystemExit(f"floor VM failed ({code})")
    return elapsed


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", "--runs", type=int, default=9)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    rootfs = make_rootfs(Path("build/bench-rootfs"))
    run_argv = [HYPERRUN, "run", "--rootfs", str(rootfs), "--", "true"]
    floor, run = [], []
    timed_floor(rootfs)  # warm the page cache for both
    timed(run_argv)
    for i in range(args.runs):
        floor.append(timed_floor(rootfs))
        run.append(timed(run_argv))
        print(f"  round {i + 1}/{args.runs}: floor {floor[-1]:.3f}s  run {run[-1]:.3f}s",
              flush=True)
    f, r = statistics.median(floor), statistics.median(run)
    result = {"accelerator": accel.choose().name, "runs": args.runs,
              "floor_median_s": round(f, 3), "run_median_s": round(r, 3),
              "ratio": round(r / f, 2)}
    print(f"\naccelerator: {result['accelerator']}, {args.runs} interleaved runs each")
    print(f"{'floor (QEMU + kernel + init that exits)':45s} median {f:.3f}s")
    print(f"{'hyperrun run --rootfs DIR -- true':45s} median {r:.3f}s")
    print(f"{'ratio':45s} {r / f:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
