"""Direct mode, the second kind of init: the image's own program is the
VM's init, in the manner of Lupine Linux. No agent, no crun, no container
in the guest: the image's read-only erofs root is the VM's root disk and
the kernel starts the program as PID 1 with the image's environment
(kernel parameters before `--`) and arguments (after it).

The core (pods/service.py) runs such a pod as any other: its one
container's task reads the program's output and exit from a
`ConsoleAgent`, which answers the few agent calls a task and a stop make
from what the VM shows on its serial console. The output is the console
with the kernel's own lines left out; when the program exits the kernel
panics ("Attempted to kill init! exitcode=0x…"), QEMU ends (panic=-1,
-no-reboot), and that status is the exit code, as a container's (128+N
for a signal N). Stopping it ends the VM: nothing could deliver a signal
to its init.

What a container would have and this does not: a writable root, /proc and
/dev mounted (the program may mount them itself), a working directory or
user other than / and root, stdin, exec, a network.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import subprocess
from pathlib import Path

from hyperrun import errdefs
from hyperrun.channel.ttrpc import ConnectionLost
from hyperrun.image.imageconfig import ProcessDefaults
from hyperrun.proto import agent_pb2 as apb
from hyperrun.vm import VM
from hyperrun.vm.config import VMConfig

from .config import SandboxConfig
from .sandbox import Sandbox

# printk: "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300"
_INIT_EXIT = re.compile(rb"Attempted to kill init! exitcode=0x([0-9a-fA-F]+)")
_KERNEL_LINE = re.compile(rb"^\[\s*\d+\.\d+\]|^Kernel panic|^---\[ end Kernel panic|"
                          rb"^CPU: |^Call Trace:|^ <TASK>| </TASK>|^Kernel Offset|^Hardware name")
# How often the console file is read for new output: it is a file QEMU
# appends to, with no event to wait on.
CONSOLE_POLL_S = 0.01


class DirectError(errdefs.Invalid):
    pass


# ------------------------------------------------------------ the VM's init

def _quote(arg: str) -> str:
    """One kernel command line word (the kernel's parser honours "...")."""
    if '"' in arg or "\n" in arg:
        raise DirectError(f"argument {arg!r}: the kernel command line cannot carry it")
    return f'"{arg}"' if (not arg or any(c.isspace() for c in arg)) else arg


def _exists(erofs: Path, path: str) -> bool:
    # dump.erofs exits 0 for a missing path too: its report is the answer.
    out = subprocess.run(["dump.erofs", f"--path={path}", str(erofs)], capture_output=True)
    return out.returncode == 0 and out.stdout.startswith(b"File : ")


def resolve(erofs: Path, name: str, env: list[str]) -> str:
    """The absolute path of the program, looked up in the image's PATH."""
    if name.startswith("/"):
        if not _exists(erofs, name):
            raise DirectError(f"{name}: no such file in the image")
        return name
    path = next((e[5:] for e in env if e.startswith("PATH=")),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for directory in path.split(":"):
        candidate = f"{directory.rstrip('/')}/{name}"
        if directory.startswith("/") and _exists(erofs, candidate):
            return candidate
    raise DirectError(f"{name}: not found in the image's PATH ({path})")


def kernel_command(args: list[str], env: list[str]) -> list[str]:
    """What follows init= on the kernel command line: the environment, then
    `--` and the arguments. Environment names must not be kernel
    parameters (they would be taken by the kernel, not passed on)."""
    words = []
    for item in env:
        name, _, value = item.partition("=")
        if not name or "." in name or name.lower() in ("root", "init", "console", "ro", "rw"):
            raise DirectError(f"environment {name!r}: not passable to init on the kernel command line")
        words.append(_quote(f"{name}={value}"))
    return words + ["--"] + [_quote(a) for a in args]


def virtio_mmio_params(devices: int) -> list[str]:
    """What QEMU 7.2's microvm (legacy IRQs) appends for `devices` virtio-mmio
    devices: 512-byte transports at 0xfeb00000, the highest of the 8 first,
    transport i on IRQ 5+i. Written here, before `--`, because QEMU appends
    them after it, where they would be init's arguments."""
    return [f"virtio_mmio.device=512@{0xfeb00000 + 0x200 * i:#x}:{5 + i}"
            for i in range(7, 7 - devices, -1)]


def vm_config(erofs: Path, process: ProcessDefaults, sandbox: SandboxConfig) -> VMConfig:
    """The VM whose init is the process's program, of the image erofs, of
    sandbox's size; DirectError if direct mode cannot run it as asked."""
    if process.cwd not in ("", "/"):
        raise DirectError(f"direct mode starts the program in /, not {process.cwd}")
    if process.user not in ("", "0", "root", "0:0", "root:root"):
        raise DirectError(f"direct mode runs the program as root, not {process.user!r}")
    if not process.args:
        raise DirectError("no command: the image names none and none was given")
    init = resolve(erofs, process.args[0], process.env)
    extra = kernel_command(process.args[1:], process.env)
    # Two virtio-mmio devices: the root disk and the (unused) agent port.
    config = dataclasses.replace(sandbox, root_image=erofs, init=init, channel="serial",
                                 cmdline_extra=virtio_mmio_params(2) + extra, hotplug_disks=False,
                                 shares=[])
    return dataclasses.replace(config.vm_config(), auto_cmdline=False)


def console_exit(vm: VM) -> int | None:
    """The program's exit code, from what the VM's console kept (None if
    it says none, or is gone)."""
    try:
        return exit_status(vm.console_log.read_bytes())
    except FileNotFoundError:
        return None


def exit_status(console: bytes) -> int | None:
    """The program's exit code, from the kernel's last words."""
    found = _INIT_EXIT.findall(console)
    if not found:
        return None
    status = int(found[-1], 16)
    if status & 0x7F:  # killed by a signal
        return 128 + (status & 0x7F)
    return (status >> 8) & 0xFF


# ------------------------------------------------------- its agent, stood in

class ConsoleAgent:
    """The agent calls a direct-mode VM can answer, from its console: the
    init's output (ReadStdout), its exit (WaitProcess), a signal (the VM's
    end). Anything else is refused: there is no agent to do it."""

    def __init__(self, vm: VM, from_end: bool = False) -> None:
        """from_end: skip what the console holds already (a daemon taking
        over a running VM: that output is in the log)."""
        self.vm = vm
        self._offset = vm.console_log.stat().st_size if from_end else 0
        self._pending = b""
        self._signal: int | None = None
        self._end: asyncio.Future | None = None

    def _refuse(self, what: str):
        raise errdefs.Conflict(f"{what}: a direct-mode VM has no agent (its init is the program)")

    async def read_stream(self, stream: str, container_id: str, exec_id: str = "",
                          size: int = 65536) -> bytes:
        """The next lines of the program's output (kernel lines left out);
        b"" once the VM has ended and all is read. Only stdout: the console
        is one stream."""
        if stream != "stdout" or exec_id:
            return b""
        while True:
            ended = self.vm.exited
            new = self._read()  # what QEMU appended since: a local file's few bytes
            self._pending += new
            *lines, self._pending = self._pending.split(b"\n")
            lines = [line.rstrip(b"\r") for line in lines]
            out = b"".join(line + b"\n" for line in lines if not _KERNEL_LINE.search(line))
            if ended and not new:
                rest, self._pending = self._pending, b""
                if rest and not _KERNEL_LINE.search(rest):
                    out += rest
                return out  # b"" at the end
            if out:
                return out
            # The next look: after the poll interval, or as soon as the VM
            # ends (the end of the output is then not a poll late).
            await asyncio.wait([self._ended()], timeout=CONSOLE_POLL_S)

    def _ended(self) -> asyncio.Future:
        """The VM's end, one watch for every read."""
        if self._end is None:
            self._end = asyncio.ensure_future(self.vm.wait_exited())
        return self._end

    def _read(self) -> bytes:
        try:
            with open(self.vm.console_log, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return b""
        self._offset += len(data)
        return data

    async def wait_process(self, container_id: str, exec_id: str = "") -> apb.WaitProcessResponse:
        """The program's exit status, once the VM has ended: the kernel's
        report of init's exit, or 128+N for the signal that ended the VM."""
        if exec_id:
            self._refuse("exec")
        await self.vm.wait_exited()
        code = await asyncio.to_thread(console_exit, self.vm)
        if code is None and self._signal is not None:
            code = 128 + self._signal
        if code is None:
            raise ConnectionLost(f"the VM ended without the program's exit status: "
                                 f"{self.vm.failure_reason()}")
        return apb.WaitProcessResponse(exit_code=code)

    async def signal_process(self, container_id: str, exec_id: str, signum: int) -> None:
        """Any signal ends the VM: none can reach its init from outside."""
        if exec_id:
            self._refuse("exec")
        if self._signal is None:
            self._signal = int(signum) or signal.SIGKILL
        await self.vm.kill()

    async def health(self, timeout: float | None = None) -> bool:
        return not self.vm.exited

    async def remove_container(self, container_id: str) -> None:
        pass  # nothing in the guest: the VM goes with the pod

    async def close(self) -> None:
        if self._end is not None and not self._end.done():
            self._end.cancel()

    async def exec_process(self, *args, **kwargs):
        self._refuse("exec")

    async def stats(self, *args, **kwargs):
        self._refuse("stats")

    async def update_container(self, *args, **kwargs):
        self._refuse("update")

    async def write_stdin(self, *args, **kwargs):
        self._refuse("stdin")

    async def close_stdin(self, *args, **kwargs):
        pass  # a run without -i closes a stdin it never had

    async def resize_tty(self, *args, **kwargs):
        pass


def sandbox(vm: VM, from_end: bool = False) -> Sandbox:
    """A direct-mode VM (not started yet, or taken over) as a sandbox."""
    return Sandbox(vm, ConsoleAgent(vm, from_end))
