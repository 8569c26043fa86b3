"""The CLI's requests: a CLI command done by the daemon for the CLI, over one
unix-socket connection (the daemon's side is hyperrun/api/cli_server.py): `run
IMAGE` and `exec`, `ps`, `pods`, `logs`, `stop` and `rm`, and `pull`,
`images` and `rmi`.

Why not the CRI, as every other command: a CLI that speaks gRPC imports
grpc and the CRI's messages (~55 ms) and the websocket client (~45 ms)
before it can send anything, then spends a round trip on each of ten RPCs;
for a run from a pool (~250 ms in all) that was a third. This client
imports nothing but the standard library's socket, json and struct, and
the daemon does the CRI steps in its own process. Docker's CLI talks to
dockerd the same way: one request, the output multiplexed back.

The daemon also does what the CLI could not: it reads the containers'
logs (root's files) and removes a run's log directory, for a member of
its socket's group too.

The wire is frames of a 5-byte header (kind, payload length) and a
payload. The CLI sends RUN first (its options as JSON), then STDIN,
STDIN_CLOSE, RESIZE and STOP as they happen; the daemon sends NOTICE
lines, STARTED once the container runs, STDOUT and STDERR, and one EXIT
last (JSON: the exit code, or an error and its code, or the container
of a detached run). The other commands send their request first too
(LOGS, LIST, STOP_CONTAINERS, REMOVE_CONTAINERS, PULL, REMOVE_IMAGES,
INSPECT) and
get STDOUT and STDERR lines and EXIT back (LIST: its rows in EXIT; PULL:
the image's digest). This module is import-light: the CLI loads it
first.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

from hyperrun import exitcodes

RUN_LABEL = "io.hyperrun.run"  # a container `hyperrun run` made, in its own pod

HEADER = struct.Struct(">BI")
MAX_FRAME = 1 << 20  # a frame's payload; output comes in 64 KiB reads

# The CLI's frames. A request starts with one of these:
RUN = ord("R")          # JSON: RunOptions
EXEC = ord("E")         # JSON: ExecOptions
LOGS = ord("L")         # JSON: LogsOptions
LIST = ord("P")         # JSON: ListOptions
STOP_CONTAINERS = ord("T")    # JSON: NamesOptions
REMOVE_CONTAINERS = ord("D")  # JSON: NamesOptions
PULL = ord("U")         # JSON: PullOptions
REMOVE_IMAGES = ord("M")      # JSON: NamesOptions
INSPECT = ord("I")      # JSON: NamesOptions (containers)
# then, in a run or an exec:
STDIN = ord("i")
STDIN_CLOSE = ord("c")
RESIZE = ord("z")       # JSON: {"rows": n, "cols": n}
STOP = ord("s")         # stop the container (its stop signal, then SIGKILL)
# The daemon's frames.
NOTICE = ord("n")       # a line for the user's stderr
PROGRESS = ord("p")     # JSON: a pull's progress, one call of image/progress.PullProgress:
                        # {"op": "start" | "advance" | "finish", its arguments}
STARTED = ord("S")
STDOUT = ord("o")
STDERR = ord("e")
EXIT = ord("x")         # JSON: {"code": n} | {"error": text, "code": n} | {"container": id}
                        # | {"code": 0, "rows": [...]} | {"code": 0, "digest": d}


class ProtocolError(Exception):
    pass


class _Request:
    """What a request's first frame asks for (a dataclass below), as JSON."""
    FIELDS: ClassVar[dict]  # each field's type, checked on arrival (see _is)
    stdin = tty = False     # fields of the requests that run a process
    console = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes):
        """The options a CLI sent, each of its type (the daemon trusts
        nothing else about them)."""
        try:
            opts = cls(**json.loads(data))
        except (ValueError, TypeError, RecursionError) as exc:
            raise ProtocolError(f"bad request: {exc}") from None
        for name, kind in cls.FIELDS.items():
            value = getattr(opts, name)
            if not _is(value, kind):
                raise ProtocolError(f"bad request: {name}={value!r:.80}")
        if opts.console is not None:
            opts.console = tuple(opts.console)
        return opts

    @property
    def console_size(self) -> tuple[int, int] | None:
        """-t's terminal (rows, cols) from the start, where it has one."""
        return self.console if self.tty and self.console and all(self.console) else None


@dataclass
class RunOptions(_Request):
    """What `hyperrun run IMAGE` (or `run --rootfs DIR`) was asked to do
    (Docker's options)."""
    image: str                      # empty with rootfs
    args: list[str]
    rootfs: str = ""                # an absolute host directory as the root
    name: str = ""                  # --name: the container's (and its pod's), unique
    direct: bool = False            # the image's program as the VM's init (no agent)
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)       # KEY=VALUE, resolved by the CLI
    workdir: str = ""
    user: str = ""
    stdin: bool = False
    tty: bool = False
    hostname: str = ""
    readonly: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)  # Docker's: seccomp=, no-new-privileges
    ulimits: list[str] = field(default_factory=list)       # NAME=SOFT[:HARD], Docker's
    volumes: list[str] = field(default_factory=list)   # HOST:CONTAINER[:ro]
    platform: str = "linux/amd64"
    pull: str = "missing"                              # missing | always | never
    cpus: int | None = None         # a limit only where given, as Docker's
    memory_mib: int | None = None
    remove: bool = False
    detach: bool = False
    ports: list[str] = field(default_factory=list)     # [HOSTIP:]HOSTPORT:PORT[/PROTO]
    network: str = "auto"
    console: tuple[int, int] | None = None  # -t: the terminal's rows and cols at the start
    progress: bool = False          # a pull's progress wanted (the CLI's stderr is a terminal)
    labels: dict[str, str] = field(default_factory=dict)  # the pod's and container's (compose's)
    restart: str = "no"             # no | always | on-failure[:N] | unless-stopped
    healthcheck: dict | None = None  # test, interval_s, timeout_s, retries, start_period_s

    FIELDS: ClassVar[dict] = {
        "labels": "strdict", "restart": str, "healthcheck": "dict?",
        "image": str, "args": "strs", "rootfs": str, "name": str, "direct": bool, "entrypoint": "strs?", "env": "strs",
        "workdir": str, "user": str, "stdin": bool, "tty": bool, "hostname": str, "readonly": bool,
        "cap_add": "strs", "cap_drop": "strs", "security_opt": "strs", "ulimits": "strs",
        "volumes": "strs", "platform": str, "pull": str, "cpus": "int?", "memory_mib": "int?",
        "remove": bool, "detach": bool, "ports": "strs", "network": str, "console": "size?",
        "progress": bool}


@dataclass
class ExecOptions(_Request):
    """What `hyperrun exec CONTAINER CMD` was asked to do."""
    container: str                  # an id or a unique prefix of one
    cmd: list[str]
    stdin: bool = False
    tty: bool = False
    console: tuple[int, int] | None = None

    FIELDS: ClassVar[dict] = {"container": str, "cmd": "strs", "stdin": bool, "tty": bool,
                              "console": "size?"}


@dataclass
class LogsOptions(_Request):
    """`hyperrun logs [-f] [--tail N] [-t] CONTAINER`."""
    container: str
    follow: bool = False
    tail: int | None = None   # only the last lines
    timestamps: bool = False  # each line after the time it was written

    FIELDS: ClassVar[dict] = {"container": str, "follow": bool, "tail": "int?",
                              "timestamps": bool}


LISTS = ("containers", "pods", "images", "stats")


@dataclass
class ListOptions(_Request):
    """`hyperrun ps [-a]`, `hyperrun pods`, `hyperrun images` or `hyperrun
    stats`: what (one of LISTS), all (containers that are not running too)."""
    what: str = "containers"
    all: bool = False

    FIELDS: ClassVar[dict] = {"what": str, "all": bool}


@dataclass
class NamesOptions(_Request):
    """`hyperrun stop [-t N]` or `hyperrun rm` of these containers, or
    `hyperrun rmi` of these images."""
    names: list[str]
    timeout: int = 10   # stop's
    force: bool = False  # rm's: a running container is killed first

    FIELDS: ClassVar[dict] = {"names": "strs", "timeout": int, "force": bool}


@dataclass
class PullOptions(_Request):
    """`hyperrun pull IMAGE`."""
    image: str
    platform: str = "linux/amd64"
    progress: bool = False

    FIELDS: ClassVar[dict] = {"image": str, "platform": str, "progress": bool}


def _is(value, kind) -> bool:
    if kind == "strdict":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in value.items())
    if kind == "dict?":
        return value is None or isinstance(value, dict)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "strs?":
        return value is None or _is(value, "strs")
    if kind == "int?":
        return value is None or (type(value) is int and 0 <= value < 1 << 31)
    if kind == "size?":
        return value is None or (isinstance(value, list) and len(value) == 2 and
                                 all(type(v) is int and 0 <= v < 1 << 16 for v in value))
    return type(value) is kind


class RunError(Exception):
    """A run that failed before or instead of its container's exit, with
    Docker's exit code for it."""

    def __init__(self, message: str, code: int = exitcodes.RUNTIME_ERROR) -> None:
        super().__init__(message)
        self.code = code


def socket_path(cri_socket: Path) -> Path:
    """The daemon's CLI socket, beside its CRI socket."""
    return cri_socket.with_name(f"{cri_socket.stem}-run{cri_socket.suffix}")


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes")
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: int, value) -> bytes:
    return frame(kind, json.dumps(value).encode())


def parse_header(header: bytes) -> tuple[int, int]:
    kind, length = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes")
    return kind, length


async def read_frame(reader) -> tuple[int, bytes] | None:
    """The next frame from an asyncio StreamReader; None at end of stream."""
    try:
        kind, length = parse_header(await reader.readexactly(HEADER.size))
        return kind, await reader.readexactly(length)
    except EOFError:  # asyncio.IncompleteReadError is one
        return None


class FrameReader:
    """Frames from a blocking socket (the CLI's side)."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            data = self.sock.recv(65536 + HEADER.size)
            if not data:
                return False
            self.buffer += data
        return True

    def next(self) -> tuple[int, bytes] | None:
        """The next frame; None at end of stream (a frame cut short too)."""
        if not self._fill(HEADER.size):
            return None
        kind, length = parse_header(bytes(self.buffer[:HEADER.size]))
        if not self._fill(HEADER.size + length):
            return None
        payload = bytes(self.buffer[HEADER.size:HEADER.size + length])
        del self.buffer[:HEADER.size + length]
        return kind, payload
