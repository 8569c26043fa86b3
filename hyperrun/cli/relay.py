"""Relaying a process's stdio between the local terminal and the agent.

Output: one task per stream calls ReadStdout/ReadStderr until end of
stream. Input: a thread reads local stdin (a blocking read cannot be
cancelled in asyncio) and hands chunks to a task that calls WriteStdin;
local end-of-file becomes CloseStdin. With a terminal, the local tty is
put in raw mode and window-size changes are forwarded.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from hyperrun.channel.agent import AgentClient
from hyperrun.cli.terminal import terminal_size

CHUNK = 65536
# Signals `hyperrun run` passes on to the container, as `docker run` does.
PROXIED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Relay:
    def __init__(self, agent: AgentClient, container_id: str, exec_id: str = "",
                 *, stdin: bool, terminal: bool, stdout_fd: int = 1, stderr_fd: int = 2,
                 stdin_fd: int = 0) -> None:
        self.agent = agent
        self.cid = container_id
        self.eid = exec_id
        self.stdin = stdin
        self.terminal = terminal
        self.fds = {"stdout": stdout_fd, "stderr": stderr_fd}
        self.stdin_fd = stdin_fd
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Begin relaying; call after the process exists, before it starts."""
        streams = ["stdout"] if self.terminal else ["stdout", "stderr"]
        self._tasks = [asyncio.create_task(self._pump_out(s)) for s in streams]
        if self.stdin:
            self._input = asyncio.create_task(self._pump_in())

    async def _pump_out(self, stream: str) -> None:
        fd: int | None = self.fds[stream]
        while data := await self.agent.read_stream(stream, self.cid, self.eid, CHUNK):
            if fd is None:
                continue
            try:
                _write_all(fd, data)
            except BrokenPipeError:
                # The local reader left (`| head`): keep draining so the
                # container never blocks on a full pipe, as Docker does.
                fd = None

    async def _pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

        def reader() -> None:
            while True:
                try:
                    data = os.read(self.stdin_fd, CHUNK)
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                except Exception:  # the relay or its loop has ended
                    return
                if not data:
                    return

        threading.Thread(target=reader, name="stdin", daemon=True).start()
        while data := await queue.get():
            await self.agent.write_stdin(self.cid, self.eid, data)
        await self.agent.close_stdin(self.cid, self.eid)

    async def drain(self) -> None:
        """Wait until every output stream has reached its end."""
        await asyncio.gather(*self._tasks)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.stdin:
            self._input.cancel()


def forward_signals(agent: AgentClient, cid: str, eid: str = "", terminal: bool = False) -> None:
    """Install handlers passing signals (and, with a tty, resizes) on."""
    loop = asyncio.get_running_loop()

    def send(signum: int) -> None:
        loop.create_task(_quiet(agent.signal_process(cid, eid, signum)))

    for signum in PROXIED_SIGNALS:
        loop.add_signal_handler(signum, send, signum)
    if terminal:
        def resize() -> None:
            rows, cols = terminal_size()
            if rows and cols:
                loop.create_task(_quiet(agent.resize_tty(cid, eid, rows, cols)))
        loop.add_signal_handler(signal.SIGWINCH, resize)


async def _quiet(coro) -> None:
    try:
        await coro
    except Exception as exc:  # the process may be gone already
        print(f"hyperrun: {exc}", file=sys.stderr)
