"""A process's stdio as the agent holds it: pipes, or a pty master.

Each stream is read by one caller at a time (a lock per stream); the
reader that sees end-of-stream closes the fd, so no fd is closed under a
blocked reader and no fd number is reused behind its back.
"""
import errno
import fcntl
import os
import struct
import termios
import threading

CHUNK = 65536


class Stream:
    def __init__(self, fd: int | None, ready: bool = True) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        # A pty stream exists only once crun hands over the terminal.
        self.ready = threading.Event()
        if ready:
            self.ready.set()

    def attach(self, fd: int | None) -> None:
        self.fd = fd
        self.ready.set()

    def read(self, size: int) -> bytes:
        """Blocks for data; returns b"" at end of stream (and closes)."""
        self.ready.wait()
        with self.lock:
            if self.fd is None:
                return b""
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
        return self.stdout.fd is None and self.stderr.fd is None

    def close(self) -> None:
        self.close_child_fds()
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()
