"""`hyperrun run IMAGE` through the daemon's run sessions (hyperrun/api/
runs.py): stdin, a terminal, stop signals, errors, and a CLI that goes
away before or after its container started. Real VMs, the busybox image
from the local registry."""
import json
import os
import signal
import subprocess

import pytest

from hyperrun.proto import cri_api_pb2 as cri
from tests.framework import qemu_pids, wait_until
from tests.framework.cli import TERM_TRAP


@pytest.fixture
def image(daemon, pushed):
    ref = pushed.ref("busybox:latest")
    daemon.pull(ref)
    return ref


def run(d, *args, **kw) -> subprocess.CompletedProcess:
    return d.cli("run", *args, **kw)


def pods_and_containers(d) -> tuple[int, int]:
    return (len(d.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items),
            len(d.runtime.ListContainers(cri.ListContainersRequest()).containers))


@pytest.mark.kvm
def test_stdin_exit_codes_and_errors(daemon, image):
    d = daemon
    r = run(d, "--rm", "-i", image, "sh", "-c", "cat; exit 3", input=b"abc\n")
    assert (r.returncode, r.stdout) == (3, b"abc\n"), r
    r = run(d, "--rm", image, "cat", input=b"not for it")  # without -i, stdin is closed
    assert (r.returncode, r.stdout) == (0, b""), r
    r = run(d, "--rm", image, "/no/such/binary")
    assert r.returncode == 127 and b"hyperrun: cannot start container:" in r.stderr, r
    # A bare name is a named volume (as Docker's); a relative path is neither.
    r = run(d, "--rm", "-v", "rel/ative:/x", image, "true")
    assert r.returncode == 125, r
    assert r.stderr == (b"hyperrun: -v 'rel/ative:/x': the host path must be absolute "
                        b"(or a volume's name)\n")
    r = run(d, "--rm", "--pull=never", image.rsplit(":", 1)[0] + ":nosuch", "true")
    assert r.returncode == 125 and b"no such image" in r.stderr, r
    assert pods_and_containers(d) == (0, 0)  # --rm: every pod went, failed or not
    # Without --rm the exited container stays, as Docker's, for ps -a and logs.
    r = run(d, image, "sh", "-c", "echo kept; exit 4")
    assert (r.returncode, r.stdout) == (4, b"kept\n")
    (c,) = d.runtime.ListContainers(cri.ListContainersRequest()).containers
    assert c.state == cri.CONTAINER_EXITED


def test_terminal(daemon, image):
    """-t: a pty of the local terminal's size from the first instant; -i
    with it: what is typed reaches the container's shell."""
    code, out = daemon.cli.terminal(["run", "--rm", "-it", image, "sh"], 33, 101,
                                    answer=lambda out: b"#" in out and b"tty; stty size; exit 6\n")
    assert code == 6, out
    assert b"/dev/pts/0" in out and b"33 101" in out, out


def test_signals_stop_the_container(daemon, image):
    """SIGINT to `hyperrun run` stops the container (its stop signal:
    SIGTERM), as Docker's sig-proxy."""
    r = daemon.cli.signalled(signal.SIGINT, "run", "--rm", image, "sh", "-c", TERM_TRAP)
    assert (r.returncode, r.stdout) == (7, b"got TERM\n"), r.stderr
    assert pods_and_containers(daemon) == (0, 0)


def test_a_cli_that_goes_away(daemon, image):
    """Killed after its container started, the run goes on in the daemon
    and --rm still removes it at the end; killed while its VM starts, the
    run ends there and its pod goes, with or without --rm."""
    d = daemon
    vms = d.base / "run"
    proc = d.cli.popen("run", "--rm", image, "sh", "-c", "echo up; sleep 2", stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    proc.kill()
    proc.wait()
    assert pods_and_containers(d) == (1, 1)  # still running
    wait_until(lambda: pods_and_containers(d) == (0, 0), 30, "the run removed")
    wait_until(lambda: not qemu_pids(vms), 10, "its VM gone")
    proc = d.cli.popen("run", image, "sleep", "600")
    wait_until(lambda: qemu_pids(vms), 30, "a VM started", interval=0.02)
    proc.kill()
    proc.wait()
    wait_until(lambda: pods_and_containers(d) == (0, 0) and not qemu_pids(vms), 60,
               "the pod of a run whose CLI went away before its start removed")


def test_vm_killed_mid_run_is_reported(daemon, image):
    proc = daemon.cli.popen("run", "--rm", image, "sh", "-c", "echo up; sleep 600",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    (qemu,) = qemu_pids(daemon.base / "run")
    os.kill(qemu, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 125, (out, err)
    assert err.startswith(b"hyperrun: the VM ended while the container ran: "), err
    assert pods_and_containers(daemon) == (0, 0)


def test_a_slow_reader_gets_every_byte(daemon, image):
    """`hyperrun run IMAGE ... | slow`: the container's output waits for the
    pipe, as an attached `docker run`'s does (a CRI attach session that
    falls that far behind is ended instead; the log keeps everything)."""
    size = 20_000_000
    run_ = daemon.cli.popen("run", "--rm", image, "head", "-c", str(size), "/dev/zero",
                            stdout=subprocess.PIPE)
    reader = subprocess.run(["sh", "-c", "sleep 3; wc -c"], stdin=run_.stdout,
                            capture_output=True, timeout=120)
    run_.stdout.close()
    assert run_.wait(60) == 0
    assert int(reader.stdout) == size


def test_exec_streams_output_takes_a_terminal_and_names_bad_ids(daemon, image):
    """`hyperrun exec` is a session too: the output as it comes (not at the
    exit), -it on a pty of the local size, a clear error for a bad id."""
    d = daemon
    cid = d.cli("run", "-d", image, "sleep", "600", check=True).stdout.decode().strip()
    proc = d.cli.popen("exec", cid[:12], "sh", "-c", "echo first; sleep 30", stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"first\n"  # while the process still runs
    assert proc.poll() is None
    proc.kill()
    proc.wait()
    code, out = d.cli.terminal(["exec", "-it", cid[:12], "sh"], 33, 101,
                               answer=lambda out: b"#" in out and b"stty size; exit 6\n")
    assert code == 6 and b"33 101" in out, out
    r = d.cli("exec", "nosuch", "true")
    assert (r.returncode, r.stderr) == (1, b"hyperrun: no container 'nosuch'\n")
    r = d.cli("exec", cid[:12], "/no/such/binary")
    assert r.returncode == 127, r


def test_a_pull_shows_its_progress_on_a_terminal(daemon, pushed):
    """The daemon's pull, for `hyperrun pull` and for a `run` whose image is
    missing, shows its layers on the CLI's terminal, as a pull without a
    daemon does; on a pipe, nothing but the digest."""
    import socket

    from hyperrun import cli_api

    d, ref = daemon, pushed.ref("busybox:latest")
    with socket.socket(socket.AF_UNIX) as sock:  # the frames themselves
        sock.connect(str(cli_api.socket_path(d.socket)))
        sock.sendall(cli_api.frame(cli_api.PULL, cli_api.PullOptions(ref, progress=True).to_json()))
        frames, reader = [], cli_api.FrameReader(sock)
        while (f := reader.next()) is not None:
            frames.append(f)
    kind, payload = frames[-1]
    assert kind == cli_api.EXIT and json.loads(payload)["digest"].startswith("sha256:")
    events = [json.loads(p) for k, p in frames if k == cli_api.PROGRESS]
    layers = {e["digest"] for e in events if e["op"] == "start"}
    assert layers and layers == {e["digest"] for e in events if e["op"] == "finish"}, events
    r = d.cli("rmi", ref)
    assert r.returncode == 0, r
    layer = next(iter(layers)).split(":")[1][:12]
    code, out = d.cli.terminal(["pull", ref], 24, 100)
    assert code == 0 and layer.encode() in out and b"Digest: sha256:" in out, out
    d.cli("rmi", ref, check=True)
    code, out = d.cli.terminal(["run", "--rm", ref, "echo", "ran"], 24, 100)
    assert code == 0 and layer.encode() in out and out.rstrip().endswith(b"ran"), out
    r = d.cli("pull", ref)
    assert r.returncode == 0 and r.stdout.startswith(b"Digest: sha256:") and r.stderr == b"", r
