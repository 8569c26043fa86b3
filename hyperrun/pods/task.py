"""A container's task: the host's side of its init process, as
containerd's runtime tasks are. It copies the process's output into the
container's log and to the outlets of those attached (`hyperrun run`, a
CRI attach), and holds its exit as a future that every waiter awaits: the
agent's WaitProcess sets it, or the pod's end (its VM died, it was
stopped) does, or the agent's failure to report the exit (an agent error
that asking again does not cure) does.

Also the handles a caller streams a process through (ExecIO, AttachIO):
the streaming server's and the CLI commands' one way to a process.
"""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from hyperrun import log
from hyperrun.channel import frame
from hyperrun.channel.agent import AgentClient
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcError

from hyperrun.sandbox.logs import LogFile

logger = log.get("pods")
OUTLET_LIMIT = 256  # chunks (up to 64 KiB each) an attached reader may lag behind
# A WaitProcess that fails with an agent error (the agent answered: the
# channel is fine) is asked again after these pauses, unless the error is
# one the same question always gets (WAIT_FINAL); then, or once they are
# spent, the task ends: exit code WAIT_FAILED_CODE, the agent's message.
WAIT_RETRY_DELAYS_S = (0.1, 1.0, 5.0)
WAIT_FINAL = frozenset({frame.NOT_FOUND, frame.FAILED_PRECONDITION, frame.INVALID_ARGUMENT,
                        frame.UNIMPLEMENTED, frame.PERMISSION_DENIED})
WAIT_FAILED_CODE = 255  # as for a VM's end: no exit status of the process's own
DRAIN_S = 2.0  # the pumps' time to bring in the output of a process killed at a failed wait

# One reader's share of a task's output: one queue per stream (b"" marks
# its end), so that the stdout and stderr readers never take each other's
# data. A lossless outlet's queues are bounded: the pumps wait for room.
Outlet = dict[str, asyncio.Queue]


def new_outlet(lossless: bool = False) -> Outlet:
    size = OUTLET_LIMIT if lossless else 0
    return {"stdout": asyncio.Queue(size), "stderr": asyncio.Queue(size)}


def end_outlet(outlet: Outlet) -> None:
    """Mark the end of an outlet's streams now; a full lossless queue loses
    its oldest chunk for it (this is a teardown: nobody waits for them)."""
    for queue in outlet.values():
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(b"")


class Task:
    def __init__(self, container_id: str, agent: AgentClient, log_path: str, tty: bool) -> None:
        self.id = container_id
        self.agent = agent
        self.log_path = log_path
        self.streams = ["stdout"] if tty else ["stdout", "stderr"]
        self.log: LogFile | None = None
        self.outlets: list[Outlet] = []
        self.reserved: list[Outlet] = []  # see reserve
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Ends with the process's exit, or when the agent's channel is lost
        # (the pod's end then sets the exit): what a stop waits for.
        self.waiter: asyncio.Task | None = None
        self._running: list[asyncio.Task] = []
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def follow(self, recorded: Callable[[int, str, str], None], started: bool = False) -> None:
        """Pump the process's output into the log and the outlets until its
        end, and take its exit: recorded(code, reason, message), then the
        future. reason is the CRI's: Completed, Error, OOMKilled (the OOM
        killer ended a process of it), or AgentError (its exit could not be
        had from the agent; message says why). started: the process runs
        already (a re-attach); else the caller says so with started() once
        its start succeeded."""
        if self.log is None:
            self.log = LogFile(self.log_path)
        pumps = [asyncio.create_task(self._pump(s)) for s in self.streams]
        if started:
            self.started()

        async def waiter() -> None:
            try:
                status = await self._wait_exit()
            except ConnectionLost:
                return  # the VM's end: the pod ends the task (ended)
            except TtrpcError as exc:
                await self._failed_wait(exc, pumps, recorded)
                return
            await asyncio.gather(*pumps, return_exceptions=True)
            reason = "OOMKilled" if status.oom_killed else \
                "Completed" if status.exit_code == 0 else "Error"
            recorded(status.exit_code, reason, "")
            self.ended(status.exit_code)

        self.waiter = asyncio.create_task(waiter())
        self._running = pumps + [self.waiter]

    def started(self) -> None:
        """The process's start succeeded (a failed start ends the task on
        its own path: StartError)."""
        if not self._started.done():
            self._started.set_result(None)

    async def _wait_exit(self):
        """The process's exit status from the agent. An agent error is
        asked again after a pause (WAIT_RETRY_DELAYS_S), unless it is
        final (WAIT_FINAL): WaitProcess of a container's init is
        idempotent in the agent (its reaper keeps the status), so asking
        again loses nothing. Raises the last TtrpcError, or ConnectionLost."""
        for delay in (*WAIT_RETRY_DELAYS_S, None):
            try:
                return await self.agent.wait_process(self.id)
            except TtrpcError as exc:
                if delay is None or exc.code in WAIT_FINAL:
                    raise
                logger.warning("WaitProcess failed; asking again", container=self.id,
                               code=exc.code, error=exc.remote_message, retry_in_s=delay)
                await asyncio.sleep(delay)

    async def _failed_wait(self, exc: TtrpcError, pumps: list[asyncio.Task],
                           recorded: Callable[[int, str, str], None]) -> None:
        """The agent cannot give the process's exit: end the task, with the
        agent's reason recorded, rather than leave its waiters waiting for
        ever. A start still in flight decides first (a failed start, whose
        WaitProcess fails too, is ended by its own path: this is cancelled).
        The process is then killed (best effort), so that "exited" is true
        and its output's end reaches the log."""
        await self._started
        message = (f"the guest agent could not report the process's exit "
                   f"({exc.remote_message}); it was killed")
        logger.warning("WaitProcess failed: the task ends", container=self.id, code=exc.code,
                       error=exc.remote_message)
        try:
            await self.agent.signal_process(self.id, "", signal.SIGKILL)
        except (ConnectionLost, TtrpcError, TimeoutError):
            pass  # gone already, or the agent cannot: the record says so all the same
        await asyncio.wait(pumps, timeout=DRAIN_S)
        recorded(WAIT_FAILED_CODE, "AgentError", message)
        self.ended(WAIT_FAILED_CODE)

    async def _pump(self, stream: str) -> None:
        try:
            while data := await self.agent.read_stream(stream, self.id, "", 65536):
                self.log.write(stream, data)
                for outlet in list(self.outlets):
                    queue = outlet[stream]
                    if queue.maxsize:  # lossless: the output waits for its reader
                        await queue.put(data)
                    elif queue.qsize() >= OUTLET_LIMIT:
                        self._drop(outlet)
                    else:
                        queue.put_nowait(data)
        except (ConnectionLost, TtrpcError):
            pass
        for outlet in list(self.outlets):
            await outlet[stream].put(b"")

    def ended(self, code: int) -> None:
        """The process is gone (code: its exit status, or the pod's end's);
        no more output will come."""
        if not self.exit.done():
            self.exit.set_result(code)
        for outlet in self.outlets:
            end_outlet(outlet)
        self.outlets.clear()
        self.reserved.clear()

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    def close(self) -> None:
        """The container is removed (or the daemon stops): stop following."""
        for running in self._running:
            running.cancel()
        self._running = []
        for outlet in self.outlets:
            end_outlet(outlet)
        self.outlets.clear()
        if self.log is not None:
            self.log.close()
            self.log = None

    # --- attached readers
    def attach(self, lossless: bool = False) -> Outlet:
        """An outlet of the output from now on (or from a reservation)."""
        if self.reserved:
            return self.reserved.pop(0)
        outlet = new_outlet(lossless)
        self.outlets.append(outlet)
        return outlet

    def reserve(self, ttl: float) -> None:
        """An attach URL was handed out for a created container: collect its
        output from now on, so that a client which attaches, starts, and
        only then gets its stream connected misses nothing. Unclaimed after
        ttl seconds (the URL expired), the reservation is dropped."""
        outlet = new_outlet()
        self.reserved.append(outlet)
        self.outlets.append(outlet)

        def expire() -> None:
            if outlet in self.reserved:
                self.reserved.remove(outlet)
                self.outlets.remove(outlet)

        asyncio.get_running_loop().call_later(ttl, expire)

    def detach(self, outlet: Outlet) -> None:
        """Take an outlet off the pumps, and empty it: a pump waiting for
        room in a lossless one goes on, and puts no more."""
        if outlet in self.outlets:
            self.outlets.remove(outlet)
        for queue in outlet.values():
            while not queue.empty():
                queue.get_nowait()

    def _drop(self, outlet: Outlet) -> None:
        """A reader that does not keep up is ended (the log has everything)
        rather than buffered without bound in the daemon."""
        self.outlets.remove(outlet)
        end_outlet(outlet)
        logger.warning("attached reader too slow: ended", container=self.id)


class ExecIO:
    """An exec'd process, read as its output comes."""

    def __init__(self, agent: AgentClient, container_id: str, exec_id: str) -> None:
        self.agent = agent
        self.cid = container_id
        self.eid = exec_id

    async def read(self, stream: str) -> bytes:
        try:
            return await self.agent.read_stream(stream, self.cid, self.eid, 65536)
        except TtrpcError:
            return b""

    async def write(self, data: bytes) -> None:
        await self.agent.write_stdin(self.cid, self.eid, data)

    async def close_stdin(self) -> None:
        await self.agent.close_stdin(self.cid, self.eid)

    async def resize(self, rows: int, cols: int) -> None:
        await self.agent.resize_tty(self.cid, self.eid, rows, cols)

    async def wait(self) -> int:
        return (await self.agent.wait_process(self.cid, self.eid)).exit_code

    async def abandon(self) -> None:
        """Its client is gone: the process is killed (as containerd kills an
        exec whose stream's context ends), so that nothing runs on that
        nobody can see or stop; its output then ends and wait() returns."""
        try:
            await self.agent.signal_process(self.cid, self.eid, signal.SIGKILL)
        except (TtrpcError, ConnectionLost):
            pass  # it had ended already, or its VM has


class AttachIO(ExecIO):
    """A container's init process, through an outlet of its task."""

    def __init__(self, task: Task, outlet: Outlet) -> None:
        super().__init__(task.agent, task.id, "")
        self.task = task
        self.outlet = outlet
        self.ended: set[str] = set()

    async def read(self, stream: str) -> bytes:
        if stream in self.ended:
            return b""
        data = await self.outlet[stream].get()
        if not data:
            self.ended.add(stream)
        return data

    async def wait(self) -> int:
        """Its exit status, once its task has it recorded."""
        try:
            return await self.task.wait()
        finally:
            self.detach()

    def detach(self) -> None:
        self.task.detach(self.outlet)

    async def abandon(self) -> None:
        """Its client is gone: let go of the container's output (the
        container runs on); the reads end at once."""
        self.detach()
        end_outlet(self.outlet)
