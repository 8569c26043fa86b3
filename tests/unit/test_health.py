"""The daemon's health checks (sandbox.HealthWatch): one sweep for every
running VM, agents that answered anything lately not asked, at most
HEALTH_RATE checks a second, a hung agent's VM killed with the reason."""
import asyncio

from hyperrun.sandbox import sandbox as sandbox_mod
from hyperrun.sandbox.sandbox import HealthWatch, Sandbox


class Agent:
    def __init__(self, hung: bool = False) -> None:
        self.hung, self.asked, self.last_reply = hung, 0, 0.0

    async def health(self, timeout=None) -> bool:
        self.asked += 1
        if self.hung:
            await asyncio.sleep(timeout)
            raise TimeoutError("no reply")
        self.last_reply = asyncio.get_running_loop().time()
        return True


class VM:
    id = "vm"

    def __init__(self) -> None:
        self.exited, self.killed = False, False
        self._end = asyncio.Event()

    async def kill(self) -> None:
        self.killed = self.exited = True
        self._end.set()
        await asyncio.sleep(0.05)  # as QEMU's: the exit is seen before the kill returns

    async def wait_exited(self) -> None:
        await self._end.wait()


def test_a_sweep_asks_quiet_agents_at_a_bounded_rate_and_kills_a_hung_one(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "HEALTH_INTERVAL_S", 0.05)
    monkeypatch.setattr(sandbox_mod, "HEALTH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(sandbox_mod, "HEALTH_RATE", 40.0)

    async def body():
        loop = asyncio.get_running_loop()
        watch = HealthWatch()
        quiet = [Sandbox(VM(), Agent()) for _ in range(4)]
        busy = Sandbox(VM(), Agent())
        hung = Sandbox(VM(), Agent(hung=True))
        monitors = [asyncio.create_task(s.monitor(watch)) for s in [*quiet, busy, hung]]
        start = loop.time()
        deadline = start + 10  # 0.2 s of timeout at 40 checks a second: far less
        while not hung.vm.killed:
            assert loop.time() < deadline, "the hung agent's VM was never killed"
            busy.agent.last_reply = loop.time()  # its calls are answered all the time
            await asyncio.sleep(0.01)
        elapsed = loop.time() - start
        reason = await asyncio.wait_for(monitors[-1], 5)
        assert "did not answer a health check within 0.2s" in reason
        assert busy.agent.asked == 0
        assert all(s.agent.asked >= 1 for s in quiet)
        asked = sum(s.agent.asked for s in [*quiet, hung])
        assert asked <= elapsed * 40 + 1, (asked, elapsed)
        assert not any(s.vm.killed for s in [*quiet, busy])
        for s in [*quiet, busy]:
            await s.vm.kill()  # their VMs end of themselves: no reason
        assert await asyncio.gather(*monitors[:-1]) == [None] * 5
        await watch.close()
    asyncio.run(asyncio.wait_for(body(), 20))
