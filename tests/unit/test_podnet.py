"""The pod network's policy (sandbox/podnet.py) and the CLI's -p/-v parsing:
what the guest and QEMU are told, without VMs."""
import dataclasses

import pytest

from hyperrun.api import cli_server
from hyperrun.network import NetworkInfo
from hyperrun.specs import DNS, PodSpec, PortMapping
from hyperrun.sandbox import podnet


def test_host_nameservers_skip_loopback_stub_resolvers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# generated\nnameserver 127.0.0.53\nnameserver 10.1.2.3\n"
                    "nameserver ::1\nnameserver 2001:db8::1\nnameserver bogus\nsearch lan\n")
    assert podnet.host_nameservers(conf) == ["10.1.2.3", "2001:db8::1"]
    assert podnet.host_nameservers(tmp_path / "missing") == []


def info(**kw):
    return NetworkInfo("sb", "net", netns="/run/netns/x", interface="eth0", tap="tap0",
                       mac="0a:00:00:00:00:01", mtu=1450, ips=["10.89.0.7/16"],
                       gateway="10.89.0.1", routes=[{"dst": "0.0.0.0/0", "gw": "10.89.0.1"}], **kw)


def test_setup_request_from_a_cni_result_and_the_pods_dns():
    spec = PodSpec("web", dns=DNS(("10.96.0.10",), ("ns.svc.cluster.local",), ("ndots:5",)))
    req = podnet.setup_request(podnet.PodNetwork("cni", info()), spec)
    assert req.hostname == "web"
    (iface,) = req.interfaces
    assert (iface.mac, list(iface.addresses), iface.mtu) == ("0a:00:00:00:00:01", ["10.89.0.7/16"], 1450)
    assert [(r.destination, r.gateway) for r in req.routes] == [("0.0.0.0/0", "10.89.0.1")]
    assert (list(req.dns.servers), list(req.dns.searches), list(req.dns.options)) == \
        (["10.96.0.10"], ["ns.svc.cluster.local"], ["ndots:5"])


def test_user_mode_gets_qemus_dns_and_no_interfaces_without_a_network():
    user = podnet.PodNetworks("user")
    spec = PodSpec("h", ports=(
        PortMapping(8080, 80, "tcp"), PortMapping(5353, 53, "udp", "127.0.0.1"),
        PortMapping(0, 9000, "tcp")))  # no host port: nothing
    nic = user.prepare("sb", "user")
    network = user.complete("sb", "user", spec)
    assert nic.kind == "user" and not nic.forwards  # added once the VM runs
    assert podnet.user_forwards(network, spec) == ["tcp::8080-:80", "udp:127.0.0.1:5353-:53"]
    assert network.ip == "10.0.2.15"
    req = podnet.setup_request(network, spec)
    assert list(req.dns.servers) == ["10.0.2.3"]
    assert podnet.PodNetwork.from_dict(network.to_dict()) == network
    none = podnet.PodNetworks("none")
    nic, network = none.prepare("sb", "none"), none.complete("sb", "none", PodSpec("h"))
    assert nic is None and not podnet.setup_request(network, PodSpec("h")).interfaces


def test_kind_per_pod_and_host_network_pods():
    nets = podnet.PodNetworks("none")
    assert nets.kind_for(PodSpec("p", network="user")) == "user"
    assert nets.kind_for(PodSpec("p", host_network=True)) == "user"
    with pytest.raises(podnet.NetworkUnavailable):
        nets.kind_for(PodSpec("p", network="bogus"))
    with pytest.raises(ValueError):
        podnet.PodNetworks("bogus")


@pytest.mark.parametrize("text, expect", [
    ("8080:80", ("tcp", 80, 8080, "")),
    ("127.0.0.1:8080:80/udp", ("udp", 80, 8080, "127.0.0.1")),
    ("1:65535/TCP", ("tcp", 65535, 1, "")),
])
def test_publish_flags(text, expect):
    p = cli_server.parse_port(text)
    assert (p.protocol, p.container_port, p.host_port, p.host_ip) == expect


@pytest.mark.parametrize("text", ["80", "a:80", "8080:0", "8080:80/icmp", "70000:80", ""])
def test_bad_publish_flags(text):
    with pytest.raises(cli_server.RunError, match="expected"):
        cli_server.parse_port(text)


def test_volume_flags():
    m = cli_server.parse_volume("/srv/data:/data:ro")
    assert (m.host_path, m.container_path, m.readonly) == ("/srv/data", "/data", True)
    assert cli_server.parse_volume("/a:/b").readonly is False
    for bad in ("rel:/data", "/a", "/a:/b:rx", ":/b"):
        with pytest.raises(cli_server.RunError):
            cli_server.parse_volume(bad)



def test_a_host_port_taken_is_refused():
    """issue 17: a second `-p 8080:80` was accepted and never got traffic."""
    import socket

    def pod(*ports: PortMapping) -> PodSpec:
        return PodSpec(name="p", ports=ports)

    web = PortMapping(18931, 80)
    podnet.check_ports(pod(web), [])
    podnet.check_ports(pod(web), [PortMapping(18931, 80, "udp"), PortMapping(18932, 80)])
    for taken in (web, PortMapping(18931, 81, host_ip="127.0.0.1")):
        with pytest.raises(podnet.PortAllocated, match="0.0.0.0:18931 failed: port is already"):
            podnet.check_ports(pod(web), [taken])
    podnet.check_ports(pod(PortMapping(18931, 80, host_ip="127.0.0.1")),
                       [PortMapping(18931, 80, host_ip="127.0.0.2")])
    with socket.socket() as listener:  # a host process's, not a pod's
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(podnet.PortAllocated):
            podnet.check_ports(pod(PortMapping(port, 80, host_ip="127.0.0.1")), [])


def test_ulimits_as_docker_takes_them():
    assert cli_server.ulimits(["nofile=1024:2048", "nproc=50"]) == {
        "RLIMIT_NOFILE": (1024, 2048), "RLIMIT_NPROC": (50, 50)}
    for bad in ("nofile=2:1", "files=1", "nofile=x", "nofile"):
        with pytest.raises(cli_server.RunError, match="--ulimit"):
            cli_server.ulimits([bad])


@dataclasses.dataclass(frozen=True)
class _Conf:
    name: str


class _FakeSandboxNetworks:
    """What PodNetworks asks of SandboxNetworks and its projects."""

    def __init__(self):
        self.calls = []
        self.projects = self
        self.released = {"hyperrun-one"}

    def add(self, sandbox_id, netlist=None, **kw):
        self.calls.append(("add", sandbox_id, netlist))
        return info()

    def teardown(self, sandbox_id):
        self.calls.append(("teardown", sandbox_id))
        return "hyperrun-one"

    def lock(self):
        import threading
        return threading.Lock()

    def ensure(self, project):
        self.calls.append(("ensure", project))
        return _Conf(f"conf-of-{project}")

    def gateway(self, name):
        return "10.90.0.1"

    def release(self, name):
        self.calls.append(("release", name))
        return name in self.released


def test_a_compose_pod_gets_its_projects_network_which_goes_with_its_last_pod():
    fake = _FakeSandboxNetworks()
    nets = podnet.PodNetworks("none", fake)
    stopped = []
    nets.on_released = stopped.append
    spec = PodSpec("one-web-1", labels={"com.docker.compose.project": "one"})
    network = nets.complete("sb", "cni", spec)
    assert fake.calls == [("ensure", "one"), ("add", "sb", _Conf("conf-of-one"))]
    nets.complete("sb2", "cni", PodSpec("plain"))
    assert fake.calls[-1] == ("add", "sb2", None)  # the conf dir's network
    nets.teardown("sb", network)
    assert fake.calls[-2:] == [("teardown", "sb"), ("release", "hyperrun-one")]
    assert stopped == ["10.90.0.1"]  # its name server's socket goes too
    fake.released = set()
    nets.teardown("sb", network)
    assert stopped == ["10.90.0.1"]

    # A failed ADD: the network made for it is released again.
    def failing_add(sandbox_id, netlist=None, **kw):
        raise OSError("plugin failed")
    fake.add = failing_add
    fake.calls.clear()
    with pytest.raises(OSError):
        nets.complete("sb3", "cni", spec)
    assert fake.calls == [("ensure", "one"), ("release", "conf-of-one")]
