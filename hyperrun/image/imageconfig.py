"""An image's config applied to a container's process, as Docker does:
Entrypoint + Cmd (with --entrypoint and a user command overriding),
Env (user values override by key), WorkingDir, User, StopSignal."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

from hyperrun import errdefs


class ImageConfigError(ValueError, errdefs.Invalid):
    pass


@dataclass
class Overrides:
    args: list[str] = field(default_factory=list)     # the user's command, if any
    entrypoint: list[str] | None = None               # --entrypoint (replaces, resets Cmd)
    env: list[str] = field(default_factory=list)      # KEY=VALUE, win over the image's
    workdir: str = ""
    user: str = ""


@dataclass
class ProcessDefaults:
    args: list[str]
    env: list[str]
    cwd: str
    user: str
    stop_signal: int


def parse_signal(name: str | int | None) -> int:
    """"SIGTERM", "TERM", "15" -> 15; empty -> SIGTERM."""
    if name in (None, ""):
        return signal.SIGTERM
    if isinstance(name, int) or str(name).isdigit():
        if not str(name).isascii() or not 0 < int(name) <= signal.SIGRTMAX:
            raise ImageConfigError(f"stop signal {name!r} is not a signal number")
        return int(name)
    upper = str(name).upper()
    upper = upper if upper.startswith("SIG") else "SIG" + upper
    try:
        return signal.Signals[upper].value
    except KeyError:
        raise ImageConfigError(f"unknown stop signal {name!r}") from None


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        key, sep, value = item.partition("=")
        merged[key] = item if sep else f"{key}="
    return list(merged.values())


def _strings(cfg: dict, key: str) -> list[str]:
    """A list-of-strings field of a registry's config, checked: its JSON
    comes from outside."""
    value = cfg.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageConfigError(f"image config {key} is not a list of strings")
    return list(value)


def _string(cfg: dict, key: str) -> str:
    value = cfg.get(key) or ""
    if not isinstance(value, str):
        raise ImageConfigError(f"image config {key} is not a string")
    return value


def apply(image_config: dict, o: Overrides) -> ProcessDefaults:
    cfg = image_config.get("config") if isinstance(image_config, dict) else None
    cfg = cfg or {}
    if not isinstance(cfg, dict):
        raise ImageConfigError("image config: its config is not an object")
    entrypoint = o.entrypoint if o.entrypoint is not None else _strings(cfg, "Entrypoint")
    # Docker: --entrypoint resets the image's Cmd; a user command replaces it.
    cmd = o.args or ([] if o.entrypoint is not None else _strings(cfg, "Cmd"))
    args = [a for a in entrypoint if a != ""] + cmd if entrypoint != [""] else cmd
    if not args:
        raise ImageConfigError("no command: the image has no Entrypoint or Cmd and none was given")
    return ProcessDefaults(
        args=args,
        env=merge_env(_strings(cfg, "Env"), o.env),
        cwd=o.workdir or _string(cfg, "WorkingDir") or "/",
        user=o.user or _string(cfg, "User"),
        stop_signal=parse_signal(_string(cfg, "StopSignal")),
    )
