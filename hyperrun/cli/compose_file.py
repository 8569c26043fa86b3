"""A compose file as a project: parsed (PyYAML's safe loader) and checked,
for the single-host subset `hyperrun compose` runs. No I/O but reading the
compose file, its `.env` and the services' env_files; what the project
asks of the daemon is hyperrun/cli/compose.py's.

The subset: services with image, command, entrypoint, environment (list
or mapping), env_file, ports, volumes (host paths, relative to the file's
directory, and named volumes declared at the top), depends_on (list, or
mapping with condition service_started / service_healthy), restart and
healthcheck; top-level name, services, volumes (and version, ignored);
`x-` extensions anywhere they may be. Anything else is refused by its
key's path ("services.web.build: not supported"). Values take the
variables of the environment and of `.env` beside the file (${VAR},
${VAR:-default}, ${VAR-default}, $VAR, $$).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
SERVICE_KEYS = ("image", "command", "entrypoint", "environment", "env_file", "ports", "volumes",
                "depends_on", "restart", "healthcheck")
TOP_KEYS = ("name", "version", "services", "volumes")
CONDITIONS = ("service_started", "service_healthy")
RESTARTS = ("no", "always", "on-failure", "unless-stopped")
HEALTH_DEFAULTS = {"interval": 30.0, "timeout": 30.0, "retries": 3, "start_period": 0.0}
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|"
                  r"([A-Za-z_][A-Za-z0-9_]*))")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")


class ComposeError(Exception):
    """The file cannot be run as it is: the message names the key."""


@dataclass
class Healthcheck:
    test: list[str]          # the command exec'd in the container (CMD-SHELL as sh -c)
    interval_s: float = 30.0
    timeout_s: float = 30.0
    retries: int = 3
    start_period_s: float = 0.0

    def to_dict(self) -> dict:
        return {"test": self.test, "interval_s": self.interval_s, "timeout_s": self.timeout_s,
                "retries": self.retries, "start_period_s": self.start_period_s}


@dataclass
class Volume:
    source: str       # an absolute host path (bind) or the project's volume name (volume)
    target: str
    kind: str         # "bind" | "volume"
    readonly: bool = False


@dataclass
class Service:
    name: str
    image: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: list[str] = field(default_factory=list)  # KEY=VALUE
    ports: list[str] = field(default_factory=list)        # [HOSTIP:]HOSTPORT:PORT[/PROTO]
    volumes: list[Volume] = field(default_factory=list)
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition
    restart: str = "no"
    healthcheck: Healthcheck | None = None


@dataclass
class Project:
    name: str
    directory: Path
    services: dict[str, Service]
    volumes: list[str]

    def container_name(self, service: str) -> str:
        """Compose's name of a service's (one) container."""
        return f"{self.name}-{service}-1"

    def volume_name(self, volume: str) -> str:
        return f"{self.name}_{volume}"

    def order(self, only: list[str] | None = None) -> list[str]:
        """Services in start order (each after what it depends on); with
        only, those and what they depend on."""
        wanted = set(self.services) if not only else set()
        for name in only or ():
            if name not in self.services:
                raise ComposeError(f"no such service: {name}")
            wanted |= self._closure(name)
        out: list[str] = []
        for name in self.services:  # checked acyclic at load
            self._visit(name, out)
        return [n for n in out if n in wanted]

    def _closure(self, name: str) -> set[str]:
        found = {name}
        for dep in self.services[name].depends_on:
            found |= self._closure(dep)
        return found

    def _visit(self, name: str, out: list[str], path: tuple[str, ...] = ()) -> None:
        if name in path:
            raise ComposeError("depends_on: a cycle: " + " -> ".join((*path, name)))
        if name in out:
            return
        for dep in self.services[name].depends_on:
            self._visit(dep, out, (*path, name))
        out.append(name)


def find(file: str | None, cwd: Path | None = None) -> Path:
    """-f FILE, else the first of compose.yaml and its other names in cwd."""
    cwd = cwd or Path.cwd()
    if file:
        return (cwd / file).resolve()
    for name in DEFAULT_FILES:
        if (cwd / name).is_file():
            return (cwd / name).resolve()
    raise ComposeError(f"no compose file in {cwd} (one of {', '.join(DEFAULT_FILES)}; or -f)")


def load(path: Path, project: str | None = None, environ: dict[str, str] | None = None
         ) -> Project:
    """The project of the compose file at path (-p project, else its
    `name:`, else its directory's name)."""
    import yaml

    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ComposeError(f"{path}: {exc.strerror}") from None
    env = {**dotenv(path.parent / ".env", must_exist=False), **(os.environ if environ is None
                                                               else environ)}
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ComposeError(f"{path}: a compose file is a mapping")
    doc = _interpolate(doc, env, "")
    _known(doc, TOP_KEYS, "")
    volumes = _volumes_declared(doc.get("volumes"))
    services_doc = doc.get("services")
    if not isinstance(services_doc, dict) or not services_doc:
        raise ComposeError("services: a mapping of at least one service is needed")
    name = project or doc.get("name") or path.parent.name
    name = re.sub(r"[^a-z0-9_-]", "", str(name).lower())
    if not name or not name[0].isalnum():
        raise ComposeError(f"project name {project or path.parent.name!r}: it must start with "
                           "a letter or digit (-p NAME)")
    services = {}
    for key, body in services_doc.items():
        services[str(key)] = _service(str(key), body, path.parent, volumes, env)
    result = Project(name, path.parent, services, volumes)
    for service in services.values():
        for dep in service.depends_on:
            if dep not in services:
                raise ComposeError(f"services.{service.name}.depends_on: no service {dep!r}")
    result.order()  # refuses a cycle
    return result


def _known(doc: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in doc:
        if not (isinstance(key, str) and (key in allowed or key.startswith("x-"))):
            raise ComposeError(f"{where}{key}: not supported")


def _volumes_declared(doc) -> list[str]:
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ComposeError("volumes: a mapping of volume names")
    for name, body in doc.items():
        if not _NAME.fullmatch(str(name)):
            raise ComposeError(f"volumes.{name}: not a volume name")
        if body not in (None, {}):
            key = next(iter(body)) if isinstance(body, dict) else ""
            raise ComposeError(f"volumes.{name}.{key}: not supported (a local directory of the "
                               "daemon's only)")
    return [str(n) for n in doc]


def _service(name: str, body, directory: Path, volumes: list[str], env: dict) -> Service:
    where = f"services.{name}."
    if not _NAME.fullmatch(name):
        raise ComposeError(f"services.{name}: not a service name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")
    if not isinstance(body, dict):
        raise ComposeError(f"services.{name}: a mapping")
    _known(body, SERVICE_KEYS, where)
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise ComposeError(f"{where}image: needed (build is not supported)")
    environment = []
    for file in _list(body.get("env_file", []), where + "env_file"):
        environment += [f"{k}={v}" for k, v in dotenv(directory / file).items()]
    environment += _environment(body.get("environment", []), where + "environment", env)
    return Service(
        name=name, image=image,
        command=_command(body.get("command"), where + "command"),
        entrypoint=_command(body.get("entrypoint"), where + "entrypoint"),
        environment=_last_wins(environment),
        ports=[_port(p, f"{where}ports") for p in _list(body.get("ports", []), where + "ports",
                                                         scalars=(str, int, dict))],
        volumes=[_volume(v, f"{where}volumes", directory, volumes)
                 for v in _list(body.get("volumes", []), where + "volumes", scalars=(str, dict))],
        depends_on=_depends_on(body.get("depends_on", []), where + "depends_on"),
        restart=_restart(body.get("restart", "no"), where + "restart"),
        healthcheck=_healthcheck(body.get("healthcheck"), where + "healthcheck"))


def _list(value, where: str, scalars: tuple = (str,)) -> list:
    if isinstance(value, str) and str in scalars:
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, scalars) and v is not True
                                              and v is not False for v in value):
        raise ComposeError(f"{where}: a list")
    return value


def _command(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ComposeError(f"{where}: {exc}") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ComposeError(f"{where}: a string or a list of strings")


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _environment(value, where: str, env: dict) -> list[str]:
    """Both forms; a name with no value takes the caller's, or is left out
    (as compose does)."""
    items: list[tuple[str, str | None]] = []
    if isinstance(value, dict):
        items = [(str(k), None if v is None else _scalar(v)) for k, v in value.items()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        for item in value:
            key, eq, val = item.partition("=")
            items.append((key, val if eq else None))
    else:
        raise ComposeError(f"{where}: a list of KEY=VALUE or a mapping")
    out = []
    for key, val in items:
        if not key or "=" in key:
            raise ComposeError(f"{where}: {key!r} is not a variable's name")
        if val is None:
            val = env.get(key)
            if val is None:
                continue
        out.append(f"{key}={val}")
    return out


def _last_wins(items: list[str]) -> list[str]:
    found: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        found.pop(key, None)
        found[key] = value
    return [f"{k}={v}" for k, v in found.items()]


def dotenv(path: Path, must_exist: bool = True) -> dict[str, str]:
    """An env file: KEY=VALUE lines, # comments, quotes around a value
    taken off."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        if not must_exist:
            return {}
        raise ComposeError(f"env_file {path}: {exc.strerror}") from None
    out = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ComposeError(f"{path}:{number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def _port(value, where: str) -> str:
    if isinstance(value, dict):
        _known(value, ("target", "published", "host_ip", "protocol"), where + ".")
        if "published" not in value or "target" not in value:
            raise ComposeError(f"{where}: target and published are needed")
        host_ip = f"{value['host_ip']}:" if value.get("host_ip") else ""
        value = f"{host_ip}{value['published']}:{value['target']}/{value.get('protocol', 'tcp')}"
    text = str(value)
    spec, _, proto = text.partition("/")
    parts = spec.rsplit(":", 2)
    if len(parts) < 2:
        raise ComposeError(f"{where}: {text!r}: a host port is needed (HOSTPORT:PORT): "
                           "ports chosen by the runtime are not supported")
    if any("-" in p for p in parts[-2:]):
        raise ComposeError(f"{where}: {text!r}: port ranges are not supported")
    if not (parts[-2].isdigit() and parts[-1].isdigit()) or proto not in ("", "tcp", "udp"):
        raise ComposeError(f"{where}: {text!r}: expected [HOSTIP:]HOSTPORT:PORT[/tcp|udp]")
    return text


def _volume(value, where: str, directory: Path, declared: list[str]) -> Volume:
    if isinstance(value, dict):
        _known(value, ("type", "source", "target", "read_only"), where + ".")
        kind, source, target = value.get("type"), value.get("source"), value.get("target")
        if kind not in ("bind", "volume") or not source or not target:
            raise ComposeError(f"{where}: type bind or volume, with a source and a target")
        readonly = bool(value.get("read_only", False))
        source, target = str(source), str(target)
    else:
        parts = value.split(":")
        if len(parts) == 1:
            raise ComposeError(f"{where}: {value!r}: anonymous volumes are not supported "
                               "(SOURCE:TARGET)")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ComposeError(f"{where}: {value!r}: expected SOURCE:TARGET[:ro|rw]")
        source, target = parts[0], parts[1]
        readonly = len(parts) == 3 and parts[2] == "ro"
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    if not target.startswith("/"):
        raise ComposeError(f"{where}: {target!r}: the target must be an absolute path")
    if kind == "bind":
        source = str((directory / os.path.expanduser(source)).resolve())
    elif source not in declared:
        raise ComposeError(f"{where}: volume {source!r} is not declared in the top-level "
                           "volumes")
    return Volume(source, target, kind, readonly)


def _depends_on(value, where: str) -> dict[str, str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict.fromkeys(value, "service_started")
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: a list of services or a mapping")
    out = {}
    for name, body in value.items():
        body = body or {}
        if not isinstance(body, dict):
            raise ComposeError(f"{where}.{name}: a mapping")
        _known(body, ("condition", "required", "restart"), f"{where}.{name}.")
        condition = body.get("condition", "service_started")
        if condition not in CONDITIONS:
            raise ComposeError(f"{where}.{name}.condition: {condition} is not supported "
                               f"({' or '.join(CONDITIONS)})")
        out[str(name)] = condition
    return out


def _restart(value, where: str) -> str:
    text = "no" if value is False else str(value)
    policy, _, count = text.partition(":")
    if policy not in RESTARTS or (count and (policy != "on-failure" or not count.isdigit())):
        raise ComposeError(f"{where}: {text!r}: one of no, always, on-failure[:N], "
                           "unless-stopped")
    return text


def duration(value, where: str) -> float:
    """Compose's durations: 1m30s, 500ms, 10s; a bare number is seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ComposeError(f"{where}: {text!r} is not a duration (as 1m30s, 10s, 500ms)")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _healthcheck(value, where: str) -> Healthcheck | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: a mapping")
    _known(value, ("test", "interval", "timeout", "retries", "start_period", "disable"),
           where + ".")
    if value.get("disable"):
        return None
    test = value.get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not (isinstance(test, list) and test and all(isinstance(t, str) for t in test)):
        raise ComposeError(f"{where}.test: a string or a list")
    if test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL" and len(test) == 2:
        command = ["/bin/sh", "-c", test[1]]
    elif test[0] == "CMD" and len(test) > 1:
        command = test[1:]
    else:
        raise ComposeError(f"{where}.test: [\"CMD\", ...], [\"CMD-SHELL\", \"...\"] or a string")
    retries = value.get("retries", HEALTH_DEFAULTS["retries"])
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
        raise ComposeError(f"{where}.retries: a number of at least 1")
    times = {key: duration(value.get(key, HEALTH_DEFAULTS[key]), f"{where}.{key}")
             for key in ("interval", "timeout", "start_period")}
    if times["interval"] <= 0 or times["timeout"] <= 0:
        raise ComposeError(f"{where}: interval and timeout must be above 0")
    return Healthcheck(command, times["interval"], times["timeout"], retries,
                       times["start_period"])


def _interpolate(value, env: dict, where: str):
    """Variables in every string value (keys are left as they are)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise ComposeError(f"{where.rstrip('.')}: ${{{name}}}: {arg or 'not set'}")
            return arg
        return current or ""
    return _VAR.sub(sub, value)
