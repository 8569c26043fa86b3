"""The peer `make bench cri` measures hyperrun against: containerd with
runc (Debian's packages, installed by the developer, never by the
project) serving the same CRI on the same host, on a private root, socket
and CNI network; and critest's `-benchmark` mode, run on both where a
locally built critest exists.

Nothing here is fetched: containerd and runc come from apt (`apt-get
install containerd runc`), critest from a local build of cri-tools
(HYPERRUN_CRITEST, else the tools folder of hyperrun's cache)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from hyperrun.network.default_config import default_conflist

# A network of the peer's own: its bridge and leases never meet hyperrun's.
PEER_NETWORK = ("hr-bench-peer", "hrpeer0", "10.216.0.0/24")
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")


class PeerMissing(RuntimeError):
    """What the comparison needs and this host lacks (the message says how to get it)."""


def pause_image(layout, base_tag: str, tag: str) -> None:
    """The pod sandbox image containerd runs first in each pod: the bench's
    busybox with a shell that sleeps until SIGTERM (containerd kills it on
    StopPodSandbox), standing in for Kubernetes' pause."""
    layout.umoci("config", "--image", layout.image(base_tag), "--tag", tag, "--clear=config.cmd",
                 "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
                 "--config.entrypoint", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done",
                 "--no-history")


class Containerd:
    """containerd + runc on a private root under `base`, pulling over plain
    HTTP from the loopback registry `registry_host`, with `pause_ref` as
    its sandbox image."""

    def __init__(self, base: Path, registry_host: str, pause_ref: str) -> None:
        missing = [tool for tool in ("containerd", "runc") if shutil.which(tool) is None]
        if missing:
            raise PeerMissing(f"no {' and '.join(missing)} on this host: apt-get install containerd runc")
        cni_dir = next((d for d in CNI_BIN_DIRS if Path(d, "bridge").exists()), None)
        if cni_dir is None:
            raise PeerMissing("no CNI plugins: apt-get install containernetworking-plugins")
        self.base = base
        self.socket = base / "containerd.sock"
        name, self.bridge, subnet = PEER_NETWORK
        net_d = base / "net.d"
        net_d.mkdir(parents=True)
        (net_d / "10-peer.conflist").write_text(json.dumps(default_conflist(
            name=name, bridge=self.bridge, subnet=subnet, data_dir=str(base / "ipam"))))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        # Without restrict_oom_score_adj every RunPodSandbox fails on this
        # host ("runc create failed: can't get final child's PID from pipe");
        # with it containerd never sets an oom_score_adj below its own.
        (base / "config.toml").write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[{cri}]
  sandbox_image = "{pause_ref}"
  enable_selinux = false
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{shutil.which('runc')}"
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{cni_dir}"
  conf_dir = "{net_d}"
[{cri}.registry.mirrors."{registry_host}"]
  endpoint = ["http://{registry_host}"]
""")
        self.log = base / "containerd.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(base / "config.toml")],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise PeerMissing(f"containerd did not start: {self.log.read_text()[-400:]}")
            time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def close(self) -> None:
        """Stop containerd and take back what its pods left: the shims, the
        mounts under the root, the bridge."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1]
            if target.startswith(str(self.base) + "/"):
                subprocess.run(["umount", "-l", target], capture_output=True)
        subprocess.run(["pkill", "-f", f"containerd-shim-runc-v2 .*-address {self.socket}"],
                       capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def critest_binary() -> Path | None:
    """A locally built critest (cri-tools v1.29.0): HYPERRUN_CRITEST, else
    the tools folder of hyperrun's cache."""
    from hyperrun.paths import cache_root

    for candidate in (os.environ.get("HYPERRUN_CRITEST"), cache_root() / "tools" / "critest"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def critest_benchmark(critest: Path, endpoint: str, work: Path, image: str, samples: int) -> dict:
    """critest -benchmark against one CRI endpoint, images pointed at the
    bench's registry; returns {benchmark: {operation: median ms}} from the
    JSON files it writes, plus its own pass/fail."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "images.yaml").write_text(f"defaultTestContainerImage: {image}\n"
                                      f"webServerTestImage: {image}\n")
    (work / "params.yaml").write_text(
        f"containersNumber: {samples}\ncontainersNumberParallel: 1\n"
        f"podsNumber: {samples}\npodsNumberParallel: 1\n"
        f"imagesNumber: {samples}\nimagesNumberParallel: 1\n"
        f"imagePullingBenchmarkImage: {image}\nimageListingBenchmarkImages:\n  - {image}\n")
    out = work / "results"
    out.mkdir(exist_ok=True)
    log = work / "critest.log"
    with open(log, "wb") as f:
        rc = subprocess.run([str(critest), "-benchmark", "--runtime-endpoint", endpoint,
                             "--image-endpoint", endpoint, "-test-images-file", str(work / "images.yaml"),
                             "-benchmarking-params-file", str(work / "params.yaml"),
                             "-benchmarking-output-dir", str(out), "-ginkgo.no-color"],
                            stdout=f, stderr=subprocess.STDOUT).returncode
    result: dict = {"rc": rc, "log": str(log)}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        ops = data.get("operationsNames") or []
        points = [p.get("operationsDurationsNs") or [] for p in data.get("datapoints") or []]
        result[path.stem.removesuffix("_benchmark_data")] = {
            op: round(statistics.median(p[i] for p in points if len(p) > i) / 1e6, 1)
            for i, op in enumerate(ops) if any(len(p) > i for p in points)}
    # "start a container from scratch" reports only in its log: a table
    # row "create PodSandbox and container [duration] | N | Min | Median ...".
    for line in log.read_text(errors="replace").splitlines():
        if line.strip().startswith("create PodSandbox and container [duration]"):
            median = line.split("|")[3].strip()
            ms = float(median[:-2]) if median.endswith("ms") else float(median.rstrip("s")) * 1000
            result["pod_container"] = {"RunPodSandbox+CreateContainer+StartContainer": round(ms, 1)}
    return result
