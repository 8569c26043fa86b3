"""Ready sandbox VMs for RunPodSandbox to take instead of starting one
(`[sandbox] pool_size`, `hyperrun daemon --pool-size N`).

A spare is a VM of the daemon's default shape and network kind, started
(restored from the template when templates are on, else booted) with its
network prepared but not added (podnet.prepare: for CNI, a netns with a
tap), and its agent warmed up and waiting. Taking one gives it a pod: the
CNI ADD (or user-mode forwards) and SetupSandbox, as a VM started for the
pod gets them (pods/launcher.py). Why it is faster than a template
alone: under TCG a restored VM still translates every code path it runs
for the first time (measured: a clone's first SetupSandbox 246 ms, the
second 10 ms); a spare has run them before it is taken.

Spares are in no record: a daemon that stops removes them; one that was
killed finds their run dirs and netns without a record when it restarts and
removes them (PodService.recover, Launcher.collect_stale). The pool refills in the
background after each take.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hyperrun import log

from .sandbox import Sandbox

logger = log.get("pool")
RETRY_SECONDS = 5.0  # after a spare failed to start
# A refill waits this long after the last take: starting a spare costs a
# core for about a second under TCG, which the pod just taken (its first
# container starting) would otherwise share on a small host.
REFILL_DELAY = 1.5


@dataclass
class Spare:
    sandbox_id: str
    kind: str          # the network kind it was prepared for
    sandbox: Sandbox


class SandboxPool:
    def __init__(self, size: int, start: Callable[[], Awaitable[Spare]],
                 discard: Callable[[Spare], Awaitable[None]]) -> None:
        self.size = size
        self._start = start
        self._discard = discard
        self._spares: list[Spare] = []
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task | None = None
        self._last_take = 0.0

    def __len__(self) -> int:
        return len(self._spares)

    def start(self) -> None:
        if self.size > 0 and self._filler is None:
            self._filler = asyncio.create_task(self._fill())
            self._wanted.set()

    async def take(self) -> Spare | None:
        """A live spare, or None if there is none ready (the caller starts
        a VM itself: a take never waits for a spare to boot)."""
        self._last_take = asyncio.get_running_loop().time()
        while self._spares:
            spare = self._spares.pop(0)
            self._wanted.set()
            if not spare.sandbox.vm.exited:
                return spare
            logger.warning("spare VM had died", sandbox=spare.sandbox_id,
                           reason=spare.sandbox.vm.failure_reason())
            await self._discard(spare)
        self._wanted.set()
        return None

    async def _fill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self._spares) < self.size:
                loop = asyncio.get_running_loop()
                if (wait := self._last_take + REFILL_DELAY - loop.time()) > 0:
                    await asyncio.sleep(wait)
                    continue
                try:
                    spare = await self._start()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.error("spare VM failed to start", error=str(exc))
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                self._spares.append(spare)
                logger.info("spare ready", sandbox=spare.sandbox_id, ready=len(self._spares))

    async def close(self) -> None:
        """Stop filling and remove every spare."""
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
            self._filler = None
        spares, self._spares = self._spares, []
        for spare in spares:
            await self._discard(spare)
