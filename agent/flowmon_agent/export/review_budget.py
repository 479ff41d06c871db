"""What TokenReview may cost: verdicts cached within a bound, API calls paced per client and in total.

Every pod can reach the agent and present any bearer token; each token no static digest matches is a
TokenReview, a call to the API server. So verdicts are cached, positive and negative (a token nobody knows
costs one call per `negative_ttl`, not one per request), each kind in its own bounded cache: a flood of
made-up tokens evicts (one entry at a time, least recently used first, counted) only other made-up
tokens, never the cluster Prometheus's verdict. A call that is still needed takes a token from its
client address's bucket (over it: 429) and from the agent's (over it: 503), both with Retry-After: a
refused review costs nothing upstream.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class ReviewLimits:
    """FLOWMON_AGENT_TOKEN_REVIEW_LIMITS (JSON) in AgentSettings."""

    positive_ttl: float = 60.0  # seconds a token the API server authenticated stays trusted
    negative_ttl: float = 30.0  # seconds a refused token stays refused without asking again
    max_entries: int = 10_000  # per cache (positive, negative)
    rate: float = 20.0  # reviews per second, all clients together...
    burst: int = 40  # ...with this many at once
    source_rate: float = 1.0  # reviews per second from one client address...
    source_burst: int = 10
    max_sources: int = 4096  # client addresses with a bucket of their own (least recently used leave)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"token review limit {name} must be positive, not {value!r}")


class ReviewThrottled(Exception):
    """No review now: `scope` "source" (this client asked too often: 429) or "total" (503)."""

    def __init__(self, scope: str, retry_after: float) -> None:
        super().__init__(f"TokenReview rate limit ({scope}), retry after {retry_after:.1f} s")
        self.scope, self.retry_after = scope, retry_after

    @property
    def status(self) -> int:
        return 429 if self.scope == "source" else 503

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class BoundedTtlCache(Generic[V]):
    """At most `max_entries` values, each for `ttl` seconds of `clock`; full: the least recently used
    entry leaves (counted in `evictions`). Expired entries leave when looked up or reached by eviction."""

    def __init__(self, max_entries: int, ttl: float, clock: Callable[[], float]) -> None:
        self.max_entries, self.ttl, self._clock = max_entries, ttl, clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bool, V | None]:
        """(True, value) while cached and fresh, else (False, None)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: Hashable, value: V) -> None:
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            _, (expires, _value) = self._entries.popitem(last=False)
            self.evictions += expires > self._clock()  # an expired entry leaving is no loss
        self._entries[key] = (self._clock() + self.ttl, value)


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second up to `burst`; starts full."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is), after refilling to `now`."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


class ReviewBudget:
    """Admits a review from `source` (a client address) or raises ReviewThrottled; only admitted calls
    take a token, from both buckets."""

    def __init__(self, limits: ReviewLimits, clock: Callable[[], float]) -> None:
        self.limits, self._clock = limits, clock
        self._total = self._bucket(limits.rate, limits.burst)
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self.throttled = {"source": 0, "total": 0}
        self.sources_evicted = 0  # client addresses whose bucket left the table (it comes back full)

    def _bucket(self, rate: float, burst: int) -> TokenBucket:
        return TokenBucket(rate, burst, burst, self._clock())

    def admit(self, source: str) -> None:
        now, limits = self._clock(), self.limits
        bucket = self._sources.pop(source, None) or self._bucket(limits.source_rate, limits.source_burst)
        self._sources[source] = bucket  # most recently used last
        while len(self._sources) > limits.max_sources:
            self._sources.popitem(last=False)
            self.sources_evicted += 1
        for scope, wait in (("source", bucket.wait(now)), ("total", self._total.wait(now))):
            if wait > 0:
                self.throttled[scope] += 1
                raise ReviewThrottled(scope, wait)
        bucket.take()
        self._total.take()
