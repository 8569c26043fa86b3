"""Typed client for the guest agent's API (proto/agent.proto)."""
from __future__ import annotations

from hyperrun.proto import agent_pb2 as pb

from .ttrpc import Opener, TtrpcClient

SERVICE = "hyperrun.agent.v1.Agent"
# A call the agent does not answer in time fails with TimeoutError: a hung
# guest must not hold a CRI call (and the pod's lock) for ever. Longer than
# the agent's own limit on crun (60 s), so that its error arrives first.
# Calls that wait by design (a process's exit, its output, room in its
# stdin) have none; a signal, sent on a stop's clock, a short one.
CALL_TIMEOUT_S = 90.0
SIGNAL_TIMEOUT_S = 10.0


class AgentClient:
    def __init__(self, name: str = "agent") -> None:
        self.session = TtrpcClient(name)

    async def connect(self, opener: Opener) -> None:
        await self.session.connect(opener)

    async def close(self) -> None:
        await self.session.close()

    @property
    def last_reply(self) -> float:
        """When the agent last answered anything (the event loop's clock)."""
        return self.session.last_reply

    async def _call(self, method, request, response_type,
                    timeout: float | None = CALL_TIMEOUT_S):
        return await self.session.call(SERVICE, method, request, response_type, timeout)

    async def health(self, timeout: float | None = None) -> bool:
        resp = await self._call("Health", pb.HealthRequest(), pb.HealthResponse, timeout)
        return resp.status == pb.HealthResponse.SERVING

    async def guest_details(self) -> pb.GuestDetails:
        return await self._call("GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetails)

    async def warm_up(self) -> None:
        await self._call("WarmUp", pb.Empty(), pb.Empty)

    async def setup_sandbox(self, request: pb.SetupSandboxRequest) -> None:
        """The sandbox's network and name files, and always its own
        identity: fresh entropy and the host's clock, stamped here at the
        moment of sending (a VM restored from a template has the template's
        RNG state and clock; harmless for a booted one)."""
        import os
        import time

        request.entropy = os.urandom(64)
        request.time_ns = time.time_ns()
        await self._call("SetupSandbox", request, pb.Empty)

    async def create_container(self, container_id: str, rootfs: pb.Storage, process: pb.Process,
                               **fields) -> None:
        """fields: the rest of CreateContainerRequest's (hostname, mounts,
        privileged, seccomp, ...), as its constructor takes them."""
        await self._call("CreateContainer", pb.CreateContainerRequest(
            container_id=container_id, rootfs=rootfs, process=process, **fields), pb.Empty)

    async def update_container(self, container_id: str, resources: pb.Resources) -> None:
        await self._call("UpdateContainer", pb.UpdateContainerRequest(
            container_id=container_id, resources=resources), pb.Empty)

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", pb.ContainerRequest(container_id=container_id), pb.Empty)

    async def exec_process(self, container_id: str, exec_id: str, process: pb.Process) -> None:
        await self._call("ExecProcess", pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=process), pb.Empty)

    async def wait_process(self, container_id: str, exec_id: str = "") -> pb.WaitProcessResponse:
        return await self._call("WaitProcess", pb.ProcessRequest(
            container_id=container_id, exec_id=exec_id), pb.WaitProcessResponse, timeout=None)

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        await self._call("SignalProcess", pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal), pb.Empty,
            timeout=SIGNAL_TIMEOUT_S)

    async def remove_container(self, container_id: str) -> None:
        await self._call("RemoveContainer", pb.ContainerRequest(container_id=container_id), pb.Empty)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        resp = await self._call("WriteStdin", pb.WriteStdinRequest(
            container_id=container_id, exec_id=exec_id, data=data), pb.WriteStdinResponse,
            timeout=None)
        return resp.written

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", pb.ProcessRequest(
            container_id=container_id, exec_id=exec_id), pb.Empty)

    async def read_stream(self, stream: str, container_id: str, exec_id: str = "",
                          max_bytes: int = 0) -> bytes:
        """stream is "stdout" or "stderr"; returns b"" at end of stream."""
        method = {"stdout": "ReadStdout", "stderr": "ReadStderr"}[stream]
        resp = await self._call(method, pb.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, max_bytes=max_bytes),
            pb.ReadStreamResponse, timeout=None)
        return b"" if resp.eof else resp.data

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call("ResizeTty", pb.ResizeTtyRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols), pb.Empty)

    async def stats(self, container_ids: list[str] | None = None) -> pb.StatsResponse:
        return await self._call("GetStats", pb.StatsRequest(container_ids=container_ids or []),
                                pb.StatsResponse)

    async def shutdown(self) -> None:
        await self._call("Shutdown", pb.Empty(), pb.Empty, timeout=5)
