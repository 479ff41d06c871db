"""wait_event: a deadline on an asyncio.Event that never swallows a cancellation."""

import asyncio

import pytest

from flowmon_agent.event_wait import wait_event


@pytest.mark.asyncio
async def test_set_event_returns_true_and_deadline_returns_false():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True
    assert await wait_event(event, -1.0) is True  # already set: no wait, even past the deadline


@pytest.mark.asyncio
async def test_cancel_arriving_as_the_event_is_set_still_cancels():
    """The race that hung Agent.stop(): the event completes and the task is cancelled in one loop
    iteration. asyncio.wait_for on Python 3.11 returns normally there; the loop below would run on."""
    event, started = asyncio.Event(), asyncio.Event()
    rounds = 0

    async def loop_until_cancelled():
        nonlocal rounds
        started.set()
        while rounds < 100:
            await wait_event(event, 60.0)  # a deadline no stall of the host reaches: only the race counts
            event.clear()
            rounds += 1

    task = asyncio.create_task(loop_until_cancelled())
    await started.wait()  # the task now waits on the event (it runs on up to its first wait)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rounds == 0


@pytest.mark.asyncio
async def test_cancel_while_waiting_and_deadline_at_once_still_cancels():
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 0.0))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
