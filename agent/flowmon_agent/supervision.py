"""Long-lived work that an unexpected exception must not end for good: restarted after a jittered,
exponentially growing (capped) wait, each restart counted and logged once.

A restart's log line names the task, the exception's type and where it was raised: never the exception's
message or arguments, which may quote what a file or a request held (a token, a key).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 1.0  # seconds before the first restart (its upper bound: jitter takes up to half off)
    cap: float = 60.0  # no wait is longer than this
    healthy_after: float = 300.0  # a run that lasted this long starts the next failure from `first` again

    def delay(self, restarts: int, draw: float) -> float:
        """Pure: the wait before restart number `restarts` (1, 2, ...) given `draw` in [0, 1) from the
        random source. Half of the exponential step is fixed, half random ("equal jitter"): agents that
        failed together (an API server restart) do not come back together, and none spins."""
        step = min(self.cap, self.first * 2 ** min(restarts - 1, 62))
        return step / 2 + draw * step / 2


def where(exc: BaseException) -> str:
    """Pure: `Type at file.py:line (function)` of the innermost frame: no message, no arguments."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    frame = frames[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"


class Restarts:
    """The restart policy and its bookkeeping, shared by every task of one agent.

    `clock`, `random` and `sleep` are injectable: tests fail a task on purpose and check the waits
    without waiting. `counts()` is what flowmon_agent_task_restarts_total exports."""

    def __init__(
        self,
        *,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.backoff = backoff
        self._clock, self._random, self._sleep = clock, random, sleep
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # tasks of several threads (the watcher's) restart through one

    def counts(self) -> dict[str, int]:
        """Restarts so far, by task name."""
        with self._lock:
            return dict(self._counts)

    def collect(self) -> Iterator[Metric]:
        """A prometheus_client collector: register the agent's Restarts in its registry."""
        family = CounterMetricFamily(
            "flowmon_agent_task_restarts",
            "Restarts of the agent's long-lived tasks (metadata watches, file reloads, conntrack) after "
            "an unexpected error, by task.",
            labels=["task"],
        )
        for name, count in sorted(self.counts().items()):
            family.add_metric([name], count)
        yield family

    def next_delay(self, name: str, exc: BaseException, restarts: int) -> float:
        """Count and log restart number `restarts` of `name` after `exc`; the wait before it."""
        delay = self.backoff.delay(restarts, self._random())
        with self._lock:
            self._counts[name] += 1
        log.error("%s stopped on an unexpected %s; restart %d in %.1f s", name, where(exc), restarts, delay)
        return delay

    async def supervise(self, name: str, run: Callable[[], Awaitable[object]]) -> None:
        """Run `run()` until it returns or is cancelled; restart it whenever it raises."""
        restarts = 0
        while True:
            started = self._clock()
            try:
                await run()
                return
            except Exception as exc:  # cancellation (BaseException) passes through
                if self._clock() - started >= self.backoff.healthy_after:
                    restarts = 0
                restarts += 1
                delay = self.next_delay(name, exc, restarts)
            await self._sleep(delay)

    def deadline(self, name: str, exc: BaseException, restarts: int) -> float:
        """For work that is not a task (a call made every poll): when it may be tried again."""
        return self._clock() + self.next_delay(name, exc, restarts)

    def now(self) -> float:
        return self._clock()
