"""`hyperrun daemon` processes for a test, each in a directory of its own,
driven by a gRPC CRI client and the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import grpc

from hyperrun import paths
from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

from .cli import HYPERRUN, Cli
from .host import qemu_pids


# What the kubelet always sets and a bare CRI client need not: the
# container's own PID namespace (the CRI's zero value, POD, shares the
# pod's, where PID 1 is the pod's holder, not the container's program).
KUBELET_LINUX = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
    namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)))


class Daemon:
    """One daemon: its data root, run directory and sockets under base.
    start() again after kill9() or stop() restarts it on the same state."""

    def __init__(self, base: Path, args: tuple[str, ...]) -> None:
        self.base = base
        self.args = args
        self.socket = base / "cri.sock"
        self.env = {**os.environ, "HYPERRUN_ROOT": str(base / "root"),
                    "HYPERRUN_RUN_DIR": str(base / "run")}
        self.proc: subprocess.Popen | None = None
        # The CLI as a client of this daemon.
        self.cli = Cli({**self.env, "HYPERRUN_SOCKET": str(self.socket)})

    def start(self) -> None:
        self.proc = subprocess.Popen([HYPERRUN, "daemon", "--socket", str(self.socket), *self.args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        line = self.proc.stdout.readline()
        assert b"serving CRI" in line, line + self.proc.stdout.read(2000)
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)

    @property
    def run_dir(self) -> Path:
        """Where its VMs run: a directory each, named by the VM's id, under
        its data root's key."""
        return (Path(self.env["HYPERRUN_RUN_DIR"]) / "sandboxes"
                / paths.owner(Path(self.env["HYPERRUN_ROOT"])))

    def events(self, event: str) -> list[dict]:
        """The daemon's log records of one kind (its log is JSON lines in
        its data root: its stderr is not a terminal)."""
        log = self.base / "root" / "daemon.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [r for r in map(json.loads, lines) if r.get("event") == event]

    # ---- pods and containers, as the kubelet would ask for them
    def pod_config(self, name: str, namespace: str = "default", **fields) -> cri.PodSandboxConfig:
        """A pod of that name (and uid) logging under the daemon's base."""
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace=namespace),
            log_directory=str(self.base / "logs"), **fields)

    def run_pod(self, image: str, name: str, script: str, namespace: str = "net", **fields):
        """A pod and its container running `sh -c script`: (pod id, container id)."""
        pod_config = self.pod_config(name, namespace, **fields)
        pod = self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=image), command=["sh", "-c", script],
                                     linux=KUBELET_LINUX)
        cid = self.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config)).container_id
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return pod, cid

    def pod(self, pod: str):
        return self.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status

    def pod_ip(self, pod: str) -> str:
        return self.pod(pod).network.ip

    def exec_sync(self, cid: str, script: str) -> tuple[int, str]:
        r = self.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script],
                                                      timeout=30))
        return r.exit_code, r.stdout.decode() + r.stderr.decode()

    def remove_pod(self, pod: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))

    def pull(self, image: str) -> str:
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        return self.images.PullImage(request).image_ref

    def warm_up(self, image: str) -> None:
        """The first pod with a host port makes the plugins' shared chains,
        which stay: later before/after comparisons see only per-pod state."""
        self.pull(image)
        pod, _ = self.run_pod(image, "warm", "true", port_mappings=[
            cri.PortMapping(container_port=80, host_port=18930)])
        self.remove_pod(pod)

    def container(self, cid: str):
        return self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status

    def container_is(self, cid: str, state) -> Callable[[], object]:
        """A condition for wait_until: the container's status once it is in
        that state (CONTAINER_RUNNING, CONTAINER_EXITED, ...)."""
        return lambda: (status := self.container(cid)).state == state and status

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def close(self) -> None:
        """Stop, kill what a failed test left in *this* daemon's run dir
        (its VMs outlive it by design), and remove its directory."""
        self.cli.close()
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill9()
        for pid in qemu_pids():
            try:
                if str(self.base) in open(f"/proc/{pid}/cmdline").read():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._remove_networks()
        shutil.rmtree(self.base, ignore_errors=True)

    def _remove_networks(self) -> None:
        """What a failed test left of its pods' networks (their VMs gone):
        CNI DEL from the daemon's cache, and its compose projects' networks."""
        root = Path(self.env["HYPERRUN_ROOT"])
        if not (root / "cni").is_dir() and not (root / "networks").is_dir():
            return
        from hyperrun.network import SandboxNetworks

        nets = SandboxNetworks(cache_dir=root / "cni")
        try:
            nets.collect_stale(set())
            nets.projects.release_unused()
        except Exception as e:  # the test's own failure matters more
            print(f"networks of {root} not all removed: {e}")


class DaemonFactory:
    """Starts daemons for one test; close() ends every one of them and
    removes what they had, whatever the test's outcome."""

    def __init__(self) -> None:
        self._daemons: list[Daemon] = []
        self._templates: list[Path] = []

    def __call__(self, *args: str, template: bool = False, defaults: bool = False,
                 **env: str) -> Daemon:
        """A started daemon with these command-line arguments (none: no
        network) and environment variables; with template, its pod VMs are
        restored from a template kept in /dev/shm (d.templates). Its pods
        boot and it keeps no pool (a daemon's defaults are templates and a
        pool: on a 2-core host under TCG, spares starting in the background
        would slow the tests), unless defaults: then no config file at all,
        its templates in a /dev/shm directory of the test's."""
        # A short base path: unix socket paths are limited to 108 bytes.
        d = Daemon(Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp")), args or ("--network", "none"))
        self._daemons.append(d)
        d.env.update(env)
        if template or defaults:
            d.templates = Path(tempfile.mkdtemp(prefix="hr-tpl-", dir="/dev/shm"))
            self._templates.append(d.templates)
            d.env.update(HYPERRUN_TEMPLATES=str(d.templates))
        if not defaults and "HYPERRUN_CONFIG" not in env:
            (d.base / "config.toml").write_text(
                f"[sandbox]\ntemplate = {str(template).lower()}\npool_size = 0\n")
            d.env.update(HYPERRUN_CONFIG=str(d.base / "config.toml"))
        d.cli.env.update(d.env)
        d.start()
        return d

    def close(self) -> None:
        for d in self._daemons:
            d.close()
        for templates in self._templates:
            shutil.rmtree(templates, ignore_errors=True)

