"""`hyperrun run`: one container in a fresh sandbox VM, attached to the
local terminal, torn down when it exits. Exit code as Docker's: the
container's own, 128+N when killed by signal N, 125 when hyperrun itself
failed, 126/127 when the command cannot be run / was not found.

execute() starts QEMU before it loads asyncio, protobuf and QMP: the guest
boots while the rest of hyperrun is imported (worth ~0.1 s per run).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun.sandbox.config import SandboxConfig
from hyperrun.vm import VMError, rundir
from hyperrun.vm.config import Share
from hyperrun.vm.qemu import QemuVM

EXIT_RUNTIME_ERROR = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127
ROOTFS_TAG = "rootfs"


@dataclass
class RunSpec:
    args: list[str]
    rootfs: Path
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    stdin: bool = False
    terminal: bool = False
    hostname: str = ""
    readonly: bool = False
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def _error(message: str) -> int:
    print(f"hyperrun: {message}", file=sys.stderr)
    return EXIT_RUNTIME_ERROR


def execute(spec: RunSpec) -> int:
    if not spec.rootfs.is_dir():
        return _error(f"rootfs {spec.rootfs} is not a directory")
    rundir.collect_stale()
    spec.sandbox.shares = [Share(ROOTFS_TAG, spec.rootfs.resolve(), readonly=spec.readonly)]
    spec.sandbox.die_with_parent = True
    try:
        vm = QemuVM(spec.sandbox.vm_config())
        vm.spawn()
    except VMError as exc:
        return _error(str(exc))
    import asyncio

    return asyncio.run(_run(spec, vm))


def _start_error_code(message: str) -> int:
    text = message.lower()
    if "no such file" in text or "not found" in text:
        return EXIT_NOT_FOUND
    if "permission denied" in text or "exec format" in text:
        return EXIT_CANNOT_INVOKE
    return EXIT_RUNTIME_ERROR


async def _run(spec: RunSpec, vm: QemuVM) -> int:
    import asyncio

    from hyperrun.sandbox.sandbox import Sandbox

    try:
        sandbox = await Sandbox.start(vm)
    except VMError as exc:
        return _error(str(exc))
    from hyperrun.channel.ttrpc import ConnectionLost

    try:
        return await _run_in(sandbox, spec)
    except ConnectionLost:
        await asyncio.sleep(0.1)  # let QEMU's exit be noticed for the reason
        reason = sandbox.vm.failure_reason() if sandbox.vm.exited else "agent channel closed"
        return _error(f"the VM ended while the container ran: {reason}")
    finally:
        await sandbox.destroy()


async def _run_in(sandbox, spec: RunSpec) -> int:
    from hyperrun import attach
    from hyperrun.channel.ttrpc import TtrpcError
    from hyperrun.proto import agent_pb2 as pb

    agent = sandbox.agent
    cid = sandbox.id
    rows, cols = attach.terminal_size() if spec.terminal else (0, 0)
    process = pb.Process(args=spec.args, env=spec.env, cwd=spec.workdir,
                         user=pb.User(spec=spec.user), terminal=spec.terminal,
                         stdin=spec.stdin, console_size=pb.ConsoleSize(rows=rows, cols=cols))
    try:
        await agent.create_container(cid, pb.Storage(source=ROOTFS_TAG, fstype="9p"), process,
                                     hostname=spec.hostname, readonly_rootfs=spec.readonly)
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
