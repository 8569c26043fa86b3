"""Content store: blobs by digest under <data root>/content.

    blobs/sha256/<hex>        verified content, read-only, never rewritten
    ingest/sha256-<hex>       a download in progress (kept to resume it)

Ingest is atomic: bytes go to the ingest file, which is checked for size
and digest, fsynced and renamed into blobs/. Nothing unverified is ever
visible under blobs/, and a pull that stops halfway resumes from what its
ingest file holds.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterator

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


class StoreError(Exception):
    pass


class DigestError(StoreError):
    """Content does not match the digest or size it was announced with."""


def check_digest(digest: str) -> str:
    """Return digest if it is a well-formed sha256 digest, else refuse it."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise StoreError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Ingest:
    """Writing one blob. Use as a context manager; commit() publishes it."""

    def __init__(self, store: "ContentStore", digest: str, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.path = store.root / "ingest" / digest.replace(":", "-")
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = None
        self.offset = 0
        self._committed = False

    def __enter__(self) -> "Ingest":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        # Resume: hash what an earlier attempt left, unless it is already
        # longer than the blob can be.
        self._file.seek(0)
        while chunk := self._file.read(CHUNK):
            self._hash.update(chunk)
            self.offset += len(chunk)
        if self.size is not None and self.offset > self.size:
            self.restart()
        return self

    def restart(self) -> None:
        """Throw away what was written (a server ignored our Range)."""
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        if self.size is not None and self.offset + len(data) > self.size:
            self._discard()
            raise DigestError(f"{self.digest}: more than the announced {self.size} bytes")
        self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def commit(self) -> Path:
        assert self._file is not None
        if self.size is not None and self.offset != self.size:
            # Short: keep what we have, a retry resumes from here.
            raise DigestError(f"{self.digest}: got {self.offset} of {self.size} bytes")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self._discard()
            raise DigestError(f"digest mismatch: expected {self.digest}, got {actual}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        dest = self.store.path(self.digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o444)
        os.replace(self.path, dest)
        fsync_path(dest.parent)
        self._committed = True
        return dest

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "ingest").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algo, _, hexpart = check_digest(digest).partition(":")
        return self.root / "blobs" / algo / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def ingest(self, digest: str, size: int | None = None) -> Ingest:
        return Ingest(self, check_digest(digest), size)

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store small content (a manifest, a config); returns its digest."""
        digest = digest or digest_bytes(data)
        if self.has(digest):
            if digest_bytes(data) != digest:
                raise DigestError(f"digest mismatch: expected {digest}, got {digest_bytes(data)}")
            return digest
        with self.ingest(digest, len(data)) as ing:
            ing.restart()
            ing.write(data)
            ing.commit()
        return digest

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def open(self, digest: str) -> BinaryIO:
        return open(self.path(digest), "rb")

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        for p in (self.root / "blobs" / "sha256").iterdir():
            if len(p.name) == 64:
                yield "sha256:" + p.name

    def discard_ingests(self) -> None:
        for p in (self.root / "ingest").iterdir():
            p.unlink(missing_ok=True)
