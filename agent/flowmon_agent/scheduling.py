"""How the agent process is scheduled: SCHED_BATCH, so that its wake-ups never preempt the applications
it measures.

The agent's work (a poll twice a second, the sampling window's attach and detach, the metadata check, a
scrape) can wait a few milliseconds; an application's request cannot. Under SCHED_OTHER each wake-up of
an agent thread preempts whatever runs on that CPU. With SCHED_BATCH the agent still gets its fair share
of CPU but waits for the running task's slice. Measured side by side: iperf3's CPU per Gbit was 2-3% higher
with the agent running than with the bare tracer, and level with it under SCHED_BATCH (docs/BENCHMARKS.md).
Lowering one's own policy needs no privilege (no CAP_SYS_NICE).

And when Python's full garbage collections run: between polls (`FullCollections`), not inside one.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

NEVER = 1 << 30  # generation 1 collections before an automatic full one: never, in practice


def run_as_batch() -> str | None:
    """Move the calling thread to SCHED_BATCH; threads it starts afterwards inherit it. Call it before
    the process starts any thread. Returns why it could not, or None."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        return f"cannot use SCHED_BATCH: {exc}"
    return None


def thread_policies(pid: int) -> dict[int, int]:
    """The scheduling policy of each thread of a process (os.SCHED_*)."""
    policies = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return policies


class FullCollections:
    """Python's full garbage collections (generation 2) between polls, instead of inside whichever one's
    allocation happens to trigger it.

    A full collection visits every object the process holds, and a full flow map holds ~8 per flow in
    the tracer and in aggregation: with 16,384 flows, one took 130-170 ms on the mixed soak's 2 shared
    cores, every ~24 s, and all 7 of a 2.5-minute run ran inside a poll, which set the poll's p99
    (docs/BENCHMARKS.md, "Mixed soak"). `take_over` turns the automatic ones off for the process (the
    young generations are collected as before; `give_back` restores Python's thresholds); `after_poll`
    runs one when `period_s` has passed since the last, in the time a poll leaves before the next. Only
    for the `flowmon agent` process: the thresholds are the process's."""

    def __init__(
        self,
        period_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], object] = gc.collect,
    ) -> None:
        self.period_s, self._clock, self._collect = period_s, clock, collect
        self._last = clock()
        self._previous: tuple[int, int, int] | None = None
        self.collections = 0

    def take_over(self) -> None:
        if self._previous is None:
            self._previous = gc.get_threshold()
            gc.set_threshold(self._previous[0], self._previous[1], NEVER)

    def give_back(self) -> None:
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None

    def after_poll(self) -> bool:
        """One full collection if one is due; whether it ran."""
        if self._clock() - self._last < self.period_s:
            return False
        self._collect()
        self._last = self._clock()
        self.collections += 1
        return True
