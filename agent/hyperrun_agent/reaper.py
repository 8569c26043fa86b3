"""Child processes and their exit statuses.

As PID 1 the agent inherits every orphan, container init processes
included (crun create leaves them to us). One thread reaps all children
with waitpid(-1) and hands each status to whoever waits for that pid; a
status that arrives before anyone asks (a container that exits at once)
is kept for a while, so no exit code is lost.
"""
import os
import signal
import threading
from collections import OrderedDict

_UNCLAIMED_MAX = 1024
NO_CHILD_WAIT_S = 30.0


class ExitStatus:
    __slots__ = ("exit_code", "signal")

    def __init__(self, wait_status: int) -> None:
        if os.WIFSIGNALED(wait_status):
            self.signal = os.WTERMSIG(wait_status)
            self.exit_code = 128 + self.signal
        else:
            self.signal = 0
            self.exit_code = os.WEXITSTATUS(wait_status)

    def __repr__(self) -> str:
        return f"ExitStatus(exit_code={self.exit_code}, signal={self.signal})"


class _Waiter:
    __slots__ = ("event", "status")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.status: ExitStatus | None = None


class Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._have_children = threading.Condition(self._lock)
        self._waiters: dict[int, _Waiter] = {}
        self._unclaimed: OrderedDict[int, ExitStatus] = OrderedDict()
        self._spawned = 0  # spawns so far: one after the reaper's waitpid wakes it
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def spawn(self, argv: list[str], stdin: int, stdout: int, stderr: int,
              env: dict[str, str] | None = None) -> int:
        """Start argv with the given fds as its stdio; watch its exit."""
        file_actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                        (os.POSIX_SPAWN_DUP2, stderr, 2)]
        with self._lock:
            pid = os.posix_spawn(argv[0], argv, env if env is not None else os.environ,
                                 file_actions=file_actions, setsigdef=(signal.SIGPIPE,))
            self._watch_locked(pid)
            self._spawned += 1
            self._have_children.notify()
        return pid

    def watch(self, pid: int) -> None:
        """Follow a process we did not spawn but inherited (a container init)."""
        with self._lock:
            self._watch_locked(pid)

    def _watch_locked(self, pid: int) -> None:
        # A fresh waiter: pids are reused, an old status must not leak in.
        waiter = self._waiters[pid] = _Waiter()
        status = self._unclaimed.pop(pid, None)
        if status is not None:
            waiter.status = status
            waiter.event.set()

    def wait(self, pid: int, timeout: float | None = None) -> ExitStatus | None:
        with self._lock:
            waiter = self._waiters.get(pid)
        if waiter is None:
            raise KeyError(f"pid {pid} is not watched")
        if not waiter.event.wait(timeout):
            return None
        return waiter.status

    def forget(self, pid: int) -> None:
        with self._lock:
            self._waiters.pop(pid, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                spawned = self._spawned
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No child: wait for a spawn's notify. The timeout only
                # catches a child made without one (the pod namespaces'
                # fork): its exit is reaped late, a zombie meanwhile. Not
                # shorter: an idle VM (a pool spare, a pod between
                # containers) would wake for nothing (it was 1 s).
                with self._lock:
                    if self._spawned == spawned:  # else a child came meanwhile
                        self._have_children.wait(NO_CHILD_WAIT_S)
                continue
            except InterruptedError:
                continue
            exit_status = ExitStatus(status)
            with self._lock:
                waiter = self._waiters.get(pid)
                if waiter is None:
                    self._unclaimed[pid] = exit_status
                    while len(self._unclaimed) > _UNCLAIMED_MAX:
                        self._unclaimed.popitem(last=False)
                else:
                    waiter.status = exit_status
                    waiter.event.set()
