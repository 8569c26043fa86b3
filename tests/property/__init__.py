"""Hostile-input property tests (hypothesis): the ttRPC frame decoder on both
sides, the tar unpacker, manifest/index/reference parsing, CRI request
helpers.

Budget: HYPERRUN_FUZZ_EXAMPLES examples per property (default 200: the whole
suite in about 20 s in `make test`); `make fuzz` runs it with
20000 and a random seed. Every property counts the inputs it was called
with; conftest.py prints the counts at the end of the run.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

EXAMPLES = max(1, int(os.environ.get("HYPERRUN_FUZZ_EXAMPLES", "200")))

# inputs tried, per property ("module::test")
TRIED: Counter[str] = Counter()

_ROOT = Path(__file__).resolve().parents[2]

# Failing examples are kept (and replayed first) under .pytest_cache, which
# git ignores.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=DirectoryBasedExampleDatabase(str(_ROOT / ".pytest_cache" / "hypothesis")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)


def budget(share: float = 1.0) -> settings:
    """FUZZ with a share of the budget (the slow properties take less)."""
    return settings(FUZZ, max_examples=max(1, int(EXAMPLES * share)))


def counted(fn):
    """Count the calls of a property (every input hypothesis tried, shrinking
    included). Goes between @given and the function."""
    name = f"{fn.__module__.rsplit('.', 1)[-1]}::{fn.__name__}"
    TRIED[name] += 0

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        TRIED[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def still_failing(probe) -> bool:
    """True while probe() raises. The condition of the xfail marks on
    properties that found a bug in code outside their change: the mark
    lifts itself once the bug is fixed, and the property runs in full."""
    try:
        probe()
    except Exception:
        return True
    return False
