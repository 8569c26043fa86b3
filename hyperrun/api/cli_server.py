"""The daemon's side of the CLI's requests (hyperrun/cli_api.py): `hyperrun run
IMAGE` as the CLI asked it, done here with the sandbox manager (and
`hyperrun exec`, a process in a running container, the same way; and
`ps`, `pods`, `logs`, `stop`, `rm`, `pull`, `images` and `rmi`, which need
the daemon's records, files and rights rather than a CLI's). A run's steps
are the CRI's, as a kubelet would take them (image, RunPodSandbox,
CreateContainer, attach, StartContainer, wait, removal), without a round
trip for each and with the output sent straight from the attach outlet.

A run's request ends with the run: a CLI that goes away before the container
started ends it (its pod is removed); one that goes away after leaves the
container running to its end, after which `--rm` still removes it, as
Docker's daemon-side autoremove does. A daemon that stops leaves running
pods running (a restart re-attaches them), as for every pod.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import secrets
import shutil
import time
from pathlib import Path

from hyperrun import cli_api, exitcodes, log
from hyperrun.pods.service import RUNNING, NotFound, pod_network
from hyperrun.sandbox import logs
from hyperrun.specs import ContainerSpec, Mount, PodSpec, PortMapping
from hyperrun.cli_api import (RUN_LABEL, ExecOptions, ListOptions, LogsOptions, NamesOptions,
                              ProtocolError, PullOptions, RunError, RunOptions)

from . import supervisor
from .errors import message as known_message


logger = log.get("runs")


# ------------------------------------------------------ the run as specs

def parse_volume(text: str, volumes_root: Path | None = None) -> Mount:
    """-v HOST:CONTAINER[:ro|rw], or NAME:CONTAINER[:ro|rw]: a named volume,
    a directory of the daemon's (volumes_root/NAME/_data, as Docker's),
    made at its first use and kept until removed with the data root."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or \
            (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise RunError(f"-v {text!r}: expected HOST:CONTAINER[:ro]")
    host = Path(parts[0])
    if volumes_root is not None and NAME.fullmatch(parts[0]):
        host = volumes_root / parts[0] / "_data"
        host.mkdir(parents=True, exist_ok=True)
    if not host.is_absolute():
        raise RunError(f"-v {text!r}: the host path must be absolute (or a volume's name)")
    return Mount(host_path=str(host), container_path=parts[1],
                 readonly=len(parts) == 3 and parts[2] == "ro")


def parse_port(text: str) -> PortMapping:
    """-p [HOSTIP:]HOSTPORT:PORT[/tcp|udp]."""
    import ipaddress

    spec, _, proto = text.partition("/")
    parts = spec.rsplit(":", 2)
    proto = (proto or "tcp").lower()
    try:
        if len(parts) < 2 or proto not in ("tcp", "udp", "sctp"):
            raise ValueError
        host_ip = parts[0] if len(parts) == 3 else ""
        if host_ip:  # Docker's [::1]:8080:80 for IPv6
            host_ip = str(ipaddress.ip_address(host_ip.removeprefix("[").removesuffix("]")))
        if not (parts[-2].isascii() and parts[-2].isdigit() and parts[-1].isascii()
                and parts[-1].isdigit()):
            raise ValueError
        host_port, port = int(parts[-2]), int(parts[-1])
        if not (0 < host_port < 65536 and 0 < port < 65536):
            raise ValueError
    except ValueError:
        raise RunError(f"-p {text!r}: expected [HOSTIP:]HOSTPORT:PORT[/tcp|udp]") from None
    return PortMapping(host_port, port, proto, host_ip)


def check_user(user: str) -> str:
    """-u name|uid[:group|gid], as Docker takes it: ids are numbers below
    2^32; names are resolved in the image's own files, in the guest."""
    name, _, group = user.partition(":")
    for part in (name, group):
        if part.isdigit() and not (part.isascii() and int(part) < 1 << 32):
            raise RunError(f"-u {user!r}: ids are numbers below 2^32")
    return user


NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")  # Docker's container names


def pod_spec(opts: RunOptions, ports: list[PortMapping], logs_root: Path) -> PodSpec:
    """A run's pod. Its limits (and so its VM's size) only where given:
    without them the pod gets the default VM, the shape pool spares and
    templates have."""
    if opts.name and not NAME.fullmatch(opts.name):
        raise RunError(f"Invalid container name ({opts.name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] "
                       "are allowed")
    name = opts.name or "run-" + secrets.token_hex(4)
    if opts.direct:
        if opts.rootfs or opts.volumes or opts.stdin or opts.tty or ports or \
                opts.network not in ("auto", "none"):
            raise RunError("--direct runs the image's program as the VM's init, with no agent: "
                           "no --rootfs, -v, -i, -t, -p or network")
    network = "none" if opts.direct else opts.network if opts.network != "auto" else ""
    return PodSpec(name=name, uid=name, namespace="hyperrun", hostname=opts.hostname or name,
                   log_directory=str(logs_root / name), labels={**opts.labels, RUN_LABEL: "1"},
                   network=network, ports=tuple(ports), cpus=opts.cpus or 0,
                   memory_limit_bytes=(opts.memory_mib or 0) << 20,
                   init="program" if opts.direct else "agent")


def container_spec(opts: RunOptions, pod: PodSpec, mounts: list[Mount]) -> ContainerSpec:
    labels = {**opts.labels, RUN_LABEL: "1"}
    try:
        if opts.restart != "no":
            if not opts.detach or opts.remove:
                raise ValueError("a restart policy is for a detached run (-d), without --rm")
            labels[supervisor.RESTART_LABEL] = supervisor.check_policy(opts.restart)
        if opts.healthcheck is not None:
            labels[supervisor.HEALTH_LABEL] = json.dumps(
                supervisor.check_healthcheck(opts.healthcheck))
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return ContainerSpec(
        name=pod.name, image=opts.image, rootfs=opts.rootfs, command=tuple(opts.entrypoint) if opts.entrypoint else None,
        args=tuple(opts.args), workdir=opts.workdir, env=tuple(opts.env),
        user=check_user(opts.user), mounts=tuple(mounts), log_path="container.log",
        labels=labels, stdin=opts.stdin, stdin_once=opts.stdin, tty=opts.tty,
        readonly_rootfs=opts.readonly, console_size=opts.console_size,
        add_capabilities=tuple(opts.cap_add), drop_capabilities=tuple(opts.cap_drop),
        ipc="container",  # Docker's: its own (a run's pod has this one container)
        ulimits=ulimits(opts.ulimits), **security_options(opts.security_opt))


_ULIMITS = ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
            "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")


def ulimits(options: list[str]) -> dict[str, tuple[int, int]]:
    """Docker's --ulimit NAME=SOFT[:HARD] as RLIMIT_* -> (soft, hard)."""
    out = {}
    for option in options:
        name, _, value = option.partition("=")
        soft, _, hard = value.partition(":")
        try:
            if name not in _ULIMITS:
                raise ValueError
            limits = int(soft), int(hard or soft)
            if not 0 <= limits[0] <= limits[1] < 1 << 64:
                raise ValueError
        except ValueError:
            raise RunError(f"--ulimit {option}: expected NAME=SOFT[:HARD] with SOFT <= HARD, "
                           f"NAME one of {', '.join(_ULIMITS)}") from None
        out[f"RLIMIT_{name.upper()}"] = limits
    return out


def security_options(options: list[str]) -> dict:
    """Docker's --security-opt as spec fields. Docker's default differs
    from the CRI's: its runs get the runtime's seccomp filter."""
    fields = {"seccomp": "runtime/default"}
    for option in options:
        key, eq, value = option.partition("=")
        if key == "seccomp" and value:
            fields["seccomp"] = "unconfined" if value == "unconfined" else \
                "runtime/default" if value in ("default", "runtime/default") else \
                f"localhost/{value}"
        elif key == "no-new-privileges" and value in ("", "true", "false"):
            fields["no_new_privileges"] = value != "false"
        else:
            raise RunError(f"--security-opt {option}: expected seccomp=unconfined|PROFILE "
                           "or no-new-privileges[=true|false]")
    return fields


def _message(exc: Exception) -> str:
    """A known failure's message; anything else is a bug and goes on up."""
    known = known_message(exc)
    if known is None:
        raise exc
    return known


# ------------------------------------------------------------- the server

class CliServer:
    """The CLI's requests, on a unix socket beside the CRI's (named
    `<CRI socket>-run.sock`: runs were its first). remove_always: every
    run's pod goes when it ends (an embedded host, whose pods end with the
    CLI anyway)."""

    def __init__(self, manager, images, path: Path, logs_root: Path,
                 remove_always: bool = False) -> None:
        self.manager = manager
        self.images = images
        self.path = path
        self.logs_root = logs_root
        self.remove_always = remove_always
        self.naming: set[str] = set()  # names of runs being made, not yet recorded
        self.volumes_root = images.root / "volumes"  # named volumes (-v NAME:PATH)
        self.supervisor = supervisor.Supervisor(manager)  # health checks, restart policies
        self._server: asyncio.AbstractServer | None = None
        self._requests: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.supervisor.resume()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.supervisor.stop()
        for task in list(self._requests):
            task.cancel()
        if self._requests:
            await asyncio.wait(self._requests, timeout=5)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._requests.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except Exception:  # a bug: this request ends, the daemon goes on
            logger.exception("request failed")
        finally:
            self._requests.discard(task)
            writer.close()


class _ClientGone(Exception):
    pass


class _Connection:
    def __init__(self, server: CliServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.m = server.manager
        self.reader = reader
        self.writer = writer
        self.client_gone = False
        self.pod: str | None = None
        self.pod_name = ""
        self.cid: str | None = None
        self.io = None  # the container's process once it runs (an AttachIO)
        self.detached = False

    # --- to the CLI
    def send(self, kind: int, payload: bytes = b"") -> None:
        if self.client_gone or self.writer.is_closing():
            self.client_gone = True
            return
        self.writer.write(cli_api.frame(kind, payload))

    async def flush(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            self.client_gone = True

    async def exit(self, result: dict) -> None:
        """The request's last frame."""
        if not (self.client_gone or self.writer.is_closing()):
            self.writer.write(cli_api.json_frame(cli_api.EXIT, result))
            await self.flush()

    def _check_client(self) -> None:
        if self.client_gone:
            raise _ClientGone()

    # --- the run
    async def serve(self) -> None:
        try:
            first = await cli_api.read_frame(self.reader)
            if first is None:
                return
            kind, payload = first
            requests = {cli_api.RUN: (RunOptions, self._run),
                        cli_api.EXEC: (ExecOptions, self._exec),
                        cli_api.LOGS: (LogsOptions, self._logs),
                        cli_api.LIST: (ListOptions, self._list),
                        cli_api.STOP_CONTAINERS: (NamesOptions, self._stop),
                        cli_api.REMOVE_CONTAINERS: (NamesOptions, self._remove),
                        cli_api.PULL: (PullOptions, self._pull),
                        cli_api.REMOVE_IMAGES: (NamesOptions, self._remove_images),
                        cli_api.INSPECT: (NamesOptions, self._inspect)}
            if kind not in requests:
                raise ProtocolError(f"a request cannot start with a frame of kind {kind}")
            request, work = requests[kind]
            opts = request.from_json(payload)
        except ProtocolError as exc:
            await self.exit({"error": str(exc), "code": exitcodes.RUNTIME_ERROR})
            return
        client = asyncio.ensure_future(self._read_client(opts))
        ended = False
        try:
            try:
                result = await work(opts)
            except _ClientGone:
                result = None
            except RunError as exc:
                result = {"error": str(exc), "code": exc.code}
            except Exception as exc:
                known = known_message(exc)
                if known is None:
                    logger.exception("run failed", sandbox=self.pod)
                message = known or f"internal error: {type(exc).__name__}: {exc}"
                result = {"error": message, "code": exitcodes.for_start_error(exc)}
            await self._end(opts)
            ended = True
        finally:
            client.cancel()
            if not ended and self.pod is not None:
                logger.info("run request cancelled; its pod stays", sandbox=self.pod)
        if result is not None:
            await self.exit(result)

    async def _run(self, opts: RunOptions) -> dict:
        mounts = [parse_volume(v, self.server.volumes_root) for v in opts.volumes]
        ports = [parse_port(p) for p in opts.ports]
        spec = pod_spec(opts, ports, self.server.logs_root)
        container = container_spec(opts, spec, mounts)
        if not opts.rootfs:
            await self._ensure_image(opts)
        self._check_client()
        self._claim_name(spec.name)
        self.pod_name = spec.name
        try:
            self.pod = await self.m.run_pod(spec)
        finally:
            self.server.naming.discard(spec.name)
        self._check_client()
        try:
            self.cid = await self.m.create_container(self.pod, container)
        except Exception as exc:
            message = _message(exc)
            raise RunError(f"cannot create container: {message}",
                           exitcodes.for_start_error(exc)) from None
        if opts.detach:
            await self._start()
            self.detached = True
            self.server.supervisor.watch(self.cid)
            return {"container": self.cid}
        # Attached before the start (no output missed), losslessly: the
        # container's output waits for the user's pipe, as `docker run`'s.
        io = await self.m.attach(self.cid, opts.tty, opts.stdin, lossless=True)
        try:
            await self._start()
            await self._relay(io, opts.tty)
            await io.wait()
        finally:
            io.detach()
        # io.wait() returned the exit its task took once it was recorded:
        # the process's own, or the VM's end.
        row = self.m.container_row(self.cid)
        if row.reason == "VMExited":
            raise RunError(f"the VM ended while the container ran: {row.message}")
        if row.reason == "AgentError":
            raise RunError(f"the container's exit could not be had from its VM: {row.message}")
        return {"code": row.exit_code}

    async def _exec(self, opts: ExecOptions) -> dict:
        """`hyperrun exec`: a process in a running container, its output
        streamed as it comes (ExecSync would hold it to the end), its exit
        code. A CLI gone away takes its process with it (_read_client), as a
        kubectl exec's does: unlike Docker's, which runs on unseen."""
        self.cid = self._container_id(opts.container)
        io = await self.m.exec(self.cid, opts.cmd, opts.tty, opts.stdin,
                               console_size=opts.console_size)
        if self.client_gone:  # gone while it started
            await io.abandon()
        await self._relay(io, opts.tty)
        return {"code": await io.wait()}

    async def _logs(self, opts: LogsOptions) -> dict:
        """`hyperrun logs`: the container's CRI log file, read here (it is
        root's), each line sent as the stream it came from; with follow,
        until the container is no longer running (sandbox/logs.py)."""
        cid = self._container_id(opts.container)
        path = self.m.log_path(self.m.container_row(cid))
        if not path:
            raise RunError(f"container {opts.container} has no log", 1)
        running = (lambda: self._running(cid)) if opts.follow else None
        async with contextlib.aclosing(
                logs.read(path, opts.tail, opts.timestamps, running)) as outputs:
            async for output in outputs:
                if output:
                    for stream, data in output:
                        self.send(cli_api.STDOUT if stream == "stdout" else cli_api.STDERR, data)
                    await self.flush()
                if self.client_gone:
                    break
        return {"code": 0}

    def _running(self, cid: str) -> bool:
        try:
            return self.m.container_row(cid).state == RUNNING
        except NotFound:  # removed meanwhile
            return False

    async def _list(self, opts: ListOptions) -> dict:
        """`hyperrun ps` (running containers, or all), `hyperrun pods`,
        `hyperrun images` and `hyperrun stats`: rows for the CLI's table."""
        if opts.what not in cli_api.LISTS:
            raise RunError(f"cannot list {opts.what!r}: one of {', '.join(cli_api.LISTS)}")
        if opts.what == "images":
            return {"code": 0, "rows": self.server.images.listing()}
        if opts.what == "stats":
            return {"code": 0, "rows": await self._stats()}
        if opts.what == "pods":
            return {"code": 0, "rows": [
                {"id": row.id, "name": (spec := row.spec).name, "namespace": spec.namespace,
                 "state": row.state.upper(), "created": row.created_at,
                 "ip": pod_network(row).ip}
                for row in self.m.state.sandboxes()]}
        pod_ports = {row.id: row.spec.ports for row in self.m.state.sandboxes()}
        return {"code": 0, "rows": [
            {"id": row.id, "image": (spec := row.spec).image or spec.rootfs, "name": spec.name,
             "state": row.state.upper(), "created": row.created_at, "started": row.started_at,
             "finished": row.finished_at, "exit_code": row.exit_code, "pod": row.sandbox_id,
             "labels": spec.labels, "health": self.server.supervisor.status(row.id),
             "ports": [f"{p.host_ip or '0.0.0.0'}:{p.host_port}->{p.container_port}/{p.protocol}"
                       for p in pod_ports.get(row.sandbox_id, ())]}
            for row in self.m.state.containers() if opts.all or row.state == RUNNING]}

    async def _stats(self) -> list[dict]:
        """Each running container's CPU (its rate over a second) and memory
        in its VM, and its pod VM's PSS on the host. A pod that stops
        meanwhile is left out."""
        from hyperrun.vm.memory import pss_kib

        rows = [r for r in self.m.state.containers()
                if r.state == RUNNING and self.m.sandbox(r.sandbox_id) is not None]
        names = {r.id: r.spec.name for r in rows}

        async def sample(pod: str) -> list[dict]:
            ids = [r.id for r in rows if r.sandbox_id == pod]
            await self.m.stats(pod, ids)  # the CPU rate is taken against this sample
            await asyncio.sleep(1)
            response, rates = await self.m.stats(pod, ids)
            sandbox = self.m.sandbox(pod)
            if sandbox is None:  # stopped just now
                return []
            vm = sandbox.vm
            pss = pss_kib(vm.pid) * 1024
            return [{"id": item.container_id,
                     "name": names[item.container_id],
                     "cpu": rates[item.container_id] / 1e7 if item.container_id in rates else None,
                     "memory": item.memory_working_set_bytes,
                     "limit": item.memory_limit_bytes or vm.config.memory_mib << 20,
                     "vm_pss": pss} for item in response.containers]

        pods = sorted({r.sandbox_id for r in rows})
        out = []
        for result in await asyncio.gather(*(sample(p) for p in pods), return_exceptions=True):
            if isinstance(result, BaseException):
                # A pod that stopped meanwhile (its VM, channel or /proc
                # entry gone) is left out; anything else is a bug.
                if not isinstance(result, OSError) and known_message(result) is None:
                    raise result
                continue
            out += result
        return out

    async def _stop(self, opts: NamesOptions) -> dict:
        async def stop(name: str) -> list[str]:
            cid = self._container_id(name)
            self.server.supervisor.stopped.add(cid)  # not restarted by its policy
            await self.m.stop_container(cid, opts.timeout)
            return [name]
        return await self._each(opts.names, stop)

    async def _remove(self, opts: NamesOptions) -> dict:
        """`hyperrun rm`: a stopped container; one that `run` made goes with
        its pod and its log directory."""
        async def remove(name: str) -> list[str]:
            cid = self._container_id(name)
            row = self.m.container_row(cid)
            if row.state == RUNNING:
                if not opts.force:
                    raise RunError(f"container {cid[:12]} is running: stop it first (or rm -f)")
                self.server.supervisor.stopped.add(cid)
                await self.m.stop_container(cid, 0)  # Docker's rm -f: SIGKILL
            if row.spec.labels.get(RUN_LABEL) == "1":
                pod_name = self.m.sandbox_row(row.sandbox_id).spec.name
                await self._remove_run_pod(row.sandbox_id, pod_name)
            else:
                await self.m.remove_container(cid)
            return [name]
        return await self._each(opts.names, remove)

    async def _inspect(self, opts: NamesOptions) -> dict:
        """`hyperrun inspect`: each container as JSON in the shape of
        `docker inspect` (the fields that apply), with its VM's facts; an
        error on stderr for a name that is none."""
        items, code = [], 0
        for name in opts.names:
            try:
                items.append(self._inspected(self._container_id(name)))
            except (RunError, NotFound):
                self.send(cli_api.STDERR, f"Error: No such object: {name}\n".encode())
                code = 1
        self.send(cli_api.STDOUT, (json.dumps(items, indent=4) + "\n").encode())
        return {"code": code}

    def _inspected(self, cid: str) -> dict:
        row = self.m.container_row(cid)
        spec, pod = row.spec, self.m.sandbox_row(row.sandbox_id)
        sandbox = self.m.sandbox(row.sandbox_id)
        network, vm_info = pod_network(pod), json.loads(pod.vm or b"{}")
        vm = sandbox.vm if sandbox is not None else None

        def when(ns: int) -> str:
            return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat() \
                if ns else "0001-01-01T00:00:00Z"
        return {
            "Id": cid, "Name": "/" + spec.name, "Created": when(row.created_at),
            "Image": row.image_ref, "Path": "", "Args": list(spec.args),
            "State": {"Status": {"running": "running", "exited": "exited"}.get(row.state,
                                                                              row.state),
                      "Running": row.state == RUNNING, "ExitCode": row.exit_code,
                      "Reason": row.reason, "Error": row.message,
                      "StartedAt": when(row.started_at), "FinishedAt": when(row.finished_at),
                   **({"Health": health} if (health := self.server.supervisor.health.get(cid))
                      else {})},
            "Config": {"Image": spec.image or spec.rootfs, "Hostname": pod.spec.pod_hostname(),
                       "Entrypoint": list(spec.command) if spec.command is not None else None,
                       "Cmd": list(spec.args), "Env": list(spec.env),
                       "WorkingDir": spec.workdir, "User": spec.user, "Tty": spec.tty,
                       "OpenStdin": spec.stdin, "Labels": spec.labels},
            "HostConfig": {"ReadonlyRootfs": spec.readonly_rootfs, "Privileged": spec.privileged,
                           "CapAdd": list(spec.add_capabilities),
                           "CapDrop": list(spec.drop_capabilities),
                           "Ulimits": [{"Name": k.removeprefix("RLIMIT_").lower(), "Soft": s,
                                        "Hard": h} for k, (s, h) in spec.ulimits.items()],
                           "SecurityOpt": [f"seccomp={spec.seccomp}"] +
                           (["no-new-privileges"] if spec.no_new_privileges else [])},
            "Mounts": [{"Type": "bind", "Source": m.host_path, "Destination": m.container_path,
                        "RW": not m.readonly, "Propagation": m.propagation} for m in spec.mounts],
            "NetworkSettings": {
                "IPAddress": network.ip, "Network": network.kind,
                "Ports": {f"{p.container_port}/{p.protocol}": [
                    {"HostIp": p.host_ip or "0.0.0.0", "HostPort": str(p.host_port)}]
                    for p in pod.spec.ports if p.host_port}},
            "Pod": {"Id": pod.id, "Name": pod.spec.name, "State": pod.state},
            "VM": {"Id": vm_info.get("id"), "Pid": vm.pid if vm is not None else None,
                   "Running": vm is not None and not vm.exited,
                   "Accel": vm.config.accel if vm is not None else None,
                   "Channel": vm_info.get("channel"), "VCPUs": vm_info.get("vcpus"),
                   "MemoryMiB": vm_info.get("memory_mib")},
        }

    async def _pull(self, opts: PullOptions) -> dict:
        """`hyperrun pull`, into the daemon's store (its progress sent, if
        the CLI has a terminal to show it on)."""
        try:
            image = await self.server.images.pull(opts.image, platform=opts.platform,
                                                  progress=self._progress(opts))
        except Exception as exc:
            raise RunError(_message(exc), 1) from None
        return {"code": 0, "digest": image.digest}

    async def _remove_images(self, opts: NamesOptions) -> dict:
        """`hyperrun rmi`: not an image a container (running or not) was
        made from, as Docker's."""
        in_use = {row.image_ref: row.id for row in self.m.state.containers()}

        async def remove(name: str) -> list[str]:
            return self.server.images.remove(name, in_use)
        return await self._each(opts.names, remove)

    async def _each(self, names: list[str], step) -> dict:
        """step for each name, as Docker's stop, rm and rmi: the lines it
        reports once done, an error for it on stderr, and on to the next."""
        code = 0
        for name in names:
            try:
                for line in await step(name):
                    self.send(cli_api.STDOUT, f"{line}\n".encode())
            except Exception as exc:
                message = str(exc) if isinstance(exc, RunError) else _message(exc)
                self.send(cli_api.STDERR, f"hyperrun: {message}\n".encode())
                code = 1
            await self.flush()
        return {"code": code}

    def _claim_name(self, name: str) -> None:
        """A run's name is its container's, unique among the daemon's runs
        until removed (Docker's rule)."""
        for row in self.m.state.sandboxes():  # a run's pod lives as long as its container
            if row.spec.labels.get(RUN_LABEL) == "1" and row.spec.name == name:
                cid = next((c.id for c in self.m.state.containers(row.id)), row.id)
                raise RunError(f'Conflict. The container name "/{name}" is already in use by '
                               f'container "{cid[:12]}". You have to remove (or rename) '
                               "that container to be able to reuse that name.")
        if name in self.server.naming:
            raise RunError(f'Conflict. The container name "/{name}" is being used by a run '
                           "starting now.")
        self.server.naming.add(name)

    def _container_id(self, prefix: str) -> str:
        """A container's id from a run's name, the id or a unique prefix of
        it, as Docker's."""
        rows = self.m.state.containers()
        named = [row.id for row in rows if row.spec.labels.get(RUN_LABEL) == "1"
                 and row.spec.name == prefix]
        if named:
            return named[0]
        matches = [row.id for row in rows if row.id.startswith(prefix)]
        if len(matches) != 1 or not prefix:
            raise RunError(f"{'no' if not matches else 'more than one'} container {prefix!r}", 1)
        return matches[0]

    async def _ensure_image(self, opts: RunOptions) -> None:
        try:
            if opts.pull != "always" and self.server.images.find(opts.image) is not None:
                return
            if opts.pull == "never":
                raise RunError(f"no such image: {opts.image} (and --pull=never)")
            self.send(cli_api.NOTICE, f"Unable to find image '{opts.image}' locally, pulling".encode())
            await self.flush()
            await self.server.images.pull(opts.image, platform=opts.platform or "linux/amd64",
                                          progress=self._progress(opts))
        except RunError:
            raise
        except Exception as exc:
            raise RunError(_message(exc)) from None

    def _progress(self, opts: RunOptions | PullOptions):
        return _SentProgress(self) if opts.progress else False

    async def _start(self) -> None:
        try:
            await self.m.start_container(self.cid)
        except Exception as exc:
            message = _message(exc)
            raise RunError(f"cannot start container: {message}",
                           exitcodes.for_start_error(exc)) from None

    async def _relay(self, io, tty: bool) -> None:
        """The process runs: tell the CLI, take its input from now on
        (_read_client), send its output to the end (a tty has no stderr)."""
        self.io = io
        self.send(cli_api.STARTED)
        streams = [("stdout", cli_api.STDOUT)] + ([] if tty else [("stderr", cli_api.STDERR)])
        await asyncio.gather(*(self._pump(io, name, kind) for name, kind in streams))

    async def _pump(self, io, stream: str, kind: int) -> None:
        """A stream of the container's output to the CLI, to its end (a CLI
        gone away stops the sending, not the draining)."""
        while data := await io.read(stream):
            self.send(kind, data)
            await self.flush()

    async def _end(self, opts) -> None:
        """The pod of a run that ended, or failed: removed (--rm, an embedded
        host, a CLI gone before the start), else stopped and kept for
        `ps -a`/`logs`, as Docker keeps an exited container."""
        if self.pod is None or self.detached:
            return
        # A CLI gone before its container started never saw one: nothing to keep.
        if opts.remove or self.server.remove_always or (self.client_gone and self.io is None):
            await _quietly(self._remove_run_pod(self.pod, self.pod_name), "run cleanup")
        else:
            await _quietly(self.m.stop_pod(self.pod), "run cleanup")

    async def _remove_run_pod(self, pod: str, name: str) -> None:
        """A run's pod, and its log directory (the daemon's to remove)."""
        await _quietly(self.m.stop_pod(pod), "run cleanup")  # removal stops what is left
        await self.m.remove_pod(pod)
        shutil.rmtree(self.server.logs_root / name, ignore_errors=True)

    # --- from the CLI
    async def _read_client(self, opts) -> None:
        try:
            while (f := await cli_api.read_frame(self.reader)) is not None:
                # The process may have ended meanwhile: its input goes nowhere.
                await _quietly(self._from_client(*f), "input from the CLI")
        except (ProtocolError, ConnectionError):
            pass
        self.client_gone = True
        if self.io is not None and isinstance(opts, ExecOptions):
            await _quietly(self.io.abandon(), "exec cleanup")
        elif self.io is not None and opts.stdin:  # stdin_once: nobody will write any more
            await _quietly(self.io.close_stdin(), "stdin close")

    async def _from_client(self, kind: int, payload: bytes) -> None:
        if self.io is None:
            return  # the CLI sends input, sizes and stops only once STARTED
        if kind == cli_api.STDIN:
            await self.io.write(payload)
        elif kind == cli_api.STDIN_CLOSE:
            await self.io.close_stdin()
        elif kind == cli_api.RESIZE:
            size = json.loads(payload)
            await self.io.resize(int(size["rows"]), int(size["cols"]))
        elif kind == cli_api.STOP and self.pod is not None:  # a run's (an exec has no stop)
            # The CRI has no "send this signal": a stop sends the container's
            # stop signal (SIGTERM unless the image says otherwise), then SIGKILL.
            asyncio.ensure_future(_quietly(self.m.stop_container(self.cid, 10), "stop"))


class _SentProgress:
    """A pull's progress (image/progress.PullProgress) sent to the CLI as
    PROGRESS frames, which it shows as a pull without a daemon does; a
    layer's advances at most every 0.1 s."""

    def __init__(self, s: "_Connection") -> None:
        self.connection = s
        self.pending: dict[str, int] = {}
        self.sent_at = 0.0

    def _send(self, op: str, **args) -> None:
        self.connection.send(cli_api.PROGRESS, json.dumps({"op": op, **args}).encode())

    def start(self, digest: str, total: int, done: int = 0) -> None:
        self._send("start", digest=digest, total=total, done=done)

    def advance(self, digest: str, n: int) -> None:
        self.pending[digest] = self.pending.get(digest, 0) + n
        if time.monotonic() - self.sent_at >= 0.1:
            self._flush()

    def _flush(self) -> None:
        for digest, n in self.pending.items():
            self._send("advance", digest=digest, n=n)
        self.pending.clear()
        self.sent_at = time.monotonic()

    def finish(self, digest: str, skipped: bool = False) -> None:
        self._flush()
        self._send("finish", digest=digest, skipped=skipped)

    def close(self) -> None:
        self._flush()


async def _quietly(step, what: str) -> None:
    """A step whose failure changes nothing for the run (logged)."""
    try:
        await step
    except Exception as exc:
        logger.info("run request: step failed", step=what, error=f"{type(exc).__name__}: {exc}")
