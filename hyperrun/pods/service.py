"""Pods and their containers' tasks, for whoever asks (the CRI's servicers,
the CLI's requests): one VM per pod (as Hyper and Kata), made by the
launcher (pods/launcher.py); its containers' roots an image or a host
directory, its init the agent or (direct mode) the container's program.

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
from hyperrun.errdefs import Conflict, Invalid, NotFound
from hyperrun.network.dns import NameServer
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcError
from hyperrun.image.imageconfig import Overrides, apply
from hyperrun.image.service import ImageService, chain_id
from hyperrun.specs import PROJECT_LABEL, SERVICE_LABEL, ContainerSpec, PodSpec, Resources
from hyperrun.proto import agent_pb2 as apb
from hyperrun.vm import VM, VMError, new as new_vm
from hyperrun.vm.config import Channel, Disk

from hyperrun.sandbox import direct, podnet, volumes
from hyperrun.sandbox.sandbox import HealthWatch, Sandbox
from hyperrun.sandbox.state import ContainerRow, SandboxRow, State

from .launcher import Launcher
from .task import AttachIO, ExecIO, Task

from hyperrun import config as hconfig
from hyperrun import log

logger = log.get("sandbox")
READY, NOTREADY = "ready", "notready"
STARTUP_WINDOW_S = 3.0  # see _resend_while_starting
CREATED, RUNNING, EXITED, UNKNOWN = "created", "running", "exited", "unknown"


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
        self.networks = networks or podnet.PodNetworks("none")
        self.images = images
        self.state = state
        self.defaults = defaults or hconfig.SandboxDefaults()
        self.launcher = Launcher(self.defaults, self.networks, root=root,
                                 die_with_parent=die_with_parent, new_vm=new_vm)
        self.pods: dict[str, Pod] = {}  # every pod with a record
        self._starting: list[PodSpec] = []  # pods being started, not yet recorded
        self.names = NameServer(self._addresses)  # the pods' DNS: network/dns.py
        self.health = HealthWatch()  # one sweep of health checks for every running VM
        self.networks.on_released = self.names.stop  # a project's network gone

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
            if row.spec.direct:
                if vm_id := await self._adopt_direct(pod, vm_info):
                    live.add(vm_id)
                continue
            vm = self.launcher.adoptable(vm_info["id"],
                                         Channel(vm_info["channel"], vm_info["cid"]))
            try:
                sandbox = await Sandbox.adopt(vm)
            except (VMError, OSError, ConnectionError) as exc:
                logger.warning("sandbox lost", sandbox=row.id, error=str(exc))
                self._sandbox_gone(row.id, f"VM lost while the daemon was down: {exc}")
                await asyncio.to_thread(self.networks.teardown, row.id, pod_network(row))
                continue
            logger.info("sandbox re-attached", sandbox=row.id, vm=vm.id, pid=vm.pid)
            live.add(vm.id)
            if not row.spec.dns:  # its guest was told the daemon's name server
                await self._nameserver(pod_network(row))
            pod.sandbox = sandbox
            self._watch_vm(pod)
            containers = self.state.containers(row.id)
            # Its plugged disks, as recorded; one plugged with no record yet (a
            # pre-plug, a kill inside a create) is plugged again, and
            # hotplug_disk takes it as it is.
            sandbox.disks = {c.disk_serial for c in containers if c.disk_serial}
            for c in containers:
                if c.state == RUNNING:
                    self._follow(pod, c)
            for name in volumes.unbind_unknown(self._shared_dir(vm), [c.id for c in containers]):
                logger.info("removed volume binds of no container", sandbox=row.id, dir=name)
        self.launcher.collect_stale(live)
        ready = [row.id for row in self.state.sandboxes() if row.state == READY]
        for sid in await asyncio.to_thread(self.networks.collect_stale, ready):
            logger.info("removed a network with no sandbox", sandbox=sid)

    async def _adopt_direct(self, pod: Pod, vm_info: dict) -> str | None:
        """recover() for a direct pod: take over its VM and follow its
        program again (from the console's end: what came before is in the
        log); a VM that ended meanwhile leaves its exit on its console."""
        running = [c for c in self.state.containers(pod.id) if c.state == RUNNING]
        if not running or "id" not in vm_info:
            self._sandbox_gone(pod.id, "the daemon restarted before the direct pod's VM started")
            return None
        vm = self.launcher.adoptable(vm_info["id"], Channel("serial"))
        try:
            await vm.adopt()
        except (VMError, OSError) as exc:
            code = await asyncio.to_thread(direct.console_exit, vm)
            if code is not None:
                for c in running:
                    self.state.update_container(c.id, state=EXITED, finished_at=_now(),
                                                exit_code=code,
                                                reason="Completed" if code == 0 else "Error")
            self._sandbox_gone(pod.id, f"VM ended while the daemon was down: {exc}")
            await vm.remove()
            return None
        pod.sandbox = direct.sandbox(vm, from_end=True)
        for c in running:
            self._follow(pod, c)
        self._watch_vm(pod)
        logger.info("direct sandbox re-attached", sandbox=pod.id, vm=vm.id, pid=vm.pid)
        return vm.id

    async def close(self) -> None:
        """Daemon shutdown: let go of pod VMs without stopping them; spare
        VMs (in no record) are removed."""
        self.names.close()
        await self.health.close()
        await self.launcher.close()
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
        if spec.direct:
            return self._add_direct_pod(spec)
        kind = self.networks.kind_for(spec)
        taken = [p for row in self.state.sandboxes() if row.state == READY
                 for p in row.spec.ports]
        podnet.check_ports(spec, [*taken, *(p for s in self._starting for p in s.ports)])
        self._starting.append(spec)  # its ports are taken while it starts
        try:
            return await self._run_pod(spec, kind)
        finally:
            self._starting.remove(spec)

    async def _run_pod(self, spec: PodSpec, kind: str) -> str:
        vcpus, memory = hconfig.vm_size(self.defaults, spec)
        clock = asyncio.get_running_loop().time
        t0 = clock()
        spare = await self.launcher.take_spare(kind, vcpus, memory)
        if spare is not None:
            sandbox_id, sandbox = spare.sandbox_id, spare.sandbox
            try:
                network = await asyncio.to_thread(self.networks.complete, sandbox_id, kind, spec)
            except BaseException:
                await self.launcher.discard(sandbox_id, sandbox, podnet.PodNetwork(kind))
                raise
        else:
            sandbox_id = secrets.token_hex(32)
            sandbox, network = await self.launcher.start(sandbox_id, kind, vcpus, memory, spec)
        t1 = clock()
        try:
            for rule in podnet.user_forwards(network, spec):
                await sandbox.vm.add_host_forward(rule)
            nameserver = await self._nameserver(network) if not spec.dns else ""
            await sandbox.agent.setup_sandbox(podnet.setup_request(network, spec, nameserver))
        except BaseException:
            await self.launcher.discard(sandbox_id, sandbox, network)
            raise
        vm = sandbox.vm
        self.state.add_sandbox(SandboxRow(sandbox_id, spec.to_json(), READY, _now(),
                                          _vm_json(vm, network)))
        pod = self._pod(sandbox_id)
        pod.sandbox = sandbox
        self._watch_vm(pod)
        logger.info("sandbox started", sandbox=sandbox_id, name=spec.name,
                    vm=vm.id, pid=vm.pid, from_pool=spare is not None,
                    started="pool" if spare is not None else
                    "template" if vm.config.incoming else "boot",
                    vm_and_network_s=round(t1 - t0, 3), setup_s=round(clock() - t1, 3))
        return sandbox_id

    async def _nameserver(self, network: podnet.PodNetwork) -> str:
        """The daemon's name server on the pod's network (its gateway), or
        "" where it has none."""
        gateway = network.info.gateway if network.kind == "cni" and network.info else ""
        return gateway if gateway and await self.names.serve_on(gateway) else ""

    def _addresses(self, name: str, client: str = "") -> list[str]:
        """A ready pod's IP by its name or hostname, for the name server;
        or by its compose service's name, for a pod of the same project
        (the one at the address client), as Docker's per-network aliases."""
        ready = [(row, ip) for row in self.state.sandboxes()
                 if row.state == READY and (ip := pod_network(row).ip)]
        found = [ip for row, ip in ready
                 if name in (row.spec.name.lower(), row.spec.pod_hostname().lower())]
        project = next((row.spec.labels.get(PROJECT_LABEL) for row, ip in ready
                        if ip == client), None)
        if found or not project:
            return found
        return [ip for row, ip in ready if row.spec.labels.get(PROJECT_LABEL) == project
                and row.spec.labels.get(SERVICE_LABEL, "").lower() == name]

    def _add_direct_pod(self, spec: PodSpec) -> str:
        """A pod whose VM's init is its one container's program: its VM is
        made with the container (it boots from the image) and started with
        it. It has no network: no agent would set one up."""
        if spec.init != "program":
            raise Invalid(f"unknown init {spec.init!r}: agent or program")
        if spec.ports or spec.network not in ("", "none") or spec.host_network:
            raise Invalid("direct mode has no network (no agent sets one up): "
                          "no ports, network none")
        sandbox_id = secrets.token_hex(32)
        self.state.add_sandbox(SandboxRow(sandbox_id, spec.to_json(), READY, _now(),
                                          json.dumps({"network": None}).encode()))
        self._pod(sandbox_id)
        return sandbox_id  # logged with its VM's start: nothing loads the logger before it

    async def _create_direct(self, sandbox_id: str, pod_spec: PodSpec,
                             spec: ContainerSpec) -> str:
        """The direct pod's one container: its VM, made (not started) from
        the image's root and the program; refused as a DirectError when
        direct mode cannot run it as asked."""
        pod = self.pods[sandbox_id]
        if pod.sandbox is not None or self.state.containers(sandbox_id):
            raise Conflict("a direct-mode pod has one container: its VM's init")
        if spec.rootfs or spec.mounts or spec.stdin or spec.tty:
            raise Invalid("direct mode boots an image's root with no agent: "
                          "no --rootfs, volumes, stdin or terminal")
        image, defaults = self._image_and_process(spec)
        container_id = secrets.token_hex(32)
        pod.sandbox = await self.launcher.direct(
            *hconfig.vm_size(self.defaults, pod_spec), self.images.rootfs(image), defaults,
            container_id[:16])
        self.state.set_sandbox_vm(sandbox_id, _vm_json(pod.sandbox.vm, podnet.PodNetwork("none")))
        self.state.add_container(ContainerRow(container_id, sandbox_id, spec.to_json(),
                                              image.digest, "", CREATED, _now(),
                                              stop_signal=defaults.stop_signal))
        return container_id

    def start_pool(self) -> None:
        """Begin filling the pool of spare VMs (if one is configured)."""
        self.launcher.start_pool()

    @staticmethod
    def _shared_dir(vm: VM):
        return vm.run_dir / volumes.SHARE_DIR

    def _watch_vm(self, pod: Pod) -> None:
        sandbox, sandbox_id = pod.sandbox, pod.id

        async def watch() -> None:
            hung = await sandbox.monitor(self.health)
            if isinstance(sandbox.agent, direct.ConsoleAgent):
                # Its VM ends with its program: the exit the task takes
                # from the console is recorded before the pod's end.
                await asyncio.gather(*(asyncio.shield(t.waiter) for t in pod.tasks.values()
                                       if t.waiter is not None), return_exceptions=True)
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
        """A container of the pod, its root one of two kinds: an image (its
        erofs disk plugged into the VM, a writable overlay on it in the
        guest) or a host directory (spec.rootfs: bound into the pod's
        shared directory and written through, as podman's --rootfs)."""
        pod = self.sandbox_row(sandbox_id).spec
        if not spec.name:
            raise Invalid("container config has no metadata.name")
        if pod.direct:
            async with self.pods[sandbox_id].lock:
                return await self._create_direct(sandbox_id, pod, spec)
        sandbox = self._running_sandbox(sandbox_id)
        if bool(spec.image) == bool(spec.rootfs):
            raise Invalid("a container's root is an image or a host directory (rootfs), one of them")
        image, defaults = self._image_and_process(spec)
        disk = None if image is None else \
            Disk(self.images.rootfs(image), serial="img-" + chain_id(image)[:16])
        container_id = secrets.token_hex(32)
        seccomp = _seccomp(spec.seccomp)  # a bad profile refused before anything is done
        async with self.pods[sandbox_id].lock:
            began = time.monotonic()
            hotplug = disk is not None and disk.serial not in sandbox.disks
            if hotplug:
                await sandbox.vm.hotplug_disk(disk)
                sandbox.disks.add(disk.serial)
            if disk is not None:
                self.launcher.used_image(disk)
            plugged = time.monotonic()
            process = apb.Process(args=defaults.args, env=defaults.env, cwd=defaults.cwd,
                                  user=apb.User(spec=defaults.user,
                                                additional_gids=list(spec.groups)),
                                  terminal=spec.tty, stdin=spec.stdin,
                                  console_size=_console(spec.console_size))
            shared = self._shared_dir(sandbox.vm)
            serial = disk.serial if disk is not None else ""
            try:
                mounts = volumes.bind(shared, container_id, spec.mounts)
                if disk is not None:
                    root = apb.Storage(source=f"serial:{serial}", fstype="erofs", overlay=True)
                else:
                    root = volumes.bind_root(shared, container_id, spec.rootfs,
                                             readonly=spec.readonly_rootfs)
            except volumes.VolumeError as exc:
                volumes.unbind(shared, container_id)
                await self._unplug_if_unused(sandbox, sandbox_id, serial)
                raise Invalid(str(exc)) from None
            try:
                await sandbox.agent.create_container(
                    container_id, root,
                    process, hostname=pod.pod_hostname(), readonly_rootfs=spec.readonly_rootfs,
                    resources=agent_resources(spec.resources), sysctls=pod.sysctls,
                    mounts=mounts, privileged=spec.privileged,
                    pid_namespace=spec.pid, ipc_namespace=spec.ipc,
                    add_capabilities=spec.add_capabilities,
                    drop_capabilities=spec.drop_capabilities, seccomp=seccomp,
                    no_new_privileges=spec.no_new_privileges,
                    masked_paths=spec.masked_paths, readonly_paths=spec.readonly_paths,
                    rlimits=[apb.Rlimit(type=t, soft=soft, hard=hard)
                             for t, (soft, hard) in spec.ulimits.items()])
            except TtrpcError:
                volumes.unbind(shared, container_id)
                await self._unplug_if_unused(sandbox, sandbox_id, serial)
                raise
            self.state.add_container(ContainerRow(container_id, sandbox_id,
                                                  spec.to_json(),
                                                  image.digest if image is not None else "",
                                                  serial, CREATED, _now(),
                                                  stop_signal=defaults.stop_signal))
        logger.info("container created", container=container_id, sandbox=sandbox_id,
                    hotplugged=hotplug, hotplug_s=round(plugged - began, 3),
                    create_s=round(time.monotonic() - plugged, 3))
        return container_id

    def _image_and_process(self, spec: ContainerSpec):
        """The container's image (None for a host directory as its root)
        and its process as the image's config and the spec's overrides
        make it, as Docker does."""
        image = None
        if not spec.rootfs:
            image = self.images.find(spec.image)
            if image is None:
                raise NotFound(f"image {spec.image!r} not found")
        return image, apply(self.images.config(image) if image is not None else {}, Overrides(
            args=list(spec.args), entrypoint=list(spec.command) if spec.command else None,
            env=list(spec.env), workdir=spec.workdir, user=spec.user))

    async def _unplug_if_unused(self, sandbox: Sandbox, sandbox_id: str, serial: str) -> None:
        if serial and not any(c.disk_serial == serial for c in self.state.containers(sandbox_id)):
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
        pod = self.pods[row.sandbox_id]
        if self.sandbox_row(row.sandbox_id).spec.direct:
            await self._start_direct(pod, row)
            return
        task = self._follow(pod, row)
        began = time.monotonic()
        try:
            await sandbox.agent.start_container(container_id)
        except TtrpcError as exc:
            self._start_failed(row, task, exc.remote_message)
            raise
        finally:
            task.started()  # not failed (for all it knows): its waiter may end it
        logger.info("container started", container=container_id, sandbox=row.sandbox_id,
                    start_s=round(time.monotonic() - began, 3))

    async def _start_direct(self, pod: Pod, row: ContainerRow) -> None:
        """Boot the direct pod's VM: its init is the container's program."""
        task = self._follow(pod, row)
        began = time.monotonic()
        try:
            await pod.sandbox.vm.launch()
        except BaseException as exc:
            self._start_failed(row, task, str(exc))
            raise
        task.started()
        self._watch_vm(pod)
        logger.info("direct container started", container=row.id, sandbox=pod.id,
                    name=self.sandbox_row(pod.id).spec.name, init=pod.sandbox.vm.config.init,
                    vm=pod.sandbox.vm.id, pid=pod.sandbox.vm.pid,
                    start_s=round(time.monotonic() - began, 3))

    def _start_failed(self, row: ContainerRow, task: Task, message: str) -> None:
        """The container's process could not be started: it ends there."""
        self.state.update_container(row.id, state=EXITED, finished_at=_now(), exit_code=128,
                                    reason="StartError", message=message)
        task.close()
        task.ended(128)

    def _task(self, pod: Pod, row: ContainerRow) -> Task:
        """The container's task, made on first need (an attach before the
        start, the start, a re-attach after a daemon restart)."""
        if (task := pod.tasks.get(row.id)) is None:
            task = pod.tasks[row.id] = Task(row.id, pod.sandbox.agent, self.log_path(row),
                                            row.spec.tty)
        return task

    def _follow(self, pod: Pod, row: ContainerRow) -> Task:
        """Pump the container's output into its log, and record its exit:
        its process's own (reason Completed, Error or OOMKilled), or
        (reason AgentError) the agent's failure to report it. A re-attach follows a running container's row; a start
        the created one's, and tells the task once its start succeeded."""
        def recorded(code: int, reason: str, message: str) -> None:
            self.state.update_container(row.id, state=EXITED, finished_at=_now(),
                                        exit_code=code, reason=reason, message=message)
            if reason == "AgentError":
                logger.warning("container ended: its exit is unknown", container=row.id,
                               exit_code=code, error=message)
            else:
                logger.info("container exited", container=row.id, exit_code=code, reason=reason)

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
        a CLI request's); console_size: a tty's (rows, cols) from the start."""
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
        so that none of its output is missed. A reader that falls behind
        is ended (the log has everything), unless lossless: then the
        container's output waits for it, as an attached `docker run` does
        (a run request, whose reader is the user's pipe)."""
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
            await io.abandon()
            raise TimeoutError(f"command {cmd!r} timed out after {timeout}s") from None


def _seccomp(profile: str) -> "apb.Seccomp | None":
    """A spec's seccomp as the agent takes it: a localhost profile is a
    file of this host, read now (as containerd does at create)."""
    if profile == "unconfined":
        return None
    if profile == "runtime/default":
        return apb.Seccomp()
    if not profile.startswith("localhost/"):
        raise Invalid(f"seccomp {profile!r}: expected unconfined, runtime/default or "
                      "localhost/<path>")
    path = profile.removeprefix("localhost/")
    try:
        with open(path, encoding="utf-8") as f:
            return apb.Seccomp(profile=f.read(1 << 20))
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"seccomp profile {path}: {exc}") from None


def _console(size: tuple[int, int] | None) -> "apb.ConsoleSize | None":
    """A tty's size from the start, as the agent takes it."""
    return apb.ConsoleSize(rows=size[0], cols=size[1]) if size else None
