"""VM templates, made by booting a sandbox to where its agent waits for a
host and saving it (vm/template.py says what a template is and how a VM
is cloned from one). Made on first use of a VM shape, by one process at
a time (a lock file per key).

`run --template` looks its template up before QEMU starts, so finding one
loads nothing heavy: asyncio and the logger (structlog, rich: 0.1 s) are
imported by the code that makes templates.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

from hyperrun.vm import new as new_vm
from hyperrun.vm.config import VMConfig
from hyperrun.vm.qemu import new_id
from hyperrun.vm.template import MEM, STATE, Template, default_root, key, shape


class TemplateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()

    def find(self, config: VMConfig) -> Template | None:
        """The template for this VM shape, if it has been made."""
        template = Template(self.root / key(config))
        return template if template.state.exists() else None

    async def get(self, config: VMConfig, run_root: Path) -> Template:
        """The template for this VM shape, made now if there is none."""
        import asyncio

        k = key(config)
        template = Template(self.root / k)
        if template.state.exists():
            return template
        self.root.mkdir(parents=True, exist_ok=True)
        lock = open(self.root / f".{k}.lock", "w")
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            if not template.state.exists():
                await self._make(config, template, run_root)
        finally:
            lock.close()
        return template

    async def _make(self, config: VMConfig, template: Template, run_root: Path) -> None:
        self.sweep_unfinished()
        work = template.path.with_name(template.path.name + ".new")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            await self._make_in(work, config, template, run_root)
        except BaseException:  # its memory file is RAM in /dev/shm
            shutil.rmtree(work, ignore_errors=True)
            raise

    def sweep_unfinished(self) -> list[Path]:
        """Remove the work directories of templates nobody is making (a
        process killed while making one leaves its memory file, RAM in
        /dev/shm): those whose lock no process holds. Returns them."""
        swept = []
        for work in self.root.glob("*.new"):
            lock_path = self.root / f".{work.name[:-len('.new')]}.lock"
            with open(lock_path, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being made (by this process too: flock is per open file)
                shutil.rmtree(work, ignore_errors=True)
                swept.append(work)
        return swept

    async def _make_in(self, work: Path, config: VMConfig, template: Template,
                       run_root: Path) -> None:
        import asyncio

        from hyperrun import log

        from .sandbox import Sandbox

        vm_id = new_id()
        # The shares' host paths do not matter to the saved state (the guest
        # has mounted none): the template VM gets empty directories of its own.
        made = dataclasses.replace(
            shape(config), memory_file=work / MEM, memory_shared=True,
            shares=tuple(dataclasses.replace(s, path=run_root / vm_id / f"share-{i}")
                         for i, s in enumerate(config.shares)))
        vm = new_vm(made, vm_id, run_root)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sandbox = await Sandbox.start(vm)
        try:
            await sandbox.agent.warm_up()  # what clones would each load on first use
            await sandbox.agent.close()  # the agent waits for its next host
            await vm.save_state(work / STATE)
        finally:
            await sandbox.destroy()
        os.rename(work, template.path)
        log.get("template").info("template made", path=str(template.path),
                                 seconds=round(loop.time() - start, 3),
                                 state_bytes=template.state.stat().st_size)

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
