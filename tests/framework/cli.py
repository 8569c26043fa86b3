"""`hyperrun ...` as a user types it: a runner for the command line."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Callable

HYPERRUN = str(Path(sys.executable).parent / "hyperrun")

# A container's program that prints "ready", then on SIGTERM "got TERM"
# and exits 7.
TERM_TRAP = "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done"


class Cli:
    """Runs `hyperrun ARGS...` with env (None: this process's) and, where
    set, the argv prefix it runs under (as another user, with setpriv).
    Processes it started with popen() and that still run are killed by
    close(): a failed test leaves none behind."""

    def __init__(self, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                 check: bool = False) -> None:
        self.env = env
        self.prefix = prefix
        self.check = check  # assert a zero exit code unless a call says otherwise
        self._started: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, HYPERRUN, *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 120,
                 check: bool | None = None, **kwargs) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout,
                           env=kwargs.pop("env", self.env), **kwargs)
        if self.check if check is None else check:
            assert r.returncode == 0, r
        return r

    def out(self, *args: str, **kwargs) -> str:
        """The output of a run that must succeed."""
        return self(*args, check=True, **kwargs).stdout.decode()

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), env=kwargs.pop("env", self.env), **kwargs)
        self._started.append(proc)
        return proc

    def signalled(self, signum: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`hyperrun ARGS...` sent signum once it has printed its first line
        (a TERM_TRAP program's "ready"): its exit code and what it wrote
        after that line."""
        proc = self.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.readline()
        assert first == b"ready\n", first + proc.stderr.read()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def terminal(self, args: list[str], rows: int, cols: int,
                 answer: Callable[[bytes], bytes | None] | None = None,
                 timeout: float = 120) -> tuple[int, bytes]:
        """Run `hyperrun ARGS...` on a pty of rows x cols: (its exit code,
        all it wrote). answer(output so far) may return bytes to type, once."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        proc = self.popen(*args, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave end is closed
                    break
                if not chunk:
                    break
                out += chunk
                if answer is not None and (typed := answer(out)):
                    os.write(master, typed)
                    answer = None
            return proc.wait(30), out
        finally:
            os.close(master)

    def close(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._started.clear()
