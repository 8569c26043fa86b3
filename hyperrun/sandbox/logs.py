"""Container output in the CRI log format, as the kubelet reads it:

    <RFC3339Nano timestamp> <stdout|stderr> <F|P> <text>

one line per line of output; P marks a partial line (output that ended
without a newline), continued by the next entry. LogFile writes it; read()
turns it back into the output it records (`hyperrun logs`)."""
from __future__ import annotations

import asyncio
import os
import time
from typing import AsyncIterator, Callable


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


async def read(path: str, tail: int | None = None, timestamps: bool = False,
               running: Callable[[], bool] | None = None
               ) -> AsyncIterator[list[tuple[str, bytes]]]:
    """A container's output from its log at path, as (stream, data) pairs:
    a list of them each time the file is read (empty when nothing new came,
    so that the caller may stop in between). Without running, what the file
    holds; with it (follow), on until running() is false, across a rotation
    (the kubelet's: the file renamed, then ReopenContainerLog). Nothing if
    the file is not there yet. tail: only the last so many entries."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return  # nothing written yet
    try:
        if tail is not None:
            f.seek(await asyncio.to_thread(tail_offset, f, tail))
        entries = _Entries(timestamps)
        while True:
            # Asked before the read: what a container wrote before it
            # ended is in the file by then.
            ended = running is None or not running()
            chunk = await asyncio.to_thread(f.read, 65536)
            if chunk:
                yield entries.output(chunk)
            elif ended:
                return
            elif (rotated := _reopened(f, path)) is not None:
                # The daemon writes to the new file only, now (its reopen
                # runs in this thread): the old one's rest, then the new one.
                f, old = rotated, f
                rest = await asyncio.to_thread(old.read)
                old.close()
                yield entries.output(rest)
            else:
                await asyncio.sleep(0.2)
                yield []
    finally:
        f.close()


class _Entries:
    """Log entries, as they are read, back into output: each entry's text to
    its stream, with its newline unless the tag says it is part of a longer
    line; with timestamps, after the TIME of a line's first part, as
    Docker's -t."""

    def __init__(self, timestamps: bool) -> None:
        self.timestamps = timestamps
        self.partial = b""  # an entry read up to its newline only in part
        self.open_lines: set[bytes] = set()  # streams whose last entry was part of a line

    def output(self, data: bytes) -> list[tuple[str, bytes]]:
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [out for line in lines if (out := self._entry(line)) is not None]

    def _entry(self, line: bytes) -> tuple[str, bytes] | None:
        fields = line.split(b" ", 3)
        if len(fields) != 4:
            return None
        written, stream, tag, text = fields
        if self.timestamps and stream not in self.open_lines:
            text = written + b" " + text
        (self.open_lines.add if tag == b"P" else self.open_lines.discard)(stream)
        return ("stdout" if stream == b"stdout" else "stderr",
                text if tag == b"P" else text + b"\n")


def _reopened(f, path: str):
    """The file now at path, open, if it is not f's any more (rotated: a
    file at path is made only by the daemon's reopen); else None."""
    try:
        new = open(path, "rb")
    except FileNotFoundError:  # renamed, not yet reopened
        return None
    if os.fstat(new.fileno()).st_ino == os.fstat(f.fileno()).st_ino:
        new.close()
        return None
    return new


def tail_offset(f, entries: int, block: int = 65536) -> int:
    """Where the last `entries` log entries of f begin (read backwards, a
    block at a time: a log can be large). An entry still being written,
    without its newline yet, counts as one."""
    end = f.seek(0, os.SEEK_END)
    if entries == 0:
        return end
    pos, found = end, 0
    while pos > 0:
        start = max(pos - block, 0)
        f.seek(start)
        data = f.read(pos - start)
        # Newlines in this block, from its end; the file's last byte, if a
        # newline, ends the last entry rather than starting one.
        at = len(data) - 1 if start + len(data) == end and data.endswith(b"\n") else len(data)
        while (at := data.rfind(b"\n", 0, at)) >= 0:
            found += 1
            if found == entries:
                return start + at + 1
        pos = start
    return 0
