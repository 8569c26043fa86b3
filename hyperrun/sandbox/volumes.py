"""Host directories and files mounted into a pod's containers (CRI mounts,
`hyperrun run -v`), and host directories as containers' roots
(`hyperrun run --rootfs DIR`).

A microvm cannot hot-add a virtio-9p device, so every sandbox VM boots with
one 9p share, its *shared directory* (in the VM's run directory), as Kata
does with its shared directory. A volume is bind-mounted on the host into
it under `<container id>/<n>`; QEMU's 9p server, in the host's mount
namespace, serves the bind at once, and the agent binds that path into the
container. The host binds are removed with the container, and in any case
before the run directory is deleted (vm/rundir.remove never walks through
a mount).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from hyperrun import errdefs
from hyperrun import mounts
from hyperrun.specs import Mount
from hyperrun.proto import agent_pb2 as apb

SHARE_TAG = "hyperrun-shared"
SHARE_DIR = "shared"


class VolumeError(errdefs.Invalid):
    pass


def share_storage() -> apb.Storage:
    return apb.Storage(source=SHARE_TAG, fstype="9p")


def _container_dir(shared: Path, container_id: str) -> Path:
    return shared / container_id[:16]


def bind(shared: Path, container_id: str, specs: Iterable[Mount]) -> list[apb.Mount]:
    """Bind each host path into the shared directory; on any failure undo
    the ones made. Missing host directories are created, as containerd
    does for the kubelet's volumes."""
    base = _container_dir(shared, container_id)
    made: list[apb.Mount] = []
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        for i, spec in enumerate(specs):
            if not spec.container_path.startswith("/"):
                raise VolumeError(f"mount {spec.container_path!r}: container path is not absolute")
            host = Path(spec.host_path)
            if not host.is_absolute():
                raise VolumeError(f"mount {spec.host_path!r}: host path is not absolute")
            if not host.exists():
                host.mkdir(parents=True, mode=0o755)
            target = base / str(i)
            if host.is_dir():
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)
            try:
                mounts.bind(host, target, readonly=spec.readonly, propagation=spec.propagation)
            except (OSError, ValueError) as exc:
                raise VolumeError(f"mount {spec.host_path} on {spec.container_path}: {exc}") from None
            made.append(apb.Mount(storage=share_storage(),
                                  subpath=str(target.relative_to(shared)),
                                  destination=spec.container_path, readonly=spec.readonly,
                                  propagation="" if spec.propagation == "private"
                                  else spec.propagation))
    except BaseException:
        unbind(shared, container_id)
        raise
    return made


def bind_root(shared: Path, container_id: str, host_dir: str, readonly: bool) -> apb.Storage:
    """A host directory as the container's root (`run --rootfs DIR`):
    bound into the shared directory under `<container id>/root` and
    written through (read-only with readonly), as podman's --rootfs."""
    host = Path(host_dir)
    if not host.is_absolute():
        raise VolumeError(f"rootfs {host_dir!r} is not an absolute path")
    if not host.is_dir():
        raise VolumeError(f"rootfs {host_dir} is not a directory")
    base = _container_dir(shared, container_id)
    base.mkdir(mode=0o700, exist_ok=True)
    target = base / "root"
    target.mkdir(exist_ok=True)
    try:
        mounts.bind(host, target, readonly=readonly)
    except OSError as exc:
        raise VolumeError(f"rootfs {host_dir}: {exc}") from None
    return apb.Storage(source=SHARE_TAG, fstype="9p", subpath=str(target.relative_to(shared)))


def unbind(shared: Path, container_id: str) -> None:
    """Remove a container's binds and their mount points. Idempotent."""
    base = _container_dir(shared, container_id)
    if not base.exists():
        return
    left = mounts.unmount_under(base)
    if left:
        raise VolumeError(f"cannot unmount {', '.join(map(str, left))}")
    for entry in base.iterdir():
        entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    os.rmdir(base)


def unbind_unknown(shared: Path, container_ids) -> list[str]:
    """Unbind what the shared directory holds for containers not in
    container_ids (a daemon killed inside CreateContainer, after the binds
    and before the record); returns the directories' names."""
    known = {_container_dir(shared, cid).name for cid in container_ids}
    stale = sorted(p.name for p in shared.iterdir() if p.name not in known) \
        if shared.is_dir() else []
    for name in stale:
        unbind(shared, name)
    return stale
