"""Soak: pod lifecycles (RunPodSandbox, CreateContainer, StartContainer,
ExecSync with its output checked, StopPodSandbox, RemovePodSandbox) from 4
gRPC clients at once against one daemon (CNI networking where it works,
else user mode; pod VMs restored from a template), bounded by an overall
timeout. Zero errors; nothing left afterwards (QEMU, children of the
daemon, mounts, sockets in the run root, netns, host links, iptables rules,
leases, run directories, cgroups); the daemon's RSS and fd count are
reported before and after, and RSS may grow by less than 64 MiB (a leak
check, not a speed check).

HYPERRUN_SOAK_LIFECYCLES (default 200) and HYPERRUN_SOAK_TIMEOUT (seconds,
default 1800) change the bounds."""
import os
import queue
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc
from tests.conftest import REPORTS
from tests.framework import Daemon
from tests.framework.cni import cni_network
from tests.integration.test_faults import NOTHING, leftovers

LIFECYCLES = int(os.environ.get("HYPERRUN_SOAK_LIFECYCLES", "200"))
TIMEOUT_S = float(os.environ.get("HYPERRUN_SOAK_TIMEOUT", "1800"))
CLIENTS = 4
NETWORK, BRIDGE, SUBNET = "hrsoak", "hrsoak0", "10.217.0.0/24"
RSS_GROWTH_LIMIT_MIB = 64


@pytest.fixture(scope="module")
def soak_net(tmp_path_factory):
    """(conf dir, leases dir) of a CNI network of this module's own, or None
    for user-mode networking where CNI does not work here."""
    gen = cni_network(tmp_path_factory, NETWORK, BRIDGE, SUBNET)
    try:
        env = next(gen)
    except pytest.skip.Exception as exc:
        print(f"soak: user-mode networking ({exc})")
        yield None
        return
    yield env
    next(gen, None)


@pytest.fixture
def soak_daemon(daemon_factory, soak_net):
    args = ("--network", "cni", "--cni-conf-dir", str(soak_net[0])) if soak_net \
        else ("--network", "user")
    return daemon_factory(*args, template=True)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "--ppid", str(pid)],
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _sockets(root: Path) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                pass
    return found


def lifecycle(runtime, image: str, d: Daemon, i: int, pods: list[str]) -> None:
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"soak-{i}", uid=f"uid-soak-{i}", namespace="soak"),
        log_directory=str(d.base / "logs"))
    pod = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config),
                                timeout=300).pod_sandbox_id
    pods.append(pod)
    try:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                     image=cri.ImageSpec(image=image), command=["sleep", "600"])
        cid = runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config), timeout=300).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=300)
        r = runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["echo", f"lifecycle {i}"],
                                                 timeout=120), timeout=300)
        if (r.exit_code, r.stdout) != (0, f"lifecycle {i}\n".encode()):
            raise AssertionError(f"exec in pod {i}: {r}")
    finally:
        runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=300)
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


@pytest.mark.timeout(TIMEOUT_S + 600)
def test_soak(soak_daemon, soak_net, pushed):
    d = soak_daemon
    leases = soak_net[1] if soak_net else d.base / "no-leases"
    image = pushed.ref("busybox:latest")
    d.pull(image)
    channels = [grpc.insecure_channel(f"unix://{d.socket}") for _ in range(CLIENTS)]
    clients = [cri_grpc.RuntimeServiceStub(c) for c in channels]
    pods: list[str] = []
    # Warm-up, not counted: the first pod makes the template (and the CNI
    # plugins' shared chains); every client connects.
    lifecycle(clients[0], image, d, -1, pods)
    for c in clients:
        c.Version(cri.VersionRequest())
    pid = d.proc.pid
    before = {"rss_kib": _status_kib(pid, "VmRSS"), "fds": _fds(pid),
              "children": _children(pid), "sockets": _sockets(d.base / "run"),
              "leftovers": leftovers(d, leases, pods, NETWORK, BRIDGE)}

    todo: queue.Queue[int] = queue.Queue()
    for i in range(LIFECYCLES):
        todo.put(i)
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + TIMEOUT_S

    def client(runtime) -> None:
        while time.monotonic() < deadline:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                lifecycle(runtime, image, d, i, pods)
                with lock:
                    done[0] += 1
            except Exception as exc:  # counted, and the soak goes on
                with lock:
                    errors.append(f"lifecycle {i}: {exc!r}"[:500])

    threads = [threading.Thread(target=client, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0

    # Give the daemon a moment to finish what follows a removal (a VM's
    # watcher, CNI DEL), then take the same measures.
    deadline = time.monotonic() + 30
    while (leftovers(d, leases, pods, NETWORK, BRIDGE) != before["leftovers"]
           or _children(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = {"rss_kib": _status_kib(pid, "VmRSS"), "fds": _fds(pid),
             "children": _children(pid), "sockets": _sockets(d.base / "run"),
             "leftovers": leftovers(d, leases, pods, NETWORK, BRIDGE)}
    REPORTS["soak"] = [
        f"{done[0]} of {LIFECYCLES} lifecycles from {CLIENTS} clients, {len(errors)} errors, "
        f"{wall:.1f} s wall, {done[0] / wall:.2f} lifecycles/s, "
        f"network {'cni' if soak_net else 'user'}, template VMs",
        f"daemon RSS {before['rss_kib'] / 1024:.1f} MiB before, {after['rss_kib'] / 1024:.1f} MiB "
        f"after (peak {_status_kib(pid, 'VmHWM') / 1024:.1f} MiB); open fds {before['fds']} "
        f"before, {after['fds']} after",
        f"leftovers after: {after['leftovers']}; daemon children after: {after['children']}"]
    for c in channels:
        c.close()
    assert errors == [], errors[:5]
    assert done[0] == LIFECYCLES, f"{done[0]} of {LIFECYCLES} within {TIMEOUT_S:.0f} s"
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert before["leftovers"] == NOTHING, before["leftovers"]
    assert after["leftovers"] == NOTHING, after["leftovers"]
    assert after["children"] == before["children"] == [], after["children"]
    assert after["sockets"] == before["sockets"], after["sockets"]
    assert after["fds"] <= before["fds"], (before["fds"], after["fds"])
    assert (after["rss_kib"] - before["rss_kib"]) / 1024 < RSS_GROWTH_LIMIT_MIB
