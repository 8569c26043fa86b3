"""`hyperrun run`: one container in a fresh sandbox VM, attached to the
local terminal, torn down when it exits. Exit code as Docker's: the
container's own, 128+N when killed by signal N, 125 when hyperrun itself
failed, 126/127 when the command cannot be run / was not found.

The container's root is an image (its read-only erofs attached as a disk,
with a writable overlay in the guest) or, with --rootfs, a host directory
shared over 9p and written through.

execute() starts QEMU before it loads asyncio, protobuf and QMP: the guest
boots while the rest of hyperrun is imported (worth ~0.1 s per run).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun.image.imageconfig import ImageConfigError, Overrides, ProcessDefaults, apply
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm import VMError, rundir
from hyperrun.vm.config import Disk, Share
from hyperrun.vm.qemu import QemuVM

from hyperrun.exitcodes import RUNTIME_ERROR as EXIT_RUNTIME_ERROR
from hyperrun.exitcodes import for_start_error as _start_error_code
ROOTFS_TAG = "rootfs"


@dataclass
class RunSpec:
    args: list[str]
    rootfs: Path | None = None        # a host directory, or
    image: str | None = None          # an image reference
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    stdin: bool = False
    terminal: bool = False
    hostname: str = ""
    readonly: bool = False
    platform: str = "linux/amd64"
    pull: str = "missing"             # missing | always | never
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class _Root:
    """How the guest gets the container's root: (source, fstype, overlay)."""
    source: str
    fstype: str
    overlay: bool


def _error(message: str) -> int:
    print(f"hyperrun: {message}", file=sys.stderr)
    return EXIT_RUNTIME_ERROR


def execute(spec: RunSpec) -> int:
    overrides = Overrides(args=spec.args, entrypoint=spec.entrypoint, env=spec.env,
                          workdir=spec.workdir, user=spec.user)
    try:
        if spec.image is not None:
            process, root = _prepare_image(spec, overrides)
        else:
            process, root = _prepare_dir(spec, overrides)
    except (ImageConfigError, _PrepareError) as exc:
        return _error(str(exc))
    rundir.collect_stale()
    spec.sandbox.die_with_parent = True
    try:
        vm = QemuVM(spec.sandbox.vm_config())
        vm.spawn()
    except VMError as exc:
        return _error(str(exc))
    import asyncio

    return asyncio.run(_run(spec, vm, process, root))


class _PrepareError(Exception):
    pass


def _prepare_dir(spec: RunSpec, overrides: Overrides) -> tuple[ProcessDefaults, _Root]:
    assert spec.rootfs is not None
    if not spec.rootfs.is_dir():
        raise _PrepareError(f"rootfs {spec.rootfs} is not a directory")
    if not spec.args:
        raise _PrepareError("no command given")
    spec.sandbox.shares = [Share(ROOTFS_TAG, spec.rootfs.resolve(), readonly=spec.readonly)]
    return apply({}, overrides), _Root(ROOTFS_TAG, "9p", overlay=False)


def _prepare_image(spec: RunSpec, overrides: Overrides) -> tuple[ProcessDefaults, _Root]:
    from hyperrun.image.service import ImageError, ImageService

    service = ImageService()
    try:
        image = service.find(spec.image) if spec.pull != "always" else None
        if image is None:
            if spec.pull == "never":
                raise _PrepareError(f"no such image: {spec.image} (and --pull=never)")
            image = _pull(service, spec)
        config = service.config(image)
        disk = service.rootfs(image)
    except ImageError as exc:
        raise _PrepareError(str(exc)) from None
    finally:
        service.close()
    spec.sandbox.disks = [Disk(disk, serial=ROOTFS_TAG)]
    return apply(config, overrides), _Root(f"serial:{ROOTFS_TAG}", "erofs", overlay=True)


def _pull(service, spec: RunSpec):
    import asyncio

    from hyperrun.image.distribution import PullError
    from hyperrun.image.reference import InvalidReference

    print(f"Unable to find image '{spec.image}' locally, pulling", file=sys.stderr)
    try:
        return asyncio.run(service.pull(spec.image, platform=spec.platform,
                                        progress=sys.stderr.isatty()))
    except (PullError, InvalidReference) as exc:
        raise _PrepareError(str(exc)) from None


async def _run(spec: RunSpec, vm: QemuVM, process: ProcessDefaults, root: _Root) -> int:
    import asyncio

    from hyperrun.channel.ttrpc import ConnectionLost
    from hyperrun.sandbox.sandbox import Sandbox

    try:
        sandbox = await Sandbox.start(vm)
    except VMError as exc:
        return _error(str(exc))
    try:
        return await _run_in(sandbox, spec, process, root)
    except ConnectionLost:
        await asyncio.sleep(0.1)  # let QEMU's exit be noticed for the reason
        reason = sandbox.vm.failure_reason() if sandbox.vm.exited else "agent channel closed"
        return _error(f"the VM ended while the container ran: {reason}")
    finally:
        await sandbox.destroy()


async def _run_in(sandbox, spec: RunSpec, defaults: ProcessDefaults, root: _Root) -> int:
    from hyperrun import attach
    from hyperrun.channel.ttrpc import TtrpcError
    from hyperrun.proto import agent_pb2 as pb

    agent = sandbox.agent
    cid = sandbox.id
    rows, cols = attach.terminal_size() if spec.terminal else (0, 0)
    process = pb.Process(args=defaults.args, env=defaults.env, cwd=defaults.cwd,
                         user=pb.User(spec=defaults.user), terminal=spec.terminal,
                         stdin=spec.stdin, console_size=pb.ConsoleSize(rows=rows, cols=cols))
    storage = pb.Storage(source=root.source, fstype=root.fstype, overlay=root.overlay)
    try:
        await agent.create_container(cid, storage, process, hostname=spec.hostname,
                                     readonly_rootfs=spec.readonly)
    except TtrpcError as exc:
        print(f"hyperrun: cannot create container: {exc.remote_message}", file=sys.stderr)
        return _start_error_code(exc.remote_message)
    relay = attach.Relay(agent, cid, stdin=spec.stdin, terminal=spec.terminal)
    relay.start()
    with attach.raw_terminal(enabled=spec.terminal and spec.stdin):
        try:
            await agent.start_container(cid)
        except TtrpcError as exc:
            relay.cancel()
            print(f"hyperrun: cannot start container: {exc.remote_message}", file=sys.stderr)
            return _start_error_code(exc.remote_message)
        attach.forward_signals(agent, cid, terminal=spec.terminal)
        status = await agent.wait_process(cid)
        await relay.drain()
        relay.cancel()
    return status.exit_code
