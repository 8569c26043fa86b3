"""Waiting on a condition or an event, with a deadline, never a sleep."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What a test waited for did not happen within its deadline."""


def _timed_out(what: str, timeout: float, state: Callable[[], object] | None) -> WaitTimeout:
    seen = f" (at the deadline: {state()!r})" if state is not None else ""
    return WaitTimeout(f"{what}: did not happen within {timeout:g} s{seen}")


class _Deadline:
    """One poll of a condition against a deadline: its first true value, or
    WaitTimeout once the deadline has passed, or None (poll again)."""

    def __init__(self, condition: Callable[[], T], timeout: float, what: str,
                 state: Callable[[], object] | None) -> None:
        self.condition, self.timeout, self.what, self.state = condition, timeout, what, state
        self.at = time.monotonic() + timeout

    def poll(self) -> T | None:
        if value := self.condition():
            return value
        if time.monotonic() >= self.at:
            raise _timed_out(self.what, self.timeout, self.state)
        return None


def wait_until(condition: Callable[[], T], timeout: float, what: str, *,
               interval: float = 0.1, state: Callable[[], object] | None = None) -> T:
    """condition()'s first true value, polled every `interval` seconds;
    WaitTimeout naming `what` (and state()'s value, if given) once
    `timeout` seconds have gone by. An exception from condition() is the
    test's: it is not retried."""
    deadline = _Deadline(condition, timeout, what, state)
    while (value := deadline.poll()) is None:
        time.sleep(interval)
    return value


async def await_condition(condition: Callable[[], T], timeout: float, what: str, *,
                          interval: float = 0.01,
                          state: Callable[[], object] | None = None) -> T:
    """wait_until for an async test: the event loop runs while it polls."""
    deadline = _Deadline(condition, timeout, what, state)
    while (value := deadline.poll()) is None:
        await asyncio.sleep(interval)
    return value


async def await_event(awaitable: Awaitable[T], timeout: float, what: str, *,
                      state: Callable[[], object] | None = None) -> T:
    """The result of an event an async test can await (an asyncio.Event's
    wait(), a reply, a task); WaitTimeout naming `what` after `timeout`
    seconds, as wait_until's."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:  # (a TimeoutError of the awaitable's own is not this)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _timed_out(what, timeout, state)
    return task.result()
