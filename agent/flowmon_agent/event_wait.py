"""Waiting for an asyncio.Event with a deadline, without losing a cancellation."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` is set within `timeout` seconds, False when the time ran out.

    Not `asyncio.wait_for`: on Python 3.11 it returns normally when the task is cancelled in the same
    loop iteration as the awaited event completes, so the cancellation is lost. The agent's poll loop
    stopped that way polled on forever and `Agent.stop()` hung (seen once in CI). `asyncio.timeout`
    cancels this task itself and so tells its own expiry from a cancellation that comes from outside."""
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
