"""VM templates: boot a sandbox VM once to where its agent waits, save it,
and start new VMs by restoring it (as Kata's and runV's templates do).

Measured with QEMU 7.2 under TCG (see docs/bench/MEASUREMENTS.md): the guest's
RAM lives in a file on /dev/shm, mapped shared while the template is made;
its device state is saved by migrating with `x-ignore-shared` (RAM is not
copied: it is the file) to a file the host opens and passes (`getfd`,
`fd:` URI; 7.2 has no `file:` URI, and QEMU's seccomp filter forbids the
`exec:` URI's spawn).
A clone maps the same file private (copy-on-write: pages it never writes
stay shared with every other clone in the page cache), starts with
`-incoming defer` and the state file's fd, sets `x-ignore-shared` before
`migrate-incoming fd:N`, and needs an explicit `cont`. The clone then gets its own identity from the
agent (entropy, clock, MAC: sandbox/podnet.setup_request).

A template is keyed by everything the restored state depends on: kernel,
guest image, QEMU's version, machine and VM shape (RAM size and devices).
Files of a template are never written again once made (clones map them):
a new template goes to a new directory, renamed into place.

This module holds what a VM needs to be made into a template or cloned
from one; the sandbox layer makes them (sandbox/templates.py: a template
is a sandbox whose agent waits for its next host).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import VMError
from .config import Nic, VMConfig
from .qemu import QEMU_BINARY

TEMPLATE_MAC = "52:54:00:00:00:01"  # the template's card; each clone's agent sets its own
MEM, STATE = "mem", "state"


def default_root() -> Path:
    return Path(os.environ.get("HYPERRUN_TEMPLATES") or "/dev/shm/hyperrun-templates")


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def shape(config: VMConfig) -> VMConfig:
    """The config a template is made with and its clones must match, for
    what the guest sees: same machine, RAM, CPUs, kernel command line and
    devices. Host-side backends (tap fd or user network, share paths)
    may differ; the card's MAC is set by the agent. A vsock clone has a
    CID of its own: QEMU tells the restored guest with a transport reset
    event, on which its driver reads the new CID (the agent's listening
    socket is bound to any CID and stays)."""
    return dataclasses.replace(config, nic=_card(config), memory_file=None,
                               memory_shared=False, incoming=False, incoming_fd=-1)


def _card(config: VMConfig) -> Nic:
    """The network card as the template has it. The backend's kind is part
    of the shape: a tap offers the guest offloads (vnet headers) that
    user-mode does not, and a clone must offer what its template did. A
    template for tap clones is made on the tap of the pod that asked for
    it (the guest has not configured its card yet: no traffic)."""
    nic = config.nic or Nic("user", TEMPLATE_MAC, restrict=True)
    return Nic(nic.kind, TEMPLATE_MAC, tap_fd=nic.tap_fd, restrict=nic.restrict)


def key(config: VMConfig) -> str:
    c = shape(config)
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        raise VMError(f"{QEMU_BINARY} not found")
    data = {"qemu": _file_id(Path(qemu)), "kernel": _file_id(c.kernel),
            "image": _file_id(c.root_image), "machine": c.machine, "vcpus": c.vcpus,
            "memory_mib": c.memory_mib, "accel": c.accel,
            "cmdline": c.cmdline(), "disks": [d.serial for d in c.disks],
            "hotplug": c.hotplug_disks, "shares": [s.tag for s in c.shares],
            "channel": c.channel.kind,
            "nic": [c.nic.kind, c.nic.restrict]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    path: Path

    @property
    def memory(self) -> Path:
        return self.path / MEM

    @property
    def state(self) -> Path:
        return self.path / STATE


def clone_config(config: VMConfig, template: Template, cache_mib: int | None) -> VMConfig:
    """config, to start as a clone of template (RAM mapped private). With
    cache_mib (`[sandbox] clone_cache_mib`), a smaller TCG translation
    cache than a boot's: a clone translates only what it runs after the
    restore, and touched cache is private memory (TCG's cache is not guest
    state: the template's size does not matter). A pool spare (None) keeps
    the full one: it is warmed up so that its translations are there when
    it is taken, and a small cache flushes them (measured: `run IMAGE true`
    from a pool of 16 MiB clones 0.79 s, of booted 64 MiB spares 0.49 s)."""
    nic = config.nic or _card(config)  # the device must exist
    tb = config.tb_size_mib if cache_mib is None else min(config.tb_size_mib, cache_mib)
    return dataclasses.replace(config, nic=nic, memory_file=template.memory,
                               memory_shared=False, incoming=True, tb_size_mib=tb,
                               incoming_fd=os.open(template.state, os.O_RDONLY | os.O_CLOEXEC))
