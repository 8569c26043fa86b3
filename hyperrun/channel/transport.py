"""Openers for the agent channel: virtio-serial (a QEMU chardev unix
socket on the host) or vsock (guest CID and port)."""
from __future__ import annotations

import asyncio
import functools
import socket

from . import ttrpc

VSOCK_PORT = 1024  # the agent listens here; Kata uses the same port


def unix(path: str) -> ttrpc.Opener:
    return functools.partial(asyncio.open_unix_connection, path)


def vsock(cid: int, port: int = VSOCK_PORT) -> ttrpc.Opener:
    async def open_():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    return open_
