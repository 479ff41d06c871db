"""TokenReview's budget, pure: the bounded verdict cache and the token buckets, on an injected clock."""

from __future__ import annotations

import pytest

from flowmon_agent.export.review_budget import BoundedTtlCache, ReviewBudget, ReviewLimits, ReviewThrottled


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_evicts_one_least_recently_used_entry_at_a_time_and_expires_by_ttl():
    clock = Clock()
    cache = BoundedTtlCache[str](3, ttl=10.0, clock=clock)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == (True, "A")  # a is now the most recently used
    cache.put("d", "D")  # full: b leaves, alone
    assert [cache.get(k)[0] for k in "abcd"] == [True, False, True, True]
    assert (len(cache), cache.evictions) == (3, 1)
    clock.now = 10.0
    assert cache.get("c") == (False, None) and len(cache) == 2  # expired: gone when looked up
    cache.put("e", "E")
    cache.put("f", "F")  # full again: the expired entry that leaves is not counted as an eviction
    assert cache.evictions == 1


def test_each_source_has_a_bucket_and_all_share_one_and_the_table_of_sources_is_bounded():
    clock = Clock()
    limits = ReviewLimits(source_rate=0.5, source_burst=2, rate=10, burst=3, max_sources=2)
    budget = ReviewBudget(limits, clock)
    budget.admit("a")
    budget.admit("a")
    with pytest.raises(ReviewThrottled) as exc:
        budget.admit("a")
    assert (exc.value.scope, exc.value.retry_after, exc.value.retry_after_header) == ("source", 2.0, "2")
    budget.admit("b")  # the third review in all
    with pytest.raises(ReviewThrottled) as exc:
        budget.admit("c")
    assert (exc.value.scope, exc.value.status) == ("total", 503)
    assert budget.throttled == {"source": 1, "total": 1}
    clock.now = 0.1  # one token back in the shared bucket; "a" left the table (two sources at most)
    budget.admit("a")  # a new full bucket for "a"
    assert budget.sources_evicted == 2  # "a", then "b"


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="rate must be positive"):
        ReviewLimits(rate=0)
