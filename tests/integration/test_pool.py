"""A daemon with a pool of spare VMs (sandbox/pool.py): pods take VMs that
were started before anyone asked for them, each gets its own network and
identity, the pool refills, and spares leave nothing behind — not at a
daemon stop, not after a kill -9 and a restart."""
import json

import pytest

from hyperrun.proto import cri_api_pb2 as cri
from tests.framework import Daemon, qemu_pids, wait_until
from tests.framework.host import http_get, network_state
from tests.integration.test_network import BRIDGE
from tests.integration.test_template import identity

HTTPD = "mkdir -p /www && echo hi from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"
POOL = 2


@pytest.fixture
def pool_daemon(daemon_factory, cni_env):
    return daemon_factory("--network", "cni", "--cni-conf-dir", str(cni_env[0]),
                          "--pool-size", str(POOL), template=True)


def pool(d: Daemon) -> dict:
    info = d.runtime.Status(cri.StatusRequest(verbose=True)).info
    return json.loads(info["config"])["pool"]


def ready_spares(d: Daemon) -> set[str]:
    """Once the pool has all its spares up, the VM ids (run dirs)."""
    wait_until(lambda: pool(d)["ready"] >= POOL, 180, "the pool refilled", interval=0.2,
               state=lambda: pool(d))
    return vm_ids(d)


def vm_ids(d: Daemon) -> set[str]:
    return {p.name for p in d.run_dir.iterdir()} if d.run_dir.is_dir() else set()


def state(leases):
    return network_state(leases, BRIDGE)


def of_vms(netns: str, vm_ids: set[str]) -> bool:
    """Whether a netns is one of these VMs' (named by the sandbox id, of
    which the VM id is the start)."""
    return any(netns.startswith("hyperrun-") and f"-{v}" in netns for v in vm_ids)


def daemon_qemus(d: Daemon) -> set[int]:
    return qemu_pids(d.base / "run")  # QEMU runs in its run directory


@pytest.mark.kvm
def test_pods_take_spare_vms_and_spares_leave_nothing(pool_daemon, pushed, cni_env):
    d = pool_daemon
    leases = cni_env[1]
    image = pushed.ref("busybox:latest")
    assert pool(d)["size"] == POOL
    d.warm_up(image)  # the plugins' shared chains, which stay
    spares = ready_spares(d)
    assert len(spares) == POOL
    before = state(leases)

    pods, cids = [], []
    for i in range(2):
        pod, cid = d.run_pod(image, f"pooled{i}", HTTPD, hostname=f"pooled{i}",
                             port_mappings=[cri.PortMapping(container_port=80,
                                                            host_port=18940 + i)])
        assert pod[:16] in spares, "the pod did not get a spare VM"
        pods.append(pod)
        cids.append(cid)
    ips, macs, uuids = set(), set(), set()
    for i, (pod, cid) in enumerate(zip(pods, cids)):
        ip = d.pod_ip(pod)
        ips.add(ip)
        assert http_get(f"http://{ip}/") == f"hi from pooled{i}\n"
        assert http_get(f"http://127.0.0.1:{18940 + i}/") == f"hi from pooled{i}\n"
        uuid, mac = identity(d, cid)
        uuids.add(uuid)
        macs.add(mac)
    assert len(ips) == len(macs) == len(uuids) == 2

    refilled = ready_spares(d)  # two new spares besides the two pods
    assert len(refilled - spares) == POOL
    # The refills have the image the pods ran plugged already: a pod of it
    # creates its container without a hot-plug (and the guest's disk scan).
    pod, cid = d.run_pod(image, "preplugged", "exec sleep 600")
    assert pod[:16] in refilled
    (created,) = [e for e in d.events("container created") if e["container"] == cid]
    assert created["hotplugged"] is False, created
    d.remove_pod(pod)
    refilled = ready_spares(d)
    for pod in pods:
        d.remove_pod(pod)
    # A pod that does not fit the spares' shape boots its own VM.
    big = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="big", uid="uid-big", namespace="net"),
        linux=cri.LinuxPodSandboxConfig(resources=cri.LinuxContainerResources(
            memory_limit_in_bytes=300 << 20)))
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=big)).pod_sandbox_id
    assert pod[:16] not in refilled and pool(d)["ready"] == POOL
    d.remove_pod(pod)

    d.stop()  # spares are in no record: a stop removes them
    assert not daemon_qemus(d)
    assert not vm_ids(d)
    after = state(leases)
    assert after["netns"] == [n for n in before["netns"] if not of_vms(n, spares)]
    assert after["links"] == before["links"] and after["iptables"] == before["iptables"]
    assert after["leases"] == before["leases"]


def test_spares_of_a_killed_daemon_are_removed_at_its_restart(pool_daemon, cni_env):
    d = pool_daemon
    old = ready_spares(d)
    old_pids = daemon_qemus(d)
    assert len(old_pids) == POOL
    d.kill9()  # the spares' VMs keep running, in no record
    assert daemon_qemus(d) == old_pids
    d.start()
    new = ready_spares(d)
    assert not old & new, "a spare from before the kill survived the restart"
    assert not old_pids & daemon_qemus(d)
    netns = state(cni_env[1])["netns"]
    assert not [n for n in netns if of_vms(n, old)]
    d.stop()
    assert not daemon_qemus(d) and not vm_ids(d)


def test_a_daemon_with_no_config_makes_a_template_then_keeps_a_pool(daemon_factory, pushed):
    """The defaults (no config file, no option): the daemon starts nothing
    until its first pod, which makes the template and is restored from it
    (template "auto") and starts the pool (pool_size "auto", sized from
    the host's available memory: this host has room for one at least); the
    second `hyperrun run --rm IMAGE true` then takes a spare. How each pod
    was started is in the daemon's log."""
    d = daemon_factory(defaults=True)
    image = pushed.ref("busybox:latest")
    d.pull(image)
    info = json.loads(d.runtime.Status(cri.StatusRequest(verbose=True)).info["config"])
    assert info["template"] is True and info["pool"]["size"] >= 1, info
    assert info["pool"]["ready"] == 0 and not daemon_qemus(d)  # nothing before the first need
    d.cli("run", "--rm", image, "true", check=True)
    assert [e["started"] for e in d.events("sandbox started")] == ["template"]
    assert list(d.templates.iterdir()), "no template was made"
    wait_until(lambda: pool(d)["ready"] >= 1, 180, "a spare is ready", interval=0.2,
               state=lambda: pool(d))
    d.cli("run", "--rm", image, "true", check=True)
    assert [e["started"] for e in d.events("sandbox started")] == ["template", "pool"]
    d.stop()
    assert not daemon_qemus(d) and not vm_ids(d)
