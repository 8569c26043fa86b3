"""The daemon's own log, with structlog: JSON lines to a file (for
machines), key=value lines on a terminal (for people).

structlog (with rich, which its console renderer loads) takes 40-80 ms to
import: it is loaded at the first message, not at setup or at a module's
`log.get`. A run without a daemon then starts its VM before it pays for it
(the import overlaps the guest's boot). Below the level setup() was
given, a message costs nothing: structlog is not loaded for it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

_target: list[Path | None] = []  # setup()'s choice, until the first message configures it
_configured = False
_level = logging.INFO
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR}


def setup(path: Path | None, level: int = logging.INFO) -> None:
    """path: a file for JSON lines, None for the terminal; level: the
    least a message must be to be written."""
    global _configured, _level
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    _target[:] = [path]
    _configured = False
    _level = level


def is_set_up() -> bool:
    return bool(_target)


def _configure() -> None:
    global _configured
    import structlog

    _configured = True
    if not _target:
        return  # structlog's defaults (a tool that set up no log)
    path = _target[0]
    processors = [structlog.processors.add_log_level,
                  structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if path is not None:
        out = open(path, "a", buffering=1)
        renderer = structlog.processors.JSONRenderer()
    else:
        out = sys.stderr
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(processors=processors + [renderer],
                        logger_factory=structlog.PrintLoggerFactory(out),
                        wrapper_class=structlog.make_filtering_bound_logger(_level),
                        cache_logger_on_first_use=True)


class _Logger:
    """A named logger; structlog is loaded (and set up) at its first use."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str):
        if _LEVELS.get(attr, _level) < _level:
            return _dropped
        if not _configured:
            _configure()
        import structlog

        return getattr(structlog.get_logger(self.name), attr)


def _dropped(*args, **kw) -> None:
    pass


def get(name: str) -> _Logger:
    return _Logger(name)
