"""`make bench`: hyperrun measured against baselines, in one invocation,
interleaved, reported as medians and ratios — never as timed asserts.

boot    `hyperrun run --rootfs DIR -- true` against the floor: the very VM
        `hyperrun run` boots (same QEMU command line, machine, devices,
        kernel, root image) with an init that exits at once (/bin/true) —
        what any VM-based run pays at minimum on this host.
images  `hyperrun pull` (fetch + unpack into the erofs root) of a Debian
        image of two layers and 100+ MB from a local docker-registry,
        against `skopeo copy` + `umoci unpack` of the same image; and the
        second `hyperrun run IMAGE true` (image prepared) against the
        first (pull, unpack, boot).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyperrun.busybox import make_rootfs
from hyperrun.run import ROOTFS_TAG
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm import accel, rundir
from hyperrun.vm.config import Share
from hyperrun.vm.qemu import QemuVM

HYPERRUN = str(Path(sys.executable).parent / "hyperrun")


def timed(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


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


def row(label: str, value: str) -> None:
    print(f"  {label:58s} {value}")


def bench_boot(runs: int) -> dict:
    print(f"== boot: {runs} interleaved runs each")
    rootfs = make_rootfs(Path("build/bench-rootfs"))
    run_argv = [HYPERRUN, "run", "--rootfs", str(rootfs), "--", "true"]
    floor, run = [], []
    timed_floor(rootfs)  # warm the page cache for both
    timed(run_argv)
    for i in range(runs):
        floor.append(timed_floor(rootfs))
        run.append(timed(run_argv))
        print(f"  round {i + 1}/{runs}: floor {floor[-1]:.3f}s  run {run[-1]:.3f}s", flush=True)
    f, r = statistics.median(floor), statistics.median(run)
    row("floor (QEMU + kernel + init that exits), median", f"{f:.3f} s")
    row("hyperrun run --rootfs DIR -- true, median", f"{r:.3f} s")
    row("ratio run / floor", f"{r / f:.2f}")
    return {"floor_median_s": round(f, 3), "run_median_s": round(r, 3), "ratio": round(r / f, 2)}


def bench_images(runs: int) -> dict:
    # The bench builds and serves its image with the same real tools the
    # tests use (debootstrap, umoci, skopeo, docker-registry).
    from tests.registry import Layout, build_debian, debian_minbase, start_registry

    from hyperrun.paths import cache_root

    work = Path(tempfile.mkdtemp(prefix="hyperrun-bench-"))
    registry = None
    try:
        print("== images: building a Debian image (debootstrap, umoci) and serving it")
        tree = debian_minbase(cache_root() / "test")
        layout = Layout(work / "oci")
        build_debian(layout, "debian", work, tree)
        registry = start_registry(work / "registry")
        registry.push(layout.path, "debian", "debian:bench")
        ref = registry.ref("debian:bench")
        size = sum(l["size"] for l in layout.manifest("debian")["layers"])
        print(f"  image: {ref}, {len(layout.manifest('debian')['layers'])} layers, "
              f"{size / 1e6:.0f} MB compressed")

        ours, theirs, first, second = [], [], [], []
        for i in range(runs):
            root = work / f"root-{i}"
            env = {**os.environ, "HYPERRUN_ROOT": str(root)}
            ours.append(timed([HYPERRUN, "pull", "-q", ref], env))
            oci, bundle = work / f"skopeo-{i}", work / f"bundle-{i}"
            start = time.perf_counter()
            subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{oci}:bench"], check=True)
            subprocess.run(["umoci", "unpack", "--image", f"{oci}:bench", str(bundle)],
                           check=True, stdout=subprocess.DEVNULL)
            theirs.append(time.perf_counter() - start)
            shutil.rmtree(root), shutil.rmtree(oci), shutil.rmtree(bundle)
            # First run: the image is not there yet (pull, unpack, boot).
            first.append(timed([HYPERRUN, "run", ref, "true"], env))
            second.append(timed([HYPERRUN, "run", ref, "true"], env))
            shutil.rmtree(root)
            print(f"  round {i + 1}/{runs}: pull {ours[-1]:.2f}s  skopeo+umoci {theirs[-1]:.2f}s"
                  f"  first run {first[-1]:.2f}s  second run {second[-1]:.2f}s", flush=True)
        o, t = statistics.median(ours), statistics.median(theirs)
        a, b = statistics.median(first), statistics.median(second)
        row("hyperrun pull (fetch + unpack to erofs), median", f"{o:.2f} s")
        row("skopeo copy + umoci unpack, median", f"{t:.2f} s")
        row("ratio hyperrun / skopeo+umoci", f"{o / t:.2f}")
        row("first hyperrun run IMAGE true (pull, unpack, boot), median", f"{a:.2f} s")
        row("second hyperrun run IMAGE true (prepared image), median", f"{b:.2f} s")
        row("ratio second / first", f"{b / a:.2f}")
        return {"image_bytes": size, "pull_median_s": round(o, 3), "skopeo_umoci_median_s": round(t, 3),
                "pull_ratio": round(o / t, 2), "first_run_median_s": round(a, 3),
                "second_run_median_s": round(b, 3), "second_first_ratio": round(b / a, 2)}
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sections", nargs="*", help="boot and/or images (default: both)")
    ap.add_argument("-n", "--runs", type=int, default=0, help="runs per measurement")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.sections = args.sections or ["boot", "images"]
    if unknown := set(args.sections) - {"boot", "images"}:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    result = {"accelerator": accel.choose().name}
    print(f"accelerator: {result['accelerator']}")
    if "boot" in args.sections:
        result["boot"] = bench_boot(args.runs or 9)
    if "images" in args.sections:
        result["images"] = bench_images(args.runs or 3)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
