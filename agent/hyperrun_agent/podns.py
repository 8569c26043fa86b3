"""The pod's own PID and IPC namespaces, which its containers share when
the CRI asks for mode POD (IPC by default under Kubernetes; PID with
shareProcessNamespace), as the pause container holds them under
containerd. Mode NODE is the guest's own: the agent's, where it is PID 1.

A process of the agent's holds them: forked (no program to ship), it
unshares both and forks again, and that child, PID 1 of the new PID
namespace, reaps what is left to it (processes whose parents ended inside
the pod's namespace) for as long as the VM runs. Container processes
themselves stay the agent's children: crun's orphans go to the agent.
"""
import ctypes
import os
import signal
import threading

CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000

_libc = ctypes.CDLL(None, use_errno=True)


def _hold() -> None:
    """PID 1 of the pod's PID namespace: reap, wait for SIGCHLD, forever."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigwaitinfo({signal.SIGCHLD})


def _start() -> int:
    """Fork the holder; its PID as the agent sees it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # only async-signal-safe-ish calls from here: a fork of a threaded process
        try:
            os.close(read)
            if _libc.unshare(CLONE_NEWPID | CLONE_NEWIPC) != 0:
                os._exit(1)
            holder = os.fork()
            if holder == 0:
                os.close(write)
                _hold()
            os.write(write, str(holder).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    if not data:
        raise OSError("the pod's namespaces could not be made (unshare failed)")
    return int(data)


class PodNamespaces:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder = 0

    def path(self, kind: str) -> str:
        """/proc/<holder>/ns/<kind> ("pid" or "ipc"), the holder made at
        the first need."""
        with self._lock:
            if not self._holder:
                self._holder = _start()
            return f"/proc/{self._holder}/ns/{kind}"
