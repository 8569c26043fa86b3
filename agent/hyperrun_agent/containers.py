"""Containers in the guest, run by crun from OCI specs the agent writes.

Layout per container under /run/hyperrun/containers/<id>/ (the bundle):
config.json, rootfs/ (the mounted storage, or an overlay on it), crun.log,
and the pid files crun writes.

CreateContainer prepares everything (rootfs, user, spec, stdio) and checks
it; StartContainer runs `crun run --detach`. One crun execution per
container instead of create + start: each costs tens of milliseconds under
TCG. crun leaves the container's init process to us (PID 1), so the reaper
sees its real exit status.
"""
import itertools
import os
import threading
import time

from hyperrun.channel import frame

from . import network, oci, podns, seccomp, syscalls, users
from .errors import AgentError, failed, invalid, not_found
from .log import log
from .reaper import ExitStatus, Reaper
from .stdio import Stdio
from .storage import Storages

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"
STATE_ROOT = "/run/hyperrun/containers"
CRUN_TIMEOUT = 60.0
_tty_ids = itertools.count()
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

# Modules needed only by some requests are imported where used: every
# import at boot costs tens of milliseconds under TCG. WarmUp imports them
# all (before a template is saved); keep this list whole.
LAZY_MODULES = ("json", "select", "shutil", "socket", "subprocess", "struct", "fcntl",
                "traceback", ".network", ".identity", ".stats")


def _check_id(value: str, what: str) -> str:
    # Ids name paths in the guest: no separators, no leading dot or dash.
    if not (0 < len(value) <= 128 and value[0].isalnum() and set(value) <= _ID_CHARS):
        raise invalid(f"invalid {what} {value!r}")
    return value


def _write_json(path: str, value: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump(value, f)


class Process:
    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, terminal: bool,
                 console_size) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.terminal = terminal
        self.rows, self.cols = console_size.rows, console_size.cols
        self.pid = 0
        # Set once the process runs (pid known) or can no longer run.
        self.started = threading.Event()
        self.waited = False  # its exit status was given to the host


class Container:
    def __init__(self, container_id: str, bundle: str) -> None:
        self.id = container_id
        self.bundle = bundle
        self.rootfs = os.path.join(bundle, "rootfs")
        self.mounts: list[str] = []  # to unmount on removal, innermost last
        self.storage_keys: list[tuple] = []  # the shared storages it uses
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.started = False
        self.user_home = "/"
        self.privileged = False  # every capability, for its execs too
        self.caps: list[str] | None = None  # its capabilities, its execs' too
        self.no_new_privileges = False  # its execs' too
        self.rlimits: dict[str, tuple[int, int]] = {}  # its execs' too
        self.process = None  # the init's Process as asked: what its execs inherit


class Containers:
    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper
        self.storages = Storages()
        self.pod_namespaces = podns.PodNamespaces()
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        os.makedirs(STATE_ROOT, exist_ok=True)

    # --- lookup -----------------------------------------------------------
    def get(self, container_id: str) -> Container:
        with self._lock:
            container = self._containers.get(container_id)
        if container is None:
            raise not_found(f"container {container_id!r}")
        return container

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._containers)

    def process(self, container_id: str, exec_id: str) -> Process:
        container = self.get(container_id)
        proc = container.init if not exec_id else container.execs.get(exec_id)
        if proc is None:
            raise not_found(f"process {exec_id!r} of container {container_id!r}")
        return proc

    # --- lifecycle --------------------------------------------------------
    def create(self, req) -> None:
        cid = _check_id(req.container_id, "container id")
        if not req.process.args:
            raise invalid("process args are empty")
        bundle = os.path.join(STATE_ROOT, cid)
        with self._lock:
            if cid in self._containers:
                raise AgentError(frame.ALREADY_EXISTS, f"container {cid!r} already exists")
            container = self._containers[cid] = Container(cid, bundle)
        try:
            container.privileged = req.privileged
            container.no_new_privileges = req.no_new_privileges
            container.rlimits = {r.type: (r.soft, r.hard) for r in req.rlimits}
            try:
                container.caps = oci.capabilities(req.privileged, req.add_capabilities,
                                                  req.drop_capabilities)
                filter_ = seccomp.linux_seccomp(req, container.caps, req.privileged)
            except ValueError as exc:  # a bad capability name or profile
                raise invalid(str(exc)) from None
            os.makedirs(container.rootfs)
            self._mount_rootfs(container, req.rootfs)
            process = self._process_spec(container, req.process)
            spec = oci.container_spec(cid, process, req.hostname, req.readonly_rootfs,
                                      oci.resources_spec(req.resources), dict(req.sysctls),
                                      privileged=req.privileged, joined=self._joined(req),
                                      seccomp=filter_, masked_paths=req.masked_paths,
                                      readonly_paths=req.readonly_paths)
            # Volumes may replace them. A root written through to a host
            # directory (9p) gets them only over files it has: crun would
            # leave the missing mount points behind in the user's tree.
            written_through = None if req.rootfs.overlay else container.rootfs
            spec["mounts"] += network.container_mounts(written_through)
            spec["mounts"] += [self._volume(container, m) for m in req.mounts]
            # As containerd: the root rshared if a volume is, else rslave if
            # one is, so that the volume's propagation holds inside.
            kinds = {m.propagation for m in req.mounts}
            for kind in ("rshared", "rslave"):
                if kind in kinds:
                    spec["linux"]["rootfsPropagation"] = kind
                    break
            _write_json(os.path.join(bundle, "config.json"), spec)
            container.process = req.process
            container.init = self._new_process(container, "", req.process)
        except BaseException:
            self._teardown(container)
            raise

    def start(self, container_id: str) -> None:
        container = self.get(container_id)
        with self._lock:
            if container.started:
                raise failed(f"container {container_id!r} is already started")
            container.started = True
        assert container.init is not None
        self._run_crun(container, container.init,
                       ["run", "--detach", "--bundle", container.bundle,
                        "--pid-file", os.path.join(container.bundle, "init.pid")])

    def exec(self, req) -> None:
        container = self.get(req.container_id)
        eid = _check_id(req.exec_id, "exec id")
        if eid in container.execs:
            raise AgentError(frame.ALREADY_EXISTS, f"exec {eid!r} already exists")
        if not req.process.args:
            raise invalid("process args are empty")
        if container.init is None or not container.init.pid or self._exited(container.init):
            raise failed(f"container {container.id!r} is not running")
        process = _inherited(container.process, req.process)
        spec_path = os.path.join(container.bundle, f"exec-{eid}.json")
        _write_json(spec_path, self._process_spec(container, process))
        proc = container.execs[eid] = self._new_process(container, eid, req.process)
        try:
            self._run_crun(container, proc,
                           ["exec", "--detach", "--process", spec_path,
                            "--pid-file", os.path.join(container.bundle, f"exec-{eid}.pid")])
        except BaseException:
            del container.execs[eid]
            raise

    def update(self, container_id: str, resources) -> None:
        """New cgroup limits for a running container, through `crun update`."""
        container = self.get(container_id)
        if container.init is None or not container.init.pid or self._exited(container.init):
            raise failed(f"container {container_id!r} is not running")
        path = os.path.join(container.bundle, "resources.json")
        _write_json(path, oci.resources_spec(resources))
        self._crun_checked(container, ["update", "--resources", path, container_id])

    def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        proc = self.process(container_id, exec_id)
        proc.started.wait()
        if not proc.pid:
            raise failed(f"process {exec_id or 'init'} of {container_id!r} never started")
        status = self.reaper.wait(proc.pid)
        assert status is not None
        proc.waited = True
        self.release_exec(container_id, exec_id)
        return status

    def release_exec(self, container_id: str, exec_id: str) -> None:
        """Forget an exec once the host has its exit status and has read its
        output to the end: nothing more can be asked of it."""
        if not exec_id:
            return
        with self._lock:
            container = self._containers.get(container_id)
            proc = container.execs.get(exec_id) if container else None
            if proc is None or not proc.waited or not proc.stdio.drained():
                return
            del container.execs[exec_id]
        self.reaper.forget(proc.pid)
        proc.stdio.close()

    def signal(self, container_id: str, exec_id: str, signum: int) -> None:
        proc = self.process(container_id, exec_id)
        if not proc.pid:
            raise failed(f"process {exec_id or 'init'} of {container_id!r} is not running")
        if self._exited(proc):
            raise failed(f"process {exec_id or 'init'} of {container_id!r} has exited")
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            raise failed(f"process {exec_id or 'init'} of {container_id!r} has exited") from None

    def remove(self, container_id: str) -> None:
        container = self.get(container_id)
        self._teardown(container)

    # --- internals --------------------------------------------------------
    def _joined(self, req) -> dict[str, str]:
        """The namespaces a container shares (see CreateContainerRequest's
        pid_namespace and ipc_namespace): kind -> path, or "" for the guest's."""
        joined = {}
        for kind, mode in (("pid", req.pid_namespace or "container"),
                           ("ipc", req.ipc_namespace or "pod")):
            if mode == "node":
                joined[kind] = ""
            elif mode == "pod":
                joined[kind] = self.pod_namespaces.path(kind)
            elif kind == "pid" and mode.startswith("target:"):
                target = self.get(mode.removeprefix("target:"))
                if target.init is None or not target.init.pid or self._exited(target.init):
                    raise failed(f"target container {target.id!r} is not running")
                joined[kind] = f"/proc/{target.init.pid}/ns/pid"
            elif mode != "container":
                raise invalid(f"{kind} namespace {mode!r}: expected container, pod, node"
                              + (" or target:<container id>" if kind == "pid" else ""))
        return joined

    def _exited(self, proc: Process) -> bool:
        return self.reaper.wait(proc.pid, timeout=0) is not None

    def _mount_rootfs(self, container: Container, storage) -> None:
        """The container's rootfs: a bind mount of the shared storage (or of
        a directory inside it), or a writable overlay (upper on guest tmpfs)
        on top of it."""
        lower = self.storages.acquire(storage)
        container.storage_keys.append(self.storages.key(storage))
        if storage.subpath:
            lower = _inside(lower, storage.subpath, "rootfs")
            if not os.path.isdir(lower):
                raise not_found(f"rootfs directory {storage.subpath!r} is not in its storage")
        if storage.overlay:
            upper = os.path.join(container.bundle, "upper")
            work = os.path.join(container.bundle, "work")
            os.makedirs(upper)
            os.makedirs(work)
            syscalls.mount("overlay", container.rootfs, "overlay", 0,
                           f"lowerdir={lower},upperdir={upper},workdir={work}")
        else:
            syscalls.mount(lower, container.rootfs, "", syscalls.MS_BIND)
        container.mounts.append(container.rootfs)

    def _volume(self, container: Container, mount) -> dict:
        """An OCI bind mount of a path inside a storage (mounted once)."""
        if not mount.destination.startswith("/"):
            raise invalid(f"mount destination {mount.destination!r} is not absolute")
        root = self.storages.acquire(mount.storage)
        container.storage_keys.append(self.storages.key(mount.storage))
        source = _inside(root, mount.subpath, "mount")
        if not os.path.lexists(source):
            raise not_found(f"volume source {mount.subpath!r} for {mount.destination}")
        if mount.propagation not in ("", "rslave", "rshared"):
            raise invalid(f"mount propagation {mount.propagation!r}")
        options = ["rbind", mount.propagation or "rprivate"] + (["ro"] if mount.readonly else [])
        return {"destination": mount.destination, "type": "bind", "source": source,
                "options": options}

    def _process_spec(self, container: Container, process) -> dict:
        try:
            uid, gid, extra, home = users.resolve(container.rootfs, process.user.spec)
        except users.UserError as exc:
            raise invalid(str(exc)) from None
        extra += [g for g in process.user.additional_gids if g not in extra]
        return oci.process_spec(list(process.args), list(process.env), process.cwd,
                                uid, gid, extra, home, process.terminal,
                                process.console_size.rows, process.console_size.cols,
                                container.privileged, container.caps,
                                container.no_new_privileges, container.rlimits)

    def _new_process(self, container: Container, exec_id: str, process) -> Process:
        return Process(container.id, exec_id, Stdio(process.terminal, process.stdin),
                       process.terminal, process.console_size)

    def _run_crun(self, container: Container, proc: Process, args: list[str]) -> None:
        """crun run/exec --detach of proc, whose pid we then watch."""
        stdio = proc.stdio
        listener = None
        try:
            if proc.terminal:
                import socket

                # Not in the bundle: unix socket paths are limited to 108
                # bytes, and container ids alone can be 64.
                path = f"/run/hyperrun/tty-{os.getpid()}-{next(_tty_ids)}.sock"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                listener.listen(1)
                args = args[:1] + ["--tty", "--console-socket", path] + args[1:] \
                    if args[0] == "exec" else args + ["--console-socket", path]
            pid = self._spawn_crun(container, args + [container.id], stdio.child_fds)
            if listener is not None:
                stdio.attach_master(self._receive_console(listener, pid))
                if proc.rows and proc.cols:
                    stdio.resize(proc.rows, proc.cols)
            self._check_crun(container, pid)
            pid_file = args[args.index("--pid-file") + 1]
            with open(pid_file) as f:
                proc.pid = int(f.read().strip())
            self.reaper.watch(proc.pid)
            self._wait_exec(proc.pid)
        except BaseException:
            stdio.close()
            raise
        finally:
            proc.started.set()
            stdio.close_child_fds()
            if listener is not None:
                listener.close()
                os.unlink(path)

    def _wait_exec(self, pid: int, timeout: float = 5.0) -> None:
        """Return once the process runs the container's program, not crun's
        setup code any more: crun ignores signals there, so a stop signal
        sent in that window (a stop right after start) would be lost."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{pid}/exe") != CRUN:
                    return
            except OSError:
                return  # exited already, or not ours to see
            time.sleep(0.002)

    def _spawn_crun(self, container: Container, args: list[str], child_fds: list[int]) -> int:
        if child_fds:
            stdin, stdout, stderr = child_fds
            close = []
        else:
            null = os.open("/dev/null", os.O_RDWR)
            stdin = stdout = stderr = null
            close = [null]
        try:
            argv = [CRUN, "--root", CRUN_ROOT, "--log", os.path.join(container.bundle, "crun.log"),
                    "--log-format", "text"] + args
            return self.reaper.spawn(argv, stdin, stdout, stderr)
        finally:
            for fd in close:
                os.close(fd)

    def _check_crun(self, container: Container, pid: int) -> None:
        status = self.reaper.wait(pid, timeout=CRUN_TIMEOUT)
        if status is None:
            os.kill(pid, 9)
            self.reaper.wait(pid)
            raise AgentError(frame.DEADLINE_EXCEEDED, f"crun did not finish in {CRUN_TIMEOUT:.0f}s")
        self.reaper.forget(pid)
        if status.exit_code != 0:
            message = self._crun_error(container)
            raise AgentError(_crun_failure_code(message), f"crun failed: {message}")

    def _crun_checked(self, container: Container, args: list[str]) -> None:
        self._check_crun(container, self._spawn_crun(container, args, []))

    @staticmethod
    def _crun_error(container: Container) -> str:
        try:
            with open(os.path.join(container.bundle, "crun.log"), errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no error message"

    def _receive_console(self, listener, crun_pid: int) -> int:
        import select
        import socket

        deadline = time.monotonic() + CRUN_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                conn, _ = listener.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                if not fds:
                    raise AgentError(frame.INTERNAL, "crun sent no terminal")
                os.set_inheritable(fds[0], False)
                return fds[0]
            if self.reaper.wait(crun_pid, timeout=0) is not None:
                break
        raise AgentError(frame.INTERNAL, "crun did not hand over the terminal")

    def _teardown(self, container: Container) -> None:
        """Kill everything of the container, unmount, forget it. Idempotent."""
        if container.init is not None:
            if container.started:
                try:
                    self._crun_checked(container, ["delete", "--force", container.id])
                except AgentError as exc:
                    log("crun delete", container.id, exc)
            for proc in [container.init, *container.execs.values()]:
                proc.started.set()  # a waiter on a never-started process gives up
                if proc.pid:
                    try:
                        os.kill(proc.pid, 9)
                    except ProcessLookupError:
                        pass
                    self.reaper.wait(proc.pid, timeout=5)
                    self.reaper.forget(proc.pid)
                proc.stdio.close()
        for target in reversed(container.mounts):
            try:
                syscalls.umount(target)
            except OSError as exc:
                log(exc)
        container.mounts.clear()
        while container.storage_keys:
            try:
                self.storages.release(container.storage_keys.pop())
            except OSError as exc:
                log(exc)
        import shutil

        shutil.rmtree(container.bundle, ignore_errors=True)
        with self._lock:
            self._containers.pop(container.id, None)


def _crun_failure_code(message: str) -> int:
    """crun's failure as a kind the host acts on (Docker's exit codes 127
    and 126): the program is missing (NOT_FOUND), or cannot be run
    (PERMISSION_DENIED). crun reports only the errno's text in its log, so
    this is the one place that reads it."""
    if "No such file or directory" in message:
        return frame.NOT_FOUND
    if "Permission denied" in message or "Exec format error" in message:
        return frame.PERMISSION_DENIED
    return frame.INTERNAL


def _inside(root: str, subpath: str, what: str) -> str:
    """root/subpath, refused when subpath leaves root."""
    path = os.path.normpath(subpath).lstrip("/")
    if path == ".." or path.startswith("../"):
        raise invalid(f"{what} subpath {subpath!r} leaves its storage")
    return os.path.join(root, path) if path != "." else root


def _inherited(init, exec_process):
    """An exec's process: the container's own (user, groups, cwd, env), with
    what the exec sets in its place; a kubectl exec is not root in a pod
    whose containers are not. Args and stdio are the exec's."""
    if init is None:
        return exec_process
    process = type(init)()
    process.CopyFrom(init)
    process.args[:] = exec_process.args
    process.terminal = exec_process.terminal
    process.stdin = exec_process.stdin
    process.console_size.CopyFrom(exec_process.console_size)
    if exec_process.cwd:
        process.cwd = exec_process.cwd
    if exec_process.user.spec:
        process.user.spec = exec_process.user.spec
    process.user.additional_gids.extend(
        g for g in exec_process.user.additional_gids if g not in process.user.additional_gids)
    names = {e.partition("=")[0] for e in exec_process.env}
    env = [e for e in process.env if e.partition("=")[0] not in names] + list(exec_process.env)
    process.env[:] = env
    return process
