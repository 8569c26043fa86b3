"""A fake guest agent: the REAL ttRPC `Server` and the REAL `AgentService`
of agent/hyperrun_agent, over `FakeContainers`, whose container processes
are plain host subprocesses. The host side talks to it exactly as to the
agent in a VM (the same frames, methods, errors and stdio semantics: the
real `Stdio` pipes, `ExitStatus`, lookups, waits, signals and the release
of an exec), served on a unix socket as QEMU's serial chardev is.

What it does not model:
- no image, rootfs, mounts or volumes: a process runs in the host's
  filesystem, with the request's args, env and cwd, as the test's user;
- no PID namespace: a container's process is not an init, so a signal it
  has no handler for is not discarded (it kills it); only the end of its
  init ends the rest of a container (its process group), as the kernel
  does for a PID namespace;
- no terminals (a tty is refused), no cgroups (UpdateContainer is only
  recorded, GetStats answers zeros), no network or hostname (SetupSandbox
  is only recorded), no crun (GuestDetails, WarmUp: plain answers);
- Shutdown answers but does not end the VM (a test ends it: FakeVM.die).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from hyperrun.channel import frame  # noqa: E402
from hyperrun.proto import agent_pb2 as pb  # noqa: E402
from hyperrun_agent import VERSION  # noqa: E402
from hyperrun_agent.containers import Container, Containers, Process, _check_id  # noqa: E402
from hyperrun_agent.errors import AgentError, failed, invalid  # noqa: E402
from hyperrun_agent.reaper import ExitStatus, Reaper  # noqa: E402
from hyperrun_agent.server import Server  # noqa: E402
from hyperrun_agent.service import SERVICE, AgentService  # noqa: E402
from hyperrun_agent.transport import SocketConnection  # noqa: E402


class ThreadReaper(Reaper):
    """Exit statuses handed out as the agent's Reaper does (wait, watch,
    forget are its own), but each child waited for by a thread of its own:
    the real one's waitpid(-1) would reap the test process's other
    children."""

    def __init__(self) -> None:  # not Reaper's: it starts the waitpid(-1) thread
        self._lock = threading.Lock()
        self._waiters = {}
        self._unclaimed = OrderedDict()

    def follow(self, popen: subprocess.Popen, on_exit) -> None:
        self.watch(popen.pid)
        threading.Thread(target=self._reap, args=(popen, on_exit), daemon=True).start()

    def _reap(self, popen: subprocess.Popen, on_exit) -> None:
        # Exited but not reaped yet: its pid (and group id) cannot be reused
        # while on_exit ends what is left of its group.
        os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT)
        on_exit()
        code = popen.wait()
        status = ExitStatus(code << 8 if code >= 0 else -code)  # as a wait status
        with self._lock:
            waiter = self._waiters.get(popen.pid)
        if waiter is not None:
            waiter.status = status
            waiter.event.set()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FakeContainers(Containers):
    """Containers whose processes are host subprocesses. Lookups, waits,
    signals and the release of execs are the real Containers' methods."""

    def __init__(self) -> None:  # not Containers': no state directory, no waitpid(-1)
        self.reaper = ThreadReaper()
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self.requests: dict[str, pb.CreateContainerRequest] = {}  # as created
        self.updates: dict[str, pb.Resources] = {}

    def create(self, req) -> None:
        cid = _check_id(req.container_id, "container id")
        _check_process(req.process)
        with self._lock:
            if cid in self._containers:
                raise AgentError(frame.ALREADY_EXISTS, f"container {cid!r} already exists")
            container = self._containers[cid] = Container(cid, bundle="")
        container.init = self._new_process(container, "", req.process)
        self.requests[cid] = req

    def _new_process(self, container: Container, exec_id: str, process) -> Process:
        proc = super()._new_process(container, exec_id, process)
        proc.spec = process  # what _run_crun runs
        return proc

    def _run_crun(self, container: Container, proc: Process, args: list[str]) -> None:
        """The real start() ends here: the process runs on the host instead."""
        init = container.init
        leader = proc is init
        env = dict(e.partition("=")[::2] for e in proc.spec.env)
        stdin, stdout, stderr = proc.stdio.child_fds
        try:
            popen = subprocess.Popen(
                list(proc.spec.args), env=env, cwd=proc.spec.cwd or "/", stdin=stdin,
                stdout=stdout, stderr=stderr, close_fds=True,
                # The init leads a group, its execs join it: the group is
                # the container, ended with its init (a PID namespace's end).
                process_group=0 if leader else init.pid)
            # Watched and known before started is set: a WaitProcess waits
            # for started, then for the pid's exit.
            self.reaper.follow(popen, (lambda: _kill_group(popen.pid)) if leader
                               else (lambda: None))
            proc.pid = popen.pid
        except OSError as exc:
            proc.stdio.close()
            raise AgentError(frame.INTERNAL, f"crun failed: {exc}") from None
        finally:
            proc.started.set()
            proc.stdio.close_child_fds()

    def exec(self, req) -> None:
        container = self._running(req.container_id)
        eid = _check_id(req.exec_id, "exec id")
        _check_process(req.process)
        with self._lock:
            if eid in container.execs:
                raise AgentError(frame.ALREADY_EXISTS, f"exec {eid!r} already exists")
            proc = container.execs[eid] = self._new_process(container, eid, req.process)
        try:
            self._run_crun(container, proc, [])
        except BaseException:
            del container.execs[eid]
            raise

    def update(self, container_id: str, resources) -> None:
        self._running(container_id)
        self.updates[container_id] = resources

    def _running(self, container_id: str) -> Container:
        container = self.get(container_id)
        if container.init is None or not container.init.pid or self._exited(container.init):
            raise failed(f"container {container_id!r} is not running")
        return container

    def remove(self, container_id: str) -> None:
        """Kill everything of the container and forget it, as the real
        teardown does (its crun delete --force: the whole group)."""
        container = self.get(container_id)
        if container.init is not None and container.init.pid and not self._exited(container.init):
            _kill_group(container.init.pid)
        for proc in [container.init, *container.execs.values()]:
            if proc is None:
                continue
            proc.started.set()  # a waiter on a never-started process gives up
            if proc.pid:
                self.reaper.wait(proc.pid, timeout=5)
                self.reaper.forget(proc.pid)
            proc.stdio.close()
        with self._lock:
            self._containers.pop(container_id, None)


def _check_process(process) -> None:
    if not process.args:
        raise invalid("process args are empty")
    if process.terminal:
        raise invalid("the fake agent has no terminals")


class FakeAgentService(AgentService):
    """The real service, but for what would change the host: those
    requests are recorded, or answered plainly."""

    def __init__(self, containers: FakeContainers) -> None:
        super().__init__(containers)
        self.setups: list[pb.SetupSandboxRequest] = []
        self.warm_ups = 0
        self.shutdowns = 0

    def setup_sandbox(self, req):
        self.setups.append(req)
        return pb.Empty()

    def guest_details(self, req):
        return pb.GuestDetails(agent_version=VERSION, kernel_release="fake", cpus=1,
                               mem_total_bytes=256 << 20, crun_version="fake")

    def warm_up(self, req):
        self.warm_ups += 1
        return pb.Empty()

    def shutdown(self, req):
        self.shutdowns += 1
        return pb.Empty()

    def get_stats(self, req):
        ids = list(req.container_ids) or self.containers.ids()
        for cid in ids:
            self.containers.get(cid)  # NOT_FOUND as the real one
        return pb.StatsResponse(timestamp_ns=time.time_ns(), guest=pb.CgroupStats(),
                                containers=[pb.CgroupStats(container_id=c) for c in ids])


class _Connection(SocketConnection):
    """A host's connection; tells the agent of each reply written (the
    server writes a reply on the thread that handled its request)."""

    def __init__(self, sock: socket.socket, agent: FakeAgent) -> None:
        super().__init__(sock)
        self.agent = agent

    def write(self, data: bytes) -> None:
        if self.agent._breaks_here():
            # The connection breaks under this reply: the host's channel
            # ends, and the agent's write fails as a real one then does.
            self.sock.shutdown(socket.SHUT_RDWR)
            raise BrokenPipeError("the fake agent broke the connection")
        super().write(data)
        self.agent._replied()


class FakeAgent:
    """One guest's agent, serving on a listening unix socket (the host end
    of a serial channel) from threads, until stop(). hang() makes it stop
    answering (a guest deadlock): requests are read and never handled.
    wait_answered() waits for a reply to be on its way to the host.
    wait_handling() waits for a request to be in its handler.
    fail_next() makes the next request of a method answer an agent error;
    break_reply() breaks the connection under the next reply of a method."""

    WORK_NS = 1_000_000  # of busy time per request handled: see busy_ns

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.containers = FakeContainers()
        self.service = FakeAgentService(self.containers)
        self.server = Server(SERVICE, {name: (req_type, self._gated(name, handler))
                                       for name, (req_type, handler)
                                       in self.service.methods().items()})
        self.busy_ns = 0  # grows while it answers, stands while it hangs or idles
        self.stopped = False
        self._answering = threading.Event()
        self._answering.set()
        self._sessions: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self.answers: list[tuple[str, str]] = []  # (method, container id), as written
        self.handling: list[str] = []  # methods whose handler was entered, in order
        self._handled = threading.local()  # this thread's answer, until written
        self._failing: dict[str, list[AgentError]] = {}  # see fail_next
        self._breaking: set[str] = set()  # see break_reply
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _gated(self, method: str, handler):
        def handle(request):
            self._answering.wait()
            if self.stopped:  # the VM ended while this request waited
                raise ConnectionAbortedError("the VM is gone")
            with self._lock:
                self.busy_ns += self.WORK_NS
                failing = self._failing.get(method)
                error = failing.pop(0) if failing else None
            self._handled.answer = None
            if error is not None:
                raise error
            with self._answered:
                self.handling.append(method)
                self._answered.notify_all()
            response = handler(request)
            self._handled.answer = (method, getattr(request, "container_id", ""))
            return response
        return handle

    def fail_next(self, method: str, code: int = frame.INTERNAL,
                  message: str = "injected failure") -> None:
        """The next request of method is answered with this agent error
        (a TtrpcError on the host), without being handled."""
        with self._lock:
            self._failing.setdefault(method, []).append(AgentError(code, message))

    def break_reply(self, method: str) -> None:
        """The connection breaks under the next reply to method, after its
        handler ran: the host never gets that reply."""
        with self._lock:
            self._breaking.add(method)

    def _breaks_here(self) -> bool:
        answer = getattr(self._handled, "answer", None)
        with self._lock:
            if answer is not None and answer[0] in self._breaking:
                self._breaking.discard(answer[0])
                return True
        return False

    def _replied(self) -> None:
        if answer := getattr(self._handled, "answer", None):
            with self._answered:
                self.answers.append(answer)
                self._answered.notify_all()

    def wait_answered(self, method: str, container_id: str, timeout: float) -> bool:
        """Until a reply to method for that container has been written to
        the host: anything the agent answers later reaches the host after
        it. Blocking (asyncio.to_thread)."""
        with self._answered:
            return self._answered.wait_for(
                lambda: (method, container_id) in self.answers, timeout)

    def wait_handling(self, method: str, timeout: float) -> bool:
        """Until a request of method has entered its handler (a read: it
        then waits for output, or takes it). Blocking (asyncio.to_thread)."""
        with self._answered:
            return self._answered.wait_for(lambda: method in self.handling, timeout)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self.stopped:
                    sock.close()
                    return
                self._sessions.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self.server.serve(_Connection(sock, self))
        finally:
            with self._lock:
                self._sessions.discard(sock)
            sock.close()

    def hang(self) -> None:
        self._answering.clear()

    def resume(self) -> None:
        self._answering.set()

    def stop(self) -> None:
        """The guest is gone: the host's sessions end first (nothing of the
        guest reaches the host after its end), then its processes."""
        with self._lock:
            self.stopped = True
            sessions = list(self._sessions)
        self._listener.shutdown(socket.SHUT_RDWR)  # ends accept()
        self._listener.close()
        for sock in sessions:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the host reads EOF, serve() returns
            except OSError:
                pass
        self._answering.set()  # requests held by a hang end (unanswered)
        for cid in self.containers.ids():
            self.containers.remove(cid)
