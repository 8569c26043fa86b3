"""The daemon's own log, with structlog: JSON lines to a file (for
machines), key=value lines on a terminal (for people)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def setup(path: Path | None) -> None:
    processors = [structlog.processors.add_log_level,
                  structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "a", buffering=1)
        renderer = structlog.processors.JSONRenderer()
    else:
        out = sys.stderr
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(processors=processors + [renderer],
                        logger_factory=structlog.PrintLoggerFactory(out),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        cache_logger_on_first_use=True)


def get(name: str):
    return structlog.get_logger(name)
