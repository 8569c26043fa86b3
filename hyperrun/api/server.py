"""`hyperrun daemon`: the CRI services on a unix socket (grpc.aio)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from hyperrun import config, log, paths
from hyperrun.image.service import ImageService
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc
from hyperrun.sandbox.manager import SandboxManager
from hyperrun.sandbox.state import State

from .images import ImageServicer
from .runtime import RuntimeServicer
from .streaming import StreamingServer


def default_socket() -> Path:
    return paths.run_root() / "hyperrun.sock"


async def serve(socket_path: Path, ready: asyncio.Event | None = None) -> None:
    images = ImageService()
    log.setup(None if sys.stderr.isatty() else images.root / "daemon.log")
    logger = log.get("daemon")
    state = State(images.root / "state.db")
    manager = SandboxManager(images, state, config.load())
    await manager.recover()
    logger.info("recovered", sandboxes=len(manager.sandboxes))
    streaming = StreamingServer(manager)
    await streaming.start()
    server = grpc.aio.server()
    cri_grpc.add_RuntimeServiceServicer_to_server(RuntimeServicer(manager, streaming), server)
    cri_grpc.add_ImageServiceServicer_to_server(ImageServicer(images), server)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    os.chmod(socket_path, 0o660)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"hyperrun daemon serving CRI v1 on unix://{socket_path}", flush=True)
    if ready is not None:
        ready.set()
    logger.info("serving", socket=str(socket_path))
    await stop.wait()
    logger.info("stopping")
    await server.stop(grace=2)
    await streaming.stop()
    await manager.close()  # sandboxes keep running; a restart re-attaches
    state.close()
    images.close()
    socket_path.unlink(missing_ok=True)


def main(socket_path: Path | None) -> int:
    try:
        asyncio.run(serve(socket_path or default_socket()))
    except config.ConfigError as exc:
        print(f"hyperrun daemon: {exc}", file=sys.stderr)
        return 1
    return 0
