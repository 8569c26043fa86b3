"""Faults, and what is left after them: a pod's QEMU killed from outside.
The pod goes NotReady, its running containers are reported exited with the
reason, and everything the VM held is freed at once: its network (netns,
veth, iptables rules, lease), run directory and volume binds."""
import os
import shutil
import signal
import time
from pathlib import Path

from hyperrun.proto import cri_api_pb2 as cri
from tests.conftest import qemu_pids
from tests.integration.test_network import (cni_env, netd, pod_ip, remove_pod, run_pod,  # noqa: F401
                                            state, warm_up)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if str(path) in line.split()[4]]


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
