"""Container output in the CRI log format, as the kubelet reads it:

    <RFC3339Nano timestamp> <stdout|stderr> <F|P> <text>

one line per line of output; P marks a partial line (output that ended
without a newline), continued by the next entry."""
from __future__ import annotations

import os
import time


def timestamp(ns: int | None = None) -> str:
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def format_chunk(stream: str, data: bytes, ns: int | None = None) -> bytes:
    """The log entries for one chunk of output."""
    ts = timestamp(ns).encode()
    tag = stream.encode()
    lines = data.split(b"\n")
    out = []
    for line in lines[:-1]:
        out.append(b"%s %s F %s\n" % (ts, tag, line))
    if lines[-1]:
        out.append(b"%s %s P %s\n" % (ts, tag, lines[-1]))
    return b"".join(out)


class LogFile:
    """Appends entries; reopen() follows a rotation (ReopenContainerLog)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.reopen()

    def reopen(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        if self.fd is not None:
            os.write(self.fd, format_chunk(stream, data))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
