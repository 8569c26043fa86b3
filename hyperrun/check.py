"""`hyperrun check`: what this host can do, and whether hyperrun can run."""
from __future__ import annotations

import os
import shutil
import subprocess

from hyperrun import assets
from hyperrun.vm import accel, qemu, rundir
from hyperrun.vm.config import vsock_available

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _size(path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


# What one pool spare costs while it waits: the PSS of an idle clone with
# a boot's TCG cache (docs/bench/MEASUREMENTS.md, under TCG; KVM has no
# cache). A template's memory is what its file in /dev/shm holds.
SPARE_PSS_MIB = 85


def _defaults_cost() -> str:
    """What a daemon with this host's config does by default, and its cost
    in memory: templates in /dev/shm, a pool of spares."""
    from hyperrun import config
    from hyperrun.vm.template import default_root

    try:
        d = config.load()
    except config.ConfigError as exc:
        return f"config: {exc}"
    available = config.mem_available_mib()
    r = config.resolve(d, daemon=True, available_mib=available)
    parts = []
    if r.template:
        files = [f for f in default_root().glob("*/mem") if f.is_file()]
        held = sum(f.stat().st_blocks * 512 for f in files) / 2**20
        made = (f"{len(files)} made, {held:.0f} MiB of RAM in {default_root()}" if files else
                f"none made yet (one per VM shape, in {default_root()}: RAM, what its "
                "guest touched)")
        parts.append(f"templates on{' (auto)' if d.template == config.AUTO else ''}: {made}")
    else:
        parts.append("templates off")
    if r.pool_size:
        how = (f"auto: {available} MiB available, one per {config.SPARE_BUDGET_MIB} MiB, "
               f"at most {config.POOL_AUTO_MAX}") if d.pool_size == config.AUTO else "config"
        parts.append(f"a pool of {r.pool_size} spare VMs ({how}), ~{SPARE_PSS_MIB} MiB each "
                     "while they wait")
    else:
        parts.append("no pool")
    return "; ".join(parts) + " ([sandbox] template, pool_size)"


def main() -> int:
    rows: list[tuple[str, bool, str]] = []  # (what, ok/required-ok, detail)
    fatal = False

    binary = shutil.which(qemu.QEMU_BINARY)
    if binary:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True)
        rows.append(("qemu", True, f"{binary}: {out.stdout.splitlines()[0] if out.stdout else '?'}"))
    else:
        rows.append(("qemu", False, f"{qemu.QEMU_BINARY} not found (apt install qemu-system-x86)"))
        fatal = True

    try:
        a = accel.choose()
        rows.append(("accelerator", True, f"{a.name}: {a.reason}"))
    except ValueError as exc:
        rows.append(("accelerator", False, str(exc)))
        fatal = True

    if vsock_available():
        rows.append(("vsock", True, "/dev/vhost-vsock present"))
    else:
        rows.append(("vsock", True, "no /dev/vhost-vsock: the agent channel uses virtio-serial"))

    if os.path.exists(VIRTIOFSD):
        rows.append(("virtiofsd", True, VIRTIOFSD))
    else:
        rows.append(("virtiofsd", True, f"{VIRTIOFSD} missing: shares use 9p"))

    for what, path, how in (("kernel", assets.kernel_path(), "make kernel"),
                            ("guest image", assets.guest_image_path(), "make guest")):
        if path.exists():
            rows.append((what, True, f"{path.resolve()} ({_size(path)})"))
        else:
            rows.append((what, False, f"not built ({path}): run `{how}`"))
            fatal = True

    root = rundir.run_root()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = os.access(root, os.W_OK)
    except OSError:
        writable = False
    rows.append(("run directory", writable, str(root)))
    fatal |= not writable

    rows.append(("daemon defaults", True, _defaults_cost()))

    width = max(len(r[0]) for r in rows)
    for what, ok, detail in rows:
        print(f"{'ok ' if ok else 'NO '} {what.ljust(width)}  {detail}")
    print("hyperrun can run" if not fatal else "hyperrun cannot run on this host (see NO above)")
    return 1 if fatal else 0
