"""A pull's progress: the interface the puller reports to
(`distribution.py`), a null one, and the terminal's (rich). Apart from the
puller so that the CLI can show a daemon's pull without importing it."""
from __future__ import annotations

from typing import Any, Protocol


class PullProgress(Protocol):
    def start(self, digest: str, total: int, done: int = 0) -> None: ...
    def advance(self, digest: str, n: int) -> None: ...
    def finish(self, digest: str, skipped: bool = False) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def start(self, digest: str, total: int, done: int = 0) -> None:
        pass

    def advance(self, digest: str, n: int) -> None:
        pass

    def finish(self, digest: str, skipped: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """Bytes per layer on the terminal (stderr), with rich."""

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TransferSpeedColumn)

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(),
                                  console=console or Console(stderr=True))
        self._tasks: dict[str, Any] = {}
        self._started = False

    def _task(self, digest: str, total: int):
        if not self._started:
            self._progress.start()
            self._started = True
        if digest not in self._tasks:
            self._tasks[digest] = self._progress.add_task(digest.split(":")[-1][:12], total=total)
        return self._tasks[digest]

    def start(self, digest: str, total: int, done: int = 0) -> None:
        self._progress.update(self._task(digest, total), total=total, completed=done)

    def advance(self, digest: str, n: int) -> None:
        if digest in self._tasks:
            self._progress.advance(self._tasks[digest], n)

    def finish(self, digest: str, skipped: bool = False) -> None:
        if skipped:
            task = self._task(digest, 1)
            self._progress.update(task, completed=1, total=1,
                                  description=digest.split(":")[-1][:12] + " (present)")
        elif digest in self._tasks:
            task = self._tasks[digest]
            self._progress.update(task, completed=self._progress.tasks[task].total)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False
