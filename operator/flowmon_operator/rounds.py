"""One round at a time for the whole cluster: kopf's events ask for a round, they do not run one.

A request names a monitor and waits for the round that covers it. Requests that arrive within
`debounce` of the first share one round (a hundred monitors resumed at start: one round); a request
arriving during a round is served by the next one. Every `period`, a full round runs whether asked or
not: it restores drifted children and catches up agents that missed a push.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
Report = TypeVar("Report")
RoundFunction = Callable[[frozenset[str], bool], Awaitable[Report]]  # (requested keys, full) → report


class RoundScheduler(Generic[Report]):
    def __init__(self, run_round: RoundFunction, *, debounce: float, period: float):
        self._run_round = run_round
        self.debounce, self.period = debounce, period
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._wake = asyncio.Event()
        self.rounds = 0  # rounds run so far (full or not)

    async def request(self, key: str) -> Report:
        """Wait for the next round that covers `key` (its children are applied there); its report, or
        the exception that ended it."""
        waiter = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(waiter)
        self._wake.set()
        return await waiter

    async def run(self) -> None:
        """Forever (cancel to stop): wait for a request or the period, gather the burst, run."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.period
        while True:
            if not self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_full - loop.time()))
            if self._pending:
                await asyncio.sleep(self.debounce)
            self._wake.clear()
            full = loop.time() >= next_full
            if full:
                next_full = loop.time() + self.period
            batch, self._pending = self._pending, {}
            await self._run_batch(batch, full)

    async def _run_batch(self, batch: dict[str, list[asyncio.Future]], full: bool) -> None:
        waiters = [w for ws in batch.values() for w in ws]
        try:
            report = await self._run_round(frozenset(batch), full)
        except asyncio.CancelledError:
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # every waiter hears of it (kopf retries them); the loop goes on
            if not waiters:
                log.warning("the periodic round failed: %s: %s", type(exc).__name__, exc)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(report)
        finally:
            self.rounds += 1
