"""The CRI's configs as the core's specs (api/cri_specs.py), through the
JSON they are kept as, and back in statuses; records of an earlier daemon
(CRI protobufs) rewritten as specs."""
import pytest

from hyperrun import errdefs
from hyperrun.api import cri_specs
from hyperrun.specs import ContainerSpec, PodSpec
from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.sandbox.state import ContainerRow, SandboxRow, State


def pod_config() -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="u1", namespace="ns", attempt=2),
        hostname="web-host", log_directory="/var/log/pods/x", labels={"app": "web"},
        annotations={"io.hyperrun.network": "user", "a": "b"},
        dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["svc"], options=["ndots:5"]),
        port_mappings=[cri.PortMapping(protocol=cri.UDP, container_port=53, host_port=5353,
                                       host_ip="127.0.0.1")])
    config.linux.sysctls["net.core.somaxconn"] = "1024"
    config.linux.resources.cpu_period, config.linux.resources.cpu_quota = 100000, 150000
    config.linux.resources.memory_limit_in_bytes = 512 << 20
    config.linux.overhead.memory_limit_in_bytes = 32 << 20
    config.linux.security_context.namespace_options.network = cri.NODE
    return config


def container_config() -> cri.ContainerConfig:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=1), image=cri.ImageSpec(image="busybox"),
        command=["sh"], args=["-c", "id"], working_dir="/w", tty=True, stdin=True,
        envs=[cri.KeyValue(key="A", value="1=2")], log_path="app/0.log", labels={"l": "v"},
        mounts=[cri.Mount(host_path="/srv", container_path="/data", readonly=True,
                          propagation=cri.PROPAGATION_HOST_TO_CONTAINER)])
    sc = config.linux.security_context
    sc.run_as_user.value, sc.run_as_group.value = 1001, 2002
    sc.supplemental_groups.extend([3, 4])
    sc.readonly_rootfs = True
    sc.namespace_options.pid = cri.NODE
    config.linux.resources.cpu_shares = 512
    return config


def test_a_pod_config_as_a_spec_and_back():
    spec = cri_specs.pod_spec(pod_config())
    assert PodSpec.from_json(spec.to_json()) == spec
    assert (spec.name, spec.uid, spec.namespace, spec.attempt) == ("web", "u1", "ns", 2)
    assert (spec.network, spec.host_network, spec.cpus) == ("user", True, 1.5)
    assert (spec.memory_limit_bytes, spec.overhead_memory_bytes) == (512 << 20, 32 << 20)
    assert spec.ports[0].to_cni() == {"hostPort": 5353, "containerPort": 53, "protocol": "udp",
                                      "hostIP": "127.0.0.1"}
    assert spec.dns.servers == ("10.96.0.10",) and spec.sysctls == {"net.core.somaxconn": "1024"}
    assert cri_specs.pod_metadata(spec) == pod_config().metadata


def test_a_container_config_as_a_spec_and_back():
    config = container_config()
    spec = cri_specs.container_spec(config)
    assert ContainerSpec.from_json(spec.to_json()) == spec
    assert (spec.command, spec.args, spec.env) == (("sh",), ("-c", "id"), ("A=1=2",))
    assert (spec.user, spec.groups, spec.pid, spec.ipc) == ("1001:2002", (3, 4), "node", "pod")
    assert cri_specs.container_metadata(spec) == config.metadata
    assert cri_specs.cri_mounts(spec) == list(config.mounts)
    assert cri_specs.cri_resources(spec.resources) == config.linux.resources
    named = cri.LinuxContainerSecurityContext(run_as_username="www")
    assert cri_specs.user(named) == "www"


def test_records_of_an_earlier_daemon_become_specs(tmp_path):
    state = State(tmp_path / "state.db")
    state.add_sandbox(SandboxRow("p1", pod_config().SerializeToString(), "ready", 1, b"{}"))
    state.add_container(ContainerRow("c1", "p1", container_config().SerializeToString(),
                                     "sha256:x", "img-1", "running", 2))
    assert cri_specs.migrate(state) == 2
    assert state.sandbox("p1").spec == cri_specs.pod_spec(pod_config())
    assert state.container("c1").spec == cri_specs.container_spec(container_config())
    assert cri_specs.migrate(state) == 0  # once


def test_a_group_without_a_user_is_refused():
    """critest: "should return error if RunAsGroup is set without RunAsUser"."""
    import pytest

    from hyperrun import errdefs

    config = container_config()
    config.linux.security_context.ClearField("run_as_user")
    with pytest.raises(errdefs.Invalid, match="run_as_group is set without run_as_user"):
        cri_specs.container_spec(config)
    config.linux.security_context.run_as_username = "app"
    assert cri_specs.container_spec(config).user == "app:2002"


def test_security_profiles_as_specs():
    """issue 16: seccomp, no_new_privs, masked and read-only paths were
    dropped; an unset profile is unconfined, as the kubelet means it."""
    Profile = cri.SecurityProfile

    def spec(**security) -> ContainerSpec:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"))
        config.linux.security_context.CopyFrom(cri.LinuxContainerSecurityContext(**security))
        return cri_specs.container_spec(config)

    assert spec().seccomp == "unconfined"
    assert spec(seccomp=Profile()).seccomp == "runtime/default"
    assert spec(seccomp=Profile(profile_type=Profile.Unconfined)).seccomp == "unconfined"
    assert spec(seccomp=Profile(profile_type=Profile.Localhost, localhost_ref="/p.json")).seccomp \
        == "localhost//p.json"
    assert spec(seccomp_profile_path="runtime/default").seccomp == "runtime/default"
    assert spec(seccomp_profile_path="localhost//p.json").seccomp == "localhost//p.json"
    s = spec(no_new_privs=True, masked_paths=["/a"], readonly_paths=["/b"])
    assert (s.no_new_privileges, s.masked_paths, s.readonly_paths) == (True, ("/a",), ("/b",))
    assert ContainerSpec.from_json(s.to_json()) == s
    assert spec(apparmor=Profile(profile_type=Profile.Unconfined)).name == "c"
    for bad, message in ((dict(seccomp_profile_path="nope"), "expected unconfined"),
                         (dict(seccomp=Profile(profile_type=Profile.Localhost)), "localhost_ref"),
                         (dict(apparmor_profile="localhost/x"), "no AppArmor")):
        with pytest.raises(errdefs.Invalid, match=message):
            spec(**bad)


def test_namespace_modes_as_specs():
    """The CRI's modes; TARGET joins another container's PID namespace; a
    record of an earlier daemon (host_pid) still reads."""
    def spec(**options) -> ContainerSpec:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"))
        config.linux.security_context.namespace_options.CopyFrom(cri.NamespaceOption(**options))
        return cri_specs.container_spec(config)

    assert (spec().pid, spec().ipc) == ("pod", "pod")  # the CRI's zero value is POD
    assert spec(pid=cri.CONTAINER, ipc=cri.NODE).pid == "container"
    assert spec(pid=cri.TARGET, target_id="abc").pid == "target:abc"
    with pytest.raises(errdefs.Invalid, match="TARGET"):
        spec(ipc=cri.TARGET, target_id="abc")
    old = b'{"name": "c", "image": "i", "host_pid": true}'
    assert ContainerSpec.from_json(old).pid == "node"
