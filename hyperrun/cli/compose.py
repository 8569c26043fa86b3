"""`hyperrun compose up / down / ps / logs / exec`: a compose file's project
(hyperrun/cli/compose_file.py) done by the daemon, each service's container
a detached run (`run -d`) in its own pod VM, as `docker compose` asks
dockerd. A container is `<project>-<service>-1`, with Docker's compose
labels; the daemon's name server answers a service's name for the pods of
its project, and the container's name for any pod. Health checks and
restart policies are the daemon's (api/supervisor.py); `up` waits on them
for depends_on's service_healthy. Named volumes are the daemon's
(`<project>_<volume>`), kept by `down`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

from hyperrun import cli_api, exitcodes
from hyperrun.cli import client
from hyperrun.cli.compose_file import ComposeError, Project, Service
from hyperrun.cli_api import ListOptions, LogsOptions, NamesOptions, RunError, RunOptions
from hyperrun.specs import PROJECT_LABEL, SERVICE_LABEL

PROJECT, SERVICE = PROJECT_LABEL, SERVICE_LABEL
NUMBER, HASH = "com.docker.compose.container-number", "com.docker.compose.config-hash"
WORKING_DIR = "com.docker.compose.project.working_dir"
HEALTHY_WAIT_S = 900.0  # depends_on service_healthy: as long as a slow (TCG) start may take
POLL_S = 0.5


def _say(name: str, what: str) -> None:
    print(f" Container {name}  {what}", file=sys.stderr, flush=True)


def run_options(project: Project, service: Service) -> RunOptions:
    """A service's container as a detached run's request."""
    volumes = [f"{project.volume_name(v.source) if v.kind == 'volume' else v.source}:"
               f"{v.target}{':ro' if v.readonly else ''}" for v in service.volumes]
    opts = RunOptions(
        image=service.image, args=service.command or [], entrypoint=service.entrypoint,
        name=project.container_name(service.name), env=service.environment, volumes=volumes,
        ports=service.ports, detach=True, restart=service.restart,
        healthcheck=service.healthcheck.to_dict() if service.healthcheck else None,
        labels={PROJECT: project.name, SERVICE: service.name, NUMBER: "1",
                WORKING_DIR: str(project.directory)})
    opts.labels[HASH] = hashlib.sha256(opts.to_json()).hexdigest()
    opts.progress = sys.stderr.isatty()  # a pull's bars: not the container's configuration
    return opts


def containers(project: Project) -> dict[str, dict]:
    """The project's containers (running or not), by service."""
    rows = client._ask(cli_api.LIST, ListOptions("containers", all=True))["rows"]
    return {r["labels"][SERVICE]: r for r in rows
            if r.get("labels", {}).get(PROJECT) == project.name and SERVICE in r["labels"]}


def up(project: Project, services: list[str], detach: bool, force_recreate: bool) -> int:
    began = time.monotonic()
    existing = containers(project)
    wanted = project.order(services)
    for name in wanted:
        service = project.services[name]
        for dep, condition in service.depends_on.items():
            if condition == "service_healthy":
                _wait_healthy(project, dep)
        opts = run_options(project, service)
        row = existing.get(name)
        if row is not None:
            same = row["labels"].get(HASH) == opts.labels[HASH] and row["state"] == "RUNNING"
            if same and not (force_recreate and (not services or name in services)):
                _say(opts.name, "Running")
                continue
            _say(opts.name, "Recreate")
            if _command(cli_api.REMOVE_CONTAINERS, NamesOptions([row["id"]], force=True)):
                return 1
        _say(opts.name, "Creating")
        with client._daemon_socket() as sock:
            result = client._request(sock, cli_api.RUN, opts)
        if "error" in result:
            print(f"hyperrun: service {name}: {result['error']}", file=sys.stderr)
            return int(result.get("code", exitcodes.RUNTIME_ERROR))
        _say(opts.name, "Started")
    print(f"hyperrun compose: {project.name} up in {time.monotonic() - began:.1f}s",
          file=sys.stderr)
    if detach:
        return 0
    try:  # attached: the services' output until Ctrl-C, which stops them (as compose's)
        return logs(project, [], follow=True, services_of=wanted)
    except KeyboardInterrupt:
        names = [project.container_name(n) for n in reversed(wanted)]
        _command(cli_api.STOP_CONTAINERS, NamesOptions(names, 10))
        return 130


def _wait_healthy(project: Project, service: str) -> None:
    name = project.container_name(service)
    if project.services[service].healthcheck is None:
        raise ComposeError(f"{service} has no healthcheck: depends_on service_healthy waits "
                           "for one")
    deadline = time.monotonic() + HEALTHY_WAIT_S
    _say(name, "Waiting")
    while True:
        row = containers(project).get(service)
        if row is None or row["state"] != "RUNNING":
            raise ComposeError(f"container {name} is not running: see `hyperrun compose logs "
                               f"{service}`")
        if row["health"] == "healthy":
            _say(name, "Healthy")
            return
        if row["health"] == "unhealthy":
            raise ComposeError(f"container {name} is unhealthy")
        if time.monotonic() > deadline:
            raise ComposeError(f"container {name}: not healthy after {HEALTHY_WAIT_S:.0f}s")
        time.sleep(POLL_S)


def _command(kind: int, opts) -> int:
    """A request whose lines go to the user only when it fails."""
    with client._daemon_socket() as sock:
        result = client._request(sock, kind, opts)
    if "error" in result:
        print(f"hyperrun: {result['error']}", file=sys.stderr)
    return int(result.get("code", 1))


def down(project: Project) -> int:
    """Every container of the project (stopped, then removed with its pod);
    named volumes stay, as compose's without -v."""
    rows = containers(project)
    order = [s for s in reversed(project.order()) if s in rows] + \
        [s for s in rows if s not in project.services]  # orphans: their service left the file
    code = 0
    for service in order:
        name = rows[service]["name"]
        _say(name, "Stopping")
        with client._daemon_socket() as sock:
            result = client._request(sock, cli_api.REMOVE_CONTAINERS,
                                     NamesOptions([rows[service]["id"]], force=True))
        code = code or int(result.get("code", 1))
        _say(name, "Removed")
    return code


def ps(project: Project, all_: bool) -> int:
    rows = [r for s, r in containers(project).items() if all_ or r["state"] == "RUNNING"]
    table = [("NAME", "IMAGE", "SERVICE", "STATUS", "PORTS")]
    for r in sorted(rows, key=lambda r: r["name"]):
        status = client._status(r) + (f" ({r['health']})" if r.get("health") else "")
        table.append((r["name"], r["image"], r["labels"][SERVICE], status,
                      ", ".join(r.get("ports", []))))
    return client.table(table)


def logs(project: Project, services: list[str], follow: bool, tail: int | None = None,
         services_of: list[str] | None = None) -> int:
    """Each service's output, its lines after `NAME  | ` (all at once with
    -f, each from its own request)."""
    rows = containers(project)
    for name in services:
        if name not in project.services:
            raise ComposeError(f"no such service: {name}")
    chosen = [s for s in (services or services_of or project.order()) if s in rows]
    width = max((len(rows[s]["name"]) for s in chosen), default=0)
    lock = threading.Lock()
    codes: list[int] = []

    def read(service: str) -> None:
        prefix = rows[service]["name"].ljust(width) + " | "
        with client._daemon_socket() as sock:
            sock.sendall(cli_api.frame(cli_api.LOGS, LogsOptions(
                rows[service]["id"], follow, tail).to_json()))
            reader, partial = cli_api.FrameReader(sock), {cli_api.STDOUT: b"", cli_api.STDERR: b""}
            while (f := reader.next()) is not None:
                kind, payload = f
                if kind == cli_api.EXIT:
                    codes.append(int(json.loads(payload).get("code", 1)))
                    break
                if kind not in partial:
                    continue
                *lines, partial[kind] = (partial[kind] + payload).split(b"\n")
                with lock:
                    for line in lines:
                        sys.stdout.write(prefix + line.decode(errors="replace") + "\n")
                    sys.stdout.flush()
    if not follow:
        for service in chosen:
            read(service)
    else:
        threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in chosen]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)  # Ctrl-C reaches the main thread
    return max(codes, default=0)


def exec_(project: Project, service: str, cmd: list[str], no_tty: bool) -> int:
    if service not in project.services:
        raise ComposeError(f"no such service: {service}")
    tty = not no_tty and sys.stdin.isatty() and sys.stdout.isatty()
    return client.exec_(project.container_name(service), cmd, interactive=tty, tty=tty)


def main(args) -> int:
    """The compose commands, from their parsed arguments."""
    from hyperrun.cli import compose_file

    try:
        project = compose_file.load(compose_file.find(args.file), args.project_name)
        if args.compose_command == "up":
            return up(project, args.services, args.detach, args.force_recreate)
        if args.compose_command == "down":
            return down(project)
        if args.compose_command == "ps":
            return ps(project, args.all)
        if args.compose_command == "logs":
            return logs(project, args.services, args.follow, args.tail)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return exec_(project, args.service, cmd, args.no_tty)
    except ComposeError as exc:
        print(f"hyperrun compose: {exc}", file=sys.stderr)
        return 1
    except RunError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exc.code
    except client.NoDaemon as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return 1
