"""Faults, and what is left after them: a pod's QEMU killed from outside.
The pod goes NotReady, its running containers are reported exited with the
reason, and everything the VM held is freed at once: its network (netns,
veth, iptables rules, lease), run directory and volume binds."""
import os
import signal
import time

from hyperrun.proto import cri_api_pb2 as cri
from tests.conftest import qemu_pids
from tests.integration.test_cri import _mounts_under
from tests.integration.test_network import (cni_env, netd, pod_ip, remove_pod,  # noqa: F401
                                            state, warm_up)


def test_qemu_killed(netd, pushed, cni_env, tmp_path):
    d = netd
    image = pushed.ref("busybox:latest")
    warm_up(d, image)
    before = state(cni_env[1])
    vms_before = qemu_pids()
    volume = tmp_path / "vol"
    volume.mkdir()
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="victim", uid="uid-victim", namespace="faults"),
        log_directory=str(d.base / "logs"), port_mappings=[
            cri.PortMapping(container_port=80, host_port=18990)])
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                 image=cri.ImageSpec(image=image), command=["sleep", "600"],
                                 mounts=[cri.Mount(container_path="/vol", host_path=str(volume))])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    assert pod_ip(d, pod) and _mounts_under(d.base)

    (vm,) = qemu_pids() - vms_before
    os.kill(vm, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
        if status.state == cri.SANDBOX_NOTREADY and state(cni_env[1]) == before:
            break
        time.sleep(0.2)
    assert status.state == cri.SANDBOX_NOTREADY
    c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert (c.state, c.reason, c.exit_code) == (cri.CONTAINER_EXITED, "VMExited", 255)
    assert "VM exited" in c.message
    assert state(cni_env[1]) == before, "the network outlived its VM"
    assert _mounts_under(d.base) == [] and not list((d.base / "run" / "sandboxes").iterdir())
    assert status.network.ip == ""
    # The dead pod still answers and goes as usual.
    remove_pod(d, pod)
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert volume.is_dir()


def _rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_flooding_container_loses_nothing_and_the_daemon_stays_small(netd, pushed):
    """60 MB of output as fast as the guest can write it: every byte in the
    CRI log, the daemon's peak memory barely moves."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="flood", uid="uid-flood", namespace="faults"),
        log_directory=str(d.base / "logs"))
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    peak_before = _rss_peak_kib(d.proc.pid)
    lines = 5_000_000  # "0123456789ab\n": 13 bytes each, 65 MB
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="f"),
                                 image=cri.ImageSpec(image=image), log_path="f.log",
                                 command=["sh", "-c", f"yes 0123456789ab | head -n {lines}"])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        if c.state == cri.CONTAINER_EXITED:
            break
        time.sleep(0.5)
    assert c.state == cri.CONTAINER_EXITED and c.exit_code == 0
    total, full = 0, 0
    with open(c.log_path, "rb") as f:
        for entry in f:
            _, stream, tag, text = entry.split(b" ", 3)
            assert stream == b"stdout"
            if tag == b"F":
                full += 1
                total += len(text)
            else:
                total += len(text) - 1  # a partial line's entry ends in the log's own newline
    assert total == lines * 13
    assert full == lines
    growth_mib = (_rss_peak_kib(d.proc.pid) - peak_before) / 1024
    print(f"daemon peak RSS grew {growth_mib:.1f} MiB while logging {total / 1e6:.0f} MB")
    assert growth_mib < 64
    remove_pod(d, pod)
