"""A sandbox is one VM plus the agent session in it.

boot() launches the VM and waits until the agent answers its health
check, racing QEMU's exit so that a VM that dies during boot is reported
with its console instead of a timeout.
"""
from __future__ import annotations

import asyncio

from hyperrun.channel import transport
from hyperrun.channel.agent import AgentClient
from hyperrun.vm import VMError
from hyperrun.vm.qemu import QemuVM

from .config import SandboxConfig

BOOT_TIMEOUT = 60.0
HEALTH_ATTEMPT_S = 5.0  # a serial-channel health check, before reconnecting


class Sandbox:
    def __init__(self, vm: QemuVM, agent: AgentClient) -> None:
        self.vm = vm
        self.agent = agent
        # Serials of the image disks plugged into the VM: a restarted daemon
        # takes those of its containers' records (manager.recover).
        self.disks: set[str] = set()

    @property
    def id(self) -> str:
        return self.vm.id

    @classmethod
    async def boot(cls, config: SandboxConfig, timeout: float = BOOT_TIMEOUT) -> "Sandbox":
        return await cls.start(QemuVM(config.vm_config()), timeout)

    @classmethod
    async def start(cls, vm: QemuVM, timeout: float = BOOT_TIMEOUT,
                    template=None) -> "Sandbox":
        """Launch vm (or attach to it if already spawned), or restore it from
        a template (vm/template.py), and wait for its agent."""
        if template is not None:
            from hyperrun.vm.template import restore
            await restore(vm, template)
        else:
            await vm.launch()
        agent = AgentClient(f"agent-{vm.id}")
        sandbox = cls(vm, agent)
        try:
            await sandbox._wait_agent(timeout)
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    def agent_opener(self):
        channel = self.vm.config.channel
        if channel.kind == "vsock":
            return transport.vsock(channel.cid)
        return transport.unix(str(self.vm.agent_socket))

    async def _connect_agent(self, timeout: float) -> bool:
        if self.vm.config.channel.kind == "serial":
            # QEMU's socket accepts at once; the request waits there until
            # the agent reads it, which it can once the guest has QEMU's
            # "port open" message. QEMU drops that message if the guest has
            # no buffer posted for it at that instant: a guest already up
            # (a template clone, a re-attach) then never reads (seen in 2 of
            # 200 soak lifecycles, each a 60 s timeout). A new connection
            # sends the message again.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                await self.agent.connect(self.agent_opener())
                try:
                    return await self.agent.health(
                        timeout=max(min(HEALTH_ATTEMPT_S, deadline - loop.time()), 0.1))
                except TimeoutError:
                    await self.agent.close()
                    if loop.time() >= deadline:
                        raise
                    from hyperrun import log
                    log.get("sandbox").warning("agent did not answer; reconnecting",
                                               vm=self.vm.id)
        while True:  # vsock: nothing listens until the agent is up
            try:
                await self.agent.connect(self.agent_opener())
                return await self.agent.health(timeout=timeout)
            except (ConnectionError, OSError):
                await self.agent.close()
                await asyncio.sleep(0.02)

    async def _wait_agent(self, timeout: float) -> None:
        health = asyncio.create_task(self._connect_agent(timeout))
        exited = asyncio.create_task(self.vm.wait_exited())
        try:
            done, _ = await asyncio.wait({health, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if health in done:
            if health.result():
                return
            raise VMError("agent answered but is not serving")
        health.cancel()
        if exited in done or self.vm.exited:
            raise VMError(f"VM {self.id} died during boot: {self.vm.failure_reason()}")
        raise VMError(f"agent in VM {self.id} did not answer within {timeout:.0f}s; "
                      f"console: {self.vm.failure_reason()}")

    @classmethod
    async def reattach(cls, vm: QemuVM, timeout: float = 10.0) -> "Sandbox":
        """Take over a running sandbox VM (after a daemon restart): QMP and
        a new agent session on its sockets."""
        await vm.attach()
        sandbox = cls(vm, AgentClient(f"agent-{vm.id}"))
        try:
            await sandbox._wait_agent(timeout)
        except BaseException:
            await sandbox.agent.close()
            if vm.qmp is not None:
                await vm.qmp.disconnect()
            raise
        return sandbox

    async def detach(self) -> None:
        """Let go of the VM without stopping it (the daemon shutting down)."""
        await self.agent.close()
        if self.vm.qmp is not None:
            await self.vm.qmp.disconnect()
            self.vm.qmp = None

    async def destroy(self) -> None:
        """Stop the VM and remove everything of it. Idempotent."""
        await self.agent.close()
        await self.vm.stop(timeout=3)
        await self.vm.remove()
