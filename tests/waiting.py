"""How tests wait: for a condition the test can observe, with a deadline no loaded host reaches.

Never `sleep(n)` and then check: a sleep is either too short on a slow machine (the check fails) or, before
a check that something did NOT happen, proves nothing unless the thing had its chance meanwhile. Wait for
the event that gives it that chance instead (rounds run, polls done, an error logged). docs/testing.md.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

WAIT = 30.0  # the default deadline: only a broken product reaches it, never a slow host


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; return its value or raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05) -> Any:
    """wait_for on an event loop: the loop runs (and the product with it) between the checks. The
    predicate may be a coroutine function (a request that reads the state)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)
