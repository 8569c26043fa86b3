"""The core (PodService, Task) with fake VMs (tests/fakes): pods, containers,
their output, exits, exec, stop and remove, VM deaths and hangs, a daemon's
restart. The agent is the real one's server and service over host
processes, so these run in seconds and boot nothing."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hyperrun.channel import frame, transport
from hyperrun.channel.agent import AgentClient
from hyperrun.channel.ttrpc import TtrpcError
from hyperrun.image.metadata import ImageRecord, Layer
from hyperrun.image.service import chain_id
from hyperrun.network import SandboxNetworks
from hyperrun.sandbox import sandbox as sandbox_mod
from hyperrun.pods import task as task_mod
from hyperrun.pods.service import PodService
from hyperrun.sandbox.podnet import PodNetworks
from hyperrun.sandbox.state import State
from hyperrun.specs import ContainerSpec, PodSpec, PortMapping
from hyperrun.vm import VMState
from tests.fakes.vm import KILLED, FakeHost, FakeVM

DEADLINE_S = 5.0  # for anything the core does at once: a failure, not a hang
PY_USR1 = """\
import os, signal
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"usr1\\n"))  # unbuffered: handlers nest
os.write(1, b"ready\\n")
while True:
    signal.pause()
"""


class Images:
    """The image store, in memory (not under test): what create_container
    asks of it (find, config, rootfs)."""

    def __init__(self, rootfs_dir: Path) -> None:
        self.rootfs_dir = rootfs_dir
        self.by_ref: dict[str, tuple[ImageRecord, dict]] = {}

    def add(self, ref: str, **config) -> None:
        digest = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        record = ImageRecord(digest, "application/vnd.oci.image.manifest.v1+json", digest,
                             [Layer(digest, "application/vnd.oci.image.layer.v1.tar", 1)])
        self.by_ref[ref] = (record, {"config": config})

    def find(self, ref: str) -> ImageRecord | None:
        return self.by_ref[ref][0] if ref in self.by_ref else None

    def config(self, image: ImageRecord) -> dict:
        return next(cfg for rec, cfg in self.by_ref.values() if rec.digest == image.digest)

    def rootfs(self, image: ImageRecord) -> Path:
        return self.rootfs_dir / f"{chain_id(image)}.erofs"


class Core:
    """One test's daemon side: fake host, images, state db and VM root;
    service() is a daemon's core over them (a second one: a restart)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "vms"
        self.logs = base / "logs"
        self.host = FakeHost(self.root)
        self.images = Images(base / "rootfs")
        path = "PATH=/usr/local/bin:/usr/bin:/bin"
        self.images.add("shell", Entrypoint=["/bin/sh"], Env=[path, "FROM_IMAGE=1"])
        self.images.add("usr1", Entrypoint=[sys.executable, "-c"], Env=[path],
                        StopSignal="SIGUSR1")
        # Its own netns dir and CNI cache: collect_stale must not see the
        # machine's (another daemon's networks).
        self.networks = PodNetworks("none", SandboxNetworks(cache_dir=base / "cni",
                                                            netns_dir=base / "netns"))
        self.states: list[State] = []
        self.services: list[PodService] = []

    def service(self) -> PodService:
        state = State(self.base / "state.db")
        self.states.append(state)
        self.services.append(PodService(self.images, state, root=self.root,
                                        networks=self.networks, new_vm=self.host.new_vm))
        return self.services[-1]

    def run(self, body) -> None:
        """A test's body on a fresh loop, with a deadline (a wait the core
        never ends fails the test instead of hanging it); then its services
        are closed, as at a daemon's shutdown, whatever the outcome."""
        async def main():
            try:
                await asyncio.wait_for(body(), 30)
            finally:
                for service in self.services:
                    await service.close()
        asyncio.run(main())

    async def pod(self, service: PodService, **spec) -> tuple[str, FakeVM]:
        spec.setdefault("name", "pod")
        pod_id = await service.run_pod(PodSpec(log_directory=str(self.logs), **spec))
        return pod_id, service.sandbox(pod_id).vm

    async def container(self, service: PodService, pod_id: str, script: str, *,
                        image: str = "shell", start: bool = True, name: str = "c",
                        **spec) -> str:
        args = ("-c", script) if image == "shell" else (script,)
        cid = await service.create_container(pod_id, ContainerSpec(
            name=name, image=image, args=args, log_path=f"{name}.log", **spec))
        if start:
            await service.start_container(cid)
        return cid

    async def sleeping(self) -> tuple[PodService, str, FakeVM, str]:
        """A service, a pod and a container that runs until stopped."""
        service = self.service()
        pod_id, vm = await self.pod(service)
        return service, pod_id, vm, await self.container(service, pod_id, "exec sleep 60")

    def log(self, name: str = "c") -> list[tuple[str, str, str]]:
        """The CRI log's entries: (stream, F|P, text)."""
        text = (self.logs / f"{name}.log").read_text()
        return [tuple(line.split(" ", 3)[1:]) for line in text.splitlines()]

    def close(self) -> None:
        self.host.close()
        for state in self.states:
            state.close()


@pytest.fixture
def core(monkeypatch):
    # Short: the agent socket's path must fit a unix socket address.
    base = Path(tempfile.mkdtemp(prefix="hr-core-", dir="/tmp"))
    # The VM config names a kernel and a guest image, which must exist; the
    # fake VM reads neither.
    for var, name in (("HYPERRUN_KERNEL", "vmlinux"), ("HYPERRUN_GUEST_IMAGE", "rootfs.erofs")):
        (base / name).touch()
        monkeypatch.setenv(var, str(base / name))
    monkeypatch.setenv("HYPERRUN_ACCEL", "tcg")
    # No health checks unless a test asks: a VM's end must arrive as an event.
    monkeypatch.setattr(sandbox_mod, "HEALTH_INTERVAL_S", 3600.0)
    c = Core(base)
    yield c
    c.close()
    shutil.rmtree(base, ignore_errors=True)


async def read_until(io, text: bytes, stream: str = "stdout") -> bytes:
    out = b""
    while text not in out:
        chunk = await asyncio.wait_for(io.read(stream), DEADLINE_S)
        assert chunk, f"{stream} ended before {text!r}: {out!r}"
        out += chunk
    return out


async def read_all(io, stream: str = "stdout") -> bytes:
    out = b""
    while chunk := await asyncio.wait_for(io.read(stream), DEADLINE_S):
        out += chunk
    return out


async def exited(service: PodService, pod_id: str, cid: str) -> int:
    """The task's exit future, awaited with a deadline."""
    return await asyncio.wait_for(service.pods[pod_id].tasks[cid].wait(), DEADLINE_S)


def lines(n: int, code: int = 0) -> str:
    """A script that prints line1..line<n>, one per line of input, then exits."""
    numbers = " ".join(map(str, range(1, n + 1)))
    return f"for i in {numbers}; do read x; echo line$i; done; exit {code}"


async def watched(core: Core, script: str, lossless: bool):
    """A started container of script, with two readers attached from its
    start: watcher, read at once (attached first, it is offered each chunk
    before slow), and slow, not read until the test says."""
    service = core.service()
    pod_id, vm = await core.pod(service)
    cid = await core.container(service, pod_id, script, stdin=True, start=False)
    watcher = await service.attach(cid, tty=False, stdin=True)
    slow = await service.attach(cid, tty=False, stdin=True, lossless=lossless)
    await service.start_container(cid)
    return service, pod_id, vm, cid, watcher, slow


async def pumped(watcher, numbers) -> None:
    """Have the container print those lines one at a time, each seen on
    the watcher's (a reader that keeps up) before the next: the pump has
    then offered it to every outlet."""
    for i in numbers:
        await watcher.write(b"\n")
        await read_until(watcher, f"line{i}\n".encode())


# ---------------------------------------------------------------- pods
def test_run_pod_launches_a_vm_and_sets_up_its_sandbox(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service, name="web", hostname="web-1")
        assert isinstance(vm, FakeVM) and vm.state is VMState.RUNNING
        assert vm.run_dir.parent == core.root
        row = service.sandbox_row(pod_id)
        assert (row.state, row.spec.name) == ("ready", "web")
        [setup] = vm.agent.service.setups
        assert setup.hostname == "web-1" and len(setup.entropy) == 64
    core.run(body)


def test_user_network_ports_become_host_forwards(core):
    async def body():
        service = core.service()
        _, vm = await core.pod(service, network="user", ports=(PortMapping(8080, 80),))
        assert vm.guest.forwards == ["tcp::8080-:80"]
        [setup] = vm.agent.service.setups
        assert list(setup.interfaces[0].addresses) == ["10.0.2.15/24"]
    core.run(body)


def test_stop_pod_and_remove_pod_end_the_vm_and_are_idempotent(core):
    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        await service.stop_pod(pod_id)
        assert vm.state is VMState.EXITED and not vm.run_dir.exists()
        assert service.sandbox_row(pod_id).state == "notready"
        assert service.container_row(cid).state == "exited"
        await service.stop_pod(pod_id)
        await service.remove_pod(pod_id)
        await service.remove_pod(pod_id)
        assert service.state.sandbox(pod_id) is None and service.state.container(cid) is None
    core.run(body)


# ---------------------------------------------------------------- containers
def test_create_and_start_a_container_its_output_in_the_log_and_attach(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service, hostname="h")
        cid = await core.container(service, pod_id, 'echo "$GREETING from $(pwd)"; echo err >&2',
                                   env=("GREETING=hello",), workdir=str(core.base), start=False)
        req = vm.agent.containers.requests[cid]
        assert list(req.process.args)[:2] == ["/bin/sh", "-c"]  # the image's entrypoint
        assert {"GREETING=hello", "FROM_IMAGE=1"} <= set(req.process.env)
        assert (req.process.cwd, req.hostname) == (str(core.base), "h")
        serial = req.rootfs.source.removeprefix("serial:")
        assert serial in vm.guest.disks  # its image hot-plugged
        assert service.container_row(cid).state == "created"

        io = await service.attach(cid, tty=False, stdin=False)  # before the start: misses nothing
        await service.start_container(cid)
        out, err = await asyncio.gather(read_all(io, "stdout"), read_all(io, "stderr"))
        assert (out, err) == (f"hello from {core.base}\n".encode(), b"err\n")
        assert await io.wait() == 0
        row = service.container_row(cid)
        assert (row.state, row.exit_code, row.reason) == ("exited", 0, "Completed")
        assert sorted(core.log()) == [("stderr", "F", "err"),
                                      ("stdout", "F", f"hello from {core.base}")]
    core.run(body)


def test_exit_is_recorded_after_all_output_and_sets_the_exit_future(core, monkeypatch):
    monkeypatch.setattr(task_mod, "OUTLET_LIMIT", 1)

    async def body():
        service, pod_id, vm, cid, watcher, slow = await watched(core, lines(3, 3), lossless=True)
        await pumped(watcher, [1, 2])  # the pump now waits for room in slow
        watcher.detach()
        await slow.write(b"\n")  # line3, left in the pipe; then the exit
        assert await asyncio.to_thread(vm.agent.wait_answered, "WaitProcess", cid, DEADLINE_S)
        # The exit reaches the host before line3 is read: the reader's end,
        # the record and the exit future must still come after it.
        assert await read_all(slow) == b"line1\nline2\nline3\n"
        assert await exited(service, pod_id, cid) == 3
        row = service.container_row(cid)
        assert (row.state, row.exit_code, row.reason) == ("exited", 3, "Error")
        assert row.finished_at >= row.started_at > 0
        assert [e[2] for e in core.log()] == ["line1", "line2", "line3"]
    core.run(body)


def test_lossless_attach_holds_the_output_for_a_reader_behind(core, monkeypatch):
    monkeypatch.setattr(task_mod, "OUTLET_LIMIT", 2)  # chunks a reader may lag behind

    async def body():
        service, pod_id, _, cid, watcher, slow = await watched(core, lines(6), lossless=True)
        await pumped(watcher, [1, 2, 3])  # 3 chunks: one more than slow may hold
        watcher.detach()
        for _ in range(3):
            await slow.write(b"\n")
        assert await read_all(slow) == b"".join(b"line%d\n" % i for i in range(1, 7))
        assert await slow.wait() == 0
        assert [e[2] for e in core.log()] == [f"line{i}" for i in range(1, 7)]
    core.run(body)


def test_attach_that_falls_behind_is_ended_and_the_log_has_everything(core, monkeypatch):
    monkeypatch.setattr(task_mod, "OUTLET_LIMIT", 2)

    async def body():
        # slow is never read until the end
        service, pod_id, _, cid, watcher, slow = await watched(core, lines(6), lossless=False)
        await pumped(watcher, range(1, 7))
        assert await exited(service, pod_id, cid) == 0  # the output did not wait for slow
        assert await read_all(slow) == b"line1\nline2\n"  # then it was ended
        assert [e[2] for e in core.log()] == [f"line{i}" for i in range(1, 7)]
    core.run(body)


def test_exec_with_stdin_and_exec_sync(core):
    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        io = await service.exec(cid, ["/bin/sh", "-c", "cat; echo e >&2; exit 4"],
                                tty=False, stdin=True)
        await io.write(b"hello\n")
        await io.close_stdin()  # cat's end
        assert await asyncio.gather(read_all(io, "stdout"), read_all(io, "stderr")) == \
            [b"hello\n", b"e\n"]
        assert await io.wait() == 4
        assert await service.exec_sync(cid, ["/bin/sh", "-c", "echo o; echo e >&2; exit 2"], 5) \
            == (b"o\n", b"e\n", 2)
        assert service.container_row(cid).state == "running"  # an exec's end is not the container's
    core.run(body)


def test_stop_sends_the_stop_signal_then_sigkill_after_the_timeout(core):
    async def body():
        service = core.service()
        pod_id, _ = await core.pod(service)
        # Its image's stop signal, SIGUSR1, which it takes and lives on.
        cid = await core.container(service, pod_id, PY_USR1, image="usr1", start=False)
        io = await service.attach(cid, tty=False, stdin=False)
        await service.start_container(cid)
        await read_until(io, b"ready\n")
        began = time.monotonic()
        await service.stop_container(cid, timeout=1)
        assert time.monotonic() - began >= 1.0  # the timeout was given to it
        assert b"usr1\n" in await read_all(io)
        row = service.container_row(cid)
        assert (row.state, row.exit_code) == ("exited", 128 + signal.SIGKILL)
    core.run(body)


def test_stop_ends_at_the_stop_signal_when_it_is_enough(core):
    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        began = time.monotonic()
        await service.stop_container(cid, timeout=30)
        assert time.monotonic() - began < 10  # not the timeout
        assert service.container_row(cid).exit_code == 128 + signal.SIGTERM
        await service.stop_container(cid, timeout=30)  # stopped already: nothing to do
    core.run(body)


def test_remove_container_kills_forgets_unplugs_and_is_idempotent(core):
    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        pid = vm.agent.containers.get(cid).init.pid
        serial = service.container_row(cid).disk_serial
        await service.remove_container(cid)
        assert service.state.container(cid) is None
        assert cid not in vm.agent.containers.ids() and cid not in service.pods[pod_id].tasks
        assert serial not in vm.guest.disks and vm.guest.unplugged == [serial]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        await service.remove_container(cid)
        await service.remove_container("no-such-container")
    core.run(body)


# ---------------------------------------------------------------- agent errors
def test_a_wait_that_fails_with_an_agent_error_is_asked_again(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service)
        cid = await core.container(service, pod_id, "read x; echo got:$x; exit 3", stdin=True,
                                   start=False)
        vm.agent.fail_next("WaitProcess", frame.INTERNAL, "a transient failure")
        io = await service.attach(cid, tty=False, stdin=True)
        await service.start_container(cid)
        await io.write(b"hello\n")
        assert await exited(service, pod_id, cid) == 3  # the second WaitProcess's answer
        row = service.container_row(cid)
        assert (row.state, row.exit_code, row.reason) == ("exited", 3, "Error")
        assert core.log() == [("stdout", "F", "got:hello")]
    core.run(body)


def test_a_wait_the_agent_cannot_answer_ends_the_task_with_its_reason(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service)
        cid = await core.container(service, pod_id, "exec sleep 60", start=False)
        # A final error: asking again would get the same answer.
        vm.agent.fail_next("WaitProcess", frame.NOT_FOUND, "process 'init' not found")
        io = await service.attach(cid, tty=False, stdin=False)
        await service.start_container(cid)
        assert await exited(service, pod_id, cid) == task_mod.WAIT_FAILED_CODE
        assert await asyncio.wait_for(io.wait(), DEADLINE_S) == task_mod.WAIT_FAILED_CODE
        row = service.container_row(cid)
        assert (row.state, row.exit_code, row.reason) == ("exited", 255, "AgentError")
        assert "process 'init' not found" in row.message
        # It was killed: "exited" is true.
        pid = vm.agent.containers.get(cid).init.pid
        assert vm.agent.containers.reaper.wait(pid, timeout=DEADLINE_S).signal == signal.SIGKILL
        await asyncio.wait_for(service.stop_container(cid, timeout=10), DEADLINE_S)
    core.run(body)


def test_a_wait_failing_past_its_retries_ends_the_task(core, monkeypatch):
    monkeypatch.setattr(task_mod, "WAIT_RETRY_DELAYS_S", (0.01, 0.01), raising=False)

    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service)
        cid = await core.container(service, pod_id, "exec sleep 60", start=False)
        for _ in range(3):  # the first ask and both retries
            vm.agent.fail_next("WaitProcess", frame.INTERNAL, "still failing")
        await service.start_container(cid)
        assert await exited(service, pod_id, cid) == 255
        row = service.container_row(cid)
        assert (row.reason, row.exit_code) == ("AgentError", 255) and "still failing" in row.message
    core.run(body)


def test_a_failed_start_is_a_start_error_though_its_wait_fails_too(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service)
        # The program cannot run: StartContainer fails, and WaitProcess
        # answers an agent error (never started) for the same process.
        cid = await core.container(service, pod_id, "", command=("/nonexistent/program",),
                                   start=False)
        with pytest.raises(TtrpcError):
            await service.start_container(cid)
        assert await exited(service, pod_id, cid) == 128
        row = service.container_row(cid)
        assert (row.state, row.exit_code, row.reason) == ("exited", 128, "StartError")
    core.run(body)


# ---------------------------------------------------------------- VM failures
def test_vm_death_marks_containers_exited_and_ends_waiters_at_once(core):
    async def body():
        service = core.service()
        pod_id, vm = await core.pod(service)
        running = await core.container(service, pod_id, "exec sleep 60", name="running")
        created = await core.container(service, pod_id, "true", name="created", start=False)
        io = await service.attach(running, tty=False, stdin=False)
        vm.die("guest kernel panic: fake")
        # Health checks are an hour apart here: only the exit's event can end these.
        assert await exited(service, pod_id, running) == 255
        assert await read_all(io) == b"" and await io.wait() == 255
        row = service.container_row(running)
        assert (row.state, row.exit_code, row.reason) == ("exited", 255, "VMExited")
        assert "guest kernel panic: fake" in row.message
        assert (service.container_row(created).state,
                service.container_row(created).reason) == ("exited", "VMExited")
        assert service.sandbox_row(pod_id).state == "notready" and service.sandbox(pod_id) is None
        await asyncio.wait_for(service.pods[pod_id].watcher, DEADLINE_S)
        assert not vm.run_dir.exists()  # what the VM held is gone with it
    core.run(body)


def test_hung_agent_fails_its_health_check_and_the_vm_is_killed(core, monkeypatch):
    monkeypatch.setattr(sandbox_mod, "HEALTH_INTERVAL_S", 0.05)
    monkeypatch.setattr(sandbox_mod, "HEALTH_TIMEOUT_S", 0.5)

    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        vm.hang()
        assert await asyncio.wait_for(service.pods[pod_id].tasks[cid].wait(), 10) == 255
        assert vm.guest.status == KILLED  # by the core, not of itself
        row = service.container_row(cid)
        assert row.reason == "VMExited" and "did not answer a health check" in row.message
    core.run(body)


# ---------------------------------------------------------------- daemon restart
def test_close_detaches_and_leaves_vms_and_containers_running(core):
    async def body():
        service, pod_id, vm, cid = await core.sleeping()
        pid = vm.agent.containers.get(cid).init.pid
        await service.close()
        assert vm.state is VMState.DETACHED
        assert service.container_row(cid).state == "running"
        os.kill(pid, 0)  # alive
        agent = AgentClient("check")
        await agent.connect(transport.unix(str(vm.agent_socket)))
        assert await agent.health(timeout=DEADLINE_S)  # the guest serves on
        await agent.close()
    core.run(body)


def test_recover_after_a_daemon_restart_adopts_live_vms_and_follows_containers(core):
    async def body():
        first = core.service()
        pod_a, vm_a = await core.pod(first, name="a")
        cid = await core.container(first, pod_a, "read x; echo got:$x; exit 3", stdin=True)
        later = await core.container(first, pod_a, "echo later", name="later", start=False)
        pod_b, vm_b = await core.pod(first, name="b")
        lost = await core.container(first, pod_b, "exec sleep 60", name="lost")
        await first.close()
        vm_b.die("guest kernel panic: while the daemon was down")
        core.states[0].close()

        second = core.service()
        await second.recover()
        adopter = core.host.vm(vm_a.id)
        assert adopter is not vm_a and adopter.state is VMState.RUNNING
        assert second.sandbox(pod_a).vm is adopter
        # The VM that died meanwhile: its pod and container say so, its run dir is gone.
        assert second.sandbox_row(pod_b).state == "notready"
        row = second.container_row(lost)
        assert (row.exit_code, row.reason) == (255, "VMExited")
        assert not vm_b.run_dir.exists()
        # The running container is followed: its exit recorded by this daemon.
        io = await second.attach(cid, tty=False, stdin=True)
        await io.write(b"hello\n")
        assert await exited(second, pod_a, cid) == 3
        assert second.container_row(cid).exit_code == 3
        # The adopted VM takes new work.
        await second.start_container(later)
        assert await exited(second, pod_a, later) == 0
        assert core.log("later") == [("stdout", "F", "later")]
    core.run(body)


def test_output_after_a_daemon_restart_reaches_the_log(core):
    async def body():
        first = core.service()
        pod_id, _ = await core.pod(first)
        cid = await core.container(first, pod_id, "read x; echo got:$x", stdin=True)
        await first.close()
        core.states[0].close()
        second = core.service()
        await second.recover()
        io = await second.attach(cid, tty=False, stdin=True)
        await io.write(b"hello\n")
        assert await exited(second, pod_id, cid) == 0
        assert core.log() == [("stdout", "F", "got:hello")]
    core.run(body)


def test_the_name_server_answers_a_service_in_its_own_project(core):
    """A pod's name answers for anyone; a compose service's name only for
    the pods of its project (the name server says who asks)."""
    import json

    from hyperrun.network.sandbox_net import NetworkInfo
    from hyperrun.sandbox.state import SandboxRow
    from hyperrun.specs import PROJECT_LABEL, SERVICE_LABEL

    m = core.service()
    for name, project, ip in (("one-db-1", "one", "10.89.0.2"), ("one-web-1", "one", "10.89.0.3"),
                              ("two-web-1", "two", "10.89.0.4"), ("lone", "", "10.89.0.5")):
        labels = {PROJECT_LABEL: project, SERVICE_LABEL: name.split("-")[1]} if project else {}
        info = NetworkInfo(name, "net", "", "eth0", "tap0", "", 1500, ips=[f"{ip}/16"])
        m.state.add_sandbox(SandboxRow(name, PodSpec(name=name, labels=labels).to_json(),
                                       "ready", 0, json.dumps({"network": {
                                           "kind": "cni", "info": info.to_dict()}}).encode()))
    assert m._addresses("one-db-1", "10.89.0.4") == ["10.89.0.2"]  # a container's name: any pod
    assert m._addresses("db", "10.89.0.3") == ["10.89.0.2"]        # its project's service
    assert m._addresses("web", "10.89.0.2") == ["10.89.0.3"]
    assert m._addresses("web", "10.89.0.4") == ["10.89.0.4"]        # two's own web
    assert m._addresses("db", "10.89.0.4") == []                    # not two's
    assert m._addresses("db", "10.89.0.5") == []                    # no project
