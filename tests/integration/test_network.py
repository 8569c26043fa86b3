"""Pod networking end to end: real VMs on a CNI bridge (Debian's plugins),
reached from the host by pod IP and host port, pod to pod, DNS config and
hostname in the guest, user-mode networking, and nothing left behind
after many pods or after a kill -9 of the daemon."""
import pytest

from hyperrun.proto import cri_api_pb2 as cri
from tests.framework.host import http_get, network_state, state_diff

BRIDGE = "hrpod0"  # the default CNI network's (framework/cni.py)
HTTPD = "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"


def state(leases):
    return network_state(leases, BRIDGE)


@pytest.mark.kvm
def test_pod_ip_host_port_pod_to_pod_and_dns(netd, pushed, cni_env):
    d = netd
    leases = cni_env[1]
    status = d.runtime.Status(cri.StatusRequest()).status
    assert {c.type: c.status for c in status.conditions}["NetworkReady"] is True
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    before = state(leases)

    web, _ = d.run_pod(image, "web", HTTPD, hostname="web-host",
                       port_mappings=[cri.PortMapping(container_port=80, host_port=18931)],
                       dns_config=cri.DNSConfig(servers=["10.214.0.53"],
                                                searches=["net.svc.cluster.local", "svc.cluster.local"],
                                                options=["ndots:5"]))
    ip = d.pod_ip(web)
    assert ip.startswith("10.214.0."), ip
    assert http_get(f"http://{ip}/") == "hello from web-host\n"               # host → pod IP
    assert http_get("http://127.0.0.1:18931/") == "hello from web-host\n"     # hostPort on localhost

    client, cid = d.run_pod(image, "client", "sleep 600")
    code, out = d.exec_sync(cid, f"wget -qO- http://{ip}/")                  # pod → pod
    assert (code, out) == (0, "hello from web-host\n")
    code, out = d.exec_sync(cid, "hostname; cat /etc/hostname; grep client /etc/hosts")
    assert code == 0 and out.splitlines()[:2] == ["client", "client"], out
    assert d.pod_ip(client) in out

    web_cid = d.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id=web))).containers[0].id
    code, resolv = d.exec_sync(web_cid, "cat /etc/resolv.conf")
    assert resolv.splitlines() == ["nameserver 10.214.0.53",
                                   "search net.svc.cluster.local svc.cluster.local",
                                   "options ndots:5"]

    # No DNS config of its own: the daemon's name server, on the network's
    # gateway, knows the pods by name, as they are now (issue 17).
    code, resolv = d.exec_sync(cid, "cat /etc/resolv.conf")
    assert resolv.splitlines() == ["nameserver 10.214.0.1"], resolv
    lookup = "nslookup web | grep -A1 '^Name:' | grep Address | sed 's/.* //'"
    assert d.exec_sync(cid, lookup) == (0, f"{ip}\n")
    d.remove_pod(web)
    web, _ = d.run_pod(image, "web", HTTPD, hostname="web-host")
    assert d.pod_ip(web) != ip
    assert d.exec_sync(cid, lookup) == (0, f"{d.pod_ip(web)}\n")
    code, out = d.exec_sync(cid, "nslookup nothing-here")
    assert code != 0, out

    for pod in (web, client):
        d.remove_pod(pod)
    after = state(leases)
    assert after == before, state_diff(before, after)


def test_user_mode_network_with_a_host_port(daemon_factory, pushed):
    d = daemon_factory("--network", "user")
    image = pushed.ref("busybox:latest")
    d.pull(image)
    pod, cid = d.run_pod(image, "slirp", HTTPD, hostname="slirp",
                         port_mappings=[cri.PortMapping(container_port=80, host_port=18932,
                                                        host_ip="127.0.0.1")])
    assert d.pod_ip(pod) == "10.0.2.15"
    assert http_get("http://127.0.0.1:18932/") == "hello from slirp\n"
    code, out = d.exec_sync(cid, "cat /etc/resolv.conf; ip route")
    assert "nameserver 10.0.2.3" in out and "default via 10.0.2.2" in out
    d.remove_pod(pod)


def test_no_network_leaks_after_many_pods_and_a_daemon_kill(netd, pushed, cni_env):
    d = netd
    leases = cni_env[1]
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    before = state(leases)
    for i in range(20):
        pod, _ = d.run_pod(image, f"p{i}", "true", port_mappings=[
            cri.PortMapping(container_port=80, host_port=18940 + i)])
        assert d.pod_ip(pod)
        d.remove_pod(pod)
    assert state(leases) == before

    pods = [d.run_pod(image, f"k{i}", "sleep 600", port_mappings=[
        cri.PortMapping(container_port=80, host_port=18960 + i)])[0] for i in range(2)]
    assert state(leases) != before
    d.kill9()
    d.start()
    ips = {d.pod_ip(p) for p in pods}
    assert len(ips) == 2 and "" not in ips   # re-attached, addresses kept
    for p in pods:
        d.remove_pod(p)
    assert state(leases) == before
    assert not list(d.run_dir.iterdir())
