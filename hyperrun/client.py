"""The CLI as a client of the daemon (hyperrun daemon): pods, ps, exec,
logs, stop, rm, and `run -d`, over the same CRI API the kubelet uses."""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path


class NoDaemon(Exception):
    pass


def socket_path() -> Path:
    from hyperrun.api.server import default_socket

    return Path(os.environ.get("HYPERRUN_SOCKET") or default_socket())


def connect():
    """(RuntimeService, ImageService) stubs, if a daemon answers."""
    import grpc

    from hyperrun.proto import cri_api_pb2 as cri
    from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

    path = socket_path()
    if not path.exists():
        raise NoDaemon(f"no hyperrun daemon at {path}: start `hyperrun daemon`")
    channel = grpc.insecure_channel(f"unix://{path}")
    runtime = cri_grpc.RuntimeServiceStub(channel)
    try:
        runtime.Version(cri.VersionRequest(), timeout=5)
    except grpc.RpcError as exc:
        raise NoDaemon(f"the daemon at {path} does not answer: {exc.details()}") from None
    return runtime, cri_grpc.ImageServiceStub(channel)


def _age(ns: int) -> str:
    seconds = max(time.time() - ns / 1e9, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def pods() -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    runtime, _ = connect()
    rows = [("POD ID", "NAME", "NAMESPACE", "STATE", "CREATED")]
    for p in runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        rows.append((p.id[:13], p.metadata.name, p.metadata.namespace,
                     cri.PodSandboxState.Name(p.state).removeprefix("SANDBOX_"), _age(p.created_at)))
    _table(rows)
    return 0


def ps(all_: bool) -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    runtime, _ = connect()
    rows = [("CONTAINER ID", "IMAGE", "NAME", "STATE", "CREATED", "POD ID")]
    for c in runtime.ListContainers(cri.ListContainersRequest()).containers:
        if not all_ and c.state != cri.CONTAINER_RUNNING:
            continue
        rows.append((c.id[:13], c.image.image, c.metadata.name,
                     cri.ContainerState.Name(c.state).removeprefix("CONTAINER_"),
                     _age(c.created_at), c.pod_sandbox_id[:13]))
    _table(rows)
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

    runtime, _ = connect()
    cid = _full_id(runtime, container)
    if not interactive and not tty:
        r = runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=cmd))
        sys.stdout.buffer.write(r.stdout)
        sys.stderr.buffer.write(r.stderr)
        return r.exit_code
    url = runtime.Exec(cri.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=interactive,
                                       stdout=True, stderr=not tty)).url
    return _stream(url, interactive, tty)


def _stream(url: str, interactive: bool, tty: bool) -> int:
    """Be the client of the daemon's streaming server (channel.k8s.io over
    a websocket): local stdin to channel 0, channels 1/2 to stdout/stderr,
    window sizes to channel 4, the exit status from channel 3."""
    import json
    import signal
    import threading

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    from hyperrun.attach import raw_terminal, terminal_size

    with ws_connect("ws" + url[4:], subprotocols=["v5.channel.k8s.io", "v4.channel.k8s.io"]) as ws:
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
                    out.write(data)
                    out.flush()
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

    runtime, _ = connect()
    cid = _full_id(runtime, container)
    status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
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
            state = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status.state
            if state != cri.CONTAINER_RUNNING:
                return 0
            time.sleep(0.2)


def stop(containers: list[str], timeout: int) -> int:
    from hyperrun.proto import cri_api_pb2 as cri

    runtime, _ = connect()
    for name in containers:
        cid = _full_id(runtime, name)
        runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=timeout))
        print(name)
    return 0


def rm(containers: list[str]) -> int:
    """Remove containers, and the pod `run -d` made for each."""
    from hyperrun.proto import cri_api_pb2 as cri

    runtime, _ = connect()
    for name in containers:
        cid = _full_id(runtime, name)
        status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        if status.state == cri.CONTAINER_RUNNING:
            raise SystemExit(f"hyperrun: container {name} is running: stop it first")
        pod = next(c.pod_sandbox_id for c in runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(id=cid))).containers)
        runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
        if status.labels.get("io.hyperrun.run") == "1":
            runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
            runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        print(name)
    return 0


def run_detached(image: str, args: list[str], entrypoint: list[str] | None, env: list[str],
                 workdir: str, cpus: int, memory_mib: int) -> int:
    """`hyperrun run -d`: a pod of one container in the daemon; prints its id."""
    from hyperrun.paths import data_root
    from hyperrun.proto import cri_api_pb2 as cri

    runtime, images = connect()
    if not images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image))).HasField("image"):
        images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    name = "run-" + secrets.token_hex(4)
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=name, namespace="hyperrun"),
        hostname=name, log_directory=str(data_root() / "logs" / name),
        linux=cri.LinuxPodSandboxConfig(resources=cri.LinuxContainerResources(
            cpu_period=100000, cpu_quota=cpus * 100000, memory_limit_in_bytes=memory_mib << 20)))
    pod_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
        command=entrypoint or [], args=args, working_dir=workdir,
        envs=[cri.KeyValue(key=k, value=v) for k, _, v in (e.partition("=") for e in env)],
        log_path="container.log", labels={"io.hyperrun.run": "1"})
    cid = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod)).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    print(cid)
    return 0
