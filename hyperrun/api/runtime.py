"""runtime.v1.RuntimeService over the sandbox manager."""
from __future__ import annotations

import asyncio
import json
from importlib.metadata import version

import grpc

from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc
from hyperrun.pods.service import (CREATED, EXITED, READY, RUNNING, PodService,
                                      pod_network)
from hyperrun.sandbox.state import ContainerRow, SandboxRow

from . import cri_specs
from .errors import rpc
from .streaming import AttachRequestInfo, ExecRequestInfo, PortForwardRequestInfo, StreamingServer

_POD_STATE = {READY: cri.SANDBOX_READY}
_CONTAINER_STATE = {CREATED: cri.CONTAINER_CREATED, RUNNING: cri.CONTAINER_RUNNING,
                    EXITED: cri.CONTAINER_EXITED}
NOT_BUILT = {
    "CheckpointContainer": "checkpointing containers is not supported",
    "ListMetricDescriptors": "metrics are not supported",
    "ListPodSandboxMetrics": "metrics are not supported",
}


def _matches(f, id_: str, labels, state=None, sandbox_id: str = "") -> bool:
    """A CRI list filter (pods, containers, their stats): ids by prefix as
    crictl sends them, state when set, every label of the selector."""
    if f.id and not id_.startswith(f.id):
        return False
    if getattr(f, "pod_sandbox_id", "") and not sandbox_id.startswith(f.pod_sandbox_id):
        return False
    if state is not None and f.HasField("state") and state != f.state.state:
        return False
    return all(labels.get(k) == v for k, v in f.label_selector.items())


def _full_id(prefix: str) -> bool:
    """A filter's id that names one record (ids are 64 hex digits): looked
    up by key, not matched against every record."""
    return len(prefix) == 64


def _state_filter(f):
    """The state a filter asks for, or None (stats filters have none)."""
    return f.state.state if "state" in f.DESCRIPTOR.fields_by_name and f.HasField("state") \
        else None


def _container_rows(m: PodService, f) -> list[ContainerRow]:
    """The records a container filter can match: by key for a full id or
    pod id, and only those of the filter's ids and state, before any of
    them is turned into a status (which parses its spec)."""
    if _full_id(f.id):
        rows = [r] if (r := m.state.container(f.id)) is not None else []
    else:
        pod = getattr(f, "pod_sandbox_id", "")
        rows = m.state.containers(pod) if _full_id(pod) else m.state.containers()
    state = _state_filter(f)
    return [r for r in rows if r.id.startswith(f.id)
            and r.sandbox_id.startswith(getattr(f, "pod_sandbox_id", ""))
            and (state is None or _CONTAINER_STATE.get(r.state, cri.CONTAINER_UNKNOWN) == state)]


def _sandbox_rows(m: PodService, f) -> list[SandboxRow]:
    """The records a pod filter can match, as _container_rows."""
    if _full_id(f.id):
        rows = [r] if (r := m.state.sandbox(f.id)) is not None else []
    else:
        rows = m.state.sandboxes()
    state = _state_filter(f)
    return [r for r in rows if r.id.startswith(f.id)
            and (state is None or _POD_STATE.get(r.state, cri.SANDBOX_NOTREADY) == state)]


async def _each_pod(m: PodService, pods: list[str], ask) -> list:
    """ask(pod) for every pod at once (a round trip to each pod's agent:
    one slow VM does not hold the others' answers), in order; a pod whose
    VM stopped meanwhile is left out."""
    results = await asyncio.gather(*(ask(pod) for pod in pods), return_exceptions=True)
    out = []
    for pod, result in zip(pods, results):
        if isinstance(result, BaseException):
            if m.sandbox(pod) is not None and not isinstance(result, asyncio.CancelledError):
                raise result
            continue
        out.append(result)
    return out


def _network_status(row) -> cri.PodSandboxNetworkStatus:
    network = pod_network(row)
    ips = network.info.pod_ips if network.info and row.state == READY else []
    return cri.PodSandboxNetworkStatus(ip=ips[0] if ips else "",
                                       additional_ips=[cri.PodIP(ip=ip) for ip in ips[1:]])


def pod_status(row: SandboxRow) -> cri.PodSandboxStatus:
    """A pod's record as the CRI shows it (here and in `hyperrun pods`)."""
    spec = row.spec
    return cri.PodSandboxStatus(
        id=row.id, metadata=cri_specs.pod_metadata(spec),
        state=_POD_STATE.get(row.state, cri.SANDBOX_NOTREADY),
        created_at=row.created_at, network=_network_status(row),
        labels=spec.labels, annotations=spec.annotations)


def container_status(manager: PodService, row: ContainerRow) -> cri.ContainerStatus:
    """A container's record as the CRI shows it (here and in `hyperrun ps`)."""
    spec = row.spec
    return cri.ContainerStatus(
        id=row.id, metadata=cri_specs.container_metadata(spec),
        state=_CONTAINER_STATE.get(row.state, cri.CONTAINER_UNKNOWN),
        created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        exit_code=row.exit_code, image=cri.ImageSpec(image=spec.image), image_ref=row.image_ref,
        reason=row.reason, message=row.message, labels=spec.labels,
        annotations=spec.annotations, log_path=manager.log_path(row),
        mounts=cri_specs.cri_mounts(spec),
        resources=cri.ContainerResources(linux=cri_specs.cri_resources(spec.resources)))


class RuntimeServicer(cri_grpc.RuntimeServiceServicer):
    def __init__(self, manager: PodService, streaming: StreamingServer) -> None:
        self.m = manager
        self.streaming = streaming

    # --- runtime ----------------------------------------------------------
    async def Version(self, request, context):
        return cri.VersionResponse(version="0.1.0", runtime_name="hyperrun",
                                   runtime_version=version("hyperrun"),
                                   runtime_api_version="v1")

    async def Status(self, request, context):
        ok, why = await asyncio.to_thread(self.m.networks.ready)
        conditions = [
            cri.RuntimeCondition(type="RuntimeReady", status=True),
            cri.RuntimeCondition(type="NetworkReady", status=ok,
                                 reason="" if ok else "NetworkPluginNotReady",
                                 message="" if ok else why),
        ]
        info = {}
        if request.verbose:  # `crictl info`: how this runtime starts pods
            m = self.m
            info["config"] = json.dumps({
                "network": m.networks.kind, "template": m.launcher.templates is not None,
                "pool": {"size": m.launcher.pool.size if m.launcher.pool is not None else 0,
                         "ready": len(m.launcher.pool) if m.launcher.pool is not None else 0}})
        return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions), info=info)

    async def RuntimeConfig(self, request, context):
        # Containers' cgroups are managed by crun in the guest, with cgroupfs.
        return cri.RuntimeConfigResponse(
            linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CGROUPFS))

    async def UpdateRuntimeConfig(self, request, context):
        return cri.UpdateRuntimeConfigResponse()  # the pod CIDR matters once CNI is in

    # --- sandboxes --------------------------------------------------------
    @rpc
    async def RunPodSandbox(self, request, context):
        if request.runtime_handler not in ("", "hyperrun"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown runtime handler {request.runtime_handler!r}")
        return cri.RunPodSandboxResponse(
            pod_sandbox_id=await self.m.run_pod(cri_specs.pod_spec(request.config)))

    @rpc
    async def StopPodSandbox(self, request, context):
        await self.m.stop_pod(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    @rpc
    async def RemovePodSandbox(self, request, context):
        await self.m.remove_pod(request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    @rpc
    async def PodSandboxStatus(self, request, context):
        row = self.m.sandbox_row(request.pod_sandbox_id)
        info = {}
        if request.verbose and (sb := self.m.sandbox(row.id)):
            info["vm"] = f"{sb.vm.id} pid {sb.vm.pid} run dir {sb.vm.run_dir}"
        return cri.PodSandboxStatusResponse(status=pod_status(row), info=info)

    @rpc
    async def ListPodSandbox(self, request, context):
        f = request.filter
        items = []
        for row in _sandbox_rows(self.m, f):
            s = pod_status(row)
            if not _matches(f, row.id, s.labels, s.state):
                continue
            items.append(cri.PodSandbox(id=s.id, metadata=s.metadata, state=s.state,
                                        created_at=s.created_at, labels=s.labels,
                                        annotations=s.annotations))
        return cri.ListPodSandboxResponse(items=items)

    # --- containers -------------------------------------------------------
    @rpc
    async def CreateContainer(self, request, context):
        cid = await self.m.create_container(request.pod_sandbox_id,
                                            cri_specs.container_spec(request.config))
        return cri.CreateContainerResponse(container_id=cid)

    @rpc
    async def StartContainer(self, request, context):
        await self.m.start_container(request.container_id)
        return cri.StartContainerResponse()

    @rpc
    async def StopContainer(self, request, context):
        await self.m.stop_container(request.container_id, request.timeout)
        return cri.StopContainerResponse()

    @rpc
    async def RemoveContainer(self, request, context):
        await self.m.remove_container(request.container_id)
        return cri.RemoveContainerResponse()

    @rpc
    async def ContainerStatus(self, request, context):
        return cri.ContainerStatusResponse(
            status=container_status(self.m, self.m.container_row(request.container_id)))

    @rpc
    async def ListContainers(self, request, context):
        f = request.filter
        out = []
        for row in _container_rows(self.m, f):
            s = container_status(self.m, row)
            if not _matches(f, row.id, s.labels, s.state, row.sandbox_id):
                continue
            out.append(cri.Container(id=row.id, pod_sandbox_id=row.sandbox_id, metadata=s.metadata,
                                     image=s.image, image_ref=s.image_ref, state=s.state,
                                     created_at=s.created_at, labels=s.labels,
                                     annotations=s.annotations))
        return cri.ListContainersResponse(containers=out)

    @rpc
    async def ExecSync(self, request, context):
        out, err, code = await self.m.exec_sync(request.container_id, list(request.cmd),
                                                request.timeout)
        return cri.ExecSyncResponse(stdout=out, stderr=err, exit_code=code)

    # --- stats ------------------------------------------------------------
    @staticmethod
    def _cpu(ts: int, item, rate: int | None) -> cri.CpuUsage:
        cpu = cri.CpuUsage(timestamp=ts)
        cpu.usage_core_nano_seconds.value = item.cpu_usage_ns
        if rate is not None:
            cpu.usage_nano_cores.value = max(rate, 0)
        return cpu

    @staticmethod
    def _memory(ts: int, item) -> cri.MemoryUsage:
        mem = cri.MemoryUsage(timestamp=ts)
        mem.working_set_bytes.value = item.memory_working_set_bytes
        mem.usage_bytes.value = item.memory_usage_bytes
        mem.rss_bytes.value = item.memory_rss_bytes
        mem.page_faults.value = item.page_faults
        mem.major_page_faults.value = item.major_page_faults
        if item.memory_limit_bytes:
            mem.available_bytes.value = max(item.memory_limit_bytes - item.memory_working_set_bytes, 0)
        return mem

    def _container_stats(self, row: ContainerRow, ts: int, item, rate) -> cri.ContainerStats:
        spec = row.spec
        writable = cri.FilesystemUsage(timestamp=ts, fs_id=cri.FilesystemIdentifier(
            mountpoint=f"guest:/run/hyperrun/containers/{row.id}/upper"))
        writable.used_bytes.value = item.writable_bytes
        writable.inodes_used.value = item.writable_inodes
        return cri.ContainerStats(
            attributes=cri.ContainerAttributes(id=row.id, metadata=cri_specs.container_metadata(spec),
                                               labels=spec.labels, annotations=spec.annotations),
            cpu=self._cpu(ts, item, rate), memory=self._memory(ts, item), writable_layer=writable)

    async def _stats_of(self, rows: list[ContainerRow]) -> list[cri.ContainerStats]:
        by_pod: dict[str, list[ContainerRow]] = {}
        for row in rows:
            if row.state == RUNNING and self.m.sandbox(row.sandbox_id) is not None:
                by_pod.setdefault(row.sandbox_id, []).append(row)

        async def ask(pod: str) -> list[cri.ContainerStats]:
            pod_rows = by_pod[pod]
            response, rates = await self.m.stats(pod, [r.id for r in pod_rows])
            items = {i.container_id: i for i in response.containers}
            return [self._container_stats(row, response.timestamp_ns, items[row.id],
                                          rates.get(row.id)) for row in pod_rows]
        return [stats for pod in await _each_pod(self.m, list(by_pod), ask) for stats in pod]

    @rpc
    async def ContainerStats(self, request, context):
        row = self.m.container_row(request.container_id)
        stats = await self._stats_of([row])
        if not stats:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"container {row.id} is not running")
        return cri.ContainerStatsResponse(stats=stats[0])

    @rpc
    async def ListContainerStats(self, request, context):
        f = request.filter
        rows = [r for r in _container_rows(self.m, f)
                if _matches(f, r.id, r.spec.labels, sandbox_id=r.sandbox_id)]
        return cri.ListContainerStatsResponse(stats=await self._stats_of(rows))

    async def _pod_stats(self, row: SandboxRow) -> cri.PodSandboxStats:
        spec = row.spec
        running = [c for c in self.m.state.containers(row.id) if c.state == RUNNING]
        response, rates = await self.m.stats(row.id, [c.id for c in running])
        ts = response.timestamp_ns
        items = {i.container_id: i for i in response.containers}
        process = cri.ProcessUsage(timestamp=ts)
        process.process_count.value = response.guest.pids
        return cri.PodSandboxStats(
            attributes=cri.PodSandboxAttributes(id=row.id, metadata=cri_specs.pod_metadata(spec),
                                                labels=spec.labels, annotations=spec.annotations),
            linux=cri.LinuxPodSandboxStats(
                cpu=self._cpu(ts, response.guest, rates.get("")),
                memory=self._memory(ts, response.guest), process=process,
                containers=[self._container_stats(c, ts, items[c.id], rates.get(c.id))
                            for c in running]))

    @rpc
    async def PodSandboxStats(self, request, context):
        row = self.m.sandbox_row(request.pod_sandbox_id)
        if self.m.sandbox(row.id) is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"pod sandbox {row.id} is not ready")
        return cri.PodSandboxStatsResponse(stats=await self._pod_stats(row))

    @rpc
    async def ListPodSandboxStats(self, request, context):
        f = request.filter
        rows = {row.id: row for row in _sandbox_rows(self.m, f)
                if self.m.sandbox(row.id) is not None and _matches(f, row.id, row.spec.labels)}
        out = await _each_pod(self.m, list(rows), lambda pod: self._pod_stats(rows[pod]))
        return cri.ListPodSandboxStatsResponse(stats=out)

    # --- streaming: the URL of our streaming server, which does the rest -----
    @rpc
    async def Exec(self, request, context):
        row = self.m.container_row(request.container_id)
        if row.state != RUNNING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"container {row.id} is not running")
        return cri.ExecResponse(url=self.streaming.register_exec(ExecRequestInfo.from_cri(request)))

    @rpc
    async def Attach(self, request, context):
        row = self.m.container_row(request.container_id)
        if row.state not in (RUNNING, CREATED):  # created: attach, then start
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"container {row.id} is not running")
        if row.state == CREATED:
            self.m.reserve_attach(row.id, self.streaming.token_ttl)
        return cri.AttachResponse(
            url=self.streaming.register_attach(AttachRequestInfo.from_cri(request)))

    @rpc
    async def PortForward(self, request, context):
        self.m.sandbox_row(request.pod_sandbox_id)
        return cri.PortForwardResponse(
            url=self.streaming.register_port_forward(PortForwardRequestInfo.from_cri(request)))

    @rpc
    async def UpdateContainerResources(self, request, context):
        await self.m.update_container(request.container_id, cri_specs.resources(request.linux))
        return cri.UpdateContainerResourcesResponse()

    @rpc
    async def ReopenContainerLog(self, request, context):
        self.m.reopen_log(request.container_id)
        return cri.ReopenContainerLogResponse()


def _not_built(name: str, message: str):
    async def handler(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {message}")
    handler.__name__ = name
    return handler


for _name, _message in NOT_BUILT.items():
    setattr(RuntimeServicer, _name, _not_built(_name, _message))
