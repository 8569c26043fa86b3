"""The local terminal: raw mode and window size, for `run -t` and `exec -t`
(a module of its own: the CLI's client path must not import asyncio and
the agent client, which relay.py needs for `run --rootfs`)."""
from __future__ import annotations

import contextlib
import os
import termios
import tty


@contextlib.contextmanager
def raw_terminal(fd: int = 0, enabled: bool = True):
    """Raw mode on a local tty for the duration; no-op when fd is not a tty."""
    if not enabled or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int = 0) -> tuple[int, int]:
    """(rows, cols) of the local terminal, or (0, 0)."""
    for candidate in (fd, 1):
        try:
            size = os.get_terminal_size(candidate)
            return size.lines, size.columns
        except OSError:
            continue
    return 0, 0
