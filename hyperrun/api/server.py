"""`hyperrun daemon`: the CRI services on a unix socket (grpc.aio)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from hyperrun import config, log, paths, cli_api
from hyperrun.image.service import ImageService
from hyperrun.pods.service import PodService
from hyperrun.sandbox.podnet import PodNetworks
from hyperrun.sandbox.state import State

from . import cri_specs
from .cli_server import CliServer


class Services:
    """The core (PodService) and its callers: the CRI services on a unix
    socket and the CLI's requests beside it. One assembly for both hosts:
    the daemon, and a CLI running without one (embedded,
    hyperrun/api/embedded.py), which serves the CLI's requests only (no
    gRPC: nothing but its own CLI talks to it)."""

    def __init__(self, socket_path: Path, state_path: Path | None = None,
                 sandbox_root: Path | None = None, die_with_parent: bool = False,
                 networks: PodNetworks | None = None, group: str | None = None,
                 pool_size: int | None = None, logs_root: Path | None = None,
                 embedded: bool = False, template: bool | None = None,
                 machine: str | None = None) -> None:
        """pool_size, template, machine: None for the config file's.
        logs_root: where `hyperrun run` pods log (None: the data root's
        logs/)."""
        self.socket_path = socket_path
        self.group = group
        self.images = ImageService()
        self.state = State(state_path or self.images.root / "state.db")
        if migrated := cri_specs.migrate(self.state):
            log.get("daemon").info("records of an earlier daemon rewritten as specs",
                                   records=migrated)
        defaults = config.load()
        for key, value in (("pool_size", pool_size), ("template", template), ("machine", machine)):
            if value is not None:
                setattr(defaults, key, value)
        # "auto" (the default): a daemon's templates fall back to booting if
        # one cannot be made, and its pool fills from the first pod on.
        auto_template = defaults.template == config.AUTO
        self.pool_on_first_need = defaults.pool_size == config.AUTO
        defaults = config.resolve(defaults, daemon=not embedded)
        self.manager = PodService(self.images, self.state, defaults,
                                  root=sandbox_root, die_with_parent=die_with_parent,
                                  networks=networks)
        self.manager.launcher.template_fallback = auto_template
        self.server = self.streaming = None
        if not embedded:
            self._cri()
        self.runs = CliServer(self.manager, self.images, cli_api.socket_path(socket_path),
                              logs_root or paths.data_root() / "logs", remove_always=embedded)

    def _cri(self) -> None:
        import grpc

        from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

        from .images import ImageServicer
        from .runtime import RuntimeServicer
        from .streaming import StreamingServer

        self.streaming = StreamingServer(self.manager)
        self.server = grpc.aio.server()
        cri_grpc.add_RuntimeServiceServicer_to_server(
            RuntimeServicer(self.manager, self.streaming), self.server)
        cri_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.images), self.server)

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        paths_served = [self.runs.path]
        if self.server is not None:
            await self.streaming.start()
            self.socket_path.unlink(missing_ok=True)
            self.server.add_insecure_port(f"unix://{self.socket_path}")
            await self.server.start()
            paths_served.append(self.socket_path)
        await self.runs.start()
        for path in paths_served:
            os.chmod(path, 0o660)
            if self.group:  # who may drive the runtime: root and this group
                import grp

                os.chown(path, -1, grp.getgrnam(self.group).gr_gid)
        if not self.pool_on_first_need:  # else at the first take (Launcher.take_spare)
            self.manager.start_pool()

    async def stop(self) -> None:
        await self.runs.stop()
        if self.server is not None:
            await self.server.stop(grace=2)
            await self.streaming.stop()
        await self.manager.close()  # sandboxes keep running; a restart re-attaches
        self.state.close()
        self.images.close()
        self.socket_path.unlink(missing_ok=True)


async def serve(socket_path: Path, network: NetworkOptions, group: str | None = None,
                pool_size: int | None = None) -> None:
    log.setup(None if sys.stderr.isatty() else paths.data_root() / "daemon.log")
    logger = log.get("daemon")
    services = Services(socket_path, networks=network.pod_networks(), group=group,
                        pool_size=pool_size)
    logger.info("networking", kind=services.manager.networks.kind)
    await services.manager.recover()
    logger.info("recovered", sandboxes=sum(p.sandbox is not None for p in services.manager.pods.values()))
    await services.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"hyperrun daemon serving CRI v1 on unix://{socket_path}", flush=True)
    logger.info("serving", socket=str(socket_path))
    await stop.wait()
    logger.info("stopping")
    await services.stop()


@dataclass
class NetworkOptions:
    """How pods get their network (hyperrun/sandbox/podnet.py)."""
    kind: str = "auto"
    cni_conf_dir: Path | None = None
    cni_bin_dirs: list[str] | None = None
    netns_prefix: str | None = None   # embedded hosts use their own
    cni_cache_dir: Path | None = None

    def pod_networks(self) -> PodNetworks:
        from hyperrun.network import SandboxNetworks

        kw = {}
        if self.cni_conf_dir:
            kw["conf_dir"] = self.cni_conf_dir
        if self.cni_bin_dirs:
            kw["bin_dirs"] = self.cni_bin_dirs
        if self.netns_prefix:
            kw["netns_prefix"] = self.netns_prefix
        if self.cni_cache_dir:
            kw["cache_dir"] = self.cni_cache_dir
        return PodNetworks(self.kind, SandboxNetworks(**kw))


def main(socket_path: Path | None, network: NetworkOptions | None = None,
         group: str | None = None, pool_size: int | None = None) -> int:
    if group:
        import grp
        try:
            grp.getgrnam(group)
        except KeyError:
            print(f"hyperrun daemon: no group {group!r}", file=sys.stderr)
            return 1
    try:
        asyncio.run(serve(socket_path or paths.daemon_socket(), network or NetworkOptions(), group,
                          pool_size))
    except config.ConfigError as exc:
        print(f"hyperrun daemon: {exc}", file=sys.stderr)
        return 1
    return 0
