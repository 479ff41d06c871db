"""The DNS capture in the agent: attached only while the running policy wants DNS, read each poll.

bpf/dns.c's cgroup-skb programs run on every packet of the node, TCP's too, so a node loads them only
while a monitor asks for DNS (`AgentPolicy.wants_dns`) and the node allows it (`dns_capture`); a policy
without one closes them. Everything runs in the agent's poll thread (attaching compiles BPF for
seconds: scrapes are served from the last view meanwhile). A failed attach is logged, counted and
retried no sooner than `retry_seconds` later by the injected clock, never on every poll. Counters never go
backwards across a detach: the closed capture's kernel counts and its own counters stay in the totals.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from flowmon_agent.dns.tracker import DnsTracker
from flowmon_agent.export.dns_health import DnsHealth
from flowmon_agent.kernel.loader import BPFUnavailableError
from flowmon_contract.policy import AgentPolicy

log = logging.getLogger(__name__)

BATCHES_PER_POLL = 8  # of DnsCapture.batch_max records each: a flood costs a bounded time per poll
ATTACH_RETRY_SECONDS = 60.0
ATTACH_ERRORS = (BPFUnavailableError, OSError, ValueError, RuntimeError, ImportError)


class DnsSource(Protocol):
    """What the agent needs of a DNS capture (flowmon_agent.dns.capture.DnsCapture)."""

    batch_max: int

    def poll(self, timeout_ms: int = 0) -> int: ...
    def stats(self) -> object: ...  # a dataclass of counters (CaptureStats)
    def close(self) -> None: ...


class DnsLifecycle:
    """Owns the capture: `poll(policy)` each poll attaches or closes it as the policy asks, then reads it;
    `health()` for the agent's metrics; `close()` at stop (no attach after it)."""

    def __init__(
        self,
        tracker: DnsTracker,
        factory: Callable[[DnsTracker], DnsSource],
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        retry_seconds: float = ATTACH_RETRY_SECONDS,
    ) -> None:
        self.tracker = tracker
        self.enabled = enabled  # the node's kill switch (AgentSettings.dns_capture)
        self.capture: DnsSource | None = None
        self.attach_failures = 0
        self._factory, self._clock, self._retry_seconds = factory, clock, retry_seconds
        self._retry_at: float | None = None
        self._retired: Counter[str] = Counter()  # closed captures' own counters
        self._closed = False
        self._lock = threading.RLock()  # stop() may close while a cancelled poll's thread still runs

    def attach(self) -> bool:
        """Attach now; a failure is logged and counted (flowmon_agent_dns_attach_failures) and the agent
        goes on without DNS until the next try, `retry_seconds` later."""
        with self._lock:
            if self._closed or self.capture is not None:
                return self.capture is not None
            try:
                self.capture = self._factory(self.tracker)
            except ATTACH_ERRORS as exc:
                self.attach_failures += 1
                self._retry_at = self._clock() + self._retry_seconds
                log.error("DNS capture not attached, going on without DNS metrics: %s", exc)
                return False
            self._retry_at = None
            log.info("DNS capture attached")
            return True

    def detach(self, *, read_last: bool = True) -> None:
        """Read the capture's last counts (unless stopping), keep them in the totals, and close it."""
        with self._lock:
            capture, self.capture = self.capture, None
            if capture is None:
                return
            try:
                if read_last:
                    capture.poll()
                self._retired.update(dataclasses.asdict(capture.stats()))
            finally:  # closed whatever the last read did: the programs never stay behind
                capture.close()
                self.tracker.retire_kernel()
            log.info("DNS capture closed")

    def follow(self, policy: AgentPolicy | None) -> None:
        """Attach while the policy wants DNS (and the node allows it), close when it does not."""
        wanted = self.enabled and policy is not None and policy.wants_dns
        with self._lock:
            due = self._retry_at is None or self._clock() >= self._retry_at
            if wanted and self.capture is None and due:
                self.attach()
            elif not wanted and self.capture is not None:
                self.detach()

    def poll(self, policy: AgentPolicy | None) -> int:
        """Follow the policy, then feed the tracker what the capture holds, in at most BATCHES_PER_POLL
        bounded batches; how many records were read."""
        with self._lock:
            if policy is not None:
                self.tracker.set_qname_suffixes(policy.qname_suffixes)
            self.follow(policy)
            capture, read = self.capture, 0
            if capture is None:
                self.tracker.expire()  # names keep expiring by their TTL
                return 0
            for _ in range(BATCHES_PER_POLL):
                batch = capture.poll()
                read += batch
                if batch < capture.batch_max:
                    break
            return read

    def health(self) -> DnsHealth:
        with self._lock:
            stats = self.tracker.stats()
            events = Counter(
                pending_full=stats.pending_full,
                retransmitted=stats.retransmitted,
                unmatched_responses=stats.unmatched_responses,
                other_opcodes=stats.other_opcodes,
                series_overflow=stats.series_overflow,
                names_evicted=stats.names.evicted,
                names_expired=stats.names.expired,
            )
            events.update(self._retired)
            if self.capture is not None:
                events.update(dataclasses.asdict(self.capture.stats()))
            malformed: Counter[str] = Counter()
            for key, count in self.tracker.malformed().items():
                malformed[key.reason] += count
            attached = self.capture is not None
            return DnsHealth(attached, self.attach_failures, dict(events), dict(malformed))

    def close(self) -> None:
        """At stop: close the capture, and never attach again."""
        with self._lock:
            self._closed = True
            self.detach(read_last=False)
