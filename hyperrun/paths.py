"""The three places hyperrun keeps files, each overridable:

- data root (images, blobs, metadata): HYPERRUN_ROOT or --root; default
  /var/lib/hyperrun as root, else ~/.local/share/hyperrun;
- cache root (built kernel and guest image): HYPERRUN_CACHE; default
  ~/.cache/hyperrun;
- run root (per-VM sockets, pid files, consoles; gone at reboot):
  HYPERRUN_RUN_DIR; default /run/hyperrun as root, else $XDG_RUNTIME_DIR.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    if env := os.environ.get("HYPERRUN_ROOT"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/hyperrun")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "hyperrun"


def cache_root() -> Path:
    if env := os.environ.get("HYPERRUN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "hyperrun"


def run_root() -> Path:
    if env := os.environ.get("HYPERRUN_RUN_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/hyperrun")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/hyperrun-{os.getuid()}"
    return Path(base) / "hyperrun"


def owner(data: Path | None = None) -> str:
    """Who owns VMs under the shared run root: a data root (a daemon's, by
    default this process's), as a short key. Daemons with different roots
    on one host keep their VMs apart by it and never collect each other's."""
    import hashlib

    path = os.path.abspath(data or data_root())
    return hashlib.sha256(path.encode()).hexdigest()[:12]


def daemon_socket() -> Path:
    """Where the daemon serves CRI: HYPERRUN_SOCKET, else <run root>/hyperrun.sock.
    Here, not in the daemon's module: every CLI command looks for it, and
    importing the daemon costs 0.2 s."""
    return Path(os.environ.get("HYPERRUN_SOCKET") or run_root() / "hyperrun.sock")
