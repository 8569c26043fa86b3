"""Image metadata in SQLite: which images exist, their names, and which
blobs each one holds (for garbage collection).

    images       one row per image manifest (the platform's manifest)
    names        "registry/repo:tag" -> image, with the digest the name
                 resolved to when pulled (an index's or the manifest's)
    image_blobs  every blob an image needs: manifest, config, layers, and
                 the index it was picked from

Blobs are written to the content store before a transaction records them
here; removal deletes rows first and blobs after, so a crash in between
leaves at most unreferenced blobs, which gc() collects.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun.db import open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    digest        TEXT PRIMARY KEY,
    media_type    TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    layers        TEXT NOT NULL,   -- JSON: [[digest, media_type, size], ...]
    size          INTEGER NOT NULL,
    platform      TEXT NOT NULL,
    created       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name        TEXT PRIMARY KEY,
    image       TEXT NOT NULL REFERENCES images(digest),
    repo_digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS image_blobs (
    image TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
    blob  TEXT NOT NULL,
    PRIMARY KEY (image, blob)
);
CREATE INDEX IF NOT EXISTS image_blobs_blob ON image_blobs(blob);
"""


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int


@dataclass
class ImageRecord:
    digest: str                  # the platform manifest's digest
    media_type: str
    config_digest: str
    layers: list[Layer]
    platform: str = "linux/amd64"
    extra_blobs: list[str] = field(default_factory=list)  # e.g. the index
    created: float = 0.0

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def blobs(self) -> list[str]:
        return [self.digest, self.config_digest, *(l.digest for l in self.layers),
                *self.extra_blobs]


@dataclass(frozen=True)
class NameRecord:
    name: str
    image: str
    repo_digest: str


class Metadata:
    def __init__(self, path: Path) -> None:
        self.db = open_db(path, SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, image: ImageRecord, name: str | None, repo_digest: str) -> None:
        layers = json.dumps([[l.digest, l.media_type, l.size] for l in image.layers])
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image.digest, image.media_type, image.config_digest, layers, image.size,
                 image.platform, image.created or time.time()))
            self.db.executemany("INSERT OR IGNORE INTO image_blobs VALUES (?, ?)",
                                [(image.digest, b) for b in image.blobs])
            if name:
                self.db.execute("INSERT OR REPLACE INTO names VALUES (?, ?, ?)",
                                (name, image.digest, repo_digest))

    def image(self, digest: str) -> ImageRecord | None:
        row = self.db.execute("SELECT * FROM images WHERE digest = ?", (digest,)).fetchone()
        return self._image(row) if row else None

    def images(self) -> list[ImageRecord]:
        return [self._image(r) for r in self.db.execute("SELECT * FROM images ORDER BY created")]

    def names(self, image: str | None = None) -> list[NameRecord]:
        if image is None:
            rows = self.db.execute("SELECT * FROM names ORDER BY name")
        else:
            rows = self.db.execute("SELECT * FROM names WHERE image = ? ORDER BY name", (image,))
        return [NameRecord(*r) for r in rows]

    def lookup(self, name: str) -> NameRecord | None:
        row = self.db.execute("SELECT * FROM names WHERE name = ?", (name,)).fetchone()
        return NameRecord(*row) if row else None

    def untag(self, name: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM names WHERE name = ?", (name,))

    def remove_image(self, digest: str) -> None:
        """Forget an image and its names; its blobs are left to gc()."""
        with self._tx():
            self.db.execute("DELETE FROM names WHERE image = ?", (digest,))
            self.db.execute("DELETE FROM image_blobs WHERE image = ?", (digest,))
            self.db.execute("DELETE FROM images WHERE digest = ?", (digest,))

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT blob FROM image_blobs")}

    def _image(self, row) -> ImageRecord:
        digest, media_type, config, layers, _size, platform, created = row
        return ImageRecord(digest, media_type, config,
                           [Layer(d, m, s) for d, m, s in json.loads(layers)], platform,
                           created=created)

    def _tx(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
