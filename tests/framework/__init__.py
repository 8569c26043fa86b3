"""hyperrun's test framework: what boots a VM or starts a daemon for a test
also ends it, however the test ends (as Firecracker's microvm_factory), and
a test waits on a condition or an event with a deadline, never a sleep.

Fixtures (tests/framework/fixtures.py, registered by tests/conftest.py):
sandbox_factory, sandbox, daemon_factory, daemon, cli, cni_env, no_leaks,
vm_assets, busybox_rootfs; and `async def` tests run on their own event
loop, which the sandbox fixtures share.
"""
from .cli import HYPERRUN, Cli
from .daemon import Daemon, DaemonFactory
from .host import qemu_pids
from .sandbox import SandboxFactory
from .wait import WaitTimeout, await_condition, await_event, wait_until

__all__ = ["HYPERRUN", "Cli", "Daemon", "DaemonFactory", "SandboxFactory", "WaitTimeout",
           "await_condition", "await_event", "qemu_pids", "wait_until"]
