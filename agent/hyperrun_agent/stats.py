"""Resource usage read from cgroup v2 files, for the CRI's stats RPCs."""
import os

from hyperrun.proto import agent_pb2 as pb

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _keyed(path: str) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _int(path: str) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


def oom_kills(container_id: str) -> int:
    """How many of the container's processes the OOM killer ended (its
    cgroup's memory.events, there until the container is removed)."""
    return _keyed(f"{CGROUP_ROOT}/hyperrun/{container_id}/memory.events").get("oom_kill", 0)


def cgroup_stats(path: str, container_id: str = "") -> pb.CgroupStats:
    cpu = _keyed(f"{path}/cpu.stat")
    mem = _keyed(f"{path}/memory.stat")
    usage = _int(f"{path}/memory.current")
    return pb.CgroupStats(
        container_id=container_id, cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(usage - mem.get("inactive_file", 0), 0),
        memory_rss_bytes=mem.get("anon", 0), page_faults=mem.get("pgfault", 0),
        major_page_faults=mem.get("pgmajfault", 0), pids=_int(f"{path}/pids.current"),
        memory_limit_bytes=_int(f"{path}/memory.max"))


def guest_stats() -> pb.CgroupStats:
    """The whole guest: the root cgroup's CPU, /proc/meminfo's memory."""
    stats = cgroup_stats(CGROUP_ROOT)
    info = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024 if rest.split() else 0
    used = info.get("MemTotal", 0) - info.get("MemAvailable", 0)
    stats.memory_usage_bytes = used
    stats.memory_working_set_bytes = used
    stats.memory_limit_bytes = info.get("MemTotal", 0)
    stats.pids = sum(1 for name in os.listdir("/proc") if name.isdigit())
    return stats


def tree_usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) under path, without following links."""
    total = inodes = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
                inodes += 1
            except OSError:
                continue
    return total, inodes
