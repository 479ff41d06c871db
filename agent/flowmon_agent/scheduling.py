"""How the agent process is scheduled: SCHED_BATCH, so that its wake-ups never preempt the applications
it measures.

The agent's work (a poll twice a second, the sampling window's attach and detach, the metadata check, a
scrape) can wait a few milliseconds; an application's request cannot. Under SCHED_OTHER each wake-up of
an agent thread preempts whatever runs on that CPU. With SCHED_BATCH the agent still gets its fair share
of CPU but waits for the running task's slice. Measured side by side: iperf3's CPU per Gbit was 2-3% higher
with the agent running than with the bare tracer, and level with it under SCHED_BATCH (docs/BENCHMARKS.md).
Lowering one's own policy needs no privilege (no CAP_SYS_NICE).
"""

from __future__ import annotations

import os


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
