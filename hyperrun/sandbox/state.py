"""Sandboxes and containers, persisted in SQLite so that a restarted daemon
finds them again. Their specs (hyperrun/specs.py) are kept as JSON: they are
the record of what was asked for."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperrun.db import open_db
from hyperrun.specs import ContainerSpec, PodSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id          TEXT PRIMARY KEY,
    config      BLOB NOT NULL,      -- PodSpec, JSON
    state       TEXT NOT NULL,      -- ready | notready
    created_at  INTEGER NOT NULL,   -- ns since the epoch
    vm          BLOB NOT NULL       -- JSON of the VMConfig, to re-attach
);
CREATE TABLE IF NOT EXISTS containers (
    id           TEXT PRIMARY KEY,
    sandbox_id   TEXT NOT NULL REFERENCES sandboxes(id),
    config       BLOB NOT NULL,     -- ContainerSpec, JSON
    image_ref    TEXT NOT NULL,     -- the image's manifest digest
    disk_serial  TEXT NOT NULL,
    state        TEXT NOT NULL,     -- created | running | exited | unknown
    created_at   INTEGER NOT NULL,
    started_at   INTEGER NOT NULL DEFAULT 0,
    finished_at  INTEGER NOT NULL DEFAULT 0,
    exit_code    INTEGER NOT NULL DEFAULT 0,
    reason       TEXT NOT NULL DEFAULT '',
    message      TEXT NOT NULL DEFAULT '',
    stop_signal  INTEGER NOT NULL DEFAULT 15
);
"""


@dataclass
class SandboxRow:
    id: str
    config: bytes
    state: str
    created_at: int
    vm: bytes

    @property
    def spec(self) -> PodSpec:
        return PodSpec.from_json(self.config)


@dataclass
class ContainerRow:
    id: str
    sandbox_id: str
    config: bytes
    image_ref: str
    disk_serial: str
    state: str
    created_at: int
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    stop_signal: int = 15

    @property
    def spec(self) -> ContainerSpec:
        return ContainerSpec.from_json(self.config)


class State:
    def __init__(self, path: Path) -> None:
        self.db = open_db(path, SCHEMA)

    def close(self) -> None:
        self.db.close()

    # sandboxes
    def add_sandbox(self, row: SandboxRow) -> None:
        self.db.execute("INSERT INTO sandboxes VALUES (?, ?, ?, ?, ?)",
                        (row.id, row.config, row.state, row.created_at, row.vm))

    def set_sandbox_state(self, sandbox_id: str, state: str) -> None:
        self.db.execute("UPDATE sandboxes SET state = ? WHERE id = ?", (state, sandbox_id))

    def set_sandbox_config(self, sandbox_id: str, config: bytes) -> None:
        self.db.execute("UPDATE sandboxes SET config = ? WHERE id = ?", (config, sandbox_id))

    def set_sandbox_vm(self, sandbox_id: str, vm: bytes) -> None:
        self.db.execute("UPDATE sandboxes SET vm = ? WHERE id = ?", (vm, sandbox_id))

    def sandbox(self, sandbox_id: str) -> SandboxRow | None:
        row = self.db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return SandboxRow(*row) if row else None

    def sandboxes(self) -> list[SandboxRow]:
        return [SandboxRow(*r) for r in self.db.execute("SELECT * FROM sandboxes ORDER BY created_at")]

    def remove_sandbox(self, sandbox_id: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM containers WHERE sandbox_id = ?", (sandbox_id,))
        self.db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
        self.db.execute("COMMIT")

    # containers
    def add_container(self, row: ContainerRow) -> None:
        self.db.execute("INSERT INTO containers (id, sandbox_id, config, image_ref, disk_serial, "
                        "state, created_at, stop_signal) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (row.id, row.sandbox_id, row.config, row.image_ref, row.disk_serial,
                         row.state, row.created_at, row.stop_signal))

    def update_container(self, container_id: str, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE containers SET {cols} WHERE id = ?", (*values.values(), container_id))

    def container(self, container_id: str) -> ContainerRow | None:
        row = self.db.execute("SELECT * FROM containers WHERE id = ?", (container_id,)).fetchone()
        return ContainerRow(*row) if row else None

    def containers(self, sandbox_id: str | None = None) -> list[ContainerRow]:
        if sandbox_id is None:
            rows = self.db.execute("SELECT * FROM containers ORDER BY created_at")
        else:
            rows = self.db.execute("SELECT * FROM containers WHERE sandbox_id = ? ORDER BY created_at",
                                   (sandbox_id,))
        return [ContainerRow(*r) for r in rows]

    def remove_container(self, container_id: str) -> None:
        self.db.execute("DELETE FROM containers WHERE id = ?", (container_id,))
