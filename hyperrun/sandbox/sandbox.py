"""A sandbox is one VM plus the agent session in it.

boot() launches the VM and waits until the agent answers its health
check, racing QEMU's exit so that a VM that dies during boot is reported
with its console instead of a timeout.
"""
from __future__ import annotations

import asyncio
import os
import time

from hyperrun.channel import transport
from hyperrun import log
from hyperrun.channel.agent import AgentClient
from hyperrun.channel.ttrpc import ConnectionLost, TtrpcError
from hyperrun.vm import VM, VMError, new as new_vm

from .config import SandboxConfig

# A boot's deadline is a span of idleness, not of time: a VM that works
# (runs, or waits for a CPU to run on) is booting, however slow the host
# (TCG, nested, loaded), and one that has done nothing for BOOT_IDLE_S while
# its agent did not answer is hung. BOOT_CAP_S bounds a VM that works for
# ever (a guest spinning) all the same.
BOOT_IDLE_S = 10.0
BOOT_CAP_S = 900.0
IDLE_SHARE = 0.2  # of one CPU: an idle guest under TCG takes 1-5 % (its timers)
HEALTH_ATTEMPT_S = 5.0  # a serial-channel health check, before reconnecting
logger = log.get("sandbox")
# A running VM's agent is asked for its health this often; one that does
# not answer within the timeout is hung (a guest deadlock, a wedged VMM): its
# VM is killed and its pod reported as a dead VM's, as Kata's sandbox
# monitor does. Generous: a loaded 2-core host under TCG answers in ms.
# One sweep asks them all (HealthWatch), at most HEALTH_RATE a second.
HEALTH_INTERVAL_S = float(os.environ.get("HYPERRUN_HEALTH_INTERVAL_S", 10))
HEALTH_TIMEOUT_S = float(os.environ.get("HYPERRUN_HEALTH_TIMEOUT_S", 30))
HEALTH_RATE = 2.0


class Activity:
    """How long a VM has been idle, from its hypervisor's busy time sampled
    at each call."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self._busy = vm.busy_ns()
        self._at = self.active_at = time.monotonic()

    def idle_s(self) -> float:
        now, busy = time.monotonic(), self.vm.busy_ns()
        if busy is not None and self._busy is not None and \
                busy - self._busy > IDLE_SHARE * (now - self._at) * 1e9:
            self.active_at = now
        self._busy, self._at = busy, now
        return now - self.active_at


class Sandbox:
    def __init__(self, vm: VM, agent: AgentClient) -> None:
        self.vm = vm
        self.agent = agent
        # Serials of the image disks plugged into the VM: a restarted daemon
        # takes those of its containers' records (manager.recover).
        self.disks: set[str] = set()

    @property
    def id(self) -> str:
        return self.vm.id

    @classmethod
    async def boot(cls, config: SandboxConfig) -> "Sandbox":
        return await cls.start(new_vm(config.vm_config()))

    @classmethod
    async def start(cls, vm: VM) -> "Sandbox":
        """Launch vm (or connect to it if already spawned) and wait for its
        agent; a clone of a template (vm/template.clone_config) is restored
        first."""
        await vm.launch()
        if vm.config.incoming:
            try:
                await vm.restore_state()
            except BaseException:
                await vm.remove()
                raise
        agent = AgentClient(f"agent-{vm.id}")
        sandbox = cls(vm, agent)
        try:
            await sandbox._wait_agent()
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
                    logger.warning("agent did not answer; reconnecting", vm=self.vm.id)
        # vsock: nothing listens until the agent is up. Each refused
        # attempt is work for the guest: the pause grows to 0.5 s.
        pause = 0.02
        while True:
            try:
                await self.agent.connect(self.agent_opener())
                return await self.agent.health(timeout=timeout)
            except (ConnectionError, OSError):
                await self.agent.close()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    async def _wait_agent(self) -> None:
        """Until the agent answers, QEMU exits, or the VM is idle for
        BOOT_IDLE_S (hung: a wedged guest, an agent that does not listen)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        health = asyncio.create_task(self._connect_agent(BOOT_CAP_S))
        exited = asyncio.create_task(self.vm.wait_exited())
        activity = Activity(self.vm)
        idle = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({health, exited}, timeout=1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if done or loop.time() - start >= BOOT_CAP_S:
                    break
                if (idle := activity.idle_s()) >= BOOT_IDLE_S:
                    break
        finally:
            exited.cancel()
        if health in done:
            if health.result():
                return
            raise VMError("agent answered but is not serving")
        health.cancel()
        if exited in done or self.vm.exited:
            raise VMError(f"VM {self.id} died during boot: {self.vm.failure_reason()}")
        why = (f"the VM has done nothing for {idle:.0f}s" if idle >= BOOT_IDLE_S
               else f"the VM has worked for {BOOT_CAP_S:.0f}s")
        raise VMError(f"agent in VM {self.id} did not answer after {loop.time() - start:.0f}s "
                      f"({why}); console: {self.vm.failure_reason()}")

    async def monitor(self, watch: "HealthWatch") -> str | None:
        """Watch a running sandbox: return once its VM has exited, None if
        it did of itself, or why it was killed (its agent stopped
        answering the health checks of watch)."""
        exited = asyncio.ensure_future(self.vm.wait_exited())
        killed = watch.add(self)
        try:
            await asyncio.wait({exited, killed}, return_when=asyncio.FIRST_COMPLETED)
            return await watch.reason(self)
        finally:
            exited.cancel()
            watch.discard(self)

    async def check_health(self) -> str | None:
        """Ask the agent for its health: None if it answers (or its VM has
        ended of itself), else why its VM was killed."""
        try:
            await self.agent.health(timeout=HEALTH_TIMEOUT_S)
            return None
        except TimeoutError:
            reason = (f"VM hung: its agent did not answer a health check within "
                      f"{HEALTH_TIMEOUT_S:g}s; the VM was killed")
        except ConnectionLost:
            # Closed by a VM on its way out (its exit comes next), or by the
            # agent: a session lost for good, the pod unusable.
            exited = asyncio.ensure_future(self.vm.wait_exited())
            await asyncio.wait({exited}, timeout=5)
            exited.cancel()
            reason = "the agent's channel closed while the VM ran; the VM was killed"
        except TtrpcError:
            return None
        if self.vm.exited:
            return None
        logger.warning("sandbox killed", vm=self.id, reason=reason)
        await self.vm.kill()
        return reason

    @classmethod
    async def adopt(cls, vm: VM) -> "Sandbox":
        """Take over a running sandbox VM (after a daemon restart): its
        hypervisor, and a new agent session."""
        await vm.adopt()
        sandbox = cls(vm, AgentClient(f"agent-{vm.id}"))
        try:
            await sandbox._wait_agent()
        except BaseException:
            await sandbox.detach()
            raise
        return sandbox

    async def detach(self) -> None:
        """Let go of the VM without stopping it (the daemon shutting down)."""
        await self.agent.close()
        await self.vm.detach()

    async def destroy(self) -> None:
        """Stop the VM and remove everything of it. Idempotent."""
        await self.agent.close()
        await self.vm.stop(timeout=3)
        await self.vm.remove()


class HealthWatch:
    """The health checks of a daemon's running sandboxes, in one sweep
    rather than a timer per pod. Every HEALTH_INTERVAL_S it asks each agent
    that has answered nothing since the previous sweep (an answer to any
    call shows it serves), starting at most HEALTH_RATE checks a second:
    with many idle pods a sweep takes longer (100 pods: 50 s), so what
    their checks cost the host stays flat however many there are, and a
    hung VM that no call touches is found later. A VM's death needs no
    check: its QEMU's exit is an event (VM.wait_exited)."""

    def __init__(self) -> None:
        self._killed: dict[Sandbox, asyncio.Future] = {}
        self._checking: dict[Sandbox, asyncio.Task] = {}
        self._sweeper: asyncio.Task | None = None

    def add(self, sandbox: Sandbox) -> asyncio.Future:
        """Watch sandbox; the future is set to the reason if it is killed."""
        killed = asyncio.get_running_loop().create_future()
        self._killed[sandbox] = killed
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="health-sweep")
        return killed

    def discard(self, sandbox: Sandbox) -> None:
        self._killed.pop(sandbox, None)
        if not self._killed and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def reason(self, sandbox: Sandbox) -> str | None:
        """Why a check killed sandbox's VM (once a check of it under way
        has ended: its kill makes the VM exit before the check returns),
        or None."""
        if (check := self._checking.get(sandbox)) is not None:
            await asyncio.wait({check})
        killed = self._killed.get(sandbox)
        return killed.result() if killed is not None and killed.done() else None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for sandbox in list(self._killed):
                if sandbox not in self._killed or sandbox in self._checking or \
                        getattr(sandbox.agent, "last_reply", 0.0) > start:
                    continue
                self._checking[sandbox] = asyncio.create_task(self._check(sandbox))
                await asyncio.sleep(1 / HEALTH_RATE)

    async def _check(self, sandbox: Sandbox) -> None:
        try:
            reason = await sandbox.check_health()
            killed = self._killed.get(sandbox)
            if reason is not None and killed is not None and not killed.done():
                killed.set_result(reason)
        finally:
            self._checking.pop(sandbox, None)

    async def close(self) -> None:
        checks = list(self._checking.values())
        for task in [t for t in (self._sweeper, *checks) if t is not None]:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        self._sweeper = None
