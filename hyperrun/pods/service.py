"""Pods and their containers, for the daemon: one VM per pod sandbox (as
Hyper and Kata), its containers agent containers in it.

State lives in SQLite (sandbox/state.py) so that a daemon killed with -9
and restarted re-attaches to every running VM (QMP and agent channel) and
carries on: statuses, exit codes, log pumping. A pod's images arrive as
read-only erofs disks hot-plugged on the VM's virtio-scsi bus, found in the
guest by serial, and unplugged when no container of the pod uses them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import signal
import time
from collections.abc import Callable

from hyperrun.channel import frame
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcError
from hyperrun.image.imageconfig import Overrides, apply
from hyperrun.image.service import ImageService, chain_id
from hyperrun.specs import ContainerSpec, PodSpec, Resources
from hyperrun.proto import agent_pb2 as apb
from hyperrun.vm import VM, VMError, new as new_vm, rundir
from hyperrun.vm.config import Channel, Disk, Share
from hyperrun.vm.template import clone_config

from hyperrun.sandbox import podnet, volumes
from hyperrun.sandbox.config import SandboxConfig
from hyperrun.sandbox.pool import SandboxPool, Spare
from hyperrun.sandbox.sandbox import Sandbox
from hyperrun.sandbox.templates import TemplateStore
from hyperrun.sandbox.state import ContainerRow, SandboxRow, State

from .task import AttachIO, ExecIO, Task

from hyperrun import config as hconfig
from hyperrun import log

logger = log.get("sandbox")
READY, NOTREADY = "ready", "notready"
STARTUP_WINDOW_S = 3.0  # see _resend_while_starting
# A pod VM's agent is asked for its health this often; one that does not
# answer within the timeout is hung (a guest deadlock, a wedged VMM): its VM
# is killed and the pod reported as a dead VM's, as Kata's sandbox monitor
# does. Generous: a loaded 2-core host under TCG answers in milliseconds.
HEALTH_INTERVAL_S = float(os.environ.get("HYPERRUN_HEALTH_INTERVAL_S", 10))
HEALTH_TIMEOUT_S = float(os.environ.get("HYPERRUN_HEALTH_TIMEOUT_S", 30))
CREATED, RUNNING, EXITED, UNKNOWN = "created", "running", "exited", "unknown"


class NotFound(Exception):
    pass


class Invalid(Exception):
    pass


class Conflict(Exception):
    pass


def _now() -> int:
    return time.time_ns()


def agent_resources(r: Resources) -> apb.Resources:
    """A container's limits as the agent's (OCI) resources."""
    return apb.Resources(cpu_period=r.cpu_period, cpu_quota=r.cpu_quota,
                         cpu_shares=r.cpu_shares, memory_limit_bytes=r.memory_limit_bytes,
                         memory_swap_limit_bytes=r.memory_swap_limit_bytes,
                         cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems, unified=r.unified)


def _vm_json(vm: VM, network: podnet.PodNetwork) -> bytes:
    c = vm.config
    return json.dumps({"id": vm.id, "channel": c.channel.kind, "cid": c.channel.cid,
                       "vcpus": c.vcpus, "memory_mib": c.memory_mib,
                       "network": network.to_dict()}).encode()


def pod_network(row: SandboxRow) -> podnet.PodNetwork:
    return podnet.PodNetwork.from_dict(json.loads(row.vm).get("network"))


class Pod:
    """A pod's live side, beside its record: its sandbox while it is ready,
    the lock its steps take, its VM's watcher, its containers' tasks."""

    def __init__(self, pod_id: str) -> None:
        self.id = pod_id
        self.sandbox: Sandbox | None = None
        self.lock = asyncio.Lock()
        self.watcher: asyncio.Task | None = None
        self.tasks: dict[str, Task] = {}
        self.cpu_samples: dict[str, tuple[int, int]] = {}  # per container ("": the guest)

    def close_task(self, container_id: str) -> None:
        if task := self.tasks.pop(container_id, None):
            task.close()


class PodService:
    """The pods and their containers' tasks, whoever asks: the CRI's
    servicers and the CLI's commands are callers."""

    def __init__(self, images: ImageService, state: State,
                 defaults: hconfig.SandboxDefaults | None = None, *,
                 root=None, die_with_parent: bool = False,
                 networks: podnet.PodNetworks | None = None,
                 new_vm: Callable[..., VM] = new_vm):
        """root: where the VMs' run directories go (the daemon's by default);
        die_with_parent: VMs end with this process (embedded mode); new_vm:
        how a VM is made, as vm.new (unit tests pass a fake VM's)."""
        self.root = root or rundir.sandbox_root()
        self.new_vm = new_vm
        self.networks = networks or podnet.PodNetworks("none")
        self.die_with_parent = die_with_parent
        self.images = images
        self.state = state
        self.defaults = defaults or hconfig.SandboxDefaults()
        self.templates = TemplateStore() if self.defaults.template else None
        self.pool = SandboxPool(self.defaults.pool_size, self._start_spare, self._discard_spare) \
            if self.defaults.pool_size > 0 else None
        self.pods: dict[str, Pod] = {}  # every pod with a record
        self._recent_disk: Disk | None = None  # the latest container's image: see _preplug

    def _pod(self, pod_id: str) -> Pod:
        if (pod := self.pods.get(pod_id)) is None:
            pod = self.pods[pod_id] = Pod(pod_id)
        return pod

    def sandbox(self, pod_id: str) -> Sandbox | None:
        """The pod's sandbox, if the pod is ready."""
        pod = self.pods.get(pod_id)
        return pod.sandbox if pod is not None else None

    # ------------------------------------------------------------ recovery
    async def recover(self) -> None:
        """At start-up: re-attach to the VMs of ready sandboxes, resume their
        containers' log pumps and waiters; clean what belongs to no live
        sandbox (no record, a stopped one, a VM lost while the daemon was
        down: a daemon killed inside a stop or remove left its run dir or
        cgroup behind a record that still names the VM)."""
        live = set()
        for row in self.state.sandboxes():
            pod = self._pod(row.id)
            vm_info = json.loads(row.vm)
            if row.state != READY:
                # Stopped, but maybe killed between the VM's end and the
                # network's teardown: finish it (idempotent).
                await asyncio.to_thread(self.networks.teardown, row.id, pod_network(row))
                continue
            vm = self.new_vm(dataclasses.replace(
                self._vm_config(), channel=Channel(vm_info["channel"], vm_info["cid"])),
                vm_id=vm_info["id"], root=self.root)
            try:
                sandbox = await Sandbox.adopt(vm)
            except (VMError, OSError, ConnectionError) as exc:
                logger.warning("sandbox lost", sandbox=row.id, error=str(exc))
                self._sandbox_gone(row.id, f"VM lost while the daemon was down: {exc}")
                await asyncio.to_thread(self.networks.teardown, row.id, pod_network(row))
                continue
            logger.info("sandbox re-attached", sandbox=row.id, vm=vm.id, pid=vm.pid)
            live.add(vm.id)
            pod.sandbox = sandbox
            self._watch_vm(pod)
            containers = self.state.containers(row.id)
            # Its plugged disks, as recorded; one plugged with no record yet (a
            # pre-plug, a kill inside a create) is plugged again, and
            # hotplug_disk takes it as it is.
            sandbox.disks = {c.disk_serial for c in containers}
            for c in containers:
                if c.state == RUNNING:
                    self._follow(pod, c)
            for name in volumes.unbind_unknown(self._shared_dir(vm), [c.id for c in containers]):
                logger.info("removed volume binds of no container", sandbox=row.id, dir=name)
        root = self.root
        if root.is_dir():
            for path in root.iterdir():
                if path.name not in live:
                    pid = rundir.kill_and_remove(path)
                    logger.info("removed a VM of no live sandbox", vm=path.name, pid=pid)
        from hyperrun.vm import cgroup
        for vm_id in cgroup.stale(live):
            cgroup.release_vm(vm_id)
        ready = [row.id for row in self.state.sandboxes() if row.state == READY]
        for sid in await asyncio.to_thread(self.networks.collect_stale, ready):
            logger.info("removed a network with no sandbox", sandbox=sid)

    def _vm_config(self, vcpus: int | None = None, memory_mib: int | None = None):
        return SandboxConfig(vcpus=vcpus or self.defaults.vcpus,
                             memory_mib=memory_mib or self.defaults.memory_mib,
                             machine=self.defaults.machine, hotplug_disks=True,
                             die_with_parent=self.die_with_parent).vm_config()

    async def close(self) -> None:
        """Daemon shutdown: let go of pod VMs without stopping them; spare
        VMs (in no record) are removed."""
        if self.pool is not None:
            await self.pool.close()
        for pod in self.pods.values():
            for task in pod.tasks.values():
                task.close()
            if pod.watcher is not None:
                pod.watcher.cancel()
            if pod.sandbox is not None:
                await pod.sandbox.detach()

    # ------------------------------------------------------------ sandboxes
    async def run_pod(self, spec: PodSpec) -> str:
        if not spec.name:
            raise Invalid("sandbox config has no metadata.name")
        for row in self.state.sandboxes():
            old = row.spec
            if (old.name, old.namespace, old.uid, old.attempt) == (
                    spec.name, spec.namespace, spec.uid, spec.attempt):
                raise Conflict(f"sandbox {spec.name!r} attempt {spec.attempt}"
                               f" exists already: {row.id}")
        kind = self.networks.kind_for(spec)
        vcpus, memory = hconfig.vm_size(self.defaults, spec)
        clock = asyncio.get_running_loop().time
        t0 = clock()
        spare = None
        if self.pool is not None and kind == self.networks.kind and \
                (vcpus, memory) == (self.defaults.vcpus, self.defaults.memory_mib):
            spare = await self.pool.take()
        if spare is not None:
            sandbox_id, sandbox = spare.sandbox_id, spare.sandbox
            try:
                network = await asyncio.to_thread(self.networks.complete, sandbox_id, kind, spec)
            except BaseException:
                await self._discard(sandbox_id, sandbox, podnet.PodNetwork(kind))
                raise
        else:
            sandbox_id = secrets.token_hex(32)
            sandbox, network = await self._start_sandbox(sandbox_id, kind, vcpus, memory, spec)
        t1 = clock()
        try:
            for rule in podnet.user_forwards(network, spec):
                await sandbox.vm.add_host_forward(rule)
            await sandbox.agent.setup_sandbox(podnet.setup_request(network, spec))
        except BaseException:
            await self._discard(sandbox_id, sandbox, network)
            raise
        vm = sandbox.vm
        self.state.add_sandbox(SandboxRow(sandbox_id, spec.to_json(), READY, _now(),
                                          _vm_json(vm, network)))
        pod = self._pod(sandbox_id)
        pod.sandbox = sandbox
        self._watch_vm(pod)
        logger.info("sandbox started", sandbox=sandbox_id, name=spec.name,
                    vm=vm.id, pid=vm.pid, from_pool=spare is not None,
                    vm_and_network_s=round(t1 - t0, 3), setup_s=round(clock() - t1, 3))
        return sandbox_id

    async def _start_sandbox(self, sandbox_id: str, kind: str, vcpus: int, memory: int,
                             spec: PodSpec | None = None
                             ) -> tuple[Sandbox, podnet.PodNetwork | None]:
        """A sandbox VM with its network prepared, restored from the
        template or booted; with a pod config, the pod's network is added
        while the VM starts. On failure nothing of it is left."""
        vm_id = sandbox_id[:16]
        nic = await asyncio.to_thread(self.networks.prepare, sandbox_id, kind)
        config = dataclasses.replace(
            self._vm_config(vcpus, memory), nic=nic,
            shares=(Share(volumes.SHARE_TAG, self.root / vm_id / volumes.SHARE_DIR),))
        adding = None
        if spec is not None:
            adding = asyncio.create_task(
                asyncio.to_thread(self.networks.complete, sandbox_id, kind, spec))
        sandbox = None
        try:
            try:
                if self.templates is not None:  # made on first use of this VM shape
                    template = await self.templates.get(config, self.root)
                    # A spare (no pod yet) keeps the full TCG cache: see clone_config.
                    config = clone_config(config, template, cache_mib=None if spec is None
                                          else self.defaults.clone_cache_mib)
                sandbox = await Sandbox.start(self.new_vm(config, vm_id, self.root))
            finally:
                if nic is not None and nic.tap_fd >= 0:
                    os.close(nic.tap_fd)  # QEMU has its own
            network = await adding if adding is not None else None
        except BaseException:
            if sandbox is not None:
                await sandbox.destroy()
            if adding is not None:
                await asyncio.gather(adding, return_exceptions=True)
            await asyncio.to_thread(self.networks.teardown, sandbox_id, podnet.PodNetwork(kind))
            raise
        return sandbox, network

    async def _start_spare(self) -> Spare:
        sandbox_id = secrets.token_hex(32)
        kind = self.networks.kind
        sandbox, _ = await self._start_sandbox(sandbox_id, kind, self.defaults.vcpus,
                                               self.defaults.memory_mib)
        spare = Spare(sandbox_id, kind, sandbox)
        try:
            await sandbox.agent.warm_up()
            # Under TCG every path the guest runs first is translated first
            # (kernel and agent): an identity-only setup (entropy, clock,
            # loopback) in a clone took 0.3 s the first time, 0.03 s after.
            # The pod's own SetupSandbox repeats it with fresh entropy.
            await sandbox.agent.setup_sandbox(apb.SetupSandboxRequest())
        except BaseException:
            await self._discard_spare(spare)
            raise
        if (disk := self._recent_disk) is not None:
            await self._preplug(sandbox, disk)
        return spare

    async def _preplug(self, sandbox: Sandbox, disk: Disk) -> None:
        """Plug the image the latest container ran into a spare while it
        waits: the guest's scan of a new SCSI disk (~20 ms of a TCG guest's
        CPU) is then done before a pod of that image takes the spare, not
        during its CreateContainer. A pod of another image plugs its own;
        this one stays, unused, until the VM ends."""
        try:
            await sandbox.vm.hotplug_disk(disk)
        except Exception as exc:  # an image removed meanwhile: the spare is fine without
            logger.info("spare without a pre-plugged image", vm=sandbox.id, error=str(exc))
            return
        sandbox.disks.add(disk.serial)

    async def _discard_spare(self, spare: Spare) -> None:
        await self._discard(spare.sandbox_id, spare.sandbox, podnet.PodNetwork(spare.kind))

    async def _discard(self, sandbox_id: str, sandbox: Sandbox,
                       network: podnet.PodNetwork) -> None:
        """Remove a sandbox that no record holds: its VM, then its network
        (the VM's tap pins the netns; teardown is idempotent)."""
        await sandbox.destroy()
        await asyncio.to_thread(self.networks.teardown, sandbox_id, network)

    def start_pool(self) -> None:
        """Begin filling the pool of spare VMs (if one is configured)."""
        if self.pool is not None:
            self.pool.start()

    @staticmethod
    def _shared_dir(vm: VM):
        return vm.run_dir / volumes.SHARE_DIR

    def _watch_vm(self, pod: Pod) -> None:
        sandbox, sandbox_id = pod.sandbox, pod.id

        async def watch() -> None:
            hung = await self._monitor(sandbox)
            if pod.sandbox is sandbox:  # not a stop we asked for
                pod.sandbox = None
                self._sandbox_gone(pod, hung or f"VM exited: {sandbox.vm.failure_reason()}")
                # What the VM held goes now, not at the pod's removal: its
                # network, run directory (sockets, volume binds), the session.
                await sandbox.agent.close()
                await sandbox.vm.remove()
                if row := self.state.sandbox(sandbox_id):
                    await asyncio.to_thread(self.networks.teardown, sandbox_id, pod_network(row))

        pod.watcher = asyncio.create_task(watch())

    async def _monitor(self, sandbox: Sandbox) -> str | None:
        """Return once the VM has exited: None if it did of itself, or why
        it was killed (its agent stopped answering health checks)."""
        exited = asyncio.ensure_future(sandbox.vm.wait_exited())
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=HEALTH_INTERVAL_S)
                if done:
                    return None
                try:
                    await sandbox.agent.health(timeout=HEALTH_TIMEOUT_S)
                    continue
                except TimeoutError:
                    reason = (f"VM hung: its agent did not answer a health check within "
                              f"{HEALTH_TIMEOUT_S:g}s; the VM was killed")
                except ConnectionLost:
                    # Closed by a VM on its way out (its exit comes next), or
                    # by the agent: a session lost for good, the pod unusable.
                    await asyncio.wait({exited}, timeout=5)
                    reason = "the agent's channel closed while the VM ran; the VM was killed"
                except TtrpcError:
                    continue
                if sandbox.vm.exited:
                    return None
                logger.warning("sandbox killed", vm=sandbox.id, reason=reason)
                await sandbox.vm.kill()
                return reason
        finally:
            exited.cancel()

    def _sandbox_gone(self, pod: Pod | str, reason: str) -> None:
        """The pod's VM is gone (or was never re-attached): its record says
        so, and so do its containers' records and tasks."""
        pod_id = pod if isinstance(pod, str) else pod.id
        logger.info("sandbox not ready", sandbox=pod_id, reason=reason)
        self.state.set_sandbox_state(pod_id, NOTREADY)
        tasks = {} if isinstance(pod, str) else pod.tasks
        for c in self.state.containers(pod_id):
            if c.state in (CREATED, RUNNING):
                code = 255 if c.state == RUNNING else 0
                self.state.update_container(c.id, state=EXITED, finished_at=_now(),
                                            exit_code=code, reason="VMExited", message=reason)
                if task := tasks.get(c.id):
                    task.ended(code)

    def sandbox_row(self, sandbox_id: str) -> SandboxRow:
        row = self.state.sandbox(sandbox_id)
        if row is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return row

    async def stop_pod(self, sandbox_id: str) -> None:
        row = self.state.sandbox(sandbox_id)
        if row is None:
            return  # stop is idempotent
        pod = self._pod(sandbox_id)
        async with pod.lock:
            for c in self.state.containers(sandbox_id):
                if c.state == RUNNING:
                    try:
                        await self.stop_container(c.id, 0)
                    except (TimeoutError, ConnectionLost) as exc:
                        # A hung or dead guest: stopping its VM, next, ends
                        # the container all the same.
                        logger.warning("container not stopped by the agent", container=c.id,
                                       sandbox=sandbox_id, error=str(exc))
            sandbox, pod.sandbox = pod.sandbox, None
            if pod.watcher is not None:
                pod.watcher.cancel()
                pod.watcher = None
            if sandbox is not None:
                await sandbox.destroy()
            self._sandbox_gone(pod, "sandbox stopped")
            await asyncio.to_thread(self.networks.teardown, sandbox_id, pod_network(row))

    async def remove_pod(self, sandbox_id: str) -> None:
        if self.state.sandbox(sandbox_id) is None:
            return
        await self.stop_pod(sandbox_id)
        if pod := self.pods.pop(sandbox_id, None):
            for cid in list(pod.tasks):
                pod.close_task(cid)
        self.state.remove_sandbox(sandbox_id)

    # ------------------------------------------------------------ containers
    def container_row(self, container_id: str) -> ContainerRow:
        row = self.state.container(container_id)
        if row is None:
            raise NotFound(f"container {container_id!r} not found")
        return row

    def _running_sandbox(self, sandbox_id: str) -> Sandbox:
        self.sandbox_row(sandbox_id)
        sandbox = self.sandbox(sandbox_id)
        if sandbox is None:
            raise Conflict(f"pod sandbox {sandbox_id} is not ready")
        return sandbox

    async def create_container(self, sandbox_id: str, spec: ContainerSpec) -> str:
        sandbox = self._running_sandbox(sandbox_id)
        pod = self.sandbox_row(sandbox_id).spec
        if not spec.name:
            raise Invalid("container config has no metadata.name")
        image = self.images.find(spec.image)
        if image is None:
            raise NotFound(f"image {spec.image!r} not found")
        image_config = self.images.config(image)
        defaults = apply(image_config, Overrides(
            args=list(spec.args), entrypoint=list(spec.command) if spec.command else None,
            env=list(spec.env), workdir=spec.workdir, user=spec.user))
        container_id = secrets.token_hex(32)
        serial = "img-" + chain_id(image)[:16]
        disk = Disk(self.images.rootfs(image), serial=serial)
        async with self.pods[sandbox_id].lock:
            began = time.monotonic()
            hotplug = serial not in sandbox.disks
            if hotplug:
                await sandbox.vm.hotplug_disk(disk)
                sandbox.disks.add(serial)
            self._recent_disk = disk
            plugged = time.monotonic()
            process = apb.Process(args=defaults.args, env=defaults.env, cwd=defaults.cwd,
                                  user=apb.User(spec=defaults.user,
                                                additional_gids=list(spec.groups)),
                                  terminal=spec.tty, stdin=spec.stdin,
                                  console_size=_console(spec.console_size))
            shared = self._shared_dir(sandbox.vm)
            try:
                mounts = volumes.bind(shared, container_id, spec.mounts)
            except volumes.VolumeError as exc:
                await self._unplug_if_unused(sandbox, sandbox_id, serial)
                raise Invalid(str(exc)) from None
            try:
                await sandbox.agent.create_container(
                    container_id, apb.Storage(source=f"serial:{serial}", fstype="erofs",
                                              overlay=True),
                    process, hostname=pod.pod_hostname(), readonly_rootfs=spec.readonly_rootfs,
                    resources=agent_resources(spec.resources), sysctls=pod.sysctls,
                    mounts=mounts, privileged=spec.privileged, host_pid=spec.host_pid)
            except TtrpcError:
                volumes.unbind(shared, container_id)
                await self._unplug_if_unused(sandbox, sandbox_id, serial)
                raise
            self.state.add_container(ContainerRow(container_id, sandbox_id,
                                                  spec.to_json(), image.digest,
                                                  serial, CREATED, _now(),
                                                  stop_signal=defaults.stop_signal))
        logger.info("container created", container=container_id, sandbox=sandbox_id,
                    hotplugged=hotplug, hotplug_s=round(plugged - began, 3),
                    create_s=round(time.monotonic() - plugged, 3))
        return container_id

    async def _unplug_if_unused(self, sandbox: Sandbox, sandbox_id: str, serial: str) -> None:
        if not any(c.disk_serial == serial for c in self.state.containers(sandbox_id)):
            await sandbox.vm.unplug_disk(serial)
            sandbox.disks.discard(serial)

    def log_path(self, row: ContainerRow) -> str:
        log_path = row.spec.log_path
        if not log_path:
            return ""
        return os.path.join(self.sandbox_row(row.sandbox_id).spec.log_directory, log_path)

    async def start_container(self, container_id: str) -> None:
        row = self.container_row(container_id)
        if row.state != CREATED:
            raise Conflict(f"container {container_id} is {row.state}, not created")
        sandbox = self._running_sandbox(row.sandbox_id)
        # RUNNING before the start: a program that exits at once is then
        # recorded EXITED by its waiter after, never overwritten by RUNNING.
        self.state.update_container(container_id, state=RUNNING, started_at=_now())
        task = self._follow(self.pods[row.sandbox_id], row)
        began = time.monotonic()
        try:
            await sandbox.agent.start_container(container_id)
        except TtrpcError as exc:
            self.state.update_container(container_id, state=EXITED, finished_at=_now(),
                                        exit_code=128, reason="StartError",
                                        message=exc.remote_message)
            task.close()
            task.ended(128)
            raise
        finally:
            task.started()  # not failed (for all it knows): its waiter may end it
        logger.info("container started", container=container_id, sandbox=row.sandbox_id,
                    start_s=round(time.monotonic() - began, 3))

    def _task(self, pod: Pod, row: ContainerRow) -> Task:
        """The container's task, made on first need (an attach before the
        start, the start, a re-attach after a daemon restart)."""
        if (task := pod.tasks.get(row.id)) is None:
            task = pod.tasks[row.id] = Task(row.id, pod.sandbox.agent, self.log_path(row),
                                            row.spec.tty)
        return task

    def _follow(self, pod: Pod, row: ContainerRow) -> Task:
        """Pump the container's output into its log, and record its exit:
        its process's own, or (reason AgentError) the agent's failure to
        report it. A re-attach follows a running container's row; a start
        the created one's, and tells the task once its start succeeded."""
        def recorded(code: int, error: str) -> None:
            if error:
                self.state.update_container(row.id, state=EXITED, finished_at=_now(),
                                            exit_code=code, reason="AgentError", message=error)
                logger.warning("container ended: its exit is unknown", container=row.id,
                               exit_code=code, error=error)
                return
            self.state.update_container(row.id, state=EXITED, finished_at=_now(), exit_code=code,
                                        reason="Completed" if code == 0 else "Error")
            logger.info("container exited", container=row.id, exit_code=code)

        task = self._task(pod, row)
        task.follow(recorded, started=row.state == RUNNING)
        return task

    async def stop_container(self, container_id: str, timeout: int) -> None:
        row = self.container_row(container_id)
        if row.state != RUNNING:
            return
        pod = self.pods.get(row.sandbox_id)
        if pod is None or pod.sandbox is None:
            return
        sandbox = pod.sandbox
        task = pod.tasks.get(container_id)
        waiter = task.waiter if task is not None else None
        for signum, wait in ((row.stop_signal, max(timeout, 0)), (signal.SIGKILL, 10)):
            try:
                await sandbox.agent.signal_process(container_id, "", signum)
            except TtrpcError:
                break  # exited meanwhile
            if waiter is None:
                break
            deadline = time.monotonic() + wait
            if signum != signal.SIGKILL:
                await self._resend_while_starting(sandbox, row, signum, waiter, deadline)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max(deadline - time.monotonic(), 0))
                break
            except asyncio.TimeoutError:
                continue
        if waiter is not None:
            await asyncio.wait_for(asyncio.shield(waiter), 10)

    async def _resend_while_starting(self, sandbox: Sandbox, row: ContainerRow, signum: int,
                                     waiter: asyncio.Task, deadline: float) -> None:
        """A container's program is its PID namespace's init: a signal it
        has no handler for yet is discarded by the kernel. Under emulation
        a program takes a while to install its handlers, so a stop right
        after start would be lost; for the first seconds of a container's
        life, the stop signal is sent again until it is taken."""
        young_until = time.monotonic() + STARTUP_WINDOW_S - (_now() - row.started_at) / 1e9
        while time.monotonic() < min(young_until, deadline) and not waiter.done():
            await asyncio.wait({waiter}, timeout=0.2)
            if waiter.done():
                return
            try:
                await sandbox.agent.signal_process(row.id, "", signum)
            except TtrpcError:
                return

    async def remove_container(self, container_id: str) -> None:
        row = self.state.container(container_id)
        if row is None:
            return  # remove is idempotent
        pod = self._pod(row.sandbox_id)
        if row.state == RUNNING:
            await self.stop_container(container_id, 0)
        async with pod.lock:
            sandbox = pod.sandbox
            if sandbox is not None:
                try:
                    await sandbox.agent.remove_container(container_id)
                except TtrpcError as exc:
                    if exc.code != frame.NOT_FOUND:  # removed already: fine
                        raise
                volumes.unbind(self._shared_dir(sandbox.vm), container_id)
            pod.close_task(container_id)
            self.state.remove_container(container_id)
            if sandbox is not None:
                await self._unplug_if_unused(sandbox, row.sandbox_id, row.disk_serial)

    async def update_container(self, container_id: str, resources: Resources) -> None:
        row = self.container_row(container_id)
        if row.state != RUNNING:
            raise Conflict(f"container {container_id} is not running")
        sandbox = self._running_sandbox(row.sandbox_id)
        await sandbox.agent.update_container(container_id, agent_resources(resources))
        spec = dataclasses.replace(row.spec, resources=resources)
        self.state.update_container(container_id, config=spec.to_json())

    def reopen_log(self, container_id: str) -> None:
        row = self.container_row(container_id)
        if row.state != RUNNING:
            raise Conflict(f"container {container_id} is not running")
        task = self.pods[row.sandbox_id].tasks.get(container_id)
        if task is not None and task.log is not None:
            task.log.reopen()

    # ------------------------------------------------------------ streaming
    async def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool,
                   console_size: tuple[int, int] | None = None) -> "ExecIO":
        """An exec whose output is read as it comes (the streaming server's,
        a run session's); console_size: a tty's (rows, cols) from the start."""
        row = self.container_row(container_id)
        if row.state != RUNNING:
            raise Conflict(f"container {container_id} is not running")
        if not cmd:
            raise Invalid("exec command is empty")
        sandbox = self._running_sandbox(row.sandbox_id)
        eid = "exec-" + secrets.token_hex(8)
        await sandbox.agent.exec_process(container_id, eid, apb.Process(
            args=cmd, terminal=tty, stdin=stdin, console_size=_console(console_size)))
        return ExecIO(sandbox.agent, container_id, eid)

    async def attach(self, container_id: str, tty: bool, stdin: bool,
                     lossless: bool = False) -> "AttachIO":
        """Attach to a container's own process: its output (copied from the
        log pumps) and, if it was created with stdin, its input. A created
        container may be attached before it starts (as `docker run` does),
        so that none of its output is missed. A session that falls behind
        is ended (the log has everything), unless lossless: then the
        container's output waits for it, as an attached `docker run` does
        (a run session, whose reader is the user's pipe)."""
        row = self.container_row(container_id)
        if row.state not in (CREATED, RUNNING):
            raise Conflict(f"container {container_id} is not running")
        self._running_sandbox(row.sandbox_id)
        task = self._task(self.pods[row.sandbox_id], row)
        return AttachIO(task, task.attach(lossless))

    def reserve_attach(self, container_id: str, ttl: float) -> None:
        """See Task.reserve."""
        row = self.container_row(container_id)
        self._running_sandbox(row.sandbox_id)
        self._task(self.pods[row.sandbox_id], row).reserve(ttl)

    async def port_forward(self, sandbox_id: str, port: int):
        """A connection to a port of the pod, through its IP (the kubelet's
        port-forward reaches the pod's network namespace; ours is a VM's)."""
        self._running_sandbox(sandbox_id)
        network = pod_network(self.sandbox_row(sandbox_id))
        if network.kind != "cni" or not network.ip:
            raise Conflict(f"port forwarding needs a pod IP reachable from the host; this pod "
                           f"has {network.kind} networking")
        return await asyncio.open_connection(network.ip, port)

    # ------------------------------------------------------------ stats
    async def stats(self, sandbox_id: str, container_ids: list[str] | None = None):
        """The guest's and its containers' usage, with CPU rates derived
        from the previous sample (the CRI's usage_nano_cores)."""
        sandbox = self._running_sandbox(sandbox_id)
        response = await sandbox.agent.stats(container_ids)
        samples = self.pods[sandbox_id].cpu_samples
        rates = {}
        for item in [response.guest, *response.containers]:
            prev = samples.get(item.container_id)
            if prev and response.timestamp_ns > prev[0]:
                rates[item.container_id] = int((item.cpu_usage_ns - prev[1]) * 1e9
                                               / (response.timestamp_ns - prev[0]))
            samples[item.container_id] = (response.timestamp_ns, item.cpu_usage_ns)
        return response, rates

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> tuple[bytes, bytes, int]:
        io = await self.exec(container_id, cmd, tty=False, stdin=False)

        async def read(stream: str) -> bytes:
            out = b""
            while data := await io.read(stream):
                out += data
            return out

        async def run() -> tuple[bytes, bytes, int]:
            out, err = await asyncio.gather(read("stdout"), read("stderr"))
            return out, err, await io.wait()

        try:
            return await asyncio.wait_for(run(), timeout or None)
        except asyncio.TimeoutError:
            await io.agent.signal_process(container_id, io.eid, signal.SIGKILL)
            raise TimeoutError(f"command {cmd!r} timed out after {timeout}s") from None


def _console(size: tuple[int, int] | None) -> "apb.ConsoleSize | None":
    """A tty's size from the start, as the agent takes it."""
    return apb.ConsoleSize(rows=size[0], cols=size[1]) if size else None
