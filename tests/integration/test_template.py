"""Pod VMs restored from a template (vm/template.py) instead of booted:
they answer, and each is its own machine — its RNG reseeded (clones of one
template would otherwise hand out the same random numbers), its clock set,
its own MAC and address — and nothing is left behind."""
import time

import pytest

from tests.framework import Daemon, qemu_pids
from tests.framework.host import http_get

HTTPD = "mkdir -p /www && echo hi from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"


@pytest.fixture
def tpl_daemon(daemon_factory, cni_env):
    return daemon_factory("--network", "cni", "--cni-conf-dir", str(cni_env[0]), template=True)


@pytest.mark.kvm
def test_clones_of_one_template_are_distinct_machines(tpl_daemon, pushed):
    d = tpl_daemon
    image = pushed.ref("busybox:latest")
    d.pull(image)
    before = qemu_pids(d.base / "run")  # this daemon's VMs only
    pods, cids = [], []
    for i in range(3):
        pod, cid = d.run_pod(image, f"clone{i}", HTTPD, hostname=f"clone{i}")
        pods.append(pod)
        cids.append(cid)
        if i == 0:
            (template,) = [p for p in d.templates.iterdir() if not p.name.startswith(".")]
            assert (template / "state").exists() and (template / "mem").exists()
    # Every pod VM maps the one template's memory file (private copy-on-write).
    for pid in qemu_pids(d.base / "run") - before:
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        assert "-incoming" in argv and any(f"mem-path={template}/mem" in a for a in argv)
    ips, macs, uuids = set(), set(), set()
    for pod, cid in zip(pods, cids):
        ip = d.pod_ip(pod)
        ips.add(ip)
        assert http_get(f"http://{ip}/") == f"hi from {pod_name(d, pod)}\n"
        uuid, mac = identity(d, cid)
        uuids.add(uuid)
        macs.add(mac)
    assert len(ips) == len(macs) == len(uuids) == 3
    for pod in pods:
        d.remove_pod(pod)
    assert not list(d.run_dir.iterdir())


def identity(d: Daemon, cid: str) -> tuple[str, str]:
    """A random uuid from the pod's guest and its card's MAC; its clock
    must have been set (a clone wakes up with the template's). The
    container's programs, its init and an exec, have randomised maps
    although the agent starts crun with fixed ones under TCG."""
    code, out = d.exec_sync(cid, "cat /proc/sys/kernel/random/uuid /sys/class/net/eth0/address;"
                                 " date +%s; cat /proc/1/personality /proc/self/personality")
    assert code == 0, out
    uuid, mac, clock, init_persona, exec_persona = out.split()
    assert abs(int(clock) - time.time()) < 30, "the clock was not set"
    assert int(init_persona, 16) == int(exec_persona, 16) == 0
    return uuid, mac


def pod_name(d: Daemon, pod: str) -> str:
    return d.pod(pod).metadata.name
