"""The framework's fixtures and its one hook, registered by tests/conftest.py.

- `async def` tests run on an event loop of their own (`aio`, an
  asyncio.Runner) that the sandbox fixtures share.
- `sandbox_factory` boots sandbox VMs, `sandbox` is one booted with the
  busybox tree as its "rootfs" share; all are destroyed at the test's end.
- `daemon_factory` starts daemons, `daemon` is one without a network whose
  sockets belong to the group "daemon", `netd` one on the module's CNI
  network (`cni_env`); all are ended and removed.
- `cli` runs `hyperrun ...`.
- `no_leaks` asserts that a test leaves no QEMU, run directory or mount.
"""
from __future__ import annotations

import asyncio
import inspect

import pytest

from hyperrun import assets

from .cli import Cli
from .cni import DEFAULT, cni_network
from .daemon import DaemonFactory
from .host import mounts, qemu_pids, run_dirs
from .sandbox import SandboxFactory
from .wait import wait_until

ASYNC_TEST_S = 240  # an async test's own deadline (pytest-timeout's is 300 s)


def pytest_collection_modifyitems(items):
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "obj", None)):
            item.fixturenames.insert(0, "aio")  # set up first, torn down last


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in inspect.signature(test).parameters}
    pyfuncitem.funcargs["aio"].run(asyncio.wait_for(test(**args), ASYNC_TEST_S))
    return True


@pytest.fixture
def aio():
    """The event loop of one test and of its sandboxes."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="session")
def vm_assets():
    """Skip VM tests (with the reason) when the guest assets are missing;
    `make test` builds them first, so there they always run."""
    missing = [str(p) for p in (assets.kernel_path(), assets.guest_image_path()) if not p.exists()]
    if missing:
        pytest.skip(f"guest assets not built ({', '.join(missing)}): run `make assets`")


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory, vm_assets):
    from hyperrun.busybox import make_rootfs

    return make_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def no_leaks():
    """Asserts that a test leaves no QEMU, run directory or mount behind."""
    from hyperrun.paths import run_root

    before_qemu, before_dirs, before_mounts = qemu_pids(run_root()), run_dirs(), mounts()
    yield
    wait_until(lambda: not qemu_pids(run_root()) - before_qemu, 10,
               "no QEMU process left behind", state=lambda: qemu_pids(run_root()) - before_qemu)
    assert run_dirs() - before_dirs == set(), "run directories left behind"
    assert mounts() == before_mounts, "mounts changed"


def _checked_for_leaks_after(request) -> None:
    """A factory's teardown comes before no_leaks' check, if the test has it."""
    if "no_leaks" in request.fixturenames:
        request.getfixturevalue("no_leaks")


@pytest.fixture
def sandbox_factory(request, vm_assets, aio):
    _checked_for_leaks_after(request)
    factory = SandboxFactory(aio)
    yield factory
    factory.close()


@pytest.fixture
def sandbox(sandbox_factory, busybox_rootfs, aio):
    """A booted sandbox whose share "rootfs" is the busybox tree."""
    from hyperrun.vm.config import Share

    return aio.run(sandbox_factory.boot(shares=[Share("rootfs", busybox_rootfs)]))


@pytest.fixture
def daemon_factory(request, vm_assets):
    _checked_for_leaks_after(request)
    factory = DaemonFactory()
    yield factory
    factory.close()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory("--network", "none", "--group", "daemon")


@pytest.fixture
def netd(daemon_factory, cni_env):
    """A daemon whose pods are on the module's CNI network."""
    return daemon_factory("--network", "cni", "--cni-conf-dir", str(cni_env[0]))


@pytest.fixture
def cli(request):
    _checked_for_leaks_after(request)
    runner = Cli()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def cni_env(request, tmp_path_factory):
    """(conf dir, leases dir) of a CNI network for the module: its
    CNI_NETWORK (name, bridge, subnet), else the default one."""
    yield from cni_network(tmp_path_factory, *getattr(request.module, "CNI_NETWORK", DEFAULT))
