"""What VMs and pods hold on the host, read from /proc, ip and iptables:
for the tests' before/after checks."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import urllib.request
from pathlib import Path

from .wait import wait_until


def qemu_pids(under: Path | None = None) -> set[int]:
    """Live (not zombie) QEMU processes started by hyperrun; with under,
    only those whose run directory is below it (QEMU runs in its run
    directory): other checkouts' VMs on the same machine then do not count."""
    root = str(under.resolve()) + "/" if under else "/"
    out = subprocess.run(["pgrep", "-f", "qemu-system.* -name hyperrun"], capture_output=True,
                         text=True)
    pids = set()
    for pid in out.stdout.split():
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            cwd = root  # cannot tell: counted
        if state != "Z" and cwd.startswith(root):
            pids.add(int(pid))
    return pids


def run_dirs() -> set[Path]:
    """The run directories of VMs outside a daemon: those made by the
    library (tests, the bench's floor) and each embedded host's (a run
    without a daemon), whose VMs' directories are inside it."""
    from hyperrun.paths import run_root
    from hyperrun.vm import rundir

    return {p for root in (rundir.vm_root(), run_root() / "embedded") if root.is_dir()
            for p in root.iterdir()}


def mounts() -> list[str]:
    """/proc/mounts, but for /run/netns itself: made a shared mount once
    (as `ip netns add` does) when the first pod network is created."""
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[1] != "/run/netns"]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if str(path) in line.split()[4]]


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout


def ip_json(*args: str):
    return json.loads(sh("ip", "-j", *args) or "[]")


def iptables_state() -> str:
    """Every table of iptables and ip6tables, without counters and dates."""
    text = sh("iptables-save") + sh("ip6tables-save")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r"\[\d+:\d+\]", "", text)


def host_links() -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show")}


def network_state(leases: Path, bridge: str) -> dict:
    """What pods may leave on the host: netns files, links (veths, taps;
    not the bridge), iptables rules and chains, host-local leases."""
    netns = sorted(n for n in os.listdir("/run/netns") if n.startswith("hyperrun-")) \
        if os.path.isdir("/run/netns") else []
    # iptables as a sorted list of lines: what a pod leaves is a line, and
    # the plugins' shared chains may be listed in another order meanwhile.
    return {"netns": netns, "links": host_links() - {bridge},
            "iptables": sorted(iptables_state().splitlines()),
            "leases": sorted(p.name for p in leases.iterdir()
                             if p.name[0].isdigit()) if leases.exists() else []}


def state_diff(before: dict, after: dict) -> str:
    """What changed between two network_state() snapshots, line by line."""
    out = []
    for key in before:
        b, a = before[key], after[key]
        if b == a:
            continue
        b = b.splitlines() if isinstance(b, str) else sorted(b)
        a = a.splitlines() if isinstance(a, str) else sorted(a)
        out += [f"{key}: -{x}" for x in b if x not in a] + [f"{key}: +{x}" for x in a if x not in b]
    return "\n".join(out)


def http_get(url: str, timeout: float = 30) -> str:
    """The body at url, asked again until the server (in a guest) listens."""
    def get() -> tuple[str] | None:  # (body,): an empty body is an answer too
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return (r.read().decode(),)
        except OSError:
            return None
    return wait_until(get, timeout, f"an answer from {url}", interval=0.2)[0]


def remove_new_chains(cmd: str, before: str, mentioning: tuple[str, ...] = ()) -> None:
    """Delete the chains (and jumps to them) that exist now but did not in
    `before` (an iptables-save of the same family). With `mentioning`, only
    those whose rules, or the rules jumping to them, contain one of these
    strings: other tests on the host may have made the rest, and use them."""
    old_chains = _chains(before)
    now = sh(f"{cmd}-save")
    new = {(t, c) for t, c in _chains(now) if (t, c) not in old_chains}
    if mentioning:
        ours, table = set(), None
        for line in now.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and any(m in line for m in mentioning):
                ours.add((table, line.split()[1]))
                if " -j " in line:
                    ours.add((table, line.split(" -j ")[-1].split()[0]))
        new &= ours
    table = None
    for line in now.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and " -j " in line:
            owner, target = line.split()[1], line.split(" -j ")[-1].split()[0]
            if (table, target) in new and (table, owner) not in new:
                subprocess.run([cmd, "-w", "-t", table, "-D", *shlex.split(line[3:])],
                               capture_output=True)
    for t, c in new:
        subprocess.run([cmd, "-w", "-t", t, "-F", c], capture_output=True)
    for t, c in new:
        subprocess.run([cmd, "-w", "-t", t, "-X", c], capture_output=True)


def _chains(save: str) -> set[tuple[str, str]]:
    out, table = set(), None
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.add((table, line[1:].split()[0]))
    return out


def qmp_status(qmp_socket: Path, timeout: float = 10) -> str | None:
    """The run state a QEMU reports on a new QMP connection ("running",
    "paused", ...), None if it does not answer (gone, or busy with another
    client past the timeout). QEMU takes one QMP client at a time: it greets
    this one only once the previous client is gone and it has seen so."""
    try:
        return _qmp_status(qmp_socket, timeout)
    except OSError:
        return None


def _qmp_status(qmp_socket: Path, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(qmp_socket))
        reader = sock.makefile("rb")

        def reply(command: str | None = None) -> dict:
            if command:
                sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            while "event" in (message := json.loads(reader.readline())):
                pass
            return message

        assert "QMP" in reply(), "no QMP greeting"
        reply("qmp_capabilities")
        return reply("query-status")["return"]["status"]
