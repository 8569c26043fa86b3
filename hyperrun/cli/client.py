"""The CLI as a client of the daemon (hyperrun daemon): `run IMAGE`,
`exec`, `ps`, `pods`, `logs`, `stop`, `rm`, `pull`, `images` and `rmi`,
which the daemon does as requests (hyperrun/cli_api.py). The CRI is for
other clients (kubelet, crictl): the CLI imports no grpc."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from hyperrun import exitcodes, paths, cli_api
from hyperrun.cli_api import (ExecOptions, ListOptions, LogsOptions, NamesOptions, PullOptions,
                              RunError, RunOptions)


class NoDaemon(Exception):
    pass


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
    rows = _ask(cli_api.LIST, ListOptions("pods"))["rows"]
    return table([("POD ID", "NAME", "NAMESPACE", "STATE", "IP", "CREATED")] + [
        (p["id"][:13], p["name"], p["namespace"], p["state"], p["ip"], _age(p["created"]))
        for p in rows])


def ps(all_: bool) -> int:
    rows = _ask(cli_api.LIST, ListOptions("containers", all=all_))["rows"]
    return table([("CONTAINER ID", "IMAGE", "NAME", "CREATED", "STATUS", "POD ID")] + [
        (c["id"][:13], c["image"], c["name"], _age(c["created"]), _status(c), c["pod"][:13])
        for c in rows])


def _status(c: dict) -> str:
    """A container's STATUS as `docker ps` words it."""
    if c["state"] == "RUNNING":
        return "Up " + _age(c["started"]).removesuffix(" ago")
    if c["state"] == "EXITED":
        return f"Exited ({c['exit_code']}) {_age(c['finished'])}"
    return c["state"].capitalize()


def stats() -> int:
    """`hyperrun stats`: as `docker stats --no-stream`, with what each
    container's VM costs the host (its PSS: shared pages in part)."""
    rows = _ask(cli_api.LIST, ListOptions("stats"))["rows"]
    return table([("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "POD VM PSS")] + [
        (c["id"][:13], c["name"], "--" if c["cpu"] is None else f"{c['cpu']:.2f}%",
         f"{_mib(c['memory'])} / {_mib(c['limit'])}", _mib(c["vm_pss"])) for c in rows])


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}MiB"


def exec_(container: str, cmd: list[str], interactive: bool = False, tty: bool = False) -> int:
    """`hyperrun exec`: in an exec request to the daemon (the output as it
    comes, stdin with -i, a terminal with -t), as `run` does."""
    return _command(cli_api.EXEC, ExecOptions(container, cmd, stdin=interactive, tty=tty))


def logs(container: str, follow: bool, tail: int | None = None, timestamps: bool = False) -> int:
    """A container's output from its CRI log file, which the daemon reads
    (as `docker logs`; the file is root's)."""
    return _command(cli_api.LOGS, LogsOptions(container, follow, tail, timestamps))


def stop(containers: list[str], timeout: int) -> int:
    return _command(cli_api.STOP_CONTAINERS, NamesOptions(containers, timeout))


def inspect(containers: list[str]) -> int:
    return _command(cli_api.INSPECT, NamesOptions(containers))


def rm(containers: list[str], force: bool = False) -> int:
    """Remove containers, and the pod `run` made for each."""
    return _command(cli_api.REMOVE_CONTAINERS, NamesOptions(containers, force=force))


def pull(sock, name: str, platform: str, quiet: bool) -> int:
    """`hyperrun pull` by the daemon, into its store."""
    opts = PullOptions(name, platform, progress=not quiet and sys.stderr.isatty())
    digest = _ask(cli_api.PULL, opts, sock)["digest"]
    print(digest if quiet else f"Digest: {digest}")
    return 0


def images(sock) -> list[list[str]]:
    """The daemon's `images` rows."""
    return _ask(cli_api.LIST, ListOptions("images"), sock)["rows"]


def rmi(sock, names: list[str]) -> int:
    return _command(cli_api.REMOVE_IMAGES, NamesOptions(names), sock)


def daemon_socket():
    """A connection to the daemon's CLI socket; None if none answers."""
    return _connect(cli_api.socket_path(paths.daemon_socket()))


def _command(kind: int, opts, sock=None) -> int:
    """A command the daemon does in a request (on sock, else a new one):
    its exit code."""
    with sock or _daemon_socket() as sock:
        try:
            return _exit_code(_request(sock, kind, opts))
        except RunError as exc:
            print(f"hyperrun: {exc}", file=sys.stderr)
            return exc.code


def _ask(kind: int, opts, sock=None) -> dict:
    """What a request (on sock, else a new one) answers in its EXIT; an
    error ends the CLI."""
    with sock or _daemon_socket() as sock:
        try:
            result = _request(sock, kind, opts)
        except RunError as exc:
            raise SystemExit(f"hyperrun: {exc}") from None
    if "error" in result:
        raise SystemExit(f"hyperrun: {result['error']}")
    return result


def _daemon_socket():
    if (sock := daemon_socket()) is None:
        raise NoDaemon(_no_daemon())
    return sock


def _no_daemon() -> str:
    return f"no hyperrun daemon at {paths.daemon_socket()}: start `hyperrun daemon`"


# ----------------------------------------------------------------- run

def run(opts: RunOptions, template: bool | None = None, machine: str | None = None) -> int:
    """`hyperrun run IMAGE` or `run --rootfs DIR`: a pod of one container,
    as Docker's run, done by the daemon (or, without one, by the same
    services in this process) in one request (hyperrun/cli_api.py): pull if
    needed, create, attach, start, wait; with --rm (and always without a
    daemon) everything goes when it exits. The exit code is Docker's.
    template, machine: the VM's, for a run without a daemon (a daemon's
    come from its config)."""
    opts.env = _resolved_env(opts.env)
    opts.progress = sys.stderr.isatty()  # a pull's, if the image is missing
    embedded = None
    try:
        sock = daemon_socket()
        if sock is None:
            if opts.detach:
                print(f"hyperrun: run -d keeps the container in the daemon: {_no_daemon()}",
                      file=sys.stderr)
                return exitcodes.RUNTIME_ERROR
            from hyperrun.api.embedded import EmbeddedHost

            embedded = EmbeddedHost(template=template, machine=machine)
            sock = _connect(cli_api.socket_path(embedded.socket))
            if sock is None:
                raise RunError("the embedded host does not answer")
        elif template is not None or machine is not None:
            sock.close()
            print("hyperrun: --template and --machine choose the VM of a run without a daemon; "
                  "the daemon's VMs are its config's ([sandbox] template, machine)",
                  file=sys.stderr)
            return exitcodes.RUNTIME_ERROR
        with sock:
            return _exit_code(_request(sock, cli_api.RUN, opts))
    except RunError as exc:
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exc.code
    except cli_api.ProtocolError as exc:  # a request over the frame limit (1 MiB of args)
        print(f"hyperrun: {exc}", file=sys.stderr)
        return exitcodes.RUNTIME_ERROR
    except KeyboardInterrupt:  # before the container ran: the request ends with us
        return 130
    finally:
        if embedded is not None:
            embedded.close()


def _resolved_env(items: list[str]) -> list[str]:
    """-e NAME passes the caller's value, as Docker; unset, it is left out."""
    env = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            value = os.environ.get(key)
            if value is None:
                continue
        env.append(f"{key}={value}")
    return env


def _connect(path: Path):
    """A connection to the CLI socket at path; None if nobody serves there."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _request(sock, kind: int, opts) -> dict:
    """A request's client: the request (with -t, the terminal's size), then
    output frames until EXIT, whose content it returns."""
    if opts.tty:
        from hyperrun.cli.terminal import terminal_size

        opts.console = terminal_size()
    import contextlib
    import json
    import threading

    lock = threading.Lock()  # the stdin pump and signal handlers send too

    def send(kind: int, payload: bytes = b"") -> None:
        with lock:
            try:
                sock.sendall(cli_api.frame(kind, payload))
            except OSError:
                pass  # the daemon ended the request: its EXIT or EOF follows

    send(kind, opts.to_json())
    reader = cli_api.FrameReader(sock)
    pull = _PullShown()
    with contextlib.ExitStack() as attached:
        attached.callback(pull.end)
        while (f := reader.next()) is not None:
            kind, payload = f
            if kind == cli_api.PROGRESS:
                pull.show(payload)
                continue
            pull.end()  # the pull is over: its bars go before anything else is written
            if kind in (cli_api.STDOUT, cli_api.STDERR):
                out = sys.stdout.buffer if kind == cli_api.STDOUT else sys.stderr.buffer
                try:
                    out.write(payload)
                    out.flush()
                except BrokenPipeError:  # our reader went away: keep draining
                    pass
            elif kind == cli_api.NOTICE:
                print(payload.decode(errors="replace"), file=sys.stderr)
            elif kind == cli_api.STARTED:
                _attach(opts, send, attached)
            elif kind == cli_api.EXIT:
                return json.loads(payload)
    raise RunError("the daemon ended the request without its exit status")


class _PullShown:
    """A daemon's pull, shown on the terminal as a pull without a daemon
    (rich, imported once the first PROGRESS frame comes)."""
    CALLS = ("start", "advance", "finish")

    def __init__(self) -> None:
        self.bars = None

    def show(self, payload: bytes) -> None:
        import json

        event = json.loads(payload)
        op = event.pop("op", None)
        if op not in self.CALLS:
            return
        if self.bars is None:
            from hyperrun.image.progress import RichProgress
            self.bars = RichProgress()
        getattr(self.bars, op)(**event)

    def end(self) -> None:
        if self.bars is not None:
            self.bars.close()
            self.bars = None


def _exit_code(result: dict) -> int:
    """A command's exit code from its EXIT (a detached run's container id
    printed, an error told)."""
    if "container" in result:
        print(result["container"])
        return 0
    if "error" in result:
        print(f"hyperrun: {result['error']}", file=sys.stderr)
    return int(result.get("code", exitcodes.RUNTIME_ERROR))


def _attach(opts: RunOptions | ExecOptions, send, stack) -> None:
    """The process runs: relay stdin, the terminal's size and (for a run)
    stop signals; an exec, as Docker's, has none to proxy."""
    import json
    import signal
    import threading

    from hyperrun.cli.terminal import raw_terminal, terminal_size

    if opts.tty:
        def send_size(*_):
            rows, cols = terminal_size()
            if rows and cols:
                send(cli_api.RESIZE, json.dumps({"rows": rows, "cols": cols}).encode())

        signal.signal(signal.SIGWINCH, send_size)  # its size at the start went in RUN
    elif isinstance(opts, RunOptions):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: send(cli_api.STOP))
    if opts.stdin:
        def pump_stdin():
            try:
                while data := os.read(0, 65536):
                    send(cli_api.STDIN, data)
            except OSError:
                pass
            send(cli_api.STDIN_CLOSE)

        threading.Thread(target=pump_stdin, daemon=True).start()
    stack.enter_context(raw_terminal(enabled=opts.tty and opts.stdin))
