"""OCI runtime specs for crun, with Docker's defaults.

The VM is the isolation boundary; inside it a container still gets its own
pid, mount, ipc, uts and cgroup namespaces, Docker's default capability
set and masked paths, so images behave as they do under Docker.
"""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's: its daemon runs with LimitNOFILE=infinity, which the kernel
# caps at fs.nr_open (1048576); databases size their tables by it.
DEFAULT_RLIMITS = {"RLIMIT_NOFILE": (1048576, 1048576)}

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

# Every capability of this kernel (6.1: 0..40), for privileged containers.
ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
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


def capabilities(privileged: bool, add=(), drop=()) -> list[str]:
    """Docker's: every capability when privileged, else the default set
    plus add, less drop; "ALL" in add is every one, in drop none (then
    add's). Unknown names are refused: a typo must not run unconfined."""
    def names(given) -> list[str]:
        out = []
        for name in given:
            name = name.upper()
            if name != "ALL" and not name.startswith("CAP_"):
                name = "CAP_" + name
            if name != "ALL" and name not in ALL_CAPS:
                raise ValueError(f"unknown capability {name!r}")
            out.append(name)
        return out

    if privileged:
        return list(ALL_CAPS)
    add, drop = names(add), names(drop)
    caps = [] if "ALL" in drop else [c for c in DEFAULT_CAPS if c not in drop]
    extra = ALL_CAPS if "ALL" in add else add
    caps += [c for c in extra if c not in caps and (c not in drop or "ALL" in drop)]
    return caps


def process_spec(args: list[str], env: list[str], cwd: str, uid: int, gid: int,
                 additional_gids: list[int], home: str, terminal: bool,
                 rows: int = 0, cols: int = 0, privileged: bool = False,
                 caps: list[str] | None = None, no_new_privileges: bool = False,
                 rlimits: dict[str, tuple[int, int]] | None = None) -> dict:
    env = list(env)
    keys = {e.split("=", 1)[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOME" not in keys:
        env.append(f"HOME={home or '/'}")
    if terminal and "TERM" not in keys:
        env.append("TERM=xterm")
    if caps is None:
        caps = capabilities(privileged)
    proc = {
        "terminal": terminal,
        "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids},
        "args": args,
        "env": env,
        "cwd": cwd or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": no_new_privileges,
        "rlimits": [{"type": t, "soft": soft, "hard": hard}
                    for t, (soft, hard) in {**DEFAULT_RLIMITS, **(rlimits or {})}.items()],
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
                   resources: dict | None = None, sysctls: dict | None = None,
                   privileged: bool = False, joined: dict[str, str] | None = None,
                   seccomp: dict | None = None, masked_paths=(), readonly_paths=()) -> dict:
    """joined: namespaces not of its own, by kind ("pid", "ipc"): the path
    of one to join, or "" for the guest's (the pod's host).
    privileged: nothing masked or read-only in /proc and /sys, every device
    (Docker's --privileged; the capabilities are process_spec's).
    masked_paths, readonly_paths: instead of Docker's (empty: those)."""
    mounts = default_mounts()
    if privileged:
        for m in mounts:
            if m["destination"] in ("/sys", "/sys/fs/cgroup"):
                m["options"] = [o for o in m["options"] if o != "ro"]
    joined = joined or {}
    namespaces = [{"type": t, **({"path": joined[t]} if joined.get(t) else {})}
                  for t in ("pid", "ipc", "uts", "mount", "cgroup") if joined.get(t) != ""]
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname or container_id[:12],
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": f"/hyperrun/{container_id}",
            "resources": {"devices": [{"allow": privileged, "access": "rwm"}],
                          **(resources or {})},
            "maskedPaths": [] if privileged else list(masked_paths) or MASKED_PATHS,
            "readonlyPaths": [] if privileged else list(readonly_paths) or READONLY_PATHS,
            "sysctl": dict(sysctls or {}),
            **({"seccomp": seccomp} if seccomp else {}),
            # The agent runs crun with fixed maps under TCG (init.py); the
            # container's programs get randomised ones back.
            "personality": {"domain": "LINUX"},
        },
    }
