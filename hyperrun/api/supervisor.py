"""What the daemon watches in a run's container after its start, as
dockerd does: its health check (a command exec'd in it every interval) and
its restart policy (no, always, on-failure[:N], unless-stopped). Both are
asked for in a run's request (`hyperrun compose` asks for them from a
compose file) and kept in the container's labels, so a restarted daemon
watches its running containers again.

A restart is the smallest honest one: the exited container is removed and
made again, with its spec, in the same pod (the same VM, network and
name), after a delay that doubles from 0.1 s to 10 s, as Docker's. A
container a user stopped is not restarted (`always` and `unless-stopped`
alike, until its next start); a pod whose VM ended is not restarted (its
container's exit says why). Health is kept in memory: after a daemon
restart it is "starting" again until the next check.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from hyperrun import log
from hyperrun.pods.service import EXITED, RUNNING, NotFound

from .errors import message as known_message

logger = log.get("supervisor")
# JSON: test, interval_s, timeout_s, retries, start_period_s
HEALTH_LABEL = "io.hyperrun.healthcheck"
RESTART_LABEL = "io.hyperrun.restart"      # no | always | on-failure[:N] | unless-stopped
RESTARTS_LABEL = "io.hyperrun.restarts"  # how many times it was made again
POLICIES = ("no", "always", "on-failure", "unless-stopped")
TICK_S = 0.5  # how often a container's state is looked at (its record, in memory)


def check_policy(policy: str) -> str:
    name, _, count = policy.partition(":")
    if name not in POLICIES or (count and (name != "on-failure" or not count.isdigit())):
        raise ValueError(f"restart policy {policy!r}: one of no, always, on-failure[:N], "
                         "unless-stopped")
    return policy


def check_healthcheck(hc: dict) -> dict:
    """A health check as a run asks for it, each field of its type."""
    test = hc.get("test")
    ok = isinstance(test, list) and test and all(isinstance(t, str) for t in test) and \
        set(hc) <= {"test", "interval_s", "timeout_s", "retries", "start_period_s"} and \
        all(isinstance(hc.get(k, 1), (int, float)) and hc.get(k, 1) >= 0
            for k in ("interval_s", "timeout_s", "start_period_s", "retries"))
    if not ok:
        raise ValueError(f"healthcheck {json.dumps(hc)[:200]}: test (a command), interval_s, "
                         "timeout_s, retries, start_period_s")
    return {"test": test, "interval_s": max(float(hc.get("interval_s", 30)), 0.1),
            "timeout_s": max(float(hc.get("timeout_s", 30)), 0.1),
            "retries": max(int(hc.get("retries", 3)), 1),
            "start_period_s": float(hc.get("start_period_s", 0))}


class Supervisor:
    def __init__(self, manager) -> None:
        self.m = manager
        self.health: dict[str, dict] = {}   # container id -> Docker's State.Health
        self.stopped: set[str] = set()      # stopped by a user: not restarted
        self._watching: dict[str, asyncio.Task] = {}

    def resume(self) -> None:
        """At the daemon's start: every running container with a check or
        a policy."""
        for row in self.m.state.containers():
            if row.state == RUNNING:
                self.watch(row.id)

    def watch(self, cid: str) -> None:
        row = self.m.container_row(cid)
        labels = row.spec.labels
        if HEALTH_LABEL not in labels and labels.get(RESTART_LABEL, "no") == "no":
            return
        if HEALTH_LABEL in labels:
            self.health[cid] = {"Status": "starting", "FailingStreak": 0, "Log": []}
        if cid not in self._watching:
            self._watching[cid] = asyncio.ensure_future(self._supervise(cid))

    def stop(self) -> None:
        for task in self._watching.values():
            task.cancel()
        self._watching.clear()

    def status(self, cid: str) -> str:
        """Docker's health word for ps: starting, healthy, unhealthy, or ""."""
        return self.health.get(cid, {}).get("Status", "")

    async def _supervise(self, cid: str) -> None:
        try:
            await self._watch(cid)
        except NotFound:
            pass  # removed
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: this container is no longer watched
            logger.exception("supervision failed", container=cid, error=str(exc))
        finally:
            self._watching.pop(cid, None)
            self.health.pop(cid, None)

    async def _watch(self, cid: str) -> None:
        row = self.m.container_row(cid)
        labels = row.spec.labels
        hc = json.loads(labels[HEALTH_LABEL]) if HEALTH_LABEL in labels else None
        policy = labels.get(RESTART_LABEL, "no")
        restarts = int(labels.get(RESTARTS_LABEL, "0"))
        began = time.monotonic()
        next_check = began + (hc["interval_s"] if hc else 0)
        while True:
            row = self.m.container_row(cid)
            if row.state == EXITED:
                break
            if hc and time.monotonic() >= next_check:
                await self._check(cid, hc, time.monotonic() - began < hc["start_period_s"])
                next_check = time.monotonic() + hc["interval_s"]
            await asyncio.sleep(TICK_S)
        if not self._restarts(row, policy, restarts):
            return
        delay = min(0.1 * 2 ** restarts, 10.0)
        await asyncio.sleep(delay)
        row = self.m.container_row(cid)  # removed meanwhile: NotFound ends the watch
        if cid in self.stopped or self.m.sandbox(row.sandbox_id) is None:
            return
        spec = dataclasses.replace(row.spec, labels={**row.spec.labels,
                                                     RESTARTS_LABEL: str(restarts + 1)})
        await self.m.remove_container(cid)
        new = await self.m.create_container(row.sandbox_id, spec)
        await self.m.start_container(new)
        logger.info("container restarted", container=new, was=cid, policy=policy,
                    exit_code=row.exit_code, restarts=restarts + 1)
        self._watching.pop(cid, None)
        self.watch(new)

    def _restarts(self, row, policy: str, restarts: int) -> bool:
        name, _, count = policy.partition(":")
        if name == "no" or row.id in self.stopped or row.reason == "VMExited":
            return False
        if name == "on-failure":
            return row.exit_code != 0 and (not count or restarts < int(count))
        return True

    async def _check(self, cid: str, hc: dict, starting: bool) -> None:
        """One check: exit 0 is healthy; retries failures in a row (not
        counted in the start period) unhealthy."""
        health = self.health.setdefault(cid, {"Status": "starting", "FailingStreak": 0,
                                              "Log": []})
        start = time.time()
        try:
            out, err, code = await self.m.exec_sync(cid, hc["test"], max(1, round(hc["timeout_s"])))
            output = (out + err).decode(errors="replace")[-4096:]
        except TimeoutError:
            code, output = -1, f"Health check exceeded timeout ({hc['timeout_s']}s)"
        except Exception as exc:
            if known_message(exc) is None and not isinstance(exc, ConnectionError):
                raise
            code, output = -1, str(exc)
        health["Log"] = (health["Log"] + [{"Start": start, "End": time.time(), "ExitCode": code,
                                           "Output": output}])[-5:]
        if code == 0:
            health.update(Status="healthy", FailingStreak=0)
        elif not starting:
            health["FailingStreak"] += 1
            if health["FailingStreak"] >= hc["retries"]:
                health["Status"] = "unhealthy"
