"""`hyperrun run --direct IMAGE`: the image's program is the VM's init (no
agent, no crun); its output and exit code still come back."""
import re

import pytest

from tests.framework import Cli, wait_until


@pytest.fixture
def root(tmp_path, monkeypatch, vm_assets):
    monkeypatch.setenv("HYPERRUN_ROOT", str(tmp_path / "root"))


@pytest.mark.kvm(channel=None)
def test_program_is_init_with_args_env_and_exit_code(cli, pushed, root, no_leaks):
    ref = pushed.ref("busybox:latest")
    r = cli("run", "--direct", "-e", "GREETING=hi there", "--entrypoint", "sh", ref, "-c",
            "echo pid $$ says $GREETING: $0; exit 7", "two words")
    assert r.returncode == 7, r
    assert r.stdout == b"pid 1 says hi there: two words\n", r
    assert cli("run", "--direct", "--entrypoint", "/bin/true", ref).returncode == 0
    r = cli("run", "--direct", "--entrypoint", "echo", ref, 'say "hi"')
    assert r.returncode == 125 and b"the kernel command line cannot carry it" in r.stderr


def test_what_direct_mode_cannot_do_is_a_clear_error(cli, pushed, root, no_leaks):
    ref = pushed.ref("busybox-config:latest")  # WorkingDir /home/user, User user:users
    r = cli("run", "--direct", ref)
    assert r.returncode == 125 and b"direct mode starts the program in /" in r.stderr, r
    r = cli("run", "--direct", "-w", "/", ref)
    assert r.returncode == 125 and b"runs the program as root" in r.stderr, r
    r = cli("run", "--direct", "--entrypoint", "nope", pushed.ref("busybox:latest"))
    assert r.returncode == 125 and b"nope: not found in the image's PATH" in r.stderr, r


def test_a_direct_vm_is_a_container_of_the_daemon(daemon, pushed, no_leaks):
    """Direct mode is an init kind of the core, not a path of the CLI's own:
    a daemon runs it detached, shows it, logs it and stops it as any
    container; what needs an agent is refused by name."""
    cli = Cli(daemon.cli.env, check=True)
    ref = pushed.ref("busybox:latest")
    cid = cli("run", "-d", "--direct", "--entrypoint", "sh", ref, "-c",
              "echo up; sleep 600").stdout.decode().strip()
    wait_until(lambda: cli("logs", cid[:12]).stdout == b"up\n", 60,
               "the program's output in its log", state=lambda: cli("logs", cid[:12]).stdout)
    assert re.search(rf"{cid[:13]} .* Up ", cli("ps").stdout.decode())
    r = cli("exec", cid[:12], "true", check=False)
    assert r.returncode != 0 and b"has no agent" in r.stderr, r
    cli("stop", cid[:12])
    # The stop signal ended the VM (nothing could deliver it to its init).
    assert re.search(rf"{cid[:13]} .* Exited \(143\)", cli("ps", "-a").stdout.decode())
    cli("rm", cid[:12])
    assert cid[:12] not in cli("ps", "-a").stdout.decode()
