"""The CRI schema (proto/cri/api.proto) stays wire- and name-compatible with
k8s.io/cri-api v0.29.0 (Kubernetes 1.29, crictl v1.29).

The expected names and numbers below are facts read from upstream's
pkg/apis/runtime/v1/api.proto at tag v0.29.0; change them only to follow an
upstream change, never to match a local edit.
"""
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

ROOT = Path(__file__).resolve().parents[2]
FD = cri.DESCRIPTOR

# (rpc, request type, response type), in upstream order.
RUNTIME_RPCS = [
    ("Version", "VersionRequest", "VersionResponse"),
    ("RunPodSandbox", "RunPodSandboxRequest", "RunPodSandboxResponse"),
    ("StopPodSandbox", "StopPodSandboxRequest", "StopPodSandboxResponse"),
    ("RemovePodSandbox", "RemovePodSandboxRequest", "RemovePodSandboxResponse"),
    ("PodSandboxStatus", "PodSandboxStatusRequest", "PodSandboxStatusResponse"),
    ("ListPodSandbox", "ListPodSandboxRequest", "ListPodSandboxResponse"),
    ("CreateContainer", "CreateContainerRequest", "CreateContainerResponse"),
    ("StartContainer", "StartContainerRequest", "StartContainerResponse"),
    ("StopContainer", "StopContainerRequest", "StopContainerResponse"),
    ("RemoveContainer", "RemoveContainerRequest", "RemoveContainerResponse"),
    ("ListContainers", "ListContainersRequest", "ListContainersResponse"),
    ("ContainerStatus", "ContainerStatusRequest", "ContainerStatusResponse"),
    ("UpdateContainerResources", "UpdateContainerResourcesRequest",
     "UpdateContainerResourcesResponse"),
    ("ReopenContainerLog", "ReopenContainerLogRequest", "ReopenContainerLogResponse"),
    ("ExecSync", "ExecSyncRequest", "ExecSyncResponse"),
    ("Exec", "ExecRequest", "ExecResponse"),
    ("Attach", "AttachRequest", "AttachResponse"),
    ("PortForward", "PortForwardRequest", "PortForwardResponse"),
    ("ContainerStats", "ContainerStatsRequest", "ContainerStatsResponse"),
    ("ListContainerStats", "ListContainerStatsRequest", "ListContainerStatsResponse"),
    ("PodSandboxStats", "PodSandboxStatsRequest", "PodSandboxStatsResponse"),
    ("ListPodSandboxStats", "ListPodSandboxStatsRequest", "ListPodSandboxStatsResponse"),
    ("UpdateRuntimeConfig", "UpdateRuntimeConfigRequest", "UpdateRuntimeConfigResponse"),
    ("Status", "StatusRequest", "StatusResponse"),
    ("CheckpointContainer", "CheckpointContainerRequest", "CheckpointContainerResponse"),
    ("GetContainerEvents", "GetEventsRequest", "ContainerEventResponse"),
    ("ListMetricDescriptors", "ListMetricDescriptorsRequest", "ListMetricDescriptorsResponse"),
    ("ListPodSandboxMetrics", "ListPodSandboxMetricsRequest", "ListPodSandboxMetricsResponse"),
    ("RuntimeConfig", "RuntimeConfigRequest", "RuntimeConfigResponse"),
]
IMAGE_RPCS = [
    ("ListImages", "ListImagesRequest", "ListImagesResponse"),
    ("ImageStatus", "ImageStatusRequest", "ImageStatusResponse"),
    ("PullImage", "PullImageRequest", "PullImageResponse"),
    ("RemoveImage", "RemoveImageRequest", "RemoveImageResponse"),
    ("ImageFsInfo", "ImageFsInfoRequest", "ImageFsInfoResponse"),
]

# message -> [(field, number)], complete for each message listed.
FIELDS = {
    "PodSandboxConfig": [
        ("metadata", 1), ("hostname", 2), ("log_directory", 3), ("dns_config", 4),
        ("port_mappings", 5), ("labels", 6), ("annotations", 7), ("linux", 8), ("windows", 9)],
    "PodSandboxMetadata": [("name", 1), ("uid", 2), ("namespace", 3), ("attempt", 4)],
    "LinuxPodSandboxConfig": [
        ("cgroup_parent", 1), ("security_context", 2), ("sysctls", 3), ("overhead", 4),
        ("resources", 5)],
    "LinuxSandboxSecurityContext": [
        ("namespace_options", 1), ("selinux_options", 2), ("run_as_user", 3),
        ("run_as_group", 8), ("readonly_rootfs", 4), ("supplemental_groups", 5),
        ("privileged", 6), ("seccomp", 9), ("apparmor", 10), ("seccomp_profile_path", 7)],
    "ContainerConfig": [
        ("metadata", 1), ("image", 2), ("command", 3), ("args", 4), ("working_dir", 5),
        ("envs", 6), ("mounts", 7), ("devices", 8), ("labels", 9), ("annotations", 10),
        ("log_path", 11), ("stdin", 12), ("stdin_once", 13), ("tty", 14), ("linux", 15),
        ("windows", 16), ("CDI_devices", 17)],
    "LinuxContainerSecurityContext": [
        ("capabilities", 1), ("privileged", 2), ("namespace_options", 3),
        ("selinux_options", 4), ("run_as_user", 5), ("run_as_group", 12),
        ("run_as_username", 6), ("readonly_rootfs", 7), ("supplemental_groups", 8),
        ("no_new_privs", 11), ("masked_paths", 13), ("readonly_paths", 14), ("seccomp", 15),
        ("apparmor", 16), ("apparmor_profile", 9), ("seccomp_profile_path", 10)],
    "Mount": [
        ("container_path", 1), ("host_path", 2), ("readonly", 3), ("selinux_relabel", 4),
        ("propagation", 5), ("uidMappings", 6), ("gidMappings", 7)],
    "ImageSpec": [
        ("image", 1), ("annotations", 2), ("user_specified_image", 18),
        ("runtime_handler", 19)],
    "ExecSyncRequest": [("container_id", 1), ("cmd", 2), ("timeout", 3)],
    "ExecSyncResponse": [("stdout", 1), ("stderr", 2), ("exit_code", 3)],
    "ExecRequest": [
        ("container_id", 1), ("cmd", 2), ("tty", 3), ("stdin", 4), ("stdout", 5),
        ("stderr", 6)],
    "AttachRequest": [
        ("container_id", 1), ("stdin", 2), ("tty", 3), ("stdout", 4), ("stderr", 5)],
    "PullImageRequest": [("image", 1), ("auth", 2), ("sandbox_config", 3)],
    "AuthConfig": [
        ("username", 1), ("password", 2), ("auth", 3), ("server_address", 4),
        ("identity_token", 5), ("registry_token", 6)],
    "Image": [
        ("id", 1), ("repo_tags", 2), ("repo_digests", 3), ("size", 4), ("uid", 5),
        ("username", 6), ("spec", 7), ("pinned", 8)],
    "ContainerStatus": [
        ("id", 1), ("metadata", 2), ("state", 3), ("created_at", 4), ("started_at", 5),
        ("finished_at", 6), ("exit_code", 7), ("image", 8), ("image_ref", 9), ("reason", 10),
        ("message", 11), ("labels", 12), ("annotations", 13), ("mounts", 14),
        ("log_path", 15), ("resources", 16)],
    "LinuxContainerResources": [
        ("cpu_period", 1), ("cpu_quota", 2), ("cpu_shares", 3), ("memory_limit_in_bytes", 4),
        ("oom_score_adj", 5), ("cpuset_cpus", 6), ("cpuset_mems", 7), ("hugepage_limits", 8),
        ("unified", 9), ("memory_swap_limit_in_bytes", 10)],
    "PodSandboxStatus": [
        ("id", 1), ("metadata", 2), ("state", 3), ("created_at", 4), ("network", 5),
        ("linux", 6), ("labels", 7), ("annotations", 8), ("runtime_handler", 9)],
    "PodSandboxStatusResponse": [
        ("status", 1), ("info", 2), ("containers_statuses", 3), ("timestamp", 4)],
    "Namespace": [("options", 2)],
    "ContainerStats": [
        ("attributes", 1), ("cpu", 2), ("memory", 3), ("writable_layer", 4), ("swap", 5)],
    "ContainerEventResponse": [
        ("container_id", 1), ("container_event_type", 2), ("created_at", 3),
        ("pod_sandbox_status", 4), ("containers_statuses", 5)],
    "VersionResponse": [
        ("version", 1), ("runtime_name", 2), ("runtime_version", 3),
        ("runtime_api_version", 4)],
}

# enum (nested ones dotted) -> [(value, number)]
ENUMS = {
    "Protocol": [("TCP", 0), ("UDP", 1), ("SCTP", 2)],
    "MountPropagation": [
        ("PROPAGATION_PRIVATE", 0), ("PROPAGATION_HOST_TO_CONTAINER", 1),
        ("PROPAGATION_BIDIRECTIONAL", 2)],
    "NamespaceMode": [("POD", 0), ("CONTAINER", 1), ("NODE", 2), ("TARGET", 3)],
    "PodSandboxState": [("SANDBOX_READY", 0), ("SANDBOX_NOTREADY", 1)],
    "ContainerState": [
        ("CONTAINER_CREATED", 0), ("CONTAINER_RUNNING", 1), ("CONTAINER_EXITED", 2),
        ("CONTAINER_UNKNOWN", 3)],
    "ContainerEventType": [
        ("CONTAINER_CREATED_EVENT", 0), ("CONTAINER_STARTED_EVENT", 1),
        ("CONTAINER_STOPPED_EVENT", 2), ("CONTAINER_DELETED_EVENT", 3)],
    "MetricType": [("COUNTER", 0), ("GAUGE", 1)],
    "CgroupDriver": [("SYSTEMD", 0), ("CGROUPFS", 1)],
    "SecurityProfile.ProfileType": [("RuntimeDefault", 0), ("Unconfined", 1), ("Localhost", 2)],
}


def test_package_and_no_extra_options():
    assert FD.package == "runtime.v1"
    proto = descriptor_pb2.FileDescriptorProto()
    FD.CopyToProto(proto)
    assert proto.syntax == "proto3"
    # No go_package or other file options, no imports: names and numbers only.
    assert not proto.HasField("options")
    assert list(proto.dependency) == []


def test_counts_match_upstream():
    # v0.29.0 has 147 top-level messages and 8 top-level enums.
    assert len(FD.message_types_by_name) == 147
    assert len(FD.enum_types_by_name) == 8
    assert sorted(FD.services_by_name) == ["ImageService", "RuntimeService"]


@pytest.mark.parametrize("service,rpcs", [("RuntimeService", RUNTIME_RPCS),
                                          ("ImageService", IMAGE_RPCS)])
def test_services_have_every_upstream_rpc(service, rpcs):
    svc = FD.services_by_name[service]
    got = [(m.name, m.input_type.name, m.output_type.name) for m in svc.methods]
    assert got == rpcs
    for m in svc.methods:
        assert m.input_type.full_name == f"runtime.v1.{m.input_type.name}"
        assert m.output_type.full_name == f"runtime.v1.{m.output_type.name}"
        # Only GetContainerEvents streams (server to client).
        assert m.client_streaming is False
        assert m.server_streaming is (m.name == "GetContainerEvents")


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_field_numbers_match_upstream(message):
    desc = FD.message_types_by_name[message]
    assert [(f.name, f.number) for f in desc.fields] == FIELDS[message]


def test_field_types_that_matter_on_the_wire():
    F = descriptor_pb2.FieldDescriptorProto
    m = FD.message_types_by_name
    assert m["ExecSyncResponse"].fields_by_name["stdout"].type == F.TYPE_BYTES
    assert m["ExecSyncResponse"].fields_by_name["exit_code"].type == F.TYPE_INT32
    assert m["ExecSyncRequest"].fields_by_name["timeout"].type == F.TYPE_INT64
    assert m["Image"].fields_by_name["size"].type == F.TYPE_UINT64
    assert m["PodSandboxMetadata"].fields_by_name["attempt"].type == F.TYPE_UINT32
    assert m["IDMapping"].fields_by_name["host_id"].type == F.TYPE_UINT32
    assert m["PortForwardRequest"].fields_by_name["port"].type == F.TYPE_INT32
    assert m["HugepageLimit"].fields_by_name["limit"].type == F.TYPE_UINT64
    labels = m["PodSandboxConfig"].fields_by_name["labels"]
    assert labels.message_type.GetOptions().map_entry
    assert m["ContainerStatus"].fields_by_name["resources"].message_type.name == \
        "ContainerResources"
    assert m["Mount"].fields_by_name["uidMappings"].message_type.name == "IDMapping"


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_enum_values_match_upstream(enum):
    outer, _, inner = enum.partition(".")
    desc = (FD.message_types_by_name[outer].enum_types_by_name[inner] if inner
            else FD.enum_types_by_name[outer])
    assert [(v.name, v.number) for v in desc.values] == ENUMS[enum]


def _sandbox_config():
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="u-1", namespace="default", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/default_web_u-1",
        dns_config=cri.DNSConfig(servers=["10.0.0.10"], searches=["svc.local"],
                                 options=["ndots:5"]),
        port_mappings=[cri.PortMapping(protocol=cri.UDP, container_port=53, host_port=5353,
                                       host_ip="127.0.0.1")],
        labels={"app": "web"},
        annotations={"note": "x"},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods",
            sysctls={"net.ipv4.ip_forward": "1"},
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER),
                run_as_user=cri.Int64Value(value=0),
                seccomp=cri.SecurityProfile(
                    profile_type=cri.SecurityProfile.RuntimeDefault)),
            resources=cri.LinuxContainerResources(cpu_quota=50000, cpu_period=100000,
                                                  memory_limit_in_bytes=256 << 20)),
    )


def test_run_pod_sandbox_request_round_trip():
    req = cri.RunPodSandboxRequest(config=_sandbox_config(), runtime_handler="hyperrun")
    data = req.SerializeToString()
    back = cri.RunPodSandboxRequest.FromString(data)
    assert back == req
    assert back.config.linux.sysctls["net.ipv4.ip_forward"] == "1"
    assert back.config.port_mappings[0].protocol == cri.UDP
    # run_as_user=0 is present (a wrapper, so zero is not "unset").
    assert back.config.linux.security_context.HasField("run_as_user")
    # Wire bytes by hand: field 2 (runtime_handler), length-delimited.
    assert cri.RunPodSandboxRequest(runtime_handler="vm").SerializeToString() == b"\x12\x02vm"


def test_create_container_request_round_trip():
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=1),
        image=cri.ImageSpec(image="docker.io/library/busybox:1.36",
                            user_specified_image="busybox"),
        command=["/bin/sh", "-c"],
        args=["echo hi"],
        working_dir="/",
        envs=[cri.KeyValue(key="A", value="1")],
        mounts=[cri.Mount(container_path="/data", host_path="/srv/data", readonly=True,
                          propagation=cri.PROPAGATION_HOST_TO_CONTAINER,
                          uidMappings=[cri.IDMapping(host_id=1000, container_id=0, length=1)])],
        devices=[cri.Device(container_path="/dev/fuse", host_path="/dev/fuse",
                            permissions="rwm")],
        labels={"io.kubernetes.container.name": "app"},
        log_path="app/0.log",
        stdin=True,
        tty=True,
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(cpu_shares=512, unified={"memory.high": "1G"},
                                                  hugepage_limits=[cri.HugepageLimit(
                                                      page_size="2MB", limit=1 << 21)]),
            security_context=cri.LinuxContainerSecurityContext(
                capabilities=cri.Capability(add_capabilities=["NET_ADMIN"]),
                run_as_group=cri.Int64Value(value=1000),
                masked_paths=["/proc/kcore"])),
        CDI_devices=[cri.CDIDevice(name="vendor.com/gpu=0")],
    )
    req = cri.CreateContainerRequest(pod_sandbox_id="p" * 64, config=config,
                                     sandbox_config=_sandbox_config())
    back = cri.CreateContainerRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.config.image.user_specified_image == "busybox"
    assert back.config.mounts[0].uidMappings[0].host_id == 1000
    assert back.config.CDI_devices[0].name == "vendor.com/gpu=0"
    # ImageSpec.user_specified_image is field 18: tag (18 << 3 | 2) = 0x92 0x01.
    assert cri.ImageSpec(user_specified_image="b").SerializeToString() == b"\x92\x01\x01b"
    # ExecSyncRequest.timeout is field 3, varint.
    assert cri.ExecSyncRequest(timeout=5).SerializeToString() == b"\x18\x05"


class _Runtime(cri_grpc.RuntimeServiceServicer):
    def Version(self, request, context):
        return cri.VersionResponse(version="0.1.0", runtime_name="hyperrun",
                                   runtime_version="0.1.0", runtime_api_version="v1")

    def GetContainerEvents(self, request, context):
        for i in range(3):
            yield cri.ContainerEventResponse(container_id=f"c{i}",
                                             container_event_type=cri.CONTAINER_STARTED_EVENT)


def test_stubs_over_a_unix_socket(tmp_path):
    """The generated stubs serve and call the CRI paths crictl uses."""
    sock = tmp_path / "cri.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cri_grpc.add_RuntimeServiceServicer_to_server(_Runtime(), server)
    cri_grpc.add_ImageServiceServicer_to_server(cri_grpc.ImageServiceServicer(), server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            rt = cri_grpc.RuntimeServiceStub(channel)
            assert rt.Version(cri.VersionRequest(version="v1"), timeout=10).runtime_name == \
                "hyperrun"
            events = list(rt.GetContainerEvents(cri.GetEventsRequest(), timeout=10))
            assert [e.container_id for e in events] == ["c0", "c1", "c2"]
            # The raw method path, as a Go client builds it.
            raw = channel.unary_unary("/runtime.v1.RuntimeService/Version",
                                      request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            reply = cri.VersionResponse.FromString(raw(b"", timeout=10))
            assert reply.runtime_api_version == "v1"
            with pytest.raises(grpc.RpcError) as err:
                cri_grpc.ImageServiceStub(channel).ListImages(cri.ListImagesRequest(),
                                                              timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_guest_imports_neither_grpc_nor_the_cri():
    """The agent's modules are shipped into the guest; the CRI ones are host-only."""
    code = (
        "import sys; sys.path.insert(0, 'agent');"
        "import hyperrun.proto, hyperrun.proto.agent_pb2, hyperrun.proto.ttrpc_pb2;"
        "import hyperrun_agent.server, hyperrun_agent.service;"
        "bad = [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')"
        " or m.startswith('hyperrun.proto.cri')];"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
