"""Faults, and what is left after them, with real VMs and real CNI:

- a pod's QEMU killed from outside;
- the agent (the guest's PID 1) crashed from inside the guest, which is a
  guest kernel panic ("Attempted to kill init!");
- a VM that stops answering (its QEMU frozen), under CRI calls and found
  by the daemon's health checks;
- the daemon killed with -9 inside or right after each CRI call of a pod's
  life, and restarted on the same state.

After each: the pod and its containers have a coherent state (NotReady,
EXITED with the reason), and once they are removed nothing is left: no
QEMU, netns, veth, iptables rule, lease, run directory, bind mount or
cgroup."""
import os
import signal
import threading
from pathlib import Path

import grpc
import pytest

from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.vm import cgroup
from tests.framework import qemu_pids, wait_until
from tests.framework.daemon import KUBELET_LINUX
from tests.framework.host import iptables_state, ip_json, mounts_under

# A network of this module's own (cni_env's): concurrent runs of
# test_network (which use hrpod0) neither see nor disturb what is checked here.
CNI_NETWORK = NETWORK, BRIDGE, SUBNET = "hrfault", "hrfault0", "10.216.0.0/24"


def leftovers(d, leases: Path, sandbox_ids, network: str = NETWORK,
              bridge: str = BRIDGE) -> dict:
    """What the pods of daemon d may leave behind, scoped to them (other
    daemons may run on this host at the same time): QEMU processes, the
    pods' netns, veths on the test bridge, iptables rules naming the
    network or a pod, host-local leases, bind mounts, run directories and
    the VMs' cgroups. Empty lists everywhere when nothing leaked."""
    ids = [i[:16] for i in sandbox_ids]  # a VM's id is its sandbox id's first 16 digits
    netns = sorted(n for n in os.listdir("/run/netns") if any(i in n for i in ids)) \
        if os.path.isdir("/run/netns") else []
    links = sorted(link["ifname"] for link in ip_json("link", "show", "master", bridge)) \
        if os.path.exists(f"/sys/class/net/{bridge}") else []
    rules = [line for line in iptables_state().splitlines()
             if network in line or any(i in line for i in ids)]
    qemu = sorted(qemu_pids(d.base / "run"))  # QEMU runs in its run directory
    run = d.run_dir
    return {"qemu": qemu, "netns": netns, "links": links, "iptables": rules,
            "leases": sorted(p.name for p in leases.iterdir() if p.name[0].isdigit())
            if leases.exists() else [],
            "mounts": mounts_under(d.base),
            "run dirs": sorted(p.name for p in run.iterdir()) if run.is_dir() else [],
            "cgroups": [str(p) for i in ids for p in cgroup._dirs(i) if p.exists()]}


NOTHING = {k: [] for k in ("qemu", "netns", "links", "iptables", "leases", "mounts", "run dirs",
                           "cgroups")}


def wait_dead_and_freed(d, pod: str, leases: Path) -> None:
    """Until the pod is NotReady and nothing its VM held is left."""
    wait_until(lambda: d.pod(pod).state == cri.SANDBOX_NOTREADY
               and leftovers(d, leases, [pod]) == NOTHING, 60,
               f"pod {pod[:12]} NotReady, nothing of its VM left", interval=0.2,
               state=lambda: (d.pod(pod).state, leftovers(d, leases, [pod])))


def sandbox_ids(d) -> list[str]:
    return [p.id for p in d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items]


def test_qemu_killed(netd, pushed, cni_env, tmp_path):
    d = netd
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    volume = tmp_path / "vol"
    volume.mkdir()
    pod_config = d.pod_config("victim", "faults", port_mappings=[
        cri.PortMapping(container_port=80, host_port=18990)])
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                 image=cri.ImageSpec(image=image), command=["sleep", "600"],
                                 mounts=[cri.Mount(container_path="/vol", host_path=str(volume))])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    assert d.pod_ip(pod) and mounts_under(d.base)
    held = leftovers(d, cni_env[1], [pod])
    assert all(held[k] for k in ("qemu", "netns", "links", "iptables", "leases", "mounts",
                                 "run dirs")), held  # the checks see what a pod holds

    (vm,) = held["qemu"]  # this daemon's (other VMs may run on the host)
    os.kill(vm, signal.SIGKILL)
    wait_dead_and_freed(d, pod, cni_env[1])
    status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_NOTREADY
    c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert (c.state, c.reason, c.exit_code) == (cri.CONTAINER_EXITED, "VMExited", 255)
    assert "VM exited" in c.message
    assert leftovers(d, cni_env[1], [pod]) == NOTHING, "the VM's resources outlived it"
    assert status.network.ip == ""
    # The dead pod still answers and goes as usual.
    d.remove_pod(pod)
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert volume.is_dir()


# Run in a privileged container that shares the guest's PID namespace: the
# agent (PID 1) cannot be killed by a signal (the kernel protects init), so
# its code is overwritten through /proc/1/mem, as a memory-corruption bug in
# the agent's process would. libc's executable pages become zeros; the next
# agent thread to return from a system call (the reaper, once this script
# exits) faults, the fault kills init, and the guest kernel panics.
CRASH_AGENT = """set -e
line=$(grep -m1 'r-xp .*/libc[.-]' /proc/1/maps)
range=${line%% *}
start=$((0x${range%-*})); end=$((0x${range#*-}))
dd if=/dev/zero of=/proc/1/mem bs=4096 seek=$((start / 4096)) count=$(((end - start) / 4096)) \
   conv=notrunc 2>/dev/null
echo overwritten $((end - start)) bytes
"""


@pytest.mark.kvm
def test_agent_crash_is_a_guest_kernel_panic(netd, pushed, cni_env):
    """The agent killed inside the guest. It is PID 1, so its death is a
    guest kernel panic, and with panic=-1 and -no-reboot QEMU exits. The
    exec that crashed it fails (no hang), the pod goes NotReady, its
    running container is EXITED with a message naming the panic, and
    everything the VM held is freed."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    pod_config = d.pod_config("panic", "faults")
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id

    def container(name, **linux):
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=image), command=["sleep", "600"],
                                     linux=cri.LinuxContainerConfig(**linux))
        cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
        d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return cid

    victim = container("victim", security_context=KUBELET_LINUX.security_context)
    killer = container("killer", security_context=cri.LinuxContainerSecurityContext(
        privileged=True, namespace_options=cri.NamespaceOption(pid=cri.NODE)))
    # The guest's PID namespace: PID 1 is the agent (python), not sleep.
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=killer, timeout=30,
                                               cmd=["cat", "/proc/1/cmdline"]))
    assert b"hyperrun_agent" in r.stdout or b"python" in r.stdout, r
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=victim, timeout=30,
                                               cmd=["cat", "/proc/1/cmdline"]))
    assert r.stdout.startswith(b"sleep"), r  # an ordinary container: its own namespace

    with pytest.raises(grpc.RpcError) as err:  # the agent dies under this call
        d.runtime.ExecSync(cri.ExecSyncRequest(container_id=killer, timeout=60,
                                               cmd=["sh", "-c", CRASH_AGENT]), timeout=120)
    assert err.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the daemon hung"
    wait_dead_and_freed(d, pod, cni_env[1])
    status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_NOTREADY
    for cid in (victim, killer):
        c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        assert (c.state, c.reason, c.exit_code) == (cri.CONTAINER_EXITED, "VMExited", 255)
        assert "guest kernel panic" in c.message and "Attempted to kill init" in c.message, \
            c.message
    assert leftovers(d, cni_env[1], [pod]) == NOTHING
    d.remove_pod(pod)
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert leftovers(d, cni_env[1], [pod]) == NOTHING


def _frozen_pod(d, image: str, name: str):
    """A pod whose container runs, then its QEMU frozen with SIGSTOP: the
    guest, the agent and QMP all silent, as in a guest deadlock or a wedged
    VMM. (pod id, container id, QEMU pid)."""
    d.warm_up(image)
    pod_config = d.pod_config(name, "faults")
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                 image=cri.ImageSpec(image=image), command=["sleep", "600"])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    (vm,) = qemu_pids(d.base / "run")
    os.kill(vm, signal.SIGSTOP)
    return pod, cid, vm


def _thaw(vm: int) -> None:
    try:
        os.kill(vm, signal.SIGCONT)  # if the daemon failed to end it: let the cleanup
    except ProcessLookupError:
        pass


def _assert_dead_and_gone(d, pod: str, cid: str, leases: Path) -> str:
    status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_NOTREADY
    c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert (c.state, c.reason, c.exit_code) == (cri.CONTAINER_EXITED, "VMExited", 255)
    assert leftovers(d, leases, [pod]) == NOTHING
    d.remove_pod(pod)
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    return c.message


def test_hung_vm_is_stopped_all_the_same(netd, pushed, cni_env):
    """A hung VM and the CRI calls that need its agent: StopContainer fails
    with DEADLINE_EXCEEDED naming the silent call instead of waiting for
    ever; StopPodSandbox stops it anyway (SIGKILL after QMP's quit goes
    unanswered): the pod goes NotReady, its container EXITED, and nothing
    is left. (The daemon's health checks, every 10 s with 30 s to answer,
    do not come into it this soon.)"""
    d = netd
    pod, cid, vm = _frozen_pod(d, pushed.ref("busybox:latest"), "hung")
    try:
        with pytest.raises(grpc.RpcError) as err:
            d.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1),
                                    timeout=120)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
        assert "SignalProcess: no reply" in err.value.details(), err.value.details()
        c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        assert c.state == cri.CONTAINER_RUNNING  # not known to have stopped
        d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    finally:
        _thaw(vm)
    _assert_dead_and_gone(d, pod, cid, cni_env[1])


def test_hung_vm_is_found_by_its_health_checks(daemon_factory, pushed, cni_env):
    """A hung VM that no CRI call touches: the daemon's health checks find
    it (here every second, 3 s to answer), kill it, and report the pod as
    a dead VM's, with the reason; nothing is left."""
    d = daemon_factory("--network", "cni", "--cni-conf-dir", str(cni_env[0]),
                       HYPERRUN_HEALTH_INTERVAL_S="1", HYPERRUN_HEALTH_TIMEOUT_S="3")
    pod, cid, vm = _frozen_pod(d, pushed.ref("busybox:latest"), "hung2")
    try:
        wait_dead_and_freed(d, pod, cni_env[1])
    finally:
        _thaw(vm)
    message = _assert_dead_and_gone(d, pod, cid, cni_env[1])
    assert "VM hung: its agent did not answer a health check within 3s" in message, message


def _rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_flooding_container_loses_nothing_and_the_daemon_stays_small(netd, pushed):
    """60 MB of output as fast as the guest can write it: every byte in the
    CRI log, the daemon's peak memory barely moves."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.pull(image)
    pod_config = d.pod_config("flood", "faults")
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    peak_before = _rss_peak_kib(d.proc.pid)
    lines = 5_000_000  # "0123456789ab\n": 13 bytes each, 65 MB
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="f"),
                                 image=cri.ImageSpec(image=image), log_path="f.log",
                                 command=["sh", "-c", f"yes 0123456789ab | head -n {lines}"])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    c = wait_until(d.container_is(cid, cri.CONTAINER_EXITED), 240, "the flood ended",
                   interval=0.5)
    assert c.state == cri.CONTAINER_EXITED and c.exit_code == 0
    total, full = 0, 0
    with open(c.log_path, "rb") as f:
        for entry in f:
            _, stream, tag, text = entry.split(b" ", 3)
            assert stream == b"stdout"
            if tag == b"F":
                full += 1
                total += len(text)
            else:
                total += len(text) - 1  # a partial line's entry ends in the log's own newline
    assert total == lines * 13
    assert full == lines
    growth_mib = (_rss_peak_kib(d.proc.pid) - peak_before) / 1024
    print(f"daemon peak RSS grew {growth_mib:.1f} MiB while logging {total / 1e6:.0f} MB")
    assert growth_mib < 64
    d.remove_pod(pod)


# --------------------------------------------------------------- daemon kill -9
def _in_flight(call, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run a CRI call on a thread; its result or error lands in the list."""
    out: list = []

    def run() -> None:
        try:
            out.append(call(*args, **kwargs))
        except grpc.RpcError as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _kill_when(d, predicate, call, *args, **kwargs):
    """kill -9 the daemon as soon as predicate() holds while call is in
    flight (polled every 5 ms), restart it on the same state and socket.
    Returns what the call got (an error, or its result if it won the race)
    and predicate's value at the kill."""
    t, out = _in_flight(call, *args, **kwargs)
    seen = wait_until(predicate, 120, "the point to kill at reached", interval=0.005)
    d.kill9()
    t.join(60)
    d.start()
    return (out[0] if out else None), seen


def _run_dirs(d) -> list[str]:
    run = d.run_dir
    return sorted(p.name for p in run.iterdir()) if run.is_dir() else []


def _remove_all(d) -> None:
    for pod in sandbox_ids(d):
        d.remove_pod(pod)
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert d.runtime.ListContainers(cri.ListContainersRequest()).containers == []


def test_daemon_killed_in_run_pod_sandbox(netd, pushed, cni_env):
    """kill -9 inside RunPodSandbox, once the pod's network is set up and its
    run directory made (QEMU starting, nothing recorded yet), and right after
    it returned. Inside: after the restart the pod does not exist (it was
    never recorded), what was made for it is collected at start-up, and the
    retried call succeeds. After: the pod is READY, re-attached, usable."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    config = d.pod_config("run", "faults")
    got, orphans = _kill_when(d, lambda: _run_dirs(d), d.runtime.RunPodSandbox,
                              cri.RunPodSandboxRequest(config=config))
    assert isinstance(got, grpc.RpcError), got
    assert sandbox_ids(d) == []
    assert leftovers(d, cni_env[1], orphans) == NOTHING
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    d.kill9()  # right after the call returned
    d.start()
    status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_READY and status.network.ip
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, sandbox_config=config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image),
            command=["sleep", "600"]))).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["echo", "ok"], timeout=30))
    assert r.stdout == b"ok\n"
    _remove_all(d)
    assert leftovers(d, cni_env[1], [pod, *orphans]) == NOTHING


@pytest.mark.kvm
def test_daemon_killed_in_create_and_start_container(netd, pushed, cni_env, tmp_path):
    """kill -9 inside CreateContainer, once the container's volume is bound
    into the pod's shared directory (its image disk hot-plugged, the guest
    side not yet made, nothing recorded), and right after CreateContainer
    and StartContainer returned. Inside: after the restart the container
    does not exist, its bind is gone, and the retried call succeeds (the
    image disk left plugged is reused). After: CREATED, then RUNNING, and
    usable."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.warm_up(image)
    volume = tmp_path / "vol"
    volume.mkdir()
    pod_config = d.pod_config("create", "faults")
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    request = cri.CreateContainerRequest(
        pod_sandbox_id=pod, sandbox_config=pod_config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image),
            command=["sleep", "600"],
            mounts=[cri.Mount(container_path="/vol", host_path=str(volume))]))
    got, _ = _kill_when(d, lambda: mounts_under(d.base), d.runtime.CreateContainer, request)
    assert isinstance(got, grpc.RpcError), got
    assert d.runtime.ListContainers(cri.ListContainersRequest()).containers == []
    assert mounts_under(d.base) == [], "the bind of a container never recorded"
    assert d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod)).status.state == cri.SANDBOX_READY
    cid = d.runtime.CreateContainer(request).container_id
    d.kill9()  # right after CreateContainer returned
    d.start()
    c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert c.state == cri.CONTAINER_CREATED
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    d.kill9()  # right after StartContainer returned
    d.start()
    c = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert c.state == cri.CONTAINER_RUNNING
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, timeout=30,
                                               cmd=["sh", "-c", "echo hi > /vol/f; cat /vol/f"]))
    assert r.stdout == b"hi\n" and (volume / "f").read_text() == "hi\n"
    _remove_all(d)
    assert leftovers(d, cni_env[1], [pod]) == NOTHING


def test_daemon_killed_in_stop_and_remove(netd, pushed, cni_env):
    """kill -9 inside StopContainer (waiting out the grace period of a
    program that ignores SIGTERM), inside StopPodSandbox and
    RemovePodSandbox (once the VM's run directory is gone, before the
    record says so), and right after RemoveContainer returned. Each time
    the restarted daemon shows a coherent state, the retried call succeeds,
    and nothing is left once the pods are removed."""
    d = netd
    image = pushed.ref("busybox:latest")
    d.warm_up(image)

    def pod_with_container(name, command=("sleep", "600")):  # sleep as init ignores SIGTERM
        config = d.pod_config(name, "faults")
        pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image),
                command=command, log_path=f"{name}.log", linux=KUBELET_LINUX))).container_id
        d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return pod, cid

    def status(cid):
        return d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status

    # StopContainer: killed during the 60 s grace period; the program lives on.
    # It ignores SIGTERM too, but says when it gets one: from then on the
    # call waits out its grace period.
    pod, cid = pod_with_container("stop", ["sh", "-c", "trap 'echo got TERM' TERM; "
                                                       "while true; do sleep 0.1; done"])
    t, out = _in_flight(d.runtime.StopContainer,
                        cri.StopContainerRequest(container_id=cid, timeout=60))
    log = d.base / "logs" / "stop.log"
    wait_until(lambda: log.exists() and b"got TERM" in log.read_bytes(), 60,
               "the container's SIGTERM from StopContainer")
    d.kill9()
    t.join(60)
    d.start()
    assert isinstance(out[0], grpc.RpcError)
    assert status(cid).state == cri.CONTAINER_RUNNING
    d.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0))
    c = status(cid)
    assert (c.state, c.exit_code) == (cri.CONTAINER_EXITED, 137)
    d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    d.kill9()  # right after RemoveContainer returned
    d.start()
    assert d.runtime.ListContainers(cri.ListContainersRequest()).containers == []
    d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))  # idempotent

    # StopPodSandbox: killed once the VM is gone, before the record says so.
    run_dir = _run_dirs(d)
    assert len(run_dir) == 1
    got, _ = _kill_when(d, lambda: not _run_dirs(d), d.runtime.StopPodSandbox,
                     cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    s = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert s.state == cri.SANDBOX_NOTREADY, got
    wait_until(lambda: leftovers(d, cni_env[1], [pod]) == NOTHING, 60, "nothing of pod left",
               interval=0.2, state=lambda: leftovers(d, cni_env[1], [pod]))
    assert leftovers(d, cni_env[1], [pod]) == NOTHING
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))  # retried
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    d.kill9()  # right after RemovePodSandbox returned
    d.start()
    assert sandbox_ids(d) == []

    # RemovePodSandbox of a running pod: killed once its VM is gone.
    pod2, cid2 = pod_with_container("remove")
    got, _ = _kill_when(d, lambda: not _run_dirs(d), d.runtime.RemovePodSandbox,
                     cri.RemovePodSandboxRequest(pod_sandbox_id=pod2))
    items = d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
    if items:  # killed before the removal committed: stopped, its container exited
        assert [(p.id, p.state) for p in items] == [(pod2, cri.SANDBOX_NOTREADY)], got
        assert status(cid2).state == cri.CONTAINER_EXITED
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod2))  # retried
    assert sandbox_ids(d) == []
    wait_until(lambda: leftovers(d, cni_env[1], [pod, pod2]) == NOTHING, 60,
               "nothing of either pod left", interval=0.2,
               state=lambda: leftovers(d, cni_env[1], [pod, pod2]))
    assert leftovers(d, cni_env[1], [pod, pod2]) == NOTHING


def test_two_daemons_never_touch_each_others_vms(daemon_factory, pushed):
    """Two daemons with different data roots on one run directory, each
    with a running pod: a kill -9 and a restart of either leaves the
    other's VM running and its container RUNNING (issue 17: the second
    daemon's start-up took the first one's VMs for stale and killed them)."""
    image = pushed.ref("busybox:latest")
    a = daemon_factory()
    b = daemon_factory(HYPERRUN_RUN_DIR=a.env["HYPERRUN_RUN_DIR"])
    running = {}
    for d in (a, b):
        d.pull(image)
        _, cid = d.run_pod(image, "own", "sleep 600", namespace="owners")
        wait_until(d.container_is(cid, cri.CONTAINER_RUNNING), 60, "the pod's container running")
        running[d] = (cid, set(qemu_pids(d.run_dir)))
    assert a.run_dir != b.run_dir and all(pids for _, pids in running.values())
    for restarted, other in ((b, a), (a, b)):
        restarted.kill9()
        restarted.start()
        for d in (restarted, other):
            cid, pids = running[d]
            assert set(qemu_pids(d.run_dir)) == pids, f"{d.base}'s VM is gone"
            assert d.container(cid).state == cri.CONTAINER_RUNNING
            assert d.exec_sync(cid, "echo alive") == (0, "alive\n")
    for d in (a, b):
        for pod in d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            d.remove_pod(pod.id)
