"""`hyperrun run --rootfs DIR`: one container whose root is a host
directory (shared over 9p and written through, as podman's --rootfs), in
a fresh VM of its own, attached to the local terminal, torn down when it
exits. The direct path, without images, pods or the CRI services: the
low-level analogue of `crun run` on a bundle. Exit codes are Docker's
(hyperrun/exitcodes.py). Images go through hyperrun/client.py.

execute() starts QEMU before it loads asyncio, protobuf and QMP: the guest
boots while the rest of hyperrun is imported (worth ~0.1 s per run). With
a template (--template), QEMU is started as its clone instead.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun.image.imageconfig import ImageConfigError, Overrides, ProcessDefaults, apply
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm.config import Share
from hyperrun.vm import VM, VMError, new as new_vm, rundir

from hyperrun.exitcodes import RUNTIME_ERROR as EXIT_RUNTIME_ERROR
from hyperrun.exitcodes import for_start_error as _start_error_code
ROOTFS_TAG = "rootfs"


@dataclass
class RunSpec:
    args: list[str]
    rootfs: Path                      # a host directory
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    stdin: bool = False
    terminal: bool = False
    hostname: str = ""
    readonly: bool = False
    template: bool = False            # restore a saved VM instead of booting
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
        process, root = _prepare_dir(spec, overrides)
    except (ImageConfigError, _PrepareError) as exc:
        return _error(str(exc))
    rundir.collect_stale()
    spec.sandbox.die_with_parent = True
    try:
        config = spec.sandbox.vm_config()
        if spec.template:
            from hyperrun import config as hconfig
            from hyperrun.sandbox.templates import TemplateStore
            from hyperrun.vm.template import clone_config

            try:
                cache_mib = hconfig.load().clone_cache_mib
            except hconfig.ConfigError as exc:
                return _error(str(exc))
            template = TemplateStore().find(config) or _make_template(config)
            config = clone_config(config, template, cache_mib)
        vm = new_vm(config)
        vm.spawn()
    except VMError as exc:
        return _error(str(exc))
    import asyncio

    return asyncio.run(_run(spec, vm, process, root))


def _make_template(config):
    """The first run of a VM shape makes its template (a boot), then clones it."""
    import asyncio

    from hyperrun import log
    from hyperrun.sandbox.templates import TemplateStore

    log.setup(None)  # its one line to stderr: stdout is the container's
    return asyncio.run(TemplateStore().get(config, rundir.vm_root()))


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


async def _run(spec: RunSpec, vm: VM, process: ProcessDefaults, root: _Root) -> int:
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
    from hyperrun.cli import relay as attach
    from hyperrun.channel.ttrpc import TtrpcError
    from hyperrun.cli.terminal import raw_terminal, terminal_size
    from hyperrun.proto import agent_pb2 as pb

    agent = sandbox.agent
    cid = sandbox.id
    rows, cols = terminal_size() if spec.terminal else (0, 0)
    process = pb.Process(args=defaults.args, env=defaults.env, cwd=defaults.cwd,
                         user=pb.User(spec=defaults.user), terminal=spec.terminal,
                         stdin=spec.stdin, console_size=pb.ConsoleSize(rows=rows, cols=cols))
    storage = pb.Storage(source=root.source, fstype=root.fstype, overlay=root.overlay)
    if sandbox.vm.config.incoming:  # a clone: its own RNG state and clock (only)
        await agent.setup_sandbox(pb.SetupSandboxRequest())
    try:
        await agent.create_container(cid, storage, process, hostname=spec.hostname,
                                     readonly_rootfs=spec.readonly)
    except TtrpcError as exc:
        print(f"hyperrun: cannot create container: {exc.remote_message}", file=sys.stderr)
        return _start_error_code(exc)
    relay = attach.Relay(agent, cid, stdin=spec.stdin, terminal=spec.terminal)
    relay.start()
    with raw_terminal(enabled=spec.terminal and spec.stdin):
        try:
            await agent.start_container(cid)
        except TtrpcError as exc:
            relay.cancel()
            print(f"hyperrun: cannot start container: {exc.remote_message}", file=sys.stderr)
            return _start_error_code(exc)
        attach.forward_signals(agent, cid, terminal=spec.terminal)
        status = await agent.wait_process(cid)
        await relay.drain()
        relay.cancel()
    return status.exit_code
