"""What a pod and its containers are asked to be, in the project's own
terms: the core takes these, whoever asks (the CRI's servicers translate
its messages into them, the CLI's commands fill them in directly). They
are the record of what was asked for: kept as JSON with each pod and
container, and shown back (CRI statuses, `ps`, `inspect`) from there.

A leaf: every layer may import it (the network's port mappings are
these), and it imports only the standard library.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# A compose project's pods and containers carry Docker's compose labels; the
# pods' name server answers a service's name among its project's pods.
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


@dataclass(frozen=True)
class PortMapping:
    """A host port forwarded to the pod (CNI's portMappings capability,
    QEMU's user-mode hostfwd)."""
    host_port: int
    container_port: int
    protocol: str = "tcp"       # tcp | udp | sctp
    host_ip: str = ""

    def to_cni(self) -> dict:
        d = {"hostPort": self.host_port, "containerPort": self.container_port,
             "protocol": self.protocol.lower()}
        if self.host_ip:
            d["hostIP"] = self.host_ip
        return d


@dataclass(frozen=True)
class Mount:
    """A host path bound into a container."""
    host_path: str
    container_path: str
    readonly: bool = False
    propagation: str = "private"   # private | rslave | rshared (the CRI's)


@dataclass(frozen=True)
class DNS:
    """The pod's resolv.conf; empty: the network's default servers."""
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.servers or self.searches or self.options)


@dataclass(frozen=True)
class Resources:
    """A container's limits (OCI's, as cgroup v2 takes them in the guest).
    0 or empty: no limit."""
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_bytes: int = 0
    memory_swap_limit_bytes: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    unified: dict[str, str] = field(default_factory=dict)

    @property
    def cpus(self) -> float:
        return self.cpu_quota / self.cpu_period if self.cpu_quota > 0 and self.cpu_period > 0 else 0


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str = ""
    uid: str = ""
    attempt: int = 0
    hostname: str = ""            # empty: the name, cut to a valid hostname
    log_directory: str = ""       # its containers' log paths are relative to it
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    network: str = ""             # cni | user | none; empty: the daemon's
    host_network: bool = False    # the node's network asked for: a VM cannot (podnet)
    ports: tuple[PortMapping, ...] = ()
    dns: DNS = DNS()
    sysctls: dict[str, str] = field(default_factory=dict)
    # What its containers may use together: the VM is sized from it
    # (config.vm_size).
    cpus: float = 0
    memory_limit_bytes: int = 0
    overhead_memory_bytes: int = 0
    # The VM's init: the agent, which runs containers (crun); or "program":
    # the one container's own program, with no agent (direct mode,
    # sandbox/direct.py).
    init: str = "agent"

    def to_json(self) -> bytes:
        return _dump(self)

    @property
    def direct(self) -> bool:
        return self.init == "program"

    @classmethod
    def from_json(cls, data: bytes) -> PodSpec:
        d = json.loads(data)
        d["ports"] = tuple(PortMapping(**p) for p in d.get("ports", ()))
        d["dns"] = DNS(**{k: tuple(v) for k, v in d.get("dns", {}).items()})
        return cls(**d)

    def pod_hostname(self) -> str:
        """Its hostname, or its name cut to a valid hostname (63 bytes:
        sethostname refuses more; pod names can be longer)."""
        if self.hostname:
            return self.hostname
        cut = self.name.encode()[:63].decode(errors="ignore")  # bytes, not characters
        return cut.rstrip("-.") or "pod"


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str                    # the reference as asked; empty with rootfs
    attempt: int = 0
    # A host directory as the root instead of an image (podman's --rootfs),
    # shared into the VM and written through.
    rootfs: str = ""
    command: tuple[str, ...] | None = None   # replaces the image's entrypoint
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()     # KEY=VALUE, over the image's
    workdir: str = ""
    user: str = ""                # Docker's -u: name|uid[:group|gid], resolved in the image
    groups: tuple[int, ...] = ()  # supplementary gids
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    mounts: tuple[Mount, ...] = ()
    log_path: str = ""            # relative to the pod's log directory
    readonly_rootfs: bool = False
    privileged: bool = False
    add_capabilities: tuple[str, ...] = ()   # to Docker's default set ("ALL": every one)
    drop_capabilities: tuple[str, ...] = ()  # from it ("ALL": all of it)
    # Whose PID and IPC namespaces (the CRI's modes): "container", "pod"
    # (shared by the pod's containers), "node" (the guest's: the pod's
    # host), or for PID "target:<container id>".
    pid: str = "container"
    ipc: str = "pod"
    no_new_privileges: bool = False
    # "unconfined" (no filter), "runtime/default", or "localhost/<profile
    # file on the host>" (read at create), as the CRI's and Docker's.
    seccomp: str = "unconfined"
    masked_paths: tuple[str, ...] = ()    # instead of Docker's (empty: those)
    # RLIMIT_* -> (soft, hard), over the default (RLIMIT_NOFILE 1048576).
    ulimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    readonly_paths: tuple[str, ...] = ()
    resources: Resources = Resources()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    # A tty's (rows, cols) from its start: the CRI has none (a kubelet
    # resizes after), `hyperrun run -t` knows its terminal's.
    console_size: tuple[int, int] | None = None

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, data: bytes) -> ContainerSpec:
        d = json.loads(data)
        if "host_pid" in d:  # a record of an earlier daemon
            d["pid"] = "node" if d.pop("host_pid") else "container"
        for key in ("args", "env", "groups", "add_capabilities", "drop_capabilities",
                    "masked_paths", "readonly_paths"):
            d[key] = tuple(d.get(key, ()))
        if d.get("command") is not None:
            d["command"] = tuple(d["command"])
        if d.get("console_size") is not None:
            d["console_size"] = tuple(d["console_size"])
        d["mounts"] = tuple(Mount(**m) for m in d.get("mounts", ()))
        d["ulimits"] = {k: tuple(v) for k, v in d.get("ulimits", {}).items()}
        d["resources"] = Resources(**d.get("resources", {}))
        return cls(**d)


def _dump(spec) -> bytes:
    return json.dumps(dataclasses.asdict(spec), separators=(",", ":")).encode()
