"""`hyperrun load`: images from a `docker save` archive or an OCI image
layout (a directory, or a tar of one). Every blob is verified against its
digest on the way into the content store, as in a pull."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

from . import reference
from .metadata import ImageRecord, Layer
from .service import ImageError, ImageService
from .store import CHUNK, StoreError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"


class _Source:
    """Files of the archive, whether a directory or a tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar = None if path.is_dir() else tarfile.open(path, "r:*")
        if self.tar is not None:
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file() if self.tar is None else name in self.members

    def open(self, name: str) -> BinaryIO:
        if self.tar is None:
            target = (self.path / name).resolve()
            if not target.is_relative_to(self.path.resolve()):
                raise ImageError(f"{name}: points outside the layout")
            return open(target, "rb")
        member = self.members.get(name)
        if member is None:
            raise ImageError(f"archive has no {name}")
        f = self.tar.extractfile(member)
        assert f is not None
        return f

    def read_json(self, name: str) -> dict | list:
        with self.open(name) as f:
            try:
                return json.loads(f.read())
            except ValueError as exc:
                raise ImageError(f"{name}: not JSON: {exc}") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _hash(source: _Source, name: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with source.open(name) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _ingest(service: ImageService, source: _Source, name: str, digest: str, size: int | None) -> None:
    if service.store.has(digest):
        return
    with service.store.ingest(digest, size) as ing, source.open(name) as f:
        ing.restart()
        while chunk := f.read(CHUNK):
            ing.write(chunk)
        ing.commit()


def load(service: ImageService, path: Path, platform: str = "linux/amd64") -> list[str]:
    """Load every image in the archive; returns lines saying what was loaded."""
    if not path.exists():
        raise ImageError(f"{path}: no such file or directory")
    try:
        source = _Source(path)
    except tarfile.TarError:
        raise ImageError(f"{path}: neither a tar archive nor an OCI layout directory") from None
    try:
        if source.exists("oci-layout") and source.exists("index.json"):
            return _load_oci(service, source, platform)
        if source.exists("manifest.json"):
            return _load_docker(service, source)
        raise ImageError(f"{path}: neither a docker save archive nor an OCI image layout")
    except StoreError as exc:
        raise ImageError(f"{path}: {exc}") from None
    finally:
        source.close()


def _blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _load_oci(service: ImageService, source: _Source, platform: str) -> list[str]:
    index = source.read_json("index.json")
    loaded = []
    for desc in index.get("manifests", []):
        ann = desc.get("annotations") or {}
        name = ann.get("io.containerd.image.name") or ann.get("org.opencontainers.image.ref.name")
        image, repo_digest = _load_oci_descriptor(service, source, desc, platform)
        if image is None:
            continue
        key = None
        # A bare tag ("latest", as skopeo writes) names no repository.
        if name and (":" in name or "/" in name):
            try:
                key = reference.parse(name).key
            except reference.InvalidReference:
                key = None
        service.record(image, key, repo_digest)
        loaded.append(f"Loaded image: {key or image.digest}")
    return loaded


def _load_oci_descriptor(service, source, desc, platform):
    from .store import check_digest

    digest = check_digest(desc.get("digest", ""))
    _ingest(service, source, _blob_name(digest), digest, desc.get("size"))
    body = json.loads(service.store.read(digest))
    media_type = body.get("mediaType") or desc.get("mediaType")
    if media_type in (OCI_INDEX, DOCKER_LIST):
        want_os, _, want_arch = platform.partition("/")
        for sub in body.get("manifests", []):
            p = sub.get("platform") or {}
            if p.get("os") == want_os and p.get("architecture") == want_arch.split("/")[0]:
                image, _ = _load_oci_descriptor(service, source, sub, platform)
                image.extra_blobs.append(digest)
                return image, digest
        return None, digest
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ImageError(f"{digest}: unsupported manifest media type {media_type!r}")
    config = body["config"]
    _ingest(service, source, _blob_name(config["digest"]), check_digest(config["digest"]),
            config.get("size"))
    layers = []
    for layer in body.get("layers", []):
        d = check_digest(layer["digest"])
        _ingest(service, source, _blob_name(d), d, layer.get("size"))
        layers.append(Layer(d, layer["mediaType"], service.store.size(d)))
    return ImageRecord(digest, media_type, config["digest"], layers), digest


def _load_docker(service: ImageService, source: _Source) -> list[str]:
    loaded = []
    for entry in source.read_json("manifest.json"):
        config_name = entry["Config"]
        config_digest, config_size = _hash(source, config_name)
        _ingest(service, source, config_name, config_digest, config_size)
        config = json.loads(service.store.read(config_digest))
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = []
        for i, layer_name in enumerate(entry["Layers"]):
            digest, size = _hash(source, layer_name)
            with source.open(layer_name) as f:
                compressed = f.read(2) == b"\x1f\x8b"
            if not compressed and i < len(diff_ids) and diff_ids[i] != digest:
                raise ImageError(f"{layer_name}: content {digest} does not match the "
                                 f"image config's diff_id {diff_ids[i]}")
            _ingest(service, source, layer_name, digest, size)
            layers.append(Layer(digest, DOCKER_LAYER + (".gzip" if compressed else ""), size))
        manifest = {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": config_size, "digest": config_digest},
            "layers": [{"mediaType": l.media_type, "size": l.size, "digest": l.digest}
                       for l in layers],
        }
        manifest_digest = service.store.put(json.dumps(manifest, separators=(",", ":")).encode())
        image = ImageRecord(manifest_digest, DOCKER_MANIFEST, config_digest, layers)
        tags = entry.get("RepoTags") or []
        for tag in tags or [None]:
            key = reference.parse(tag).key if tag else None
            service.record(image, key, manifest_digest)
            loaded.append(f"Loaded image: {reference.parse(tag).familiar if tag else manifest_digest}")
    return loaded
