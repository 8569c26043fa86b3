"""Pod networking end to end: real VMs on a CNI bridge (Debian's plugins),
reached from the host by pod IP and host port, pod to pod, DNS config and
hostname in the guest, user-mode networking, and nothing left behind
after many pods or after a kill -9 of the daemon."""
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hyperrun.network import cni_available, default_conflist
from hyperrun.proto import cri_api_pb2 as cri
from tests.integration.test_cri import Daemon
from tests.integration.test_network_host import _remove_new_chains, host_links, iptables_state, sh

NETWORK, BRIDGE, SUBNET = "hrpod", "hrpod0", "10.214.0.0/24"
HTTPD = "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"


def cni_network(tmp_path_factory, network: str = NETWORK, bridge: str = BRIDGE,
                subnet: str = SUBNET):
    """A CNI conf dir for a test network (skips without root or plugins);
    yields (conf dir, host-local leases dir) and removes the bridge and the
    chains it made afterwards. Modules that must not share a bridge with
    concurrent runs of this one pass a name, bridge and subnet of their own."""
    if os.geteuid() != 0:
        pytest.skip("not root: netns, CNI plugins and taps need CAP_NET_ADMIN")
    root = tmp_path_factory.mktemp("podnet")
    conf_dir = root / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-test.conflist").write_text(json.dumps(default_conflist(
        name=network, bridge=bridge, subnet=subnet, data_dir=str(root / "ipam"))))
    ok, reason = cni_available(conf_dir)
    if not ok:
        pytest.skip(f"CNI not available: {reason}")
    v4, v6 = sh("iptables-save"), sh("ip6tables-save")
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    yield conf_dir, root / "ipam" / network
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    # Only chains of this network: concurrent runs of other tests share the
    # plugins' chains and have their own.
    mentioning = (f'\\"{network}\\"', subnet.rsplit(".", 1)[0] + ".")
    _remove_new_chains("iptables", v4, mentioning)
    _remove_new_chains("ip6tables", v6, mentioning)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


@pytest.fixture(scope="module")
def cni_env(tmp_path_factory):
    yield from cni_network(tmp_path_factory)


@pytest.fixture
def netd(vm_assets, cni_env):
    base = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))
    d = Daemon(base, ("--network", "cni", "--cni-conf-dir", str(cni_env[0])))
    d.start()
    yield d
    d.close()


def state(leases: Path) -> dict:
    """What pods may leave on the host: netns files, links (veths, taps),
    iptables rules and chains, host-local leases."""
    netns = sorted(n for n in os.listdir("/run/netns") if n.startswith("hyperrun-")) \
        if os.path.isdir("/run/netns") else []
    # iptables as a sorted list of lines: what a pod leaves is a line, and
    # the plugins' shared chains may be listed in another order meanwhile.
    return {"netns": netns, "links": host_links() - {BRIDGE},
            "iptables": sorted(iptables_state().splitlines()),
            "leases": sorted(p.name for p in leases.iterdir()
                             if p.name[0].isdigit()) if leases.exists() else []}


def state_diff(before: dict, after: dict) -> str:
    """What changed between two state() snapshots, line by line."""
    out = []
    for key in before:
        b, a = before[key], after[key]
        if b == a:
            continue
        b = b.splitlines() if isinstance(b, str) else sorted(b)
        a = a.splitlines() if isinstance(a, str) else sorted(a)
        out += [f"{key}: -{x}" for x in b if x not in a] + [f"{key}: +{x}" for x in a if x not in b]
    return "\n".join(out)


def run_pod(d: Daemon, image: str, name: str, script: str, **pod_kw):
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="net"),
        log_directory=str(d.base / "logs" / name), **pod_kw)
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                 image=cri.ImageSpec(image=image), command=["sh", "-c", script])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    return pod, cid


def pod_ip(d: Daemon, pod: str) -> str:
    return d.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.network.ip


def http_get(url: str, timeout: float = 30) -> str:
    """Retried until the server in the guest listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def exec_sync(d: Daemon, cid: str, script: str) -> tuple[int, str]:
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script],
                                               timeout=30))
    return r.exit_code, r.stdout.decode() + r.stderr.decode()


def remove_pod(d: Daemon, pod: str) -> None:
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def warm_up(d: Daemon, image: str) -> None:
    """The first pod with a host port makes the plugins' shared chains,
    which stay: later before/after comparisons see only per-pod state."""
    d.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    pod, _ = run_pod(d, image, "warm", "true", port_mappings=[
        cri.PortMapping(container_port=80, host_port=18930)])
    remove_pod(d, pod)


@pytest.mark.kvm
def test_pod_ip_host_port_pod_to_pod_and_dns(netd, pushed, cni_env):
    d = netd
    leases = cni_env[1]
    status = d.runtime.Status(cri.StatusRequest()).status
    assert {c.type: c.status for c in status.conditions}["NetworkReady"] is True
    image = pushed.ref("busybox:latest")
    warm_up(d, image)
    before = state(leases)

    web, _ = run_pod(d, image, "web", HTTPD, hostname="web-host",
                     port_mappings=[cri.PortMapping(container_port=80, host_port=18931)],
                     dns_config=cri.DNSConfig(servers=["10.214.0.53"],
                                              searches=["net.svc.cluster.local", "svc.cluster.local"],
                                              options=["ndots:5"]))
    ip = pod_ip(d, web)
    assert ip.startswith("10.214.0."), ip
    assert http_get(f"http://{ip}/") == "hello from web-host\n"               # host → pod IP
    assert http_get("http://127.0.0.1:18931/") == "hello from web-host\n"     # hostPort on localhost

    client, cid = run_pod(d, image, "client", "sleep 600")
    code, out = exec_sync(d, cid, f"wget -qO- http://{ip}/")                  # pod → pod
    assert (code, out) == (0, "hello from web-host\n")
    code, out = exec_sync(d, cid, "hostname; cat /etc/hostname; grep client /etc/hosts")
    assert code == 0 and out.splitlines()[:2] == ["client", "client"], out
    assert pod_ip(d, client) in out

    web_cid = d.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id=web))).containers[0].id
    code, resolv = exec_sync(d, web_cid, "cat /etc/resolv.conf")
    assert resolv.splitlines() == ["nameserver 10.214.0.53",
                                   "search net.svc.cluster.local svc.cluster.local",
                                   "options ndots:5"]

    for pod in (web, client):
        remove_pod(d, pod)
    after = state(leases)
    assert after == before, state_diff(before, after)


def test_user_mode_network_with_a_host_port(vm_assets, pushed):
    base = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))
    d = Daemon(base, ("--network", "user"))
    d.start()
    try:
        image = pushed.ref("busybox:latest")
        d.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
        pod, cid = run_pod(d, image, "slirp", HTTPD, hostname="slirp",
                           port_mappings=[cri.PortMapping(container_port=80, host_port=18932,
                                                          host_ip="127.0.0.1")])
        assert pod_ip(d, pod) == "10.0.2.15"
        assert http_get("http://127.0.0.1:18932/") == "hello from slirp\n"
        code, out = exec_sync(d, cid, "cat /etc/resolv.conf; ip route")
        assert "nameserver 10.0.2.3" in out and "default via 10.0.2.2" in out
        remove_pod(d, pod)
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_no_network_leaks_after_many_pods_and_a_daemon_kill(netd, pushed, cni_env):
    d = netd
    leases = cni_env[1]
    image = pushed.ref("busybox:latest")
    warm_up(d, image)
    before = state(leases)
    for i in range(20):
        pod, _ = run_pod(d, image, f"p{i}", "true", port_mappings=[
            cri.PortMapping(container_port=80, host_port=18940 + i)])
        assert pod_ip(d, pod)
        remove_pod(d, pod)
    assert state(leases) == before

    pods = [run_pod(d, image, f"k{i}", "sleep 600", port_mappings=[
        cri.PortMapping(container_port=80, host_port=18960 + i)])[0] for i in range(2)]
    assert state(leases) != before
    d.kill9()
    d.start()
    ips = {pod_ip(d, p) for p in pods}
    assert len(ips) == 2 and "" not in ips   # re-attached, addresses kept
    for p in pods:
        remove_pod(d, p)
    assert state(leases) == before
    assert not list((d.base / "run" / "sandboxes").iterdir())
