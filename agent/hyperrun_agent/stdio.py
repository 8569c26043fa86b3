"""A process's stdio as the agent holds it: pipes, or a pty master.

Each stream is read by one caller at a time (a lock per stream); the
reader that sees end-of-stream closes the fd, so no fd is closed under a
blocked reader and no fd number is reused behind its back.

A read for a host is a transaction (take, then settle): the reader holds
the stream from taking the data until its reply was written or could not
be, and output whose reply did not reach the host goes back to the front
of the stream (`unread`), for the next reader. A reader whose host is gone
while it waits gives the stream up without taking anything (`Cancelled`).
So each byte reaches exactly one delivered reply, across host sessions
(a daemon restart) too.
"""
import errno
import fcntl
import os
import struct
import termios
import threading

CHUNK = 65536


class Cancelled(Exception):
    """The reader's host went away before the stream had data for it."""


class Stream:
    def __init__(self, fd: int | None, ready: bool = True) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.unread = b""  # taken for a reply that did not reach the host: see settle
        # A pty stream exists only once crun hands over the terminal.
        self.ready = threading.Event()
        if ready:
            self.ready.set()

    def attach(self, fd: int | None) -> None:
        self.fd = fd
        self.ready.set()

    def read(self, size: int) -> bytes:
        """Blocks for data; returns b"" at end of stream (and closes). For
        a reader with no host session: what it takes is delivered."""
        data = self.take(size)
        self.settle(data, True)
        return data

    def take(self, size: int, cancel_fd: int | None = None) -> bytes:
        """Blocks for data (b"" at end of stream, which closes the fd) and
        holds the stream until settle(). cancel_fd: readable once whoever
        asked is gone; then Cancelled, with nothing taken."""
        self.ready.wait()
        self.lock.acquire()
        try:
            if cancel_fd is not None and _readable(cancel_fd, 0):
                raise Cancelled()
            if self.unread:
                size = size or CHUNK
                data, self.unread = self.unread[:size], self.unread[size:]
                return data
            if self.fd is None:
                return b""
            if cancel_fd is not None:
                self._wait(cancel_fd)
            try:
                data = os.read(self.fd, size or CHUNK)
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: pty master whose slave is gone
                    raise
                data = b""
            if not data:
                os.close(self.fd)
                self.fd = None
            return data
        except BaseException:
            self.lock.release()
            raise

    def settle(self, data: bytes, delivered: bool) -> None:
        """End a take(): data that did not reach its reader goes back to the
        front of the stream; the next reader gets it first."""
        try:
            if data and not delivered:
                self.unread = data + self.unread
        finally:
            self.lock.release()

    def _wait(self, cancel_fd: int) -> None:
        """Until the stream's fd has something to say (data, its end, an
        error: the read tells which), or Cancelled."""
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(cancel_fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if cancel_fd in events:
                raise Cancelled()
            if events:
                return

    def write(self, data: bytes) -> int:
        self.ready.wait()
        with self.lock:
            if self.fd is None:
                raise BrokenPipeError(errno.EPIPE, "stdin is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            return len(data)

    def close(self) -> None:
        """Close unless a reader holds the stream (it will see EOF itself)."""
        self.ready.set()
        if self.lock.acquire(blocking=False):
            try:
                if self.fd is not None:
                    os.close(self.fd)
                    self.fd = None
            finally:
                self.lock.release()


def _readable(fd: int, timeout_ms: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))


class Stdio:
    """stdin/stdout/stderr of one process; child_fds go to crun."""

    def __init__(self, terminal: bool, open_stdin: bool) -> None:
        self.terminal = terminal
        self.child_fds: list[int] = []
        self.master: int | None = None
        if terminal:
            # Filled in by attach_master once crun hands over the pty.
            self.stdin = Stream(None, ready=False)
            self.stdout = Stream(None, ready=False)
            self.stderr = Stream(None)  # a pty merges stderr into stdout
            self.open_stdin = open_stdin
            return
        if open_stdin:
            child_in, ours_in = os.pipe()
        else:
            child_in, ours_in = os.open("/dev/null", os.O_RDONLY), None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.stdin, self.stdout, self.stderr = Stream(ours_in), Stream(out_r), Stream(err_r)
        self.child_fds = [child_in, out_w, err_w]
        for fd in (ours_in, out_r, err_r):
            if fd is not None:
                os.set_inheritable(fd, False)

    def attach_master(self, master: int) -> None:
        self.master = master
        # stdin shares the master; a dup keeps stdout's EOF close independent.
        self.stdin.attach(os.dup(master) if self.open_stdin else None)
        self.stdout.attach(master)

    def close_child_fds(self) -> None:
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds = []

    def close_stdin(self) -> None:
        if self.terminal and self.stdin.fd is not None:
            try:
                self.stdin.write(b"\x04")  # EOT: end of input on a tty
            except OSError:
                pass
        self.stdin.close()

    def resize(self, rows: int, cols: int) -> None:
        if self.master is None:
            raise ValueError("process has no terminal")
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def drained(self) -> bool:
        """Both output streams have been read to their end."""
        return all(s.fd is None and not s.unread for s in (self.stdout, self.stderr))

    def close(self) -> None:
        self.close_child_fds()
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()
