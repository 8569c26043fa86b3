"""The CLI as a client of the daemon (hyperrun daemon): pods, ps, exec,
logs, stop, rm, and `run -d`, over the same CRI API the kubelet uses."""
from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hyperrun import annotations, exitcodes, paths


class NoDaemon(Exception):
    pass


class Host:
    """Where the CRI services run: the daemon, or this process (embedded).
    Everything below speaks CRI to either, through the same stubs."""

    def __init__(self, path: Path, embedded=None) -> None:
        import grpc

        from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

        self.embedded = embedded
        self.channel = grpc.insecure_channel(f"unix://{path}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        if self.embedded is not None:
            self.embedded.close()

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect() -> Host:
    """The daemon, if one answers on its socket."""
    import grpc

    from hyperrun.proto import cri_api_pb2 as cri

    path = paths.daemon_socket()
    if not path.exists():
        raise NoDaemon(f"no hyperrun daemon at {path}: start `hyperrun daemon`")
    host = Host(path)
    try:
        host.runtime.Version(cri.VersionRequest(), timeout=5)
    except grpc.RpcError as exc:
        host.close()
        raise NoDaemon(f"the daemon at {path} does not answer: {exc.details()}") from None
    return host


def open_host() -> Host:
    """The daemon if it answers, else the same services in this process."""
    try:
        return connect()
    except NoDaemon:
        from hyperrun.api.embedded import EmbeddedHost

        embedded = EmbeddedHost()
        return Host(embedded.socket, embedded)


def _age(ns: int) -> str:
    seconds = max(time.time() - ns / 1e9, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def table(rows: list[tuple]) -> int:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def pods() -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        rows = [("POD ID", "NAME", "NAMESPACE", "STATE", "CREATED")]
        for p in host.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            rows.append((p.id[:13], p.metadata.name, p.metadata.namespace,
                         cri.PodSandboxState.Name(p.state).removeprefix("SANDBOX_"),
                         _age(p.created_at)))
    table(rows)
    return 0


def ps(all_: bool) -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        rows = [("CONTAINER ID", "IMAGE", "NAME", "STATE", "CREATED", "POD ID")]
        for c in host.runtime.ListContainers(cri.ListContainersRequest()).containers:
            if not all_ and c.state != cri.CONTAINER_RUNNING:
                continue
            rows.append((c.id[:13], c.image.image, c.metadata.name,
                         cri.ContainerState.Name(c.state).removeprefix("CONTAINER_"),
                         _age(c.created_at), c.pod_sandbox_id[:13]))
    table(rows)
    return 0


def _full_id(runtime, prefix: str) -> str:
    from hyperrun.proto import cri_api_pb2 as cri

    matches = [c.id for c in runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(id=prefix))).containers]
    if len(matches) != 1:
        raise SystemExit(f"hyperrun: {'no' if not matches else 'more than one'} container {prefix!r}")
    return matches[0]


def exec_(container: str, cmd: list[str], interactive: bool = False, tty: bool = False) -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        cid = _full_id(host.runtime, container)
        if not interactive and not tty:
            r = host.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=cmd))
            sys.stdout.buffer.write(r.stdout)
            sys.stderr.buffer.write(r.stderr)
            return r.exit_code
        url = host.runtime.Exec(cri.ExecRequest(container_id=cid, cmd=cmd, tty=tty,
                                                stdin=interactive, stdout=True,
                                                stderr=not tty)).url
        return _stream(url, interactive, tty)


def _stream(url: str, interactive: bool, tty: bool, on_open=None) -> int:
    """Be the client of the streaming server (channel.k8s.io over a
    websocket): local stdin to channel 0, channels 1/2 to stdout/stderr,
    window sizes to channel 4, the exit status from channel 3. on_open
    runs once the stream is connected (`run` starts its container then)."""
    import json
    import signal
    import threading

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    from hyperrun.terminal import raw_terminal, terminal_size

    with ws_connect("ws" + url[4:], subprotocols=["v5.channel.k8s.io", "v4.channel.k8s.io"],
                    max_size=None) as ws:
        v5 = ws.subprotocol == "v5.channel.k8s.io"

        def send_size(*_):
            rows, cols = terminal_size()
            if rows and cols:
                ws.send(b"\x04" + json.dumps({"Width": cols, "Height": rows}).encode())

        def pump_stdin():
            try:
                while data := os.read(0, 65536):
                    ws.send(b"\x00" + data)
                if v5:
                    ws.send(b"\xff\x00")  # v5: close stdin
            except (OSError, ConnectionClosed):
                pass

        if on_open is not None:
            on_open()
        if tty:
            send_size()
            signal.signal(signal.SIGWINCH, send_size)
        if interactive:
            threading.Thread(target=pump_stdin, daemon=True).start()
        status = b""
        with raw_terminal(enabled=tty and interactive):
            while True:
                try:
                    msg = ws.recv()
                except ConnectionClosed:
                    break
                if not isinstance(msg, bytes) or not msg:
                    continue
                channel, data = msg[0], msg[1:]
                if channel in (1, 2):
                    out = sys.stdout.buffer if channel == 1 else sys.stderr.buffer
                    try:
                        out.write(data)
                        out.flush()
                    except BrokenPipeError:  # our reader went away: keep draining
                        pass
                elif channel == 3:
                    status += data
    if not status:
        return 0
    parsed = json.loads(status)
    if parsed.get("status") == "Success":
        return 0
    for cause in (parsed.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", 1))
    print(f"hyperrun: {parsed.get('message', 'exec failed')}", file=sys.stderr)
    return 126


def logs(container: str, follow: bool) -> int:
    """Print a container's output from its CRI log file (as `crictl logs`)."""
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        cid = _full_id(host.runtime, container)
        status = host.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        if not status.log_path:
            raise SystemExit(f"hyperrun: container {container} has no log")
        with open(status.log_path, "rb") as f:
            while True:
                line = f.readline()
                if line:
                    _, stream, tag, text = line.split(b" ", 3)
                    out = sys.stdout.buffer if stream == b"stdout" else sys.stderr.buffer
                    out.write(text if tag == b"F" else text.rstrip(b"\n"))
                    out.flush()
                    continue
                if not follow:
                    return 0
                state = host.runtime.ContainerStatus(
                    cri.ContainerStatusRequest(container_id=cid)).status.state
                if state != cri.CONTAINER_RUNNING:
                    return 0
                time.sleep(0.2)


def stop(containers: list[str], timeout: int) -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        for name in containers:
            cid = _full_id(host.runtime, name)
            host.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=timeout))
            print(name)
    return 0


def rm(containers: list[str]) -> int:
    """Remove containers, and the pod `run` made for each."""
    from hyperrun.proto import cri_api_pb2 as cri

    with connect() as host:
        for name in containers:
            cid = _full_id(host.runtime, name)
            status = host.runtime.ContainerStatus(
                cri.ContainerStatusRequest(container_id=cid)).status
            if status.state == cri.CONTAINER_RUNNING:
                raise SystemExit(f"hyperrun: container {name} is running: stop it first")
            pod = next(c.pod_sandbox_id for c in host.runtime.ListContainers(
                cri.ListContainersRequest(filter=cri.ContainerFilter(id=cid))).containers)
            _remove_run(host, cid, pod, status.labels.get(RUN_LABEL) == "1")
            print(name)
    return 0


# ----------------------------------------------------------------- run

RUN_LABEL = "io.hyperrun.run"          # a container `hyperrun run` made, in its own pod


@dataclass
class RunOptions:
    image: str
    args: list[str]
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    stdin: bool = False
    tty: bool = False
    hostname: str = ""
    readonly: bool = False
    volumes: list[str] = field(default_factory=list)   # HOST:CONTAINER[:ro]
    platform: str = "linux/amd64"
    pull: str = "missing"                              # missing | always | never
    cpus: int | None = None         # a limit only where given, as Docker's
    memory_mib: int | None = None
    remove: bool = False
    detach: bool = False
    ports: list[str] = field(default_factory=list)     # [HOSTIP:]HOSTPORT:PORT[/PROTO]
    network: str = "auto"


class RunError(Exception):
    def __init__(self, message: str, code: int = exitcodes.RUNTIME_ERROR) -> None:
        super().__init__(message)
        self.code = code


def parse_volume(text: str):
    """-v HOST:CONTAINER[:ro|rw] as a CRI mount."""
    from hyperrun.proto import cri_api_pb2 as cri

    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or \
            (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise RunError(f"-v {text!r}: expected HOST:CONTAINER[:ro]")
    host = Path(parts[0])
    if not host.is_absolute():
        raise RunError(f"-v {text!r}: the host path must be absolute")
    return cri.Mount(host_path=str(host), container_path=parts[1],
                     readonly=len(parts) == 3 and parts[2] == "ro")


def parse_port(text: str):
    """-p [HOSTIP:]HOSTPORT:PORT[/tcp|udp] as a CRI port mapping."""
    import ipaddress

    cri = _cri()
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
    return cri.PortMapping(protocol={"tcp": cri.TCP, "udp": cri.UDP, "sctp": cri.SCTP}[proto],
                           container_port=port, host_port=host_port, host_ip=host_ip)


def _security_context(user: str):
    """-u as the CRI's: numeric uid[:gid] as ids; names go whole in
    run_as_username, which the guest resolves in the image's own files."""
    from hyperrun.proto import cri_api_pb2 as cri

    sc = cri.LinuxContainerSecurityContext()
    name, _, group = user.partition(":")

    def is_id(text: str) -> bool:  # ASCII digits within a uid's range
        return text.isascii() and text.isdigit() and int(text) < 1 << 32

    if (name.isdigit() and not is_id(name)) or (group.isdigit() and not is_id(group)):
        raise RunError(f"-u {user!r}: ids are numbers below 2^32")
    if is_id(name) and (not group or is_id(group)):
        sc.run_as_user.value = int(name)
        if group:
            sc.run_as_group.value = int(group)
    elif user:
        sc.run_as_username = user
    return sc


def _ensure_image(host: Host, opts: RunOptions) -> None:
    import grpc

    from hyperrun.proto import cri_api_pb2 as cri

    spec = _image_spec(opts.image, opts.platform)
    if opts.pull != "always" and host.images.ImageStatus(
            cri.ImageStatusRequest(image=spec)).HasField("image"):
        return
    if opts.pull == "never":
        raise RunError(f"no such image: {opts.image} (and --pull=never)")
    print(f"Unable to find image '{opts.image}' locally, pulling", file=sys.stderr)
    try:
        host.images.PullImage(cri.PullImageRequest(image=spec))
    except grpc.RpcError as exc:
        raise RunError(exc.details()) from None


def run(opts: RunOptions) -> int:
    """`hyperrun run IMAGE`: a pod of one container, as Docker's run: pull
    if needed, create, attach, start, wait; with --rm (and always without
    a daemon) everything goes when it exits. The exit code is Docker's."""
    import grpc

    try:
        mounts = [parse_volume(v) for v in opts.volumes]
        ports = [parse_port(p) for p in opts.ports]
        host = open_host() if not opts.detach else connect()
    except RunError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exc.code
    except NoDaemon as exc:
        print(f"hyperrun: run -d keeps the container in the daemon: {exc}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    if not opts.detach:
        _prefetch_stream_client()
    pod = cid = None
    try:
        _ensure_image(host, opts)
        pod, pod_config = _run_pod(host, opts, ports)
        cid = _create(host, opts, pod, pod_config, mounts)
        if opts.detach:
            _start(host, cid)
            print(cid)
            return 0
        return _attach_and_wait(host, opts, cid)
    except RunError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exc.code
    except grpc.RpcError as exc:
        print(f"hyperrun: {exc.details()}", file=sys.stderr)
        return exitcodes.for_start_error(exc.details() or "")
    except KeyboardInterrupt:
        return 130
    finally:
        if pod is not None and not opts.detach:
            if opts.remove or host.embedded is not None:
                _remove_run(host, cid, pod, True)
            else:  # kept for `hyperrun ps -a`/`logs`; its VM is not needed any more
                _quietly(host.runtime.StopPodSandbox, _cri().StopPodSandboxRequest(pod_sandbox_id=pod))
        host.close()


def _prefetch_stream_client() -> None:
    """Import the websocket client in a thread while the first RPCs wait
    on the daemon (they release the GIL): 20 ms of a `run` from the pool
    otherwise spent after CreateContainer. The import lock makes the later
    import in _stream wait for this one."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("websockets.sync.client",),
                     name="prefetch", daemon=True).start()


def _cri():
    from hyperrun.proto import cri_api_pb2 as cri
    return cri


def _quietly(call, request) -> None:
    import grpc

    try:
        call(request)
    except grpc.RpcError:
        pass


def _run_pod(host: Host, opts: RunOptions, ports=()):
    cri = _cri()
    name = "run-" + secrets.token_hex(4)
    logs_dir = (host.embedded.dir if host.embedded else paths.data_root()) / "logs" / name
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=name, namespace="hyperrun"),
        hostname=opts.hostname or name, log_directory=str(logs_dir), labels={RUN_LABEL: "1"},
        port_mappings=ports, annotations={annotations.NETWORK: opts.network},
        linux=cri.LinuxPodSandboxConfig(resources=_resources(opts)))
    pod = host.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
    return pod, pod_config


def _resources(opts: RunOptions):
    """The pod's limits (and so its VM's size), where given: without them
    the pod gets the default VM, the shape pool spares and templates have."""
    r = _cri().LinuxContainerResources()
    if opts.cpus:
        r.cpu_period, r.cpu_quota = 100000, opts.cpus * 100000
    if opts.memory_mib:
        r.memory_limit_in_bytes = opts.memory_mib << 20
    return r


def _create(host: Host, opts: RunOptions, pod: str, pod_config, mounts) -> str:
    import grpc

    cri = _cri()
    env = []
    for item in opts.env:
        key, eq, value = item.partition("=")
        if not eq:
            value = os.environ.get(key)  # -e NAME passes the caller's value, as Docker
            if value is None:
                continue
        env.append(cri.KeyValue(key=key, value=value))
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=pod_config.metadata.name),
        image=cri.ImageSpec(image=opts.image), command=opts.entrypoint or [], args=opts.args,
        working_dir=opts.workdir, envs=env, mounts=mounts, log_path="container.log",
        labels={RUN_LABEL: "1"}, stdin=opts.stdin, stdin_once=opts.stdin, tty=opts.tty,
        linux=cri.LinuxContainerConfig(security_context=_security_context(opts.user)))
    config.linux.security_context.readonly_rootfs = opts.readonly
    try:
        return host.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
    except grpc.RpcError as exc:
        raise RunError(f"cannot create container: {exc.details()}",
                       exitcodes.for_start_error(exc.details() or "")) from None


def _start(host: Host, cid: str) -> None:
    import grpc

    try:
        host.runtime.StartContainer(_cri().StartContainerRequest(container_id=cid))
    except grpc.RpcError as exc:
        raise RunError(f"cannot start container: {exc.details()}",
                       exitcodes.for_start_error(exc.details() or "")) from None


def _attach_and_wait(host: Host, opts: RunOptions, cid: str) -> int:
    """Attach first, then start, so no output is missed; the exit code
    comes from the container's status once its output has ended."""
    import signal
    import threading

    cri = _cri()
    url = host.runtime.Attach(cri.AttachRequest(container_id=cid, stdin=opts.stdin, tty=opts.tty,
                                                stdout=True, stderr=not opts.tty)).url

    def stop_container(signum, frame):
        # The CRI has no "send this signal": a stop sends the container's
        # stop signal (SIGTERM unless the image says otherwise), then SIGKILL.
        threading.Thread(target=_quietly, daemon=True, args=(
            host.runtime.StopContainer, cri.StopContainerRequest(container_id=cid, timeout=10)
        )).start()

    if not opts.tty:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stop_container)
    failure: list[RunError] = []

    def start():
        try:
            _start(host, cid)
        except RunError as exc:
            failure.append(exc)

    _stream(url, opts.stdin, opts.tty, on_open=start)
    if failure:
        raise failure[0]
    deadline = time.monotonic() + 30
    while True:
        status = host.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        if status.state == cri.CONTAINER_EXITED:
            if status.reason == "VMExited":
                raise RunError(f"the VM ended while the container ran: {status.message}")
            return status.exit_code
        if time.monotonic() > deadline:
            raise RunError("the container's output ended but it did not exit")
        time.sleep(0.05)


def _remove_run(host: Host, cid: str | None, pod: str, with_pod: bool) -> None:
    """A container, and the pod `run` made for it, with its log directory."""
    import shutil

    cri = _cri()
    if cid is not None and not with_pod:  # RemovePodSandbox takes its containers along
        _quietly(host.runtime.RemoveContainer, cri.RemoveContainerRequest(container_id=cid))
    if with_pod:
        try:
            status = host.runtime.PodSandboxStatus(
                cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
        except Exception:
            status = None
        _quietly(host.runtime.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        _quietly(host.runtime.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        if status is not None and status.labels.get(RUN_LABEL) == "1":
            from hyperrun.paths import data_root

            shutil.rmtree(data_root() / "logs" / status.metadata.name, ignore_errors=True)


# ----------------------------------------------------------------- images

def _image_spec(name: str, platform: str = ""):
    return _cri().ImageSpec(image=name, annotations={annotations.PLATFORM: platform} if platform else {})


def pull(host: Host, name: str, platform: str, quiet: bool) -> int:
    """`hyperrun pull` through the daemon (progress is the daemon's own)."""
    import grpc

    try:
        ref = host.images.PullImage(_cri().PullImageRequest(image=_image_spec(name, platform))).image_ref
    except grpc.RpcError as exc:
        print(f"hyperrun: {exc.details()}", file=sys.stderr)
        return 1
    digest = ref.rpartition("@")[2]
    print(digest if quiet else f"Digest: {digest}")
    return 0


def images(host: Host) -> list[tuple]:
    """Rows of `hyperrun images`, from the daemon's ListImages."""
    from hyperrun.image import reference

    rows = []
    for image in host.images.ListImages(_cri().ListImagesRequest()).images:
        size, image_id = f"{image.size / 1e6:.1f}MB", image.id.removeprefix("sha256:")[:12]
        digests = {d.partition("@")[0]: d.partition("@")[2] for d in image.repo_digests}
        if not image.repo_tags:
            rows.append(("<none>", "<none>", next(iter(digests.values()), "")[:19], image_id, size))
        for tag in image.repo_tags:
            ref = reference.parse(tag)
            repo = reference.Reference(ref.registry, ref.repository)
            rows.append((repo.familiar, ref.tag or "<none>", digests.get(repo.name, "")[:19],
                         image_id, size))
    return rows


def rmi(host: Host, names: list[str]) -> int:
    import grpc

    status = 0
    for name in names:
        spec = _image_spec(name)
        if not host.images.ImageStatus(_cri().ImageStatusRequest(image=spec)).HasField("image"):
            print(f"hyperrun: no such image: {name}", file=sys.stderr)
            status = 1
            continue
        try:
            host.images.RemoveImage(_cri().RemoveImageRequest(image=spec))
            print(f"Untagged: {name}")
        except grpc.RpcError as exc:
            print(f"hyperrun: {exc.details()}", file=sys.stderr)
            status = 1
    return status
