"""How the agent reaches the host: a virtio-serial port or vsock."""
import os
import time

from .server import Connection

PORT_NAME = "hyperrun.agent"
VSOCK_PORT = 1024


def find_serial_port(name: str = PORT_NAME) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        ports = sorted(os.listdir(base))
    except FileNotFoundError:
        return None
    for port in ports:
        try:
            with open(f"{base}/{port}/name") as f:
                if f.read().strip() == name:
                    return "/dev/" + port
        except OSError:
            continue
    return None


class SerialConnection(Connection):
    """A virtio-serial port. While no host is connected to QEMU's end,
    reads return end-of-file at once and poll() reports POLLIN with
    POLLHUP, so waiting for a host is a sleep loop on POLLHUP."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def wait_for_host(self) -> None:
        """Block until a host connects; the first data is then readable."""
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll()
            # No host: POLLHUP (with POLLIN: a read would not block, it would
            # return end-of-file). Returning on POLLIN alone made this a busy
            # loop, a whole vCPU while no host was connected (a template
            # being saved, a clone before its host).
            if not any(ev & select.POLLHUP for _, ev in events):
                return
            time.sleep(0.01)


class SocketConnection(Connection):
    def __init__(self, sock) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        return self.sock.recv(size)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def vsock_listener(port: int = VSOCK_PORT):
    import socket

    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(8)
    return sock
