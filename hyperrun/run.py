"""`hyperrun run`: one container in a fresh sandbox VM, attached to the
local terminal, torn down when it exits. Exit code as Docker's: the
container's own, 128+N when killed by signal N, 125 when hyperrun itself
failed, 126/127 when the command cannot be run / was not found."""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun import attach
from hyperrun.channel.ttrpc import TtrpcError
from hyperrun.proto import agent_pb2 as pb
from hyperrun.sandbox.sandbox import Sandbox, SandboxConfig
from hyperrun.vm import VMError, rundir
from hyperrun.vm.config import Share

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


def _start_error_code(exc: TtrpcError) -> int:
    text = exc.remote_message.lower()
    if "no such file" in text or "not found" in text:
        return EXIT_NOT_FOUND
    if "permission denied" in text or "exec format" in text:
        return EXIT_CANNOT_INVOKE
    return EXIT_RUNTIME_ERROR


async def run(spec: RunSpec) -> int:
    if not spec.rootfs.is_dir():
        print(f"hyperrun: rootfs {spec.rootfs} is not a directory", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    rundir.collect_stale()
    spec.sandbox.shares = [Share(ROOTFS_TAG, spec.rootfs.resolve(), readonly=spec.readonly)]
    spec.sandbox.die_with_parent = True
    try:
        sandbox = await Sandbox.boot(spec.sandbox)
    except VMError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    try:
        return await _run_in(sandbox, spec)
    finally:
        await sandbox.destroy()


async def _run_in(sandbox: Sandbox, spec: RunSpec) -> int:
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
        return _start_error_code(exc)
    relay = attach.Relay(agent, cid, stdin=spec.stdin, terminal=spec.terminal)
    relay.start()
    with attach.raw_terminal() if spec.terminal and spec.stdin else _nullcontext():
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


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
