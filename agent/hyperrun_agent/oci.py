"""OCI runtime specs for crun, with Docker's defaults.

The VM is the isolation boundary; inside it a container still gets its own
pid, mount, ipc, uts and cgroup namespaces, Docker's default capability
set and masked paths, so images behave as they do under Docker.
"""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]

READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]


def _supported_filesystems() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def default_mounts() -> list[dict]:
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    if "mqueue" in _supported_filesystems():
        mounts.append({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                       "options": ["nosuid", "noexec", "nodev"]})
    return mounts


def process_spec(args: list[str], env: list[str], cwd: str, uid: int, gid: int,
                 additional_gids: list[int], home: str, terminal: bool,
                 rows: int = 0, cols: int = 0) -> dict:
    env = list(env)
    keys = {e.split("=", 1)[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOME" not in keys:
        env.append(f"HOME={home or '/'}")
    if terminal and "TERM" not in keys:
        env.append("TERM=xterm")
    caps = list(DEFAULT_CAPS)
    proc = {
        "terminal": terminal,
        "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids},
        "args": args,
        "env": env,
        "cwd": cwd or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": False,
    }
    if terminal and rows and cols:
        proc["consoleSize"] = {"height": rows, "width": cols}
    return proc


def resources_spec(r) -> dict:
    """OCI linux.resources from the agent's Resources message (unset fields omitted)."""
    cpu = {k: v for k, v in (("period", r.cpu_period), ("quota", r.cpu_quota),
                             ("shares", r.cpu_shares), ("cpus", r.cpuset_cpus),
                             ("mems", r.cpuset_mems)) if v}
    memory = {k: v for k, v in (("limit", r.memory_limit_bytes),
                                ("swap", r.memory_swap_limit_bytes)) if v}
    spec: dict = {}
    if cpu:
        spec["cpu"] = cpu
    if memory:
        spec["memory"] = memory
    if r.unified:
        spec["unified"] = dict(r.unified)
    return spec


def container_spec(container_id: str, process: dict, hostname: str, readonly: bool,
                   resources: dict | None = None, sysctls: dict | None = None) -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname or container_id[:12],
        "mounts": default_mounts(),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
            "cgroupsPath": f"/hyperrun/{container_id}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}], **(resources or {})},
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "sysctl": dict(sysctls or {}),
        },
    }
