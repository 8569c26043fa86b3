"""The Agent service (proto/agent.proto): requests to container operations."""
import os
import threading

from hyperrun.channel import frame
from hyperrun.proto import agent_pb2 as pb

from . import VERSION, syscalls
from .containers import CRUN, LAZY_MODULES, Containers
from .errors import AgentError, failed
from .log import log
from .server import current_call
from .stdio import Cancelled

SERVICE = "hyperrun.agent.v1.Agent"
WARM_UP_ID = "hyperrun-warm-up"


def _root_device() -> str:
    """The guest's root disk (the kernel's root=): an erofs image, mounted
    again as a warm-up container's image (same superblock)."""
    with open("/proc/cmdline") as f:
        for word in f.read().split():
            if word.startswith("root="):
                return word[len("root="):]
    raise failed("no root= on the kernel command line")


class AgentService:
    def __init__(self, containers: Containers) -> None:
        self.containers = containers
        self._crun_version = ""

    def methods(self) -> dict:
        return {
            "Health": (pb.HealthRequest, self.health),
            "GetGuestDetails": (pb.GuestDetailsRequest, self.guest_details),
            "WarmUp": (pb.Empty, self.warm_up),
            "SetupSandbox": (pb.SetupSandboxRequest, self.setup_sandbox),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "StartContainer": (pb.ContainerRequest, self.start_container),
            "ExecProcess": (pb.ExecProcessRequest, self.exec_process),
            "WaitProcess": (pb.ProcessRequest, self.wait_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "RemoveContainer": (pb.ContainerRequest, self.remove_container),
            "WriteStdin": (pb.WriteStdinRequest, self.write_stdin),
            "CloseStdin": (pb.ProcessRequest, self.close_stdin),
            "ReadStdout": (pb.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (pb.ReadStreamRequest, self.read_stderr),
            "ResizeTty": (pb.ResizeTtyRequest, self.resize_tty),
            "UpdateContainer": (pb.UpdateContainerRequest, self.update_container),
            "GetStats": (pb.StatsRequest, self.get_stats),
            "Shutdown": (pb.Empty, self.shutdown),
        }

    def health(self, req):
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    def guest_details(self, req):
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        mem_total = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
        try:
            with open("/sys/fs/cgroup/cgroup.controllers") as f:
                controllers = f.read().split()
        except OSError:
            controllers = []
        return pb.GuestDetails(agent_version=VERSION, kernel_release=os.uname().release,
                               cpus=os.cpu_count() or 1, mem_total_bytes=mem_total,
                               uptime_seconds=uptime, crun_version=self._crun(),
                               cgroup_controllers=controllers)

    def _crun(self) -> str:
        """crun's version line (running it also reads crun into the page cache)."""
        if not self._crun_version:
            import subprocess

            out = subprocess.run([CRUN, "--version"], capture_output=True, text=True)
            self._crun_version = out.stdout.splitlines()[0] if out.stdout else ""
        return self._crun_version

    def warm_up(self, req):
        """Load and run once what every sandbox will: the modules imported
        lazily, and a throwaway container (the guest's own root as its
        image, `true` as its process) through the very create/start/wait/
        remove path pods take: erofs and overlay mounts, crun, the reaper.
        Before a template is saved, that leaves it all in the guest's
        memory for every clone; in a pool spare under TCG it also leaves
        those paths translated (measured: a clone's first SetupSandbox
        246 ms with the imports left to it, 70 ms after)."""
        import importlib

        for name in LAZY_MODULES:
            importlib.import_module(name, __package__)
        self._crun()
        cid = WARM_UP_ID
        self.containers.create(pb.CreateContainerRequest(
            container_id=cid, rootfs=pb.Storage(source=_root_device(), fstype="erofs", overlay=True),
            process=pb.Process(args=["/usr/bin/true"], env=["PATH=/usr/bin"], cwd="/")))
        try:
            self.containers.start(cid)
            status = self.containers.wait(cid, "")
        finally:
            self.containers.remove(cid)
        if status.exit_code != 0:
            raise failed(f"warm-up container exited with {status.exit_code}")
        return pb.Empty()

    def setup_sandbox(self, req):
        from . import network

        network.setup(req)
        return pb.Empty()

    def create_container(self, req):
        self.containers.create(req)
        return pb.Empty()

    def start_container(self, req):
        self.containers.start(req.container_id)
        return pb.Empty()

    def exec_process(self, req):
        self.containers.exec(req)
        return pb.Empty()

    def wait_process(self, req):
        from . import stats

        status = self.containers.wait(req.container_id, req.exec_id)
        oom = not req.exec_id and stats.oom_kills(req.container_id) > 0
        return pb.WaitProcessResponse(exit_code=status.exit_code, signal=status.signal,
                                      oom_killed=oom)

    def signal_process(self, req):
        self.containers.signal(req.container_id, req.exec_id, req.signal)
        return pb.Empty()

    def remove_container(self, req):
        self.containers.remove(req.container_id)
        return pb.Empty()

    def write_stdin(self, req):
        proc = self.containers.process(req.container_id, req.exec_id)
        try:
            written = proc.stdio.stdin.write(req.data)
        except BrokenPipeError:
            raise failed("stdin is closed") from None
        return pb.WriteStdinResponse(written=written)

    def close_stdin(self, req):
        self.containers.process(req.container_id, req.exec_id).stdio.close_stdin()
        return pb.Empty()

    def _read(self, req, stream_name: str):
        """Output for the host that asked, and only for it: the stream is
        held until the reply is written; output whose reply does not reach
        that host (its session ended meanwhile) stays for the next reader,
        and a reader whose host is gone while it waits takes nothing."""
        stream = getattr(self.containers.process(req.container_id, req.exec_id).stdio, stream_name)
        call = current_call()
        try:
            data = stream.take(min(req.max_bytes or 65536, 1 << 20),
                               call.ended_fd if call is not None else None)
        except Cancelled:
            raise AgentError(frame.CANCELLED, "the host that asked is gone") from None
        if data and call is not None:
            call.after_reply(lambda delivered: stream.settle(data, delivered))
        else:  # the end of stream (no data to give back), or no session
            stream.settle(data, True)
        if not data:
            self.containers.release_exec(req.container_id, req.exec_id)
        return pb.ReadStreamResponse(data=data, eof=not data)

    def read_stdout(self, req):
        return self._read(req, "stdout")

    def read_stderr(self, req):
        return self._read(req, "stderr")

    def resize_tty(self, req):
        proc = self.containers.process(req.container_id, req.exec_id)
        try:
            proc.stdio.resize(req.rows, req.cols)
        except ValueError as exc:
            raise failed(str(exc)) from None
        return pb.Empty()

    def update_container(self, req):
        self.containers.update(req.container_id, req.resources)
        return pb.Empty()

    def get_stats(self, req):
        import time

        from . import stats

        ids = list(req.container_ids) or self.containers.ids()
        out = []
        for cid in ids:
            container = self.containers.get(cid)
            item = stats.cgroup_stats(f"{stats.CGROUP_ROOT}/hyperrun/{cid}", cid)
            upper = os.path.join(container.bundle, "upper")
            if os.path.isdir(upper):
                item.writable_bytes, item.writable_inodes = stats.tree_usage(upper)
            out.append(item)
        return pb.StatsResponse(timestamp_ns=time.time_ns(), guest=stats.guest_stats(),
                                containers=out)

    def shutdown(self, req):
        log("shutdown requested")
        # Reply first; power off a moment later.
        threading.Timer(0.05, syscalls.reboot).start()
        return pb.Empty()
