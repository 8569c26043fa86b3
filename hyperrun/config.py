"""hyperrun's configuration file: defaults for sandbox VMs.

Looked for at HYPERRUN_CONFIG, then /etc/hyperrun/config.toml, then
<data root>/config.toml; every key is optional:

    [sandbox]
    vcpus = 1            # default vCPUs of a pod VM
    memory_mib = 256     # default memory of a pod VM
    machine = "microvm"  # or "q35"
    max_vcpus = 8        # caps what pod resources may ask for
    max_memory_mib = 16384
    # guest memory on top of what the pod's containers may use: the guest
    # kernel, the agent and crun
    overhead_mib = 96
    # start pod VMs by restoring a saved one (vm/template.py) instead of
    # booting: made on first use per VM shape, kept in /dev/shm. "auto": a
    # daemon's are (it falls back to booting if it cannot make one), a run
    # without a daemon boots (`run --template` asks)
    template = "auto"
    # spare VMs kept started (network prepared, agent warm) for pods of the
    # default shape and network to take: RunPodSandbox then boots nothing
    # (sandbox/pool.py). Each holds its memory while it waits. "auto": a
    # daemon keeps one per 2 GiB the host has available when it starts, at
    # most 2, filled from its first pod on; a run without a daemon none
    pool_size = "auto"
    # TCG translation cache (MiB) of a pod VM restored from a template
    # (a boot's is 64): touched cache is private memory, so smaller is
    # denser and, below what a start translates, slower (vm/template.py)
    clone_cache_mib = 32
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from hyperrun import paths


class ConfigError(Exception):
    pass


AUTO = "auto"
# pool_size = "auto": one spare per SPARE_BUDGET_MIB the host has available
# when the daemon starts, at most POOL_AUTO_MAX. A spare's PSS is ~85 MiB
# under TCG (docs/TEMPLATES.md): the budget leaves the pods the rest.
SPARE_BUDGET_MIB = 2048
POOL_AUTO_MAX = 2


@dataclass
class SandboxDefaults:
    vcpus: int = 1
    memory_mib: int = 256
    machine: str = "microvm"
    max_vcpus: int = 8
    max_memory_mib: int = 16384
    overhead_mib: int = 96
    template: bool | str = "auto"   # True, False or AUTO
    pool_size: int | str = "auto"   # N or AUTO
    clone_cache_mib: int = 32


def config_path() -> Path | None:
    if env := os.environ.get("HYPERRUN_CONFIG"):
        return Path(env)
    for candidate in (Path("/etc/hyperrun/config.toml"), paths.data_root() / "config.toml"):
        if candidate.exists():
            return candidate
    return None


def load(path: Path | None = None) -> SandboxDefaults:
    path = path or config_path()
    defaults = SandboxDefaults()
    if path is None:
        return defaults
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    section = data.get("sandbox", {})
    known = {f.name: f.type for f in fields(SandboxDefaults)}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key sandbox.{key} (known: {', '.join(known)})")
        if key in ("template", "pool_size") and value == AUTO:
            setattr(defaults, key, value)
            continue
        expected = {"str": str, "bool": bool}.get(known[key].split(" ")[0], int)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            also = ' or "auto"' if key in ("template", "pool_size") else ""
            raise ConfigError(f"{path}: sandbox.{key} must be {expected.__name__}{also}")
        setattr(defaults, key, value)
    if defaults.pool_size != AUTO and defaults.pool_size < 0:
        raise ConfigError(f"{path}: sandbox.pool_size must be 0 or more")
    if defaults.clone_cache_mib < 4:
        raise ConfigError(f"{path}: sandbox.clone_cache_mib must be 4 or more")
    if defaults.machine not in ("microvm", "q35"):
        raise ConfigError(f"{path}: sandbox.machine must be microvm or q35")
    return defaults


def vm_size(defaults: SandboxDefaults, spec) -> tuple[int, int]:
    """(vCPUs, MiB) of a pod's VM (spec: a specs.PodSpec): its CPU
    limit rounded up, its memory limit plus the pod's overhead plus the
    guest's own; the defaults where it sets no limit, capped by the
    configured maximums."""
    vcpus = math.ceil(spec.cpus) if spec.cpus > 0 else defaults.vcpus
    memory = defaults.memory_mib
    if spec.memory_limit_bytes > 0:
        memory = -(-(spec.memory_limit_bytes + spec.overhead_memory_bytes) // (1 << 20)) \
            + defaults.overhead_mib
    return min(max(vcpus, 1), defaults.max_vcpus), min(max(memory, 128), defaults.max_memory_mib)


def mem_available_mib() -> int:
    """The host's MemAvailable, in MiB (0 where /proc/meminfo cannot say)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) // 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def auto_pool_size(available_mib: int) -> int:
    return max(0, min(POOL_AUTO_MAX, available_mib // SPARE_BUDGET_MIB))


def resolve(defaults: SandboxDefaults, daemon: bool,
            available_mib: int | None = None) -> SandboxDefaults:
    """defaults with "auto" decided: a daemon makes templates and keeps a
    pool sized from the memory the host has available (auto_pool_size); a
    run without a daemon (embedded) does neither: spares would outlive its
    one run, and a template made for one run costs it more than a boot."""
    out = dataclasses.replace(defaults)
    if out.template == AUTO:
        out.template = daemon
    if out.pool_size == AUTO:
        out.pool_size = auto_pool_size(mem_available_mib() if available_mib is None
                                       else available_mib) if daemon else 0
    return out
