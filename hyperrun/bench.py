"""`make bench`: hyperrun measured against baselines, in one invocation,
interleaved, reported as medians and ratios — never as timed asserts.

start   `true` in the same busybox image, every way there is, interleaved:
        `runc run` on the host (no VM: the baseline a user would otherwise
        pick); `hyperrun run --rm IMAGE true` through a daemon booting
        cold, through one restoring a VM template, through one with a pool
        of ready sandboxes (where this build has one); `run --rootfs DIR`
        without a daemon, cold and from a template; `run --direct` (the
        program as the VM's init); and the QEMU floor, the very VM `run
        --rootfs` boots with an init that exits at once. Medians, ratios
        to cold and to runc, the PSS of one idle sandbox of each kind; the
        report goes to docs/bench (results.md, results.json, start.png).
images  `hyperrun pull` (fetch + unpack into the erofs root) of a Debian
        image of two layers and 100+ MB from a local docker-registry,
        against `skopeo copy` + `umoci unpack` of the same image; and the
        second `hyperrun run IMAGE true` (image prepared) against the
        first (pull, unpack, boot).
cri     hyperrun's daemon against containerd + runc (where installed:
        apt-get install containerd runc), the same CRI calls interleaved
        round by round: RunPodSandbox, Create+Start, first output,
        ExecSync, Stop+Remove (medians, ratios); then critest -benchmark
        on both where a local critest exists (HYPERRUN_CRITEST).
network host -> pod over HTTP on the CNI bridge (100 MB, and a small
        request) against the same from a plain netns on the same bridge.
density 30 idle pods at once (each answers an exec), booted and restored
        from a template: time to start them, median PSS per pod VM.
scale   idle pods added step by step (--steps, default 10,30,60,100; each
        answers an exec), from a template and booted (--modes) while memory
        allows: at each count the time to start them all, the idle CPU per
        pod VM and the daemon's over --window seconds, PSS per pod, the
        daemon's RSS, fds and threads, and the latency of ListPodSandbox,
        ListContainers, `hyperrun ps` and `hyperrun stats` (median of 3).
        Not run by default (minutes, and most of the host's memory); its
        report: scale.md, scale.json, scale.png in docs/bench.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyperrun import benchreport
from hyperrun.busybox import make_rootfs

from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm import rundir
from hyperrun.vm.config import Share
from hyperrun.vm.memory import pss_kib, tcg_cache_kib
from hyperrun.vm import new as new_vm

HYPERRUN = str(Path(sys.executable).parent / "hyperrun")


def timed(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


def timed_floor(rootfs: Path) -> float:
    # The guest image and a share, as a run has, and an init that exits at once.
    config = SandboxConfig(shares=[Share("floor", rootfs.resolve())], init="/bin/true")
    vm = new_vm(config.vm_config())
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


def _busybox_layout(work: Path):
    """The test busybox image as an OCI layout (umoci): the one image that
    every variant of the start section runs."""
    from hyperrun.sample_images import Layout, build_busybox

    layout = Layout(work / "oci")
    build_busybox(layout, "busybox", work)
    return layout


def _load_busybox(layout, work: Path, env: dict) -> None:
    """The busybox layout, loaded as bench/busybox into env's data root."""
    archive = work / "busybox.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout.image('busybox')}",
                    f"docker-archive:{archive}:bench/busybox:latest"], check=True)
    subprocess.run([HYPERRUN, "load", "-i", str(archive)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


class Runc:
    """The baseline a user would otherwise pick: the same image as a plain
    container on the host, with Debian's runc. The bundle is `umoci unpack`
    of the bench's busybox layout; the state root is private.

    runc's default cgroup driver (cgroupfs) works on this host's hybrid
    layout (v1 controllers, cgroup2 only at /sys/fs/cgroup/unified): it
    makes /<id> in each v1 hierarchy and removes it with the container.
    --systemd-cgroup would need systemd as PID 1, which it is not here.
    (Debian's crun refuses the hybrid layout, hence runc.)"""

    def __init__(self, layout, work: Path) -> None:
        self.bundle, self.state = work / "runc-bundle", work / "runc-state"
        subprocess.run(["umoci", "unpack", "--image", layout.image("busybox"), str(self.bundle)],
                       check=True, stdout=subprocess.DEVNULL)
        self.count = 0
        self.id = ""
        self.set_args(["true"])

    def set_args(self, args: list[str]) -> None:
        path = self.bundle / "config.json"
        config = json.loads(path.read_text())
        # umoci's config runs the image's Cmd on a terminal.
        config["process"].update(terminal=False, args=args)
        path.write_text(json.dumps(config))

    def argv(self) -> list[str]:
        """`runc run` in the foreground: it deletes the container when its
        process exits."""
        self.count += 1
        self.id = f"hr-bench-{os.getpid()}-{self.count}"
        return ["runc", "--root", str(self.state), "run", "--bundle", str(self.bundle), self.id]

    def kill(self) -> None:
        subprocess.run(["runc", "--root", str(self.state), "kill", self.id, "KILL"],
                       stderr=subprocess.DEVNULL)


class DaemonFailed(RuntimeError):
    """The daemon exited instead of serving (an option it does not know...)."""


IDLE = "echo ready; exec sleep 3600"


class NotMeasured(RuntimeError):
    pass


def _idle_pss(argv: list[str], env: dict | None, measure, end) -> float:
    """Start argv, which prints "ready" once its sandbox is up and then
    idles; two seconds later, measure(proc) (MiB); end(proc) after."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err)
        try:
            for line in proc.stdout:
                if b"ready" in line:
                    break
            else:
                proc.wait()
                err.seek(0)
                raise NotMeasured(f"{' '.join(argv[:4])} ended ({proc.returncode}) before it was "
                                  f"ready: {err.read().decode(errors='replace')[-400:].strip()}")
            time.sleep(2)
            return measure(proc)
        finally:
            end(proc)
            proc.wait()


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for p in pids:  # grows while we walk it
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _run_dirs(run_root: Path) -> list[Path]:
    """The VM run directories under a run root: daemons' sandboxes' (under
    each one's owner key) or, for runs without a daemon, each embedded
    host's."""
    return [*run_root.glob("sandboxes/*/*"), *run_root.glob("embedded/*/vms/*")]


def _vm_pss_mib(run_root: Path, measure=None) -> list[float]:
    """PSS (MiB) of each running QEMU whose run directory is under the run
    root (_run_dirs), or what measure(pid) says in KiB (tcg_cache_kib: its
    TCG cache's share)."""
    measure = measure or pss_kib
    pids = [rundir.qemu_pid(p) for p in _run_dirs(run_root)]
    return [measure(pid) / 1024 for pid in pids if pid is not None and rundir.alive_qemu(pid)]


def _daemon_pss(d: "_Daemon") -> float:
    """Median PSS of the daemon's VMs with one idle pod (a pool's ready VMs
    count too: they are idle VMs of the same kind)."""
    pod_id, config = d.pod("idle")
    d.container(pod_id, config, "idle", "sleep 3600")
    time.sleep(2)
    pss = statistics.median(_vm_pss_mib(d.base / "run"))
    d.remove_pod(pod_id)
    return pss


def _start_daemon(base: Path, config: str, *args: str, env: dict | None = None) -> "_Daemon":
    base.mkdir(parents=True, exist_ok=True)
    if "pool_size" not in config:  # the default ("auto") keeps one
        config += "pool_size = 0\n"
    (base / "config.toml").write_text(f"[sandbox]\n{config}")
    return _Daemon(base, "--network", "none", *args,
                   env={"HYPERRUN_CONFIG": str(base / "config.toml"), **(env or {})})


POOL_SIZE = 2


def _wait_pool(d: "_Daemon", timeout: float = 120) -> bool:
    """Wait until the daemon says its pool is full of ready (warmed) spares
    (CRI Status, verbose): between timed runs, so that its refill does not
    share the CPUs with the next variant's clock."""
    deadline = time.monotonic() + timeout
    while True:
        info = d.rt.Status(d.cri.StatusRequest(verbose=True)).info
        pool = json.loads(info.get("config", "{}")).get("pool", {})
        if pool.get("size", 0) > 0 and pool.get("ready", 0) >= pool["size"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# The start section's variants: name, what runs, and the cold run its
# "x cold" ratio is taken against (same path: daemon or --rootfs).
VARIANTS = [
    ("runc", "`runc run` (plain container on the host, no VM)", None),
    ("floor", "QEMU floor: the VM, an init that exits at once", "cold"),
    ("cold", "`hyperrun run --rm IMAGE true` (daemon, boots)", "cold"),
    ("template", "the same, daemon with `[sandbox] template = true`", "cold"),
    ("pool", f"the same, daemon with templates and a pool of {POOL_SIZE} ready sandboxes "
             "(`--pool-size`)", "cold"),
    ("rootfs-cold", "`hyperrun run --network none --rootfs DIR -- true` (no daemon)", "rootfs-cold"),
    ("rootfs-template", "`hyperrun run --network none --template --rootfs DIR -- true`",
     "rootfs-cold"),
    ("rootfs-network", "the same with the default pod network (CNI as root)", "rootfs-cold"),
    ("direct", "`hyperrun run --direct IMAGE` (`true` as the VM's init)", "cold"),
]


def bench_start(runs: int) -> dict:
    """`true` in the busybox image, every way there is, interleaved: runc on
    the host; through a daemon cold, from a template, from a pool; without
    a daemon (--rootfs) cold and from a template; direct mode; and the QEMU
    floor. Medians, ratios, and the PSS of one idle sandbox of each kind."""
    print(f"== start: `true` in the busybox image, {runs} interleaved rounds")
    work = Path(tempfile.mkdtemp(prefix="hr-bench-", dir="/tmp"))
    templates = Path(tempfile.mkdtemp(prefix="hr-bench-templates-", dir="/dev/shm"))
    env = {**os.environ, "HYPERRUN_TEMPLATES": str(templates), "HYPERRUN_ROOT": str(work / "root"),
           "HYPERRUN_RUN_DIR": str(work / "run")}
    rootfs = str(make_rootfs(Path("build/bench-rootfs")))
    # No network, as the floor: what a network costs is a variant of its own.
    rootfs_run = [HYPERRUN, "run", "--network", "none", "--rootfs", rootfs]
    rootfs_tpl = [HYPERRUN, "run", "--network", "none", "--template", "--rootfs", rootfs]
    rootfs_net = [HYPERRUN, "run", "--template", "--rootfs", rootfs]
    daemons: dict[str, _Daemon] = {}
    runc = None
    times: dict[str, list[float]] = {}
    pss: dict[str, float] = {}
    pss_failed: dict[str, str] = {}

    def client(name: str) -> dict:
        return {**os.environ, "HYPERRUN_SOCKET": str(daemons[name].base / "cri.sock")}

    def end_vms(proc) -> None:
        proc.kill()
        proc.wait()
        for path in _run_dirs(work / "run"):
            rundir.kill_and_remove(path)

    def vm_pss(proc) -> float:
        return statistics.median(_vm_pss_mib(work / "run"))

    try:
        layout = _busybox_layout(work)
        _load_busybox(layout, work, env)
        runc = Runc(layout, work)
        daemons["cold"] = _start_daemon(work / "d-cold", "template = false\n")
        daemons["template"] = _start_daemon(work / "d-template", "template = true\n",
                                            env={"HYPERRUN_TEMPLATES": str(templates)})
        # The pool's spares are restored from the template too (as a user
        # who wants fast starts would run it): it is the same template.
        daemons["pool"] = _start_daemon(work / "d-pool", "template = true\n",
                                        "--pool-size", str(POOL_SIZE),
                                        env={"HYPERRUN_TEMPLATES": str(templates)})
        pool_waits = _wait_pool(daemons["pool"])
        if not pool_waits:
            print("  pool: the daemon does not report its spares ready; not waiting for refills")
        measure = {
            "runc": lambda: timed(runc.argv()),
            "floor": lambda: timed_floor(Path(rootfs)),
            **{name: (lambda name=name: timed([HYPERRUN, "run", "--rm", daemons[name].image, "true"],
                                              client(name))) for name in daemons},
            "rootfs-cold": lambda: timed([*rootfs_run, "--", "true"], env),
            "rootfs-template": lambda: timed([*rootfs_tpl, "--", "true"], env),
            "rootfs-network": lambda: timed([*rootfs_net, "--", "true"], env),
            "direct": lambda: timed([HYPERRUN, "run", "--direct", "--entrypoint", "/bin/true",
                                     "bench/busybox:latest"], env),
        }
        names = [name for name, _, _ in VARIANTS if name in measure]
        for name in names:  # warm the page cache; make the templates, fill the pool
            measure[name]()
        times = {name: [] for name in names}
        for i in range(runs):
            for name in names:
                if name == "pool" and pool_waits:
                    _wait_pool(daemons["pool"])
                times[name].append(measure[name]())
            print(f"  round {i + 1}/{runs}: " + "  ".join(
                f"{name} {times[name][-1]:.3f}s" for name in names), flush=True)

        print("  PSS of one idle sandbox of each kind")
        runc.set_args(["sh", "-c", IDLE])
        idle = {
            "runc": lambda: _idle_pss(
                runc.argv(), None,
                lambda proc: sum(pss_kib(p) for p in _process_tree(proc.pid)) / 1024,
                lambda proc: runc.kill()),
            **{name: (lambda name=name: _daemon_pss(daemons[name])) for name in daemons},
            "rootfs-cold": lambda: _idle_pss([*rootfs_run, "--", "sh", "-c", IDLE], env, vm_pss,
                                             end_vms),
            "rootfs-template": lambda: _idle_pss([*rootfs_tpl, "--", "sh", "-c", IDLE], env,
                                                 vm_pss, end_vms),
            "direct": lambda: _idle_pss([HYPERRUN, "run", "--direct", "--entrypoint", "/bin/sh",
                                         "bench/busybox:latest", "-c", IDLE], env, vm_pss, end_vms),
        }
        for name, measure_pss in idle.items():
            try:
                pss[name] = measure_pss()
            except NotMeasured as exc:  # a footnote in the report, not the end of the bench
                print(f"  PSS of {name} not measured: {exc}")
                pss_failed[name] = str(exc)
    finally:
        for d in daemons.values():
            d.close()
        for path in _run_dirs(work / "run"):
            rundir.kill_and_remove(path)
        shutil.rmtree(templates, ignore_errors=True)
        rundir.remove(work)  # never through a bind of the rootfs a killed run left

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {"runs": runs, "variants": {}, "pss_not_measured": pss_failed}
    for name, what, cold in VARIANTS:
        if name not in median:
            continue
        m = median[name]
        entry = {"what": what, "median_s": round(m, 3), "runs_s": [round(t, 3) for t in times[name]],
                 "ratio_runc": round(m / median["runc"], 1),
                 "pss_mib": round(pss[name], 1) if name in pss else None}
        if cold is not None:
            entry.update(cold=cold, ratio_cold=round(m / median[cold], 2))
        result["variants"][name] = entry
        pss_text = f", PSS {pss[name]:.1f} MiB" if name in pss else ""
        ratio = f", {m / median[cold]:.2f}x {cold}" if cold and name != cold else ""
        row(f"{name}, median", f"{m:.3f} s ({m / median['runc']:.0f}x runc{ratio}){pss_text}")
    return result


def bench_images(runs: int) -> dict:
    # The bench builds and serves its image with the same real tools the
    # tests use (debootstrap, umoci, skopeo, docker-registry).
    from hyperrun.sample_images import Layout, build_debian, debian_minbase, start_registry

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


class _CriClient:
    """A CRI endpoint with the bench's busybox pulled: pods, containers."""

    def __init__(self, endpoint: str, image: str, logs: Path) -> None:
        import grpc

        from hyperrun.proto import cri_api_pb2 as cri
        from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

        self.cri, self.image, self.logs, self.endpoint = cri, image, logs, endpoint
        self.channel = grpc.insecure_channel(endpoint)
        self.rt = cri_grpc.RuntimeServiceStub(self.channel)
        self.im = cri_grpc.ImageServiceStub(self.channel)
        self.im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))

    def pod(self, name: str, **kw):
        cri = self.cri
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
            name=name, uid=name, namespace="bench"), log_directory=str(self.logs), **kw)
        return self.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id, config

    def create(self, pod_id: str, config, name: str, script: str) -> str:
        cri = self.cri
        c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                image=cri.ImageSpec(image=self.image), command=["sh", "-c", script],
                                log_path=f"{name}.log")
        return self.rt.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=c, sandbox_config=config)).container_id

    def container(self, pod_id: str, config, name: str, script: str) -> str:
        cid = self.create(pod_id, config, name, script)
        self.rt.StartContainer(self.cri.StartContainerRequest(container_id=cid))
        return cid

    def exec_sync(self, cid: str, cmd: list[str]):
        return self.rt.ExecSync(self.cri.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=30))

    def remove_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(self.cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self.rt.RemovePodSandbox(self.cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_all(self) -> None:
        for pod in self.rt.ListPodSandbox(self.cri.ListPodSandboxRequest()).items:
            self.remove_pod(pod.id)


def _busybox_registry(base: Path):
    """The bench's busybox in a loopback registry: (layout, registry, ref)."""
    from hyperrun.sample_images import start_registry

    layout = _busybox_layout(base)
    registry = start_registry(base / "registry")
    try:
        registry.push(layout.path, "busybox", "busybox:latest")
    except BaseException:
        registry.stop()
        raise
    return layout, registry, registry.ref("busybox:latest")


class _Daemon(_CriClient):
    """A daemon on a private root with the busybox test image in a local
    registry (its own, or `registry`'s), pulled; the bench removes its VMs
    after (they outlive it by design)."""

    def __init__(self, base: Path, *args: str, env: dict | None = None, registry=None) -> None:
        self.base = base
        self.proc = self.registry = None
        base.mkdir(parents=True, exist_ok=True)
        if registry is None:
            _, self.registry, image = _busybox_registry(base)
        else:
            image = registry.ref("busybox:latest")
        env = {**os.environ, "HYPERRUN_ROOT": str(base / "root"),
               "HYPERRUN_RUN_DIR": str(base / "run"), **(env or {})}
        if "HYPERRUN_CONFIG" not in env:  # booting pods, no pool: not the defaults
            (base / "config.toml").write_text("[sandbox]\ntemplate = false\npool_size = 0\n")
            env["HYPERRUN_CONFIG"] = str(base / "config.toml")
        self.socket = base / "cri.sock"
        # Its output goes to a file: a pipe nobody reads would fill and stall it.
        log = base / "daemon.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([HYPERRUN, "daemon", "--socket", str(self.socket), *args],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        while b"hyperrun daemon serving" not in log.read_bytes():
            if self.proc.poll() is not None:
                self.proc = None
                self.close()
                lines = log.read_text(errors="replace").strip().splitlines()
                raise DaemonFailed(lines[-1] if lines else "exited")
            time.sleep(0.05)
        super().__init__(f"unix://{self.socket}", image, base / "logs")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            for path in (self.base / "run" / "sandboxes").glob("*/*"):
                rundir.kill_and_remove(path)
        if self.registry is not None:
            self.registry.stop()


def _wait_output(log: Path, text: bytes) -> None:
    while not (log.exists() and text in log.read_bytes()):
        time.sleep(0.002)


# What one round of the CRI comparison times, in order, on each runtime.
CRI_STEPS = [
    ("run_pod", "RunPodSandbox"),
    ("create_start", "CreateContainer + StartContainer"),
    ("first_output", "RunPodSandbox to the container's first output line"),
    ("exec_sync", "ExecSync `true` (median of 10 per round)"),
    ("stop_remove", "StopPodSandbox + RemovePodSandbox"),
]


def _cri_round(client: _CriClient, i: int) -> dict:
    t0 = time.perf_counter()
    pod_id, config = client.pod(f"bench{i}")
    t1 = time.perf_counter()
    cid = client.container(pod_id, config, f"c{i}", "echo ready; exec sleep 600")
    t2 = time.perf_counter()
    _wait_output(client.logs / f"c{i}.log", b"ready")
    t3 = time.perf_counter()
    execs = []
    for _ in range(10):
        t = time.perf_counter()
        r = client.exec_sync(cid, ["true"])
        execs.append(time.perf_counter() - t)
        if r.exit_code != 0:
            raise SystemExit(f"ExecSync true exited {r.exit_code}: {r.stderr.decode()[-300:]}")
    t4 = time.perf_counter()
    client.remove_pod(pod_id)
    t5 = time.perf_counter()
    return {"run_pod": t1 - t0, "create_start": t2 - t1, "first_output": t3 - t0,
            "exec_sync": statistics.median(execs), "stop_remove": t5 - t4}


def bench_cri(runs: int) -> dict:
    """hyperrun's daemon against containerd + runc through the same CRI
    calls, interleaved round by round, on CNI networks of their own: pod
    start, container create + start, first output, ExecSync, stop + remove
    (medians, ratios); then critest -benchmark on both, where a local
    critest exists."""
    from hyperrun import benchpeer

    base = Path(tempfile.mkdtemp(prefix="hr-bench-", dir="/tmp"))
    d = peer = registry = None
    clients: dict[str, _CriClient] = {}
    try:
        print("== cri: hyperrun daemon vs containerd + runc, same busybox, same CRI calls")
        layout, registry, image = _busybox_registry(base)
        benchpeer.pause_image(layout, "busybox", "pause")
        registry.push(layout.path, "pause", "pause:bench")
        # The daemon as a user gets it: no config (a template made at the
        # first pod, a pool of spares), waited for before each of its rounds.
        (base / "defaults.toml").write_text("")
        d = _Daemon(base / "hyperrun", "--network", "cni", registry=registry,
                    env={"HYPERRUN_CONFIG": str(base / "defaults.toml")})
        clients["hyperrun"] = d
        try:
            peer = benchpeer.Containerd(base / "containerd", registry.host, registry.ref("pause:bench"))
            clients["containerd"] = _CriClient(peer.endpoint, image, base / "containerd" / "logs")
        except benchpeer.PeerMissing as e:
            row("containerd + runc", f"not measured: {e}")
        for name, client in clients.items():  # warm: images, first network set-up
            _cri_round(client, -1 - len(name))
        samples: dict[str, list[dict]] = {name: [] for name in clients}
        for i in range(runs):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                if name == "hyperrun":
                    _wait_pool(d)
                samples[name].append(_cri_round(clients[name], i))
        result: dict = {}
        for name in clients:
            result[name] = {key: round(statistics.median(s[key] for s in samples[name]) * 1000, 1)
                            for key, _ in CRI_STEPS}
        for key, label in CRI_STEPS:
            hr = result["hyperrun"][key]
            line = f"{hr:.0f} ms"
            if "containerd" in result:
                ct = result["containerd"][key]
                line += f"  containerd {ct:.0f} ms  ratio {hr / ct:.1f}"
            row(f"{label}, median ms", line)
        critest = benchpeer.critest_binary()
        if critest is None:
            row("critest -benchmark", "not run: no critest (HYPERRUN_CRITEST; docs/CRI.md)")
        else:
            for name, client in clients.items():
                client.remove_all()
                bench = benchpeer.critest_benchmark(critest, client.endpoint, base / f"critest-{name}",
                                                    image, max(runs, 5))
                result.setdefault("critest_benchmark", {})[name] = bench
                for spec, ops in bench.items():
                    if isinstance(ops, dict):
                        row(f"critest -benchmark {name}: {spec}",
                            ", ".join(f"{op} {ms:.0f}" for op, ms in ops.items()) + " ms")
                if bench["rc"] != 0:
                    row(f"critest -benchmark {name}", f"exit {bench['rc']}, see {bench['log']}")
        return result
    finally:
        for client in clients.values():
            try:
                client.remove_all()
            except Exception as e:  # noqa: BLE001 - a dead endpoint: its close() below cleans up
                print(f"  cleanup: {e}")
        if peer is not None:
            peer.close()
        if d is not None:
            d.close()
        if registry is not None:
            registry.stop()
        if not os.environ.get("HYPERRUN_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _idle_pods_daemon(mode: str):
    """A daemon on private roots whose pods boot ("cold") or are template
    clones ("template": the template made before anything is timed, as a
    pool would), with no pool; its pods, VMs, roots and templates removed
    after."""
    base = Path(tempfile.mkdtemp(prefix="hr-bench-", dir="/tmp"))
    templates = Path(tempfile.mkdtemp(prefix="hr-bench-templates-", dir="/dev/shm"))
    d = None
    try:
        d = _start_daemon(base, f"template = {str(mode == 'template').lower()}\npool_size = 0\n",
                          env={"HYPERRUN_TEMPLATES": str(templates)})
        if mode == "template":
            pod_id, _ = d.pod("warm")
            d.remove_pod(pod_id)
        yield d
        for pod in d.rt.ListPodSandbox(d.cri.ListPodSandboxRequest()).items:
            d.remove_pod(pod.id)
    finally:
        if d is not None:
            d.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(templates, ignore_errors=True)


def bench_density(count: int) -> dict:
    """`count` idle pods at once, each running a container that answers an
    exec, booted cold and then restored from a template: time to start them
    all and the median PSS of a pod's QEMU."""
    result = {}
    for mode in ("cold", "template"):
        print(f"== density: {count} idle pods, {mode}")
        with _idle_pods_daemon(mode) as d:
            base = d.base
            start = time.perf_counter()
            cids = []
            for i in range(count):
                pod_id, config = d.pod(f"idle{i}")
                cids.append(d.container(pod_id, config, f"c{i}", "sleep 3600"))
            elapsed = time.perf_counter() - start
            for cid in cids:
                r = d.rt.ExecSync(d.cri.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=30))
                assert r.exit_code == 0
            time.sleep(2)  # idle
            median = statistics.median(_vm_pss_mib(base / "run"))
            cache = statistics.median(_vm_pss_mib(base / "run", tcg_cache_kib))
            row(f"{count} pods started ({mode}), each answered an exec", f"{elapsed:.1f} s")
            row(f"PSS per idle pod VM ({mode}), median", f"{median:.1f} MiB, of which "
                f"{cache:.1f} MiB TCG's translation cache (none under KVM)")
            result[mode] = {"start_all_s": round(elapsed, 1), "pss_median_mib": round(median, 1),
                            "tcg_cache_median_mib": round(cache, 1)}
    row("ratio PSS template / cold", f"{result['template']['pss_median_mib'] / result['cold']['pss_median_mib']:.2f}")
    return result


SCALE_STEPS = (10, 30, 60, 100)
IDLE_WINDOW_S = 10.0
# Before a step, the bench wants this much memory free beyond what its new
# pods are expected to take (the previous step's PSS per pod, or a guess).
SCALE_RESERVE_MIB = 2048
SCALE_GUESS_MIB = {"template": 80, "cold": 200}


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _idle_cpu(qemu: list[int], daemon: int, window: float) -> tuple[float, float]:
    """Over window seconds of idling: the CPU the VMs' QEMU processes took,
    as % of one CPU per pod, and the daemon's, as % of one CPU (both from
    /proc/PID/stat's utime + stime)."""
    before = {pid: _cpu_ticks(pid) for pid in [*qemu, daemon]}
    start = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - start
    after = {pid: _cpu_ticks(pid) for pid in before}
    hz = os.sysconf("SC_CLK_TCK")
    used = {pid: (after[pid] - before[pid]) / hz for pid in before
            if before[pid] is not None and after[pid] is not None}
    vms = [used[pid] for pid in qemu if pid in used]
    per_pod = 100 * sum(vms) / elapsed / max(len(vms), 1)
    return per_pod, 100 * used.get(daemon, 0.0) / elapsed


def _proc_status(pid: int) -> dict:
    """The daemon's RSS (MiB), open fds and threads."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"])}


def _median_ms(call, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def _mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemAvailable:"))


def _scale_mode(mode: str, steps: list[int], window: float) -> list[dict]:
    """One daemon, pods added step by step up to each count; at each count,
    the idle cost and the list calls' latency."""
    out: list[dict] = []
    with _idle_pods_daemon(mode) as d:
        base = d.base
        client = {**os.environ, "HYPERRUN_SOCKET": str(base / "cri.sock")}
        cids: list[str] = []
        elapsed_all, per_pod_mib = 0.0, SCALE_GUESS_MIB[mode]
        for count in steps:
            wanted = (count - len(cids)) * per_pod_mib + SCALE_RESERVE_MIB
            if (free := _mem_available_mib()) < wanted:
                print(f"  {mode}: stopping before {count} pods: {free} MiB available, "
                      f"{wanted} MiB wanted")
                break
            start = time.perf_counter()
            while len(cids) < count:
                i = len(cids)
                pod_id, config = d.pod(f"idle{i}")
                cids.append(d.container(pod_id, config, f"c{i}", "sleep 3600"))
            elapsed_all += time.perf_counter() - start
            for cid in cids:
                r = d.rt.ExecSync(d.cri.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60))
                assert r.exit_code == 0, r
            time.sleep(2)  # the execs' aftermath
            qemu = [pid for pid in (rundir.qemu_pid(p) for p in _run_dirs(base / "run"))
                    if pid is not None and rundir.alive_qemu(pid)]
            cpu_pod, cpu_daemon = _idle_cpu(qemu, d.proc.pid, window)
            pss = statistics.median(_vm_pss_mib(base / "run"))
            per_pod_mib = pss * 1.2
            cri = d.cri
            step = {
                "pods": count, "start_all_s": round(elapsed_all, 1),
                "idle_cpu_per_pod_pct": round(cpu_pod, 2),
                "daemon_idle_cpu_pct": round(cpu_daemon, 2),
                "pss_per_pod_mib": round(pss, 1), "daemon": _proc_status(d.proc.pid),
                "list_pods_ms": _median_ms(lambda: d.rt.ListPodSandbox(cri.ListPodSandboxRequest())),
                "list_containers_ms": _median_ms(
                    lambda: d.rt.ListContainers(cri.ListContainersRequest())),
                "ps_ms": _median_ms(lambda: timed([HYPERRUN, "ps"], client)),
                "stats_ms": _median_ms(lambda: timed([HYPERRUN, "stats"], client)),
                "mem_available_mib": _mem_available_mib(),
            }
            out.append(step)
            dm = step["daemon"]
            row(f"{count} pods ({mode}): started in, cumulative", f"{elapsed_all:.1f} s")
            row("  idle CPU per pod (QEMU) / daemon's, over "
                f"{window:g} s", f"{cpu_pod:.2f} % / {cpu_daemon:.2f} % of a CPU")
            row("  PSS per pod, median; daemon RSS, fds, threads",
                f"{pss:.1f} MiB; {dm['rss_mib']} MiB, {dm['fds']}, {dm['threads']}")
            row("  ListPodSandbox, ListContainers, ps, stats (median of 3)",
                f"{step['list_pods_ms']}, {step['list_containers_ms']}, {step['ps_ms']}, "
                f"{step['stats_ms']} ms")
    return out


def bench_scale(steps: list[int], modes: list[str], window: float = IDLE_WINDOW_S) -> dict:
    """Idle pods at growing counts (steps), from template clones and booted,
    each answering an exec; at each count: the time to start them all, the
    host CPU the idle VMs take (per pod) and the daemon's, the PSS per pod,
    the daemon's RSS, fds and threads, and the latency of ListPodSandbox,
    ListContainers, `hyperrun ps` and `hyperrun stats`."""
    result: dict = {"steps": steps, "window_s": window}
    for mode in modes:
        print(f"== scale: idle pods, {mode}, steps {', '.join(map(str, steps))}")
        result[mode] = _scale_mode(mode, steps, window)
    return result


def _http_get(url: str, timeout: float = 60) -> bytes:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def bench_network(runs: int) -> dict:
    """Host -> pod over HTTP on the CNI bridge: a 100 MB transfer and a
    small request, against the same served from a plain netns on the same
    bridge (CNI's own interface, no VM): what the VM and its tap cost."""
    from hyperrun.network import cni, netns

    base = Path(tempfile.mkdtemp(prefix="hr-bench-", dir="/tmp"))
    d = baseline = httpd = None
    netlist = att = client = None
    try:
        print("== network: busybox httpd in a pod vs in a netns on the same CNI bridge")
        d = _Daemon(base, "--network", "cni")
        # The pod's 100 MB lives in guest memory (overlay upper on tmpfs).
        pod_id, config = d.pod("web", linux=d.cri.LinuxPodSandboxConfig(
            resources=d.cri.LinuxContainerResources(memory_limit_in_bytes=512 << 20)))
        d.container(pod_id, config, "web", "mkdir /www && echo ok > /www/small && "
                    "dd if=/dev/zero of=/www/big bs=1M count=100 2>/dev/null && "
                    "exec httpd -f -p 80 -h /www")
        pod_ip = d.rt.PodSandboxStatus(d.cri.PodSandboxStatusRequest(
            pod_sandbox_id=pod_id)).status.network.ip
        # The baseline: a netns given an interface on the same network by
        # the same plugins, serving the same files with the same httpd.
        www = base / "www"
        www.mkdir()
        (www / "small").write_text("ok\n")
        (www / "big").write_bytes(bytes(100 << 20))
        baseline = Path("/run/netns/hyperrun-bench-baseline")
        netns.create(baseline)
        netlist = cni.load_config(cni.DEFAULT_CONF_DIR)
        client = cni.Client(cni.DEFAULT_BIN_DIRS, base / "cni")
        att = cni.Attachment("hyperrun-bench-baseline", str(baseline), "eth0",
                             (("IgnoreUnknown", "1"),))
        result = client.add(netlist, att)
        base_ip = result.sandbox_ips("eth0", str(baseline))[0].address.split("/")[0]
        busybox = shutil.which("busybox") or "/bin/busybox"
        httpd = subprocess.Popen(["ip", "netns", "exec", baseline.name, busybox, "httpd", "-f",
                                  "-p", "80", "-h", str(www)])
        size = {}
        for ip in (pod_ip, base_ip):
            _http_get(f"http://{ip}/small")  # up and warm
        transfer = {"pod": [], "netns": []}
        latency = {"pod": [], "netns": []}
        for _ in range(runs):
            for name, ip in (("pod", pod_ip), ("netns", base_ip)):
                t = time.perf_counter()
                size[name] = len(_http_get(f"http://{ip}/big"))
                transfer[name].append(time.perf_counter() - t)
                for _ in range(10):
                    t = time.perf_counter()
                    _http_get(f"http://{ip}/small")
                    latency[name].append(time.perf_counter() - t)
        assert size["pod"] == size["netns"] == 100 << 20, size
        tp = {k: (100 << 20) / statistics.median(v) / 1e6 for k, v in transfer.items()}
        lat = {k: statistics.median(v) * 1000 for k, v in latency.items()}
        row("host -> pod, 100 MB over HTTP, median", f"{tp['pod']:.0f} MB/s")
        row("baseline: host -> netns on the same bridge", f"{tp['netns']:.0f} MB/s")
        row("ratio (pod / netns)", f"{tp['pod'] / tp['netns']:.3f}")
        row("request latency (GET 3 bytes), pod, median", f"{lat['pod']:.2f} ms")
        row("baseline: netns, median", f"{lat['netns']:.2f} ms")
        row("ratio", f"{lat['pod'] / lat['netns']:.1f}")
        d.remove_pod(pod_id)
        return {"pod_mb_s": round(tp["pod"], 1), "netns_mb_s": round(tp["netns"], 1),
                "pod_latency_ms": round(lat["pod"], 2), "netns_latency_ms": round(lat["netns"], 2)}
    finally:
        if httpd is not None:
            httpd.kill()
            httpd.wait()
        if att is not None:
            entry = client.cached(att.container_id, "eth0")
            client.delete(netlist, att, entry.result if entry else None)
            client.forget(att.container_id, "eth0")
        if baseline is not None:
            netns.remove(baseline)
        if d is not None:
            d.close()
        shutil.rmtree(base, ignore_errors=True)


SECTIONS = {"start": (bench_start, 9), "images": (bench_images, 3), "cri": (bench_cri, 5),
            "network": (bench_network, 3), "density": (bench_density, 30),
            "scale": (bench_scale, 0)}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`python -m hyperrun.bench` (`make bench`) and `hyperrun bench`."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"{', '.join(SECTIONS)} (default: all)")
    ap.add_argument("-n", "--runs", type=int, default=0,
                    help="rounds (runs per measurement); default per section: " +
                         ", ".join(f"{name} {n}" for name, (_, n) in SECTIONS.items()))
    ap.add_argument("--steps", default=",".join(map(str, SCALE_STEPS)),
                    help="scale: the pod counts, comma-separated (default: %(default)s)")
    ap.add_argument("--modes", default="template,cold",
                    help="scale: template clones, booted VMs or both (default: %(default)s)")
    ap.add_argument("--window", type=float, default=IDLE_WINDOW_S,
                    help="scale: seconds over which idle CPU is taken (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--out", type=Path, default=benchreport.REPO / "docs" / "bench",
                    help="where results.md, results.json and start.png go once the bench "
                         "has finished, if it ran the start section (default: docs/bench)")
    ap.add_argument("--no-report", action="store_true", help="write no report files")
    args = ap.parse_args(argv)
    args.sections = args.sections or [name for name in SECTIONS if name != "scale"]
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    result = {"machine": benchreport.machine()}
    print(f"accelerator: {result['machine']['accelerator']}")
    for name in args.sections:
        bench, runs = SECTIONS[name]
        if name == "scale":
            result[name] = bench_scale(sorted(int(n) for n in args.steps.split(",")),
                                       args.modes.split(","), args.window)
            continue
        result[name] = bench(args.runs or runs)
    result["machine"]["loadavg_end"] = benchreport.loadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if "start" in result and not args.no_report:
        for path in benchreport.write(result, args.out):
            print(f"wrote {path}")
    if "scale" in result and not args.no_report:
        for path in benchreport.write_scale(result, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
