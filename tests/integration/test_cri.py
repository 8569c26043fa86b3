"""The CRI daemon driven end to end by a Python gRPC client, with real VMs:
a pod, two containers, exec, CRI-format logs, stop, remove — and a kill -9
of the daemon in the middle, after which everything is still there."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from hyperrun import cli_api
from hyperrun.proto import cri_api_pb2 as cri
from tests.framework import HYPERRUN, Cli, qemu_pids, wait_until
from tests.framework.daemon import KUBELET_LINUX
from tests.framework.host import mounts_under, qmp_status


@pytest.mark.kvm
def test_cri_pod_lifecycle_survives_daemon_kill(daemon, pushed):
    d = daemon
    before = qemu_pids()
    for path in (d.socket, cli_api.socket_path(d.socket)):  # CRI, and run sessions beside it
        st = os.stat(path)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, 1), path  # --group daemon: its gid
    v = d.runtime.Version(cri.VersionRequest())
    assert (v.runtime_name, v.runtime_api_version) == ("hyperrun", "v1")

    image = pushed.ref("busybox:latest")
    ref = d.pull(image)
    assert ref.endswith(pushed.digests["busybox:latest"])
    listed = d.images.ListImages(cri.ListImagesRequest()).images
    assert [i.repo_tags for i in listed] == [[image.replace(pushed.registry.host, pushed.registry.host)]]

    logs = d.base / "logs"
    # The VM is sized from the pod's resources: 2 CPUs, 300 MiB + overhead.
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="uid-1", namespace="default"),
        hostname="web-pod", log_directory=str(logs), labels={"app": "web"},
        linux=cri.LinuxPodSandboxConfig(resources=cri.LinuxContainerResources(
            cpu_period=100000, cpu_quota=150000, memory_limit_in_bytes=300 << 20),
            sysctls={"kernel.shm_rmid_forced": "1"}))
    pod = d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    assert qemu_pids() - before, "no VM for the pod"
    status = d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_READY and status.metadata.name == "web"
    (vm_pid,) = qemu_pids() - before
    argv = open(f"/proc/{vm_pid}/cmdline").read().split("\0")
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-m") + 1] == str(300 + 96)
    with pytest.raises(grpc.RpcError) as err:  # same metadata and attempt: refused
        d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    def create(name, args, resources=None):
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=image), command=["sh", "-c"],
                                     args=[args], log_path=f"{name}.log", labels={"c": name},
                                     linux=cri.LinuxContainerConfig(
                                         resources=resources,
                                         security_context=KUBELET_LINUX.security_context))
        return d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id

    long = create("long", "echo hello; echo oops >&2; hostname; sleep 300",
                  cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_period=100000,
                                              cpu_quota=50000))
    short = create("short", "echo two; exit 3")
    assert wait_until(d.container_is(long, cri.CONTAINER_CREATED), 60,
                      "long CREATED").state == cri.CONTAINER_CREATED
    for cid in (long, short):
        d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    st = wait_until(d.container_is(short, cri.CONTAINER_EXITED), 60, "short exited")
    assert (st.state, st.exit_code, st.reason) == (cri.CONTAINER_EXITED, 3, "Error")
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=long, cmd=["sh", "-c", "echo out; echo err >&2; exit 5"],
                                               timeout=30))
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 5)

    # Limits applied in the guest's cgroups at create, and changed while running.
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=long, timeout=30,
                                               cmd=["cat", "/proc/sys/kernel/shm_rmid_forced"]))
    assert r.stdout == b"1\n"  # the pod's sysctls, in each container's namespaces
    limits = ["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"]
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=long, cmd=limits, timeout=30))
    assert r.stdout == b"67108864\n50000 100000\n", r
    d.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=long, linux=cri.LinuxContainerResources(
            memory_limit_in_bytes=128 << 20, cpu_period=100000, cpu_quota=150000)))
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=long, cmd=limits, timeout=30))
    assert r.stdout == b"134217728\n150000 100000\n", r
    status = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=long)).status
    assert status.resources.linux.memory_limit_in_bytes == 128 << 20

    def log_lines(name, count):
        return wait_until(lambda: len(lines := (logs / f"{name}.log").read_text().splitlines())
                          >= count and lines, 10, f"{count} lines in {name}'s log")

    lines = log_lines("long", 3)
    parsed = sorted(line.split(" ", 1)[1] for line in lines)
    assert parsed == ["stderr F oops", "stdout F hello", "stdout F web-pod"], lines
    assert lines[0][:4].isdigit() and lines[0].split(" ")[0].endswith("Z")
    assert [l.split(" ", 1)[1] for l in log_lines("short", 1)] == ["stdout F two"]

    # Stats from the guest's cgroups; the second sample has a CPU rate.
    first = d.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=long)).stats
    second = d.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=long)).stats
    assert second.cpu.usage_core_nano_seconds.value >= first.cpu.usage_core_nano_seconds.value > 0
    assert second.cpu.HasField("usage_nano_cores")
    assert 0 < second.memory.working_set_bytes.value < 256 << 20
    assert second.attributes.metadata.name == "long"
    pod_stats = d.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod)).stats
    assert pod_stats.linux.process.process_count.value > 3
    assert 0 < pod_stats.linux.memory.working_set_bytes.value < 256 << 20
    assert [c.attributes.id for c in pod_stats.linux.containers] == [long]
    listed = d.runtime.ListContainerStats(cri.ListContainerStatsRequest()).stats
    assert [s.attributes.id for s in listed] == [long]
    of_pod = cri.ContainerStatsFilter(pod_sandbox_id=pod)  # a full id: looked up by key
    assert [s.attributes.id for s in d.runtime.ListContainerStats(
        cri.ListContainerStatsRequest(filter=of_pod)).stats] == [long]
    assert [s.attributes.id for s in d.runtime.ListPodSandboxStats(cri.ListPodSandboxStatsRequest(
        filter=cri.PodSandboxStatsFilter(id=pod[:8]))).stats] == [pod]

    # Exec through the streaming server, as a websocket client (v4.channel.k8s.io).
    import json

    from websockets.sync.client import connect as ws_connect
    url = d.runtime.Exec(cri.ExecRequest(container_id=long, cmd=["sh", "-c", "read x; echo got $x; echo e >&2; exit 3"],
                                         stdin=True, stdout=True, stderr=True)).url
    assert url.startswith("http://127.0.0.1:")
    with ws_connect("ws" + url[4:], subprotocols=["v4.channel.k8s.io"]) as ws:
        ws.send(b"\x00hello\n")
        got = {1: b"", 2: b"", 3: b""}
        while True:
            try:
                msg = ws.recv(timeout=30)
            except Exception:
                break
            if isinstance(msg, bytes) and msg:
                got[msg[0]] = got.get(msg[0], b"") + msg[1:]
    assert (got[1], got[2]) == (b"got hello\n", b"e\n")
    status = json.loads(got[3])
    assert status["status"] == "Failure" and status["details"]["causes"][0]["message"] == "3"

    # A terminal (64-hex container ids must not break the console socket path).
    url = d.runtime.Exec(cri.ExecRequest(container_id=long, cmd=["sh"], tty=True, stdin=True,
                                         stdout=True)).url
    with ws_connect("ws" + url[4:], subprotocols=["v4.channel.k8s.io"]) as ws:
        ws.send(b'\x04{"Width":100,"Height":30}')
        ws.send(b"\x00stty size; tty; exit 0\n")
        out = b""
        while True:
            try:
                msg = ws.recv(timeout=30)
            except Exception:
                break
            if isinstance(msg, bytes) and msg[:1] == b"\x01":
                out += msg[1:]
    assert b"30 100" in out and b"/dev/pts/" in out, out

    running = cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING))
    assert [c.id for c in d.runtime.ListContainers(cri.ListContainersRequest(filter=running)).containers] == [long]
    by_label = cri.ContainerFilter(label_selector={"c": "short"})
    assert [c.id for c in d.runtime.ListContainers(cri.ListContainersRequest(filter=by_label)).containers] == [short]
    for f in (cri.ContainerFilter(id=long), cri.ContainerFilter(id=long[:12]),
              cri.ContainerFilter(pod_sandbox_id=pod, state=running.state)):
        assert [c.id for c in d.runtime.ListContainers(
            cri.ListContainersRequest(filter=f)).containers] == [long], f
    assert not d.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(id="0" * 64))).containers
    assert [p.id for p in d.runtime.ListPodSandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(id=pod))).items] == [pod]

    # kill -9 of the daemon: the VM and its containers go on; a new daemon re-attaches.
    vms = qemu_pids() - before
    d.kill9()
    # QEMU greets a new QMP client once it has seen its last one (the dead
    # daemon) go: a VM that answers then has lived through the kill.
    (vm_dir,) = d.run_dir.iterdir()
    wait_until(lambda: qmp_status(vm_dir / "qmp.sock") == "running", 30,
               "the pod's VM running and answering QMP after the daemon's kill -9",
               state=lambda: qemu_pids() - before)
    assert qemu_pids() - before == vms
    d.start()
    assert wait_until(d.container_is(long, cri.CONTAINER_RUNNING), 60,
                      "long RUNNING after the restart").state == cri.CONTAINER_RUNNING
    st = wait_until(d.container_is(short, cri.CONTAINER_EXITED), 60, "short still exited")
    assert (st.exit_code, st.reason) == (3, "Error")
    r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=long, cmd=["echo", "after restart"], timeout=30))
    assert r.stdout == b"after restart\n"
    assert d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.state == cri.SANDBOX_READY

    # A stop right after start reaches the program's handler, though the
    # program (its PID namespace's init) installs it only after a while.
    trap = create("trap", "trap 'exit 3' TERM; while true; do sleep 0.1; done")
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=trap))
    t0 = time.monotonic()
    d.runtime.StopContainer(cri.StopContainerRequest(container_id=trap, timeout=30))
    assert time.monotonic() - t0 < 10
    assert wait_until(d.container_is(trap, cri.CONTAINER_EXITED), 60,
                      "trap exited").exit_code == 3
    d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=trap))
    rc = d.runtime.RuntimeConfig(cri.RuntimeConfigRequest())
    assert rc.linux.cgroup_driver == cri.CGROUPFS

    # Stop: sh as the container's init ignores SIGTERM; SIGKILL after the timeout.
    d.runtime.StopContainer(cri.StopContainerRequest(container_id=long, timeout=1))
    st = wait_until(d.container_is(long, cri.CONTAINER_EXITED), 60, "long stopped")
    assert (st.state, st.exit_code) == (cri.CONTAINER_EXITED, 137)
    for cid in (long, short):
        d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
        d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))  # idempotent
    assert d.runtime.ListContainers(cri.ListContainersRequest()).containers == []
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert d.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.state == cri.SANDBOX_NOTREADY
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    wait_until(lambda: qemu_pids() - before == set(), 10, "the pod's QEMU gone")
    assert not any(d.run_dir.iterdir())

    with pytest.raises(grpc.RpcError) as err:
        d.runtime.Exec(cri.ExecRequest(container_id=long, cmd=["sh"], stdout=True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the container is gone


def test_cli_through_the_daemon(daemon, pushed):
    """`hyperrun run -d / ps / exec / logs / stop / rm` are clients of the daemon."""
    env, image = daemon.cli.env, pushed.ref("busybox:latest")
    cli = Cli(env, check=True)

    before = qemu_pids()
    assert "Digest: sha256:" in cli("pull", image).stdout.decode()
    assert "busybox" in cli("images").stdout.decode()
    # The foreground run goes through the daemon too: output, exit code, cleanup.
    r = cli("run", "--rm", image, "sh", "-c", "echo fg; echo err >&2; exit 5", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"fg\n", b"err\n"), r
    assert cli("ps", "-a").stdout.decode().count("\n") == 1  # --rm: gone
    cid = cli("run", "-d", image, "sh", "-c", "echo started; echo warn >&2; sleep 600").stdout.decode().strip()
    assert len(cid) == 64
    assert re.search(rf"{cid[:13]} .* Up \d+[smhd] ", cli("ps").stdout.decode())
    assert "READY" in cli("pods").stdout.decode()
    # stats: the container's CPU over a second, its memory in the VM against
    # the VM's RAM (no limit was set), the pod VM's PSS on the host.
    header, row = cli("stats").stdout.decode().splitlines()
    assert header.split()[:3] == ["CONTAINER", "ID", "NAME"], header
    assert re.fullmatch(rf"{cid[:13]}\s+\S+\s+\d+\.\d\d%\s+[\d.]+MiB / [\d.]+MiB\s+[\d.]+MiB",
                        row), row
    r = cli("exec", cid[:12], "sh", "-c", "echo in; exit 4", check=False)
    assert (r.returncode, r.stdout) == (4, b"in\n")
    # -i: through the streaming server, stdin relayed and closed.
    r = cli("exec", "-i", cid[:12], "sh", "-c", "read x; echo got $x; exit 6", input=b"hi\n",
            check=False)
    assert (r.returncode, r.stdout) == (6, b"got hi\n"), r
    r = wait_until(lambda: (r := cli("logs", cid[:12])).stdout == b"started\n"
                   and r.stderr == b"warn\n" and r, 10, "the container's output in its log")
    assert (r.stdout, r.stderr) == (b"started\n", b"warn\n")
    r = cli("logs", "--tail", "0", cid[:12])
    assert (r.stdout, r.stderr) == (b"", b"")
    r = cli("logs", "-n", "2", "-t", cid[:12])
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT[\d:.]+Z started\n", r.stdout), r
    assert cli("logs", "--tail", "x", cid[:12], check=False).returncode == 2  # argparse's
    assert cli("rm", cid[:12], check=False).returncode != 0  # running: stop first
    r = cli("rmi", image, check=False)  # a container was made from it
    assert r.returncode == 1 and f"container {cid[:12]} uses it".encode() in r.stderr, r
    assert "busybox" in cli("images").stdout.decode()  # nothing untagged either
    cli("stop", "-t", "1", cid[:12])
    assert cid[:13] not in cli("ps").stdout.decode()
    assert re.search(r" Exited \(137\) \d+[smhd] ago ", cli("ps", "-a").stdout.decode())  # killed
    cli("rm", cid[:12])
    assert cli("ps", "-a").stdout.decode().count("\n") == 1  # the header only
    wait_until(lambda: qemu_pids() - before == set(), 10, "the pods' QEMUs gone")
    # The CLI speaks sessions only: grpc and the CRI's messages (~55 ms of
    # imports) are the daemon's.
    r = subprocess.run([sys.executable, "-X", "importtime", HYPERRUN, "images"], env=env,
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and b"busybox" in r.stdout and b"grpc" not in r.stderr, r.stderr[-2000:]
    assert "Untagged" in cli("rmi", image).stdout.decode()
    r = cli("rmi", image, check=False)
    assert r.returncode == 1 and b"no such image" in r.stderr.lower(), r
    assert "busybox" not in cli("images").stdout.decode()



def test_cli_as_a_member_of_the_socket_group(daemon, pushed):
    """A user who is not root but in the daemon's socket group (--group)
    reads logs, whose files are root's, and removes a run, whose log
    directory is the daemon's: the daemon does both for the CLI."""
    image = pushed.ref("busybox:latest")
    daemon.pull(image)
    os.chmod(daemon.base, 0o711)  # the sockets are in there (mkdtemp made it 0700)
    cli = Cli({"PATH": os.environ["PATH"], "HOME": "/tmp", "HYPERRUN_SOCKET": str(daemon.socket)},
              prefix=("setpriv", "--reuid=nobody", "--regid=daemon", "--clear-groups"),
              check=True)

    cid = cli("run", "-d", image, "sh", "-c", "echo out; sleep 1; echo err >&2").stdout.decode().strip()
    # -f follows to the container's end, and has everything it wrote.
    r = cli("logs", "-f", cid[:12])
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n"), r
    assert cli("logs", cid[:12]).stdout == b"out\n"
    logs = daemon.base / "root" / "logs"
    assert len(list(logs.iterdir())) == 1  # the run's pod's
    r = cli("rm", cid[:12], "nosuch", check=False)
    assert (r.returncode, r.stdout) == (1, f"{cid[:12]}\n".encode()), r
    assert b"no container 'nosuch'" in r.stderr
    assert list(logs.iterdir()) == []
    assert cli("ps", "-a").stdout.decode().count("\n") == 1  # the header only

def run_pod_named(d, name: str):
    """A pod of that name (and uid) logging under the daemon's base: its id
    and config."""
    config = d.pod_config(name)
    return d.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id, config


def test_logs_follow_across_a_rotation(daemon, pushed):
    """`hyperrun logs -f` goes on in the new file when the kubelet rotates
    a container's log (rename, then ReopenContainerLog), missing nothing."""
    d, image = daemon, pushed.ref("busybox:latest")
    d.pull(image)
    pod, pod_config = run_pod_named(d, "rot")
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image),
        command=["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo line$i; i=$((i+1)); "
                             "sleep 0.1; done"], log_path="c.log")
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    follow = d.cli.popen("logs", "-f", cid[:12], stdout=subprocess.PIPE)
    lines: list[bytes] = []  # what the follower has printed so far

    def read() -> None:
        for line in follow.stdout:
            lines.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: b"line5\n" in lines, 30, "logs -f following the container's log")
    log, rotated = d.base / "logs" / "c.log", d.base / "logs" / "c.log.1"
    log.rename(rotated)
    # The daemon writes to the renamed file until the reopen: a line there
    # is one the follower must read from the old file after the rename.
    size = rotated.stat().st_size
    wait_until(lambda: rotated.stat().st_size > size, 30, "a line in the renamed log")
    d.runtime.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=cid))
    assert follow.wait(60) == 0
    reader.join(10)
    out = b"".join(lines)
    assert out == b"".join(b"line%d\n" % i for i in range(40)), out
    assert b"line39" in log.read_bytes() and b"line0" in rotated.read_bytes()
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_cri_volumes(daemon, pushed, tmp_path):
    """Host directories and files mounted into a container: read-write and
    read-only, seen by the guest at once; the host binds go with the
    container and nothing stays mounted."""
    d = daemon
    image = pushed.ref("busybox:latest")
    d.pull(image)
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    conf = tmp_path / "app.conf"
    conf.write_text("setting=1\n")
    fresh = tmp_path / "made" / "by" / "runtime"  # missing: created, as containerd does
    pod, pod_config = run_pod_named(d, "vol")
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="v"), image=cri.ImageSpec(image=image),
        command=["sleep", "300"], log_path="v.log",
        mounts=[cri.Mount(container_path="/data", host_path=str(data)),
                cri.Mount(container_path="/etc/app.conf", host_path=str(conf), readonly=True),
                cri.Mount(container_path="/fresh", host_path=str(fresh))])
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    status = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert [m.container_path for m in status.mounts] == ["/data", "/etc/app.conf", "/fresh"]

    def sh(script):
        r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script],
                                                   timeout=30))
        return r.exit_code, r.stdout.decode(), r.stderr.decode()

    assert sh("cat /data/in.txt /etc/app.conf") == (0, "from the host\nsetting=1\n", "")
    assert sh("echo from the guest > /data/out.txt; mkdir /data/sub; echo x > /fresh/f")[0] == 0
    assert (data / "out.txt").read_text() == "from the guest\n"
    assert (data / "sub").is_dir() and (fresh / "f").read_text() == "x\n"
    (data / "later.txt").write_text("written after start\n")
    assert sh("cat /data/later.txt")[1] == "written after start\n"
    code, _, err = sh("echo no > /etc/app.conf")
    assert code != 0 and "Read-only file system" in err
    assert conf.read_text() == "setting=1\n"
    assert mounts_under(d.base), "the volumes are bound into the sandbox's shared directory"

    d.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    assert mounts_under(d.base) == []
    assert sorted(p.name for p in data.iterdir()) == ["in.txt", "later.txt", "out.txt", "sub"]
    # A host path that cannot be bound is a clear error, and leaves nothing.
    bad = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="bad"), image=cri.ImageSpec(image=image),
        command=["true"], mounts=[cri.Mount(container_path="rel", host_path=str(data))])
    with pytest.raises(grpc.RpcError) as err:
        d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=bad, sandbox_config=pod_config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not absolute" in err.value.details()
    # The pod goes with a container still holding a volume: nothing stays mounted.
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert mounts_under(d.base) == []
    assert (data / "in.txt").read_text() == "from the host\n"


def test_volume_mount_propagation(daemon, pushed, tmp_path):
    """A host mount made under a volume after the container started shows
    in the container with rslave and rshared, not with private (critest's
    propagation specs); an rshared volume on a private host mount is
    refused, as containerd refuses it; nothing stays mounted."""
    d = daemon
    image = pushed.ref("busybox:latest")
    d.pull(image)
    shared, private, flag = tmp_path / "shared", tmp_path / "private", tmp_path / "flag"
    for path in (shared / "point", private / "point", flag):
        path.mkdir(parents=True)
    (flag / "flagFile").write_text("")
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-rshared", str(shared)], check=True)
    subprocess.run(["mount", "--bind", str(private), str(private)], check=True)
    subprocess.run(["mount", "--make-rprivate", str(private)], check=True)
    pod, pod_config = run_pod_named(d, "prop")
    try:
        def container(name: str, host: Path, propagation: int) -> str:
            config = cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                command=["sleep", "300"], log_path=f"{name}.log",
                mounts=[cri.Mount(container_path="/vol", host_path=str(host),
                                  propagation=propagation)])
            cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
            d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
            return cid

        kinds = {"rslave": cri.PROPAGATION_HOST_TO_CONTAINER,
                 "rshared": cri.PROPAGATION_BIDIRECTIONAL, "private": cri.PROPAGATION_PRIVATE}
        cids = {name: container(name, private if name == "private" else shared, kind)
                for name, kind in kinds.items()}
        for name, cid in cids.items():
            status = d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
            assert status.mounts[0].propagation == kinds[name]
        subprocess.run(["mount", "--bind", str(flag), str(shared / "point")], check=True)
        subprocess.run(["mount", "--bind", str(flag), str(private / "point")], check=True)
        seen = {name: d.exec_sync(cid, "ls -A /vol/point") for name, cid in cids.items()}
        assert seen == {"rslave": (0, "flagFile\n"), "rshared": (0, "flagFile\n"),
                        "private": (0, "")}, seen
        refused = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="refused"), image=cri.ImageSpec(image=image),
            command=["true"], mounts=[cri.Mount(container_path="/vol", host_path=str(private),
                                                propagation=cri.PROPAGATION_BIDIRECTIONAL)])
        with pytest.raises(grpc.RpcError) as err:
            d.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod, config=refused, sandbox_config=pod_config))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a shared mount" in err.value.details()
    finally:
        d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        for path in (shared / "point", private / "point", shared, private):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
    assert mounts_under(d.base) == []


def test_an_exec_is_the_containers_user_groups_env_and_cwd(daemon, pushed, no_leaks):
    """An exec'd process runs as the container's own does (containerd's
    exec does): the same uid, groups, working directory and environment."""
    cli = Cli(daemon.cli.env, check=True)
    cid = cli("run", "-d", "-u", "1000:1000", "-w", "/tmp", "-e", "FOO=bar",
              pushed.ref("busybox:latest"), "sleep", "600").stdout.decode().strip()
    r = cli("exec", cid[:12], "sh", "-c", 'id -u; id -g; pwd; echo "$FOO"')
    assert r.stdout == b"1000\n1000\n/tmp\nbar\n", r
    cli("stop", "-t", "1", cid[:12])
    cli("rm", cid[:12])


def test_an_exec_whose_client_goes_away_is_killed(daemon, pushed, no_leaks):
    """An exec'd process lives no longer than its client: a CRI streaming
    exec whose connection drops (as containerd's) and a `hyperrun exec`
    whose CLI is killed both take their process with them; the container
    runs on."""
    from websockets.sync.client import connect as ws_connect

    cli = Cli(daemon.cli.env, check=True)
    cid = cli("run", "-d", pushed.ref("busybox:latest"), "sleep", "600").stdout.decode().strip()
    # The exec writes its PID, then says so and sleeps: "started" read
    # means the process to watch is known.
    script = "echo $$ > /tmp/{0}.pid; echo started; exec sleep 1000"

    def alive(name: str) -> bool:
        code, out = daemon.exec_sync(cid, f"kill -0 $(cat /tmp/{name}.pid) && "
                                          f"! grep -q Z /proc/$(cat /tmp/{name}.pid)/stat")
        return code == 0

    url = daemon.runtime.Exec(cri.ExecRequest(container_id=cid, cmd=["sh", "-c", script.format("ws")],
                                              stdout=True, stderr=True)).url
    with ws_connect("ws" + url[4:], subprotocols=["v4.channel.k8s.io"]) as ws:
        out = b""
        while b"started" not in out:
            msg = ws.recv(timeout=60)
            out += msg[1:] if isinstance(msg, bytes) and msg[:1] == b"\x01" else b""
        assert alive("ws")
    wait_until(lambda: not alive("ws"), 60, "the exec of a closed websocket to end")

    proc = cli.popen("exec", cid[:12], "sh", "-c", script.format("cli"), stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    assert alive("cli")
    proc.kill()
    proc.wait()
    wait_until(lambda: not alive("cli"), 60, "the exec of a killed CLI to end")

    assert daemon.exec_sync(cid, "true")[0] == 0  # the container runs on
    cli("rm", "-f", cid[:12])


def test_capabilities_and_security_options_of_a_run(daemon, pushed, no_leaks):
    """--cap-drop/--cap-add (the CRI's capabilities) set the container's
    capabilities, and its execs have the same (issue 16: they were ignored);
    a run gets the runtime's seccomp filter unless --security-opt says
    otherwise, as Docker's."""
    cli = Cli(daemon.cli.env, check=True)
    cid = cli("run", "-d", "--cap-drop", "ALL", "--cap-add", "KILL", "--cap-add", "net_admin",
              pushed.ref("busybox:latest"), "sleep", "600").stdout.decode().strip()
    # CAP_KILL is bit 5, CAP_NET_ADMIN bit 12.
    for argv in (["sh", "-c", "grep -E '^Cap(Bnd|Eff)' /proc/1/status"],
                 ["sh", "-c", "grep -E '^Cap(Bnd|Eff)' /proc/self/status"]):
        out = cli("exec", cid[:12], *argv).stdout.decode().split()
        assert out == ["CapEff:", "0000000000001020", "CapBnd:", "0000000000001020"], out
    status = ["sh", "-c", "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status | cut -f2"]
    assert cli("exec", cid[:12], *status).stdout == b"0\n2\n"  # NoNewPrivs, Seccomp
    r = cli("run", "--rm", "--security-opt", "seccomp=unconfined", "--security-opt",
            "no-new-privileges", pushed.ref("busybox:latest"), *status)
    assert r.stdout == b"1\n0\n", r
    # Docker's RLIMIT_NOFILE, for an exec too; --ulimit over it (issue 17).
    limits = ["sh", "-c", "ulimit -n; ulimit -Hn"]
    assert cli("exec", cid[:12], *limits).stdout == b"1048576\n1048576\n"
    r = cli("run", "--rm", "--ulimit", "nofile=1024:2048", pushed.ref("busybox:latest"), *limits)
    assert r.stdout == b"1024\n2048\n", r
    r = cli("run", "--rm", "--cap-add", "NOPE", pushed.ref("busybox:latest"), "true", check=False)
    assert r.returncode == 125 and b"unknown capability 'CAP_NOPE'" in r.stderr, r
    r = cli("run", "--rm", "--security-opt", "label=x", pushed.ref("busybox:latest"), "true",
            check=False)
    assert r.returncode == 125 and b"--security-opt label=x: expected" in r.stderr, r
    cli("stop", "-t", "1", cid[:12])
    cli("rm", cid[:12])


def test_security_context_in_the_guest(daemon, pushed, no_leaks, tmp_path):
    """Seccomp (the CRI's unset profile, RuntimeDefault, a Localhost profile
    file of this host, ignored when privileged), no_new_privs, and masked
    and read-only paths reach the container's process and its execs
    (issue 16: all were ignored); an AppArmor profile of the node is refused."""
    d, image = daemon, pushed.ref("busybox:latest")
    d.pull(image)
    pod, pod_config = run_pod_named(d, "sec")
    block_chmod = tmp_path / "block-chmod.json"
    block_chmod.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": '
                           '[{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}')
    Profile = cri.SecurityProfile

    def container(name: str, **security) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
            command=["sleep", "600"],
            linux=cri.LinuxContainerConfig(  # its own PID namespace, as the kubelet's default
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(pid=cri.CONTAINER), **security)))
        cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
        d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return cid

    def sh(cid: str, script: str) -> tuple[int, str]:
        r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script],
                                                   timeout=30))
        return r.exit_code, (r.stdout + r.stderr).decode()

    status = "grep -E '^(Seccomp|NoNewPrivs):' /proc/1/status /proc/self/status | cut -d: -f2-"
    default = container("default", seccomp=Profile(profile_type=Profile.RuntimeDefault),
                        no_new_privs=True)
    # Filter mode 2 and no_new_privs, for the process and for an exec.
    assert sh(default, status) == (0, "NoNewPrivs:\t1\nSeccomp:\t2\n" * 2)
    unset = container("unset")
    assert sh(unset, status) == (0, "NoNewPrivs:\t0\nSeccomp:\t0\n" * 2)
    local = container("local", seccomp=Profile(profile_type=Profile.Localhost,
                                              localhost_ref=str(block_chmod)))
    code, out = sh(local, "chmod 400 /tmp")
    assert code != 0 and "Operation not permitted" in out, out
    privileged = container("priv", privileged=True, seccomp=Profile(
        profile_type=Profile.Localhost, localhost_ref=str(block_chmod)))
    assert sh(privileged, "chmod 400 /tmp && grep '^Seccomp:' /proc/self/status") == \
        (0, "Seccomp:\t0\n")
    paths = container("paths", masked_paths=["/etc/passwd"], readonly_paths=["/tmp"])
    assert sh(paths, "wc -c < /etc/passwd") == (0, "0\n")
    code, out = sh(paths, "touch /tmp/x")
    assert code != 0 and "Read-only file system" in out, out

    for bad, message in (
            (dict(seccomp=Profile(profile_type=Profile.Localhost,
                                  localhost_ref=str(tmp_path / "none.json"))), "No such file"),
            (dict(apparmor=Profile(profile_type=Profile.Localhost, localhost_ref="p")),
             "has no AppArmor")):
        with pytest.raises(grpc.RpcError) as err:
            container("bad", **bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert message in err.value.details(), err.value.details()
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_an_oom_kill_is_reported(daemon, pushed, no_leaks):
    """A container the kernel's OOM killer ends exits 137 with reason
    OOMKilled, as critest's OOM spec asks (issue 16: reason was Error)."""
    d, image = daemon, pushed.ref("busybox:latest")
    d.pull(image)
    pod, pod_config = run_pod_named(d, "oom")
    limits = cri.LinuxContainerResources(memory_limit_in_bytes=15 << 20,
                                         memory_swap_limit_in_bytes=15 << 20)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="oom"), image=cri.ImageSpec(image=image),
        command=["sh", "-c", "dd if=/dev/zero of=/dev/null bs=20M"],
        linux=cri.LinuxContainerConfig(resources=limits))
    cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))

    def status():
        return d.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    wait_until(lambda: status().state == cri.CONTAINER_EXITED, 60, "the container's OOM kill")
    assert (status().exit_code, status().reason) == (137, "OOMKilled"), status()
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_pid_and_ipc_namespaces_of_a_pod(daemon, pushed, no_leaks):
    """The CRI's namespace modes inside the pod's VM: POD shared by the
    pod's containers, CONTAINER a container's own, NODE the guest's (the
    agent's, PID 1 there), TARGET another container's PID namespace (issue
    16: every container had its own)."""
    d, image = daemon, pushed.ref("busybox:latest")
    d.pull(image)
    pod, pod_config = run_pod_named(d, "ns")

    def container(name: str, **modes) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
            command=["sleep", "600"], linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(**modes))))
        cid = d.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
        d.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return cid

    def run(cid: str, *cmd: str) -> str:
        r = d.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=30))
        assert r.exit_code == 0, r
        return r.stdout.decode()

    def ns(cid: str) -> tuple[str, str]:
        pid, ipc = run(cid, "sh", "-c", "readlink /proc/self/ns/pid; readlink /proc/self/ns/ipc"
                       ).split()
        return pid, ipc

    a, b = container("a", pid=cri.POD, ipc=cri.POD), container("b", pid=cri.POD, ipc=cri.POD)
    own = container("own", pid=cri.CONTAINER, ipc=cri.CONTAINER)
    node = container("node", pid=cri.NODE, ipc=cri.NODE)
    target = container("target", pid=cri.TARGET, ipc=cri.POD, target_id=own)
    assert ns(a) == ns(b)
    # b sees a's process and its own, and no other container's.
    assert run(b, "ps", "-o", "args").count("sleep 600") == 2
    assert ns(own)[0] != ns(a)[0] and ns(own)[1] != ns(a)[1]
    # The guest's: every container's process, and the kernel's threads.
    processes = run(node, "ps", "-o", "args")
    assert processes.count("sleep 600") == 5 and "[kthreadd]" in processes, processes
    assert ns(node)[0] not in (ns(a)[0], ns(own)[0]) and ns(node)[1] not in (ns(a)[1], ns(own)[1])
    assert ns(target) == (ns(own)[0], ns(a)[1])
    d.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    d.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_names_rm_force_and_a_taken_port(daemon, pushed, no_leaks):
    """`run --name` names a container wherever an id goes, once; `rm -f`
    kills a running one; a host port a running pod has is refused (issue
    17: no names, no rm -f, a second -p accepted and never served)."""
    cli, image = Cli(daemon.cli.env, check=True), pushed.ref("busybox:latest")
    cid = cli("run", "-d", "--name", "web", "-p", "18940:80", image, "sleep", "600"
              ).stdout.decode().strip()
    r = cli("run", "-d", "--name", "web", image, "true", check=False)
    assert r.returncode == 125 and f'name "/web" is already in use by container "{cid[:12]}"' \
        in r.stderr.decode(), r
    r = cli("run", "--rm", "-p", "18940:81", image, "true", check=False)
    assert r.returncode == 125 and b"0.0.0.0:18940 failed: port is already allocated" in r.stderr
    r = cli("run", "--rm", "--name", "bad/name", image, "true", check=False)
    assert r.returncode == 125 and b"Invalid container name (bad/name)" in r.stderr, r
    assert cli("exec", "web", "echo", "hi").stdout == b"hi\n"
    assert "web" in cli("ps").stdout.decode()
    (info,) = json.loads(cli("inspect", "web").stdout)
    assert (info["Id"], info["Name"], info["State"]["Running"]) == (cid, "/web", True)
    assert info["NetworkSettings"]["Ports"] == {"80/tcp": [{"HostIp": "0.0.0.0",
                                                            "HostPort": "18940"}]}
    assert info["VM"]["Pid"] in qemu_pids() and info["VM"]["Channel"] in ("serial", "vsock")
    r = cli("inspect", "web", "nothing", check=False)
    assert r.returncode == 1 and b"No such object: nothing" in r.stderr
    assert [i["Name"] for i in json.loads(r.stdout)] == ["/web"]
    r = cli("rm", "web", check=False)
    assert r.returncode == 1 and b"is running: stop it first (or rm -f)" in r.stderr, r
    cli("rm", "-f", "web")
    assert cid[:12] not in cli("ps", "-a").stdout.decode()
    # Both free again.
    assert cli("run", "--rm", "--name", "web", "-p", "18940:80", image, "echo", "again"
               ).stdout == b"again\n"
