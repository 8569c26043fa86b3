"""The image service: pull, load, list, remove; and each image's read-only
root filesystem image (erofs), built once and shared by every sandbox.

    <data root>/content/        blobs (image/store.py)
    <data root>/metadata.db     images and names (image/metadata.py)
    <data root>/rootfs/<chain>.erofs   one per distinct layer chain
    <data root>/tmp/            unpack work space
"""
from __future__ import annotations

import errno

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hyperrun import errdefs
from hyperrun import paths

from . import reference
from .metadata import ImageRecord, Metadata, NameRecord
from .store import ContentStore, StoreError


SCRATCH_TMPFS = "/dev/shm"


class ImageError(errdefs.Unknown):
    pass


class ImageNotFound(ImageError, errdefs.NotFound):
    pass


@dataclass
class ImageSummary:
    image: ImageRecord
    names: list[NameRecord]


def chain_id(image: ImageRecord) -> str:
    """Names a layer stack: images sharing their layers share a rootfs."""
    h = hashlib.sha256("\n".join(l.digest for l in image.layers).encode())
    return h.hexdigest()


class ImageService:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.data_root()
        self.store = ContentStore(self.root / "content")
        self.meta = Metadata(self.root / "metadata.db")
        self.rootfs_dir = self.root / "rootfs"
        self.tmp_dir = self.root / "tmp"
        self.rootfs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.meta.close()

    # --- names ------------------------------------------------------------
    def resolve(self, text: str) -> ImageRecord:
        """An image by name (any form Docker accepts), digest or id prefix."""
        image = self.find(text)
        if image is None:
            raise ImageNotFound(f"no such image: {text}")
        return image

    def find(self, text: str) -> ImageRecord | None:
        candidate = text.removeprefix("sha256:")
        if 12 <= len(candidate) <= 64 and all(c in "0123456789abcdef" for c in candidate):
            matches = [i for i in self.meta.images()
                       if i.digest[7:].startswith(candidate)
                       or i.config_digest[7:].startswith(candidate)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ImageError(f"{text} matches {len(matches)} images: give more digits")
        try:
            ref = reference.parse(text)
        except reference.InvalidReference:
            return None
        if ref.digest is not None:
            for name in self.meta.names():
                if name.name.startswith(ref.name + ":") or name.name.startswith(ref.name + "@"):
                    if ref.digest in (name.repo_digest, name.image):
                        return self.meta.image(name.image)
            return self.meta.image(ref.digest)
        record = self.meta.lookup(ref.key)
        return self.meta.image(record.image) if record else None

    def list(self) -> list[ImageSummary]:
        return [ImageSummary(i, self.meta.names(i.digest)) for i in self.meta.images()]

    def listing(self) -> list[tuple[str, str, str, str, str, str]]:
        """`images` as Docker lists them: a row (REPOSITORY, TAG, DIGEST,
        IMAGE ID, SIZE, COMPRESSED) per name, one for an image without a
        name. SIZE is unpacked, as Docker's: its erofs root's (built at
        pull), else the layers' compressed size."""
        rows = []
        for summary in self.list():
            image = summary.image
            try:
                unpacked = (self.rootfs_dir / f"{chain_id(image)}.erofs").stat().st_size
            except OSError:
                unpacked = image.size
            image_id = image.config_digest[7:19]
            sizes = f"{unpacked / 1e6:.1f}MB", f"{image.size / 1e6:.1f}MB"
            if not summary.names:
                rows.append(("<none>", "<none>", image.digest[:19], image_id, *sizes))
            for name in summary.names:
                ref = reference.parse(name.name)
                repo = reference.Reference(ref.registry, ref.repository).familiar
                rows.append((repo, ref.tag or "<none>", name.repo_digest[:19], image_id, *sizes))
        return rows

    def config(self, image: ImageRecord) -> dict:
        try:
            return json.loads(self.store.read(image.config_digest))
        except (OSError, ValueError, StoreError) as exc:
            raise ImageError(f"image {image.digest}: unreadable config: {exc}") from exc

    # --- pull / record ----------------------------------------------------
    async def pull(self, text: str, *, platform: str = "linux/amd64", progress=None,
                   auth=None, unpack: bool = True) -> ImageRecord:
        """Fetch an image and, as containerd does, unpack it: its erofs
        root is then ready for the first container."""
        import asyncio

        from . import distribution

        ref = reference.parse(text)
        try:
            result = await distribution.pull(ref, self.store, platform=platform,
                                             progress=progress, auth=auth)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Nothing half-written is in blobs/ (ingest is verified, then
                # renamed); what was fetched stays in ingest/ for a retry.
                raise ImageError(f"pulling {text}: no space left on the device of "
                                 f"{self.root}") from None
            raise
        if unpack:
            try:
                await asyncio.to_thread(self.rootfs, result.image)
            except ImageError:
                # A layer that cannot be unpacked (e.g. a hostile one): the
                # store is left as it was before the pull.
                referenced = self.meta.referenced_blobs()
                for blob in result.image.blobs:
                    if blob not in referenced:
                        self.store.delete(blob)
                raise
        self.meta.add(result.image, ref.key, result.repo_digest)
        return result.image

    def record(self, image: ImageRecord, name: str | None, repo_digest: str) -> None:
        """Register an image whose blobs are already in the store."""
        missing = [b for b in image.blobs if not self.store.has(b)]
        if missing:
            raise ImageError(f"image {image.digest} lacks blobs: {', '.join(missing)}")
        self.meta.add(image, name, repo_digest)

    # --- removal ----------------------------------------------------------
    def remove(self, text: str, in_use: dict[str, str] | None = None) -> list[str]:
        """By name: untag, and delete the image once no name is left. By
        digest or id: delete the image and all its names. Docker-style
        report lines. in_use (image digest: a container of it) says which
        images must not be deleted: such a removal changes nothing, as
        Docker's `rmi` without -f."""
        image = self.resolve(text)
        done = []
        try:
            ref = reference.parse(text)
        except reference.InvalidReference:
            ref = None
        by_name = ref is not None and ref.digest is None and self.meta.lookup(ref.key)
        last_name = not by_name or {n.name for n in self.meta.names(image.digest)} == {ref.key}
        if last_name and image.digest in (in_use or {}):
            raise ImageError(f"cannot remove image {image.config_digest[7:19]}: container "
                             f"{in_use[image.digest][:12]} uses it (remove the container first)")
        if by_name:
            self.meta.untag(ref.key)
            done.append(f"Untagged: {ref.familiar}")
            if self.meta.names(image.digest):
                return done
        else:
            done += [f"Untagged: {n.name}" for n in self.meta.names(image.digest)]
        self.meta.remove_image(image.digest)
        done.append(f"Deleted: {image.digest}")
        self.gc()
        return done

    def gc(self) -> list[str]:
        """Delete blobs and rootfs images no image refers to."""
        referenced = self.meta.referenced_blobs()
        removed = [d for d in self.store.digests() if d not in referenced]
        for digest in removed:
            self.store.delete(digest)
        chains = {chain_id(i) for i in self.meta.images()}
        for path in self.rootfs_dir.glob("*.erofs"):
            if path.stem not in chains:
                path.unlink(missing_ok=True)
        return removed

    # --- root filesystem --------------------------------------------------
    def rootfs(self, image: ImageRecord) -> Path:
        """The image's read-only erofs root, building it on first use."""
        out = self.rootfs_dir / f"{chain_id(image)}.erofs"
        if out.exists():
            return out
        with open(self.rootfs_dir / f"{chain_id(image)}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and reuse
            try:
                if not out.exists():
                    self._build_rootfs(image, out)
            finally:
                os.unlink(lock.name)
        return out

    def _scratch_dir(self, image: ImageRecord) -> Path:
        """Where to unpack: the tree only lives until mkfs.erofs has read it,
        so tmpfs (/dev/shm) when it has ample room — writing thousands of
        small files to disk first costs seconds of writeback and doubles
        the disk writes — else the data root's tmp/."""
        estimate = 4 * image.size + (256 << 20)  # layers are ~2-4x smaller unpacked
        try:
            st = os.statvfs(SCRATCH_TMPFS)
            if st.f_bavail * st.f_frsize > estimate:
                return Path(SCRATCH_TMPFS)
        except OSError:
            pass
        return self.tmp_dir

    def _build_rootfs(self, image: ImageRecord, out: Path) -> None:
        from .rootfs import RootfsError, build_rootfs_image
        from .unpack import Layer as UnpackLayer
        from .unpack import UnpackError, unpack_layers

        work = Path(tempfile.mkdtemp(prefix="hyperrun-unpack-", dir=self._scratch_dir(image)))
        try:
            tree = work / "rootfs"
            tree.mkdir()
            layers = [UnpackLayer(self.store.path(l.digest), l.media_type, l.digest)
                      for l in image.layers]
            try:
                unpack_layers(layers, tree)
                build_rootfs_image(tree, out)
            except (UnpackError, RootfsError) as exc:
                raise ImageError(f"cannot unpack image {image.digest}: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
