"""`hyperrun run --direct IMAGE`: the image's program is the VM's init (no
agent, no crun); its output and exit code still come back."""
import pytest


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
