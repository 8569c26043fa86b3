"""The CRI services inside a CLI process, for when no daemon answers: the
same assembly as `hyperrun daemon` (api/server.Services) on a private
socket, served from a thread of its own, so that the CLI's code is the
same on both hosts (hyperrun/cli/client.py's requests go to either).

What differs is lifetime: an embedded host's sandboxes live as long as the
CLI process. Its state and VM run directories are in a private directory
under the run root, its VMs end with the process (PR_SET_PDEATHSIG), and
`close()` removes every sandbox it made. A killed CLI leaves a directory
whose owner is dead; the next embedded host collects it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from pathlib import Path

from hyperrun import paths
from hyperrun.vm import rundir


def _embedded_root() -> Path:
    return paths.run_root() / "embedded"


def collect_stale() -> None:
    """Directories of embedded hosts whose process is gone, and run
    directories of VMs made outside any host (vm.new with no root: the
    tests', the bench's floor) whose QEMU is gone: a run without a daemon
    collects both, as the run path of its own used to collect the latter."""
    rundir.collect_stale()
    root = _embedded_root()
    if not root.is_dir():
        return
    for path in root.iterdir():
        pid = int(path.name.split("-")[0]) if path.name.split("-")[0].isdigit() else 0
        if pid and os.path.exists(f"/proc/{pid}"):
            continue
        vms = path / "vms"
        if vms.is_dir():
            for vm_dir in vms.iterdir():
                rundir.kill_and_remove(vm_dir)
        if (path / "cni").is_dir():
            _network_options(path, pid).pod_networks().collect_stale([])
        rundir.remove(path)  # never through a bind (a --rootfs or -v host directory)


def _network_options(path: Path, pid: int):
    """An embedded host's networks: its own netns names and CNI cache, so
    that the daemon (and other CLIs) never take them for their own."""
    from hyperrun.api.server import NetworkOptions

    return NetworkOptions(netns_prefix=f"hrun{pid}-", cni_cache_dir=path / "cni")


class EmbeddedHost:
    def __init__(self, template: bool | None = None, machine: str | None = None) -> None:
        """template, machine: the VMs' (None: the config file's)."""
        self.template = template
        self.machine = machine
        collect_stale()
        self.dir = rundir.create(_embedded_root() / f"{os.getpid()}-{secrets.token_hex(4)}")
        self.socket = self.dir / "cri.sock"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._services = None
        self._thread = threading.Thread(target=self._serve, name="hyperrun-embedded", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.close()
            raise self._error

    def _serve(self) -> None:
        # QEMU is forked from this thread: PR_SET_PDEATHSIG fires when the
        # forking *thread* ends, so it must live as long as the host.
        from hyperrun import log
        from hyperrun.api.server import Services

        asyncio.set_event_loop(self._loop)
        # Only warnings and errors: the directory, log included, goes with
        # the host, and an info line would load structlog (~40 ms of CPU,
        # taken from the booting guest) for a file that no one reads.
        log.setup(self.dir / "embedded.log", logging.WARNING)

        async def start() -> None:
            self._services = Services(
                self.socket, state_path=self.dir / "state.db", sandbox_root=self.dir / "vms",
                die_with_parent=True, pool_size=0,  # spares would outlive their one use
                networks=_network_options(self.dir, os.getpid()).pod_networks(),
                logs_root=self.dir / "logs", embedded=True,
                template=self.template, machine=self.machine)
            await self._services.start()

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        """Remove every sandbox this host made, stop serving, clean up."""
        if self._services is not None:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(60)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        rundir.remove(self.dir)  # never through a bind (a --rootfs or -v host directory)

    async def _shutdown(self) -> None:
        manager = self._services.manager
        for row in manager.state.sandboxes():
            try:
                await manager.remove_pod(row.id)
            except Exception:  # the VM is killed below in any case
                pass
        await self._services.stop()
        for vm_dir in (self.dir / "vms").glob("*"):
            rundir.kill_and_remove(vm_dir)
