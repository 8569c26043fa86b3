"""`hyperrun run --direct IMAGE [CMD...]`: the image's own program as the
guest's init, in the manner of Lupine Linux: no agent, no crun, no
container inside the VM. The image's read-only erofs root is the VM's
root disk; the kernel starts the entrypoint as PID 1 with the image's
environment (kernel parameters before `--`) and arguments (after it).

The program's output reaches the host on the serial console, which is
copied to stdout as it comes. When the program exits, the kernel panics
("Attempted to kill init! exitcode=0x…"), and that status is the exit
code: the same as a container's (128+N for a signal N). It is the point
between a container in a VM and a unikernel: one application, its own
Linux kernel, nothing else in the guest.

What a container would have and this does not: a writable root, /proc and
/dev mounted (the program may mount them itself), a working directory or
user other than / and root, stdin.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

from hyperrun import exitcodes

# printk: "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300"
_INIT_EXIT = re.compile(rb"Attempted to kill init! exitcode=0x([0-9a-fA-F]+)")
_KERNEL_LINE = re.compile(rb"^\[\s*\d+\.\d+\]|^Kernel panic|^---\[ end Kernel panic|"
                          rb"^CPU: |^Call Trace:|^ <TASK>| </TASK>|^Kernel Offset|^Hardware name")


class DirectError(Exception):
    pass


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


def exit_status(console: bytes) -> int | None:
    """The program's exit code, from the kernel's last words."""
    found = _INIT_EXIT.findall(console)
    if not found:
        return None
    status = int(found[-1], 16)
    if status & 0x7F:  # killed by a signal
        return 128 + (status & 0x7F)
    return (status >> 8) & 0xFF


def virtio_mmio_params(devices: int) -> list[str]:
    """What QEMU 7.2's microvm (legacy IRQs) appends for `devices` virtio-mmio
    devices: 512-byte transports at 0xfeb00000, the highest of the 8 first,
    transport i on IRQ 5+i. Written here, before `--`, because QEMU appends
    them after it, where they would be init's arguments."""
    return [f"virtio_mmio.device=512@{0xfeb00000 + 0x200 * i:#x}:{5 + i}"
            for i in range(7, 7 - devices, -1)]


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


def run(image_ref: str, args: list[str], entrypoint: list[str] | None, env: list[str],
        workdir: str, user: str, pull: str, platform: str, vm_size: dict) -> int:
    import asyncio

    from hyperrun.image.imageconfig import Overrides, apply
    from hyperrun.image.service import ImageError, ImageService
    from hyperrun.sandbox.config import SandboxConfig
    from hyperrun.vm import VMError, rundir
    from hyperrun.vm import new as new_vm

    service = ImageService()
    try:
        image = service.find(image_ref) if pull != "always" else None
        if image is None:
            if pull == "never":
                raise DirectError(f"no such image: {image_ref} (and --pull=never)")
            print(f"Unable to find image '{image_ref}' locally, pulling", file=sys.stderr)
            image = asyncio.run(service.pull(image_ref, platform=platform,
                                             progress=sys.stderr.isatty()))
        process = apply(service.config(image), Overrides(args=args, entrypoint=entrypoint, env=env,
                                                         workdir=workdir, user=user))
        erofs = service.rootfs(image)
        if process.cwd not in ("", "/"):
            raise DirectError(f"direct mode starts the program in /, not {process.cwd}")
        if process.user not in ("", "0", "root", "0:0", "root:root"):
            raise DirectError(f"direct mode runs the program as root, not {process.user!r}")
        init = resolve(erofs, process.args[0], process.env)
        extra = kernel_command(process.args[1:], process.env)
    except (DirectError, ImageError) as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    except Exception as exc:  # a pull's own errors (network, auth, reference)
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    finally:
        service.close()

    rundir.collect_stale()
    # Two virtio-mmio devices: the root disk and the (unused) agent port.
    config = SandboxConfig(**vm_size, root_image=erofs, init=init,
                           cmdline_extra=virtio_mmio_params(2) + extra, channel="serial",
                           die_with_parent=True)
    try:
        vm = new_vm(dataclasses.replace(config.vm_config(), auto_cmdline=False))
        vm.spawn()
    except VMError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    try:
        console = _follow(vm)
    finally:
        if vm.process.poll() is None:
            vm.process.kill()
            vm.process.wait()
        rundir.remove(vm.run_dir)
    code = exit_status(console)
    if code is None:
        tail = b" | ".join(console.strip().splitlines()[-3:]).decode(errors="replace")
        print(f"hyperrun: the VM ended without the program's exit status: {tail}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    return code


def _follow(vm) -> bytes:
    """Copy the console to stdout as it grows, kernel lines left out, until
    QEMU exits; returns all of it."""
    seen = b""
    pending = b""
    out = sys.stdout.buffer
    while True:
        done = vm.process.poll() is not None
        try:
            with open(vm.console_log, "rb") as f:
                f.seek(len(seen))
                new = f.read()
        except FileNotFoundError:
            new = b""
        seen += new
        pending += new
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not _KERNEL_LINE.search(line):
                out.write(line + b"\n")
        out.flush()
        if done:
            if pending and not _KERNEL_LINE.search(pending):
                out.write(pending)
                out.flush()
            return seen
        time.sleep(0.01)
