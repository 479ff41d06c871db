"""Who may read what: bearer tokens scoped per monitor path, an admin token, optional TokenReview.

Tokens are never stored, only their SHA-256; every comparison is `hmac.compare_digest` over digests and
runs over the whole candidate list (no early exit), so timing does not tell how close a guess was.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowmon_agent.export.review_budget import BoundedTtlCache, ReviewBudget, ReviewLimits
from flowmon_contract.policy import AgentPolicy
from flowmon_kube import SERVICE_ACCOUNT, ApiClient, Connection, KubeError, read_json

log = logging.getLogger(__name__)

SA_PREFIX = "system:serviceaccount:"


class Decision(Enum):
    ALLOW = 200
    UNAUTHENTICATED = 401  # no token, or one nobody knows
    FORBIDDEN = 403  # a known token that may not read this path


@dataclass(frozen=True, slots=True)
class Target:
    """What a request wants: a monitor's path (key ns/name), or the agent's own (/metrics, /v1/policy)."""

    monitor: str | None = None

    @property
    def admin_only(self) -> bool:
        return self.monitor is None


AGENT = Target()


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def matches_any(candidate: bytes, allowed: Iterable[bytes]) -> bool:
    found = False
    for item in allowed:
        found |= hmac.compare_digest(candidate, item)  # no short-circuit: constant over the list
    return found


def monitor_digests(policy: AgentPolicy | None) -> dict[str, list[bytes]]:
    if policy is None:
        return {}
    return {m.key: [bytes.fromhex(h) for h in m.token_sha256] for m in policy.monitors}


def decide_static(
    token: str | None, target: Target, *, admin: Iterable[bytes], monitors: dict[str, list[bytes]]
) -> Decision | None:
    """Pure: the decision from the admin token and the policy's per-monitor token hashes.

    None means "no static token matched": the caller may still ask TokenReview, else it is a 401.
    """
    if token is None:
        return Decision.UNAUTHENTICATED
    presented = digest(token)
    if matches_any(presented, admin):
        return Decision.ALLOW
    if target.monitor is not None and matches_any(presented, monitors.get(target.monitor, ())):
        return Decision.ALLOW
    others = [d for key, ds in monitors.items() if key != target.monitor for d in ds]
    if matches_any(presented, others):
        return Decision.FORBIDDEN
    return None


@dataclass(frozen=True, slots=True)
class ReviewedUser:
    username: str


def decide_reviewed(
    user: ReviewedUser | None, target: Target, *, admin_users: Iterable[str], readers: Iterable[str] = ()
) -> Decision:
    """Pure: a TokenReview result → decision. Admin users read everything and push policy; readers (a
    cluster Prometheus) read every monitor's path; a ServiceAccount reads the monitors of its own
    namespace (the tenancy boundary), nothing else."""
    if user is None:
        return Decision.UNAUTHENTICATED
    if user.username in set(admin_users):
        return Decision.ALLOW
    if target.monitor is not None and user.username in set(readers):
        return Decision.ALLOW
    if target.monitor is not None and user.username.startswith(SA_PREFIX):
        sa_namespace = user.username[len(SA_PREFIX) :].split(":", 1)[0]
        if target.monitor.split("/", 1)[0] == sa_namespace:
            return Decision.ALLOW
    return Decision.FORBIDDEN


class ReviewUnavailable(RuntimeError):
    """The API server could not be asked (network, permissions): no verdict about the token."""


class TokenReviewer(Protocol):
    async def review(self, token: str, source: str = "") -> ReviewedUser | None:
        """The token's user, None when it authenticates nobody; ReviewThrottled when over the budget."""
        ...

    def collect(self) -> Iterator[Metric]: ...


IN_CLUSTER_SA = SERVICE_ACCOUNT
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


class KubeTokenReviewer:
    """Asks the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`, on flowmon_kube's client)
    with the agent's own ServiceAccount token, within a ReviewBudget (review_budget.py): verdicts cached
    by token digest (a scrape every few seconds costs one review per minute), calls paced per client
    address and in total, one call at a time per token (concurrent requests share it). The reviewed token
    is in the request body only: never in a log or an exception. A prometheus_client collector of its
    own counts (calls by result, cache hits, evictions, throttled requests)."""

    def __init__(
        self,
        api_url: str,
        *,
        sa_token_file: Path = IN_CLUSTER_SA / "token",
        ca_file: Path | None = IN_CLUSTER_SA / "ca.crt",
        audiences: Iterable[str] = (),
        limits: ReviewLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._connection = Connection(
            server=self.api_url, token_file=sa_token_file, ca_path=str(ca_file) if ca_file else None
        )
        self._audiences = list(audiences)
        self.limits = limits = limits or ReviewLimits()
        self._verdicts = {
            True: BoundedTtlCache[ReviewedUser](limits.max_entries, limits.positive_ttl, clock),
            False: BoundedTtlCache[None](limits.max_entries, limits.negative_ttl, clock),
        }
        self._budget = ReviewBudget(limits, clock)
        self._pending: dict[bytes, asyncio.Future[ReviewedUser | None]] = {}
        self.calls = {"authenticated": 0, "unauthenticated": 0, "unavailable": 0}
        self.cache_hits = 0

    async def review(self, token: str, source: str = "") -> ReviewedUser | None:
        key = digest(token)
        for cache in self._verdicts.values():
            found, user = cache.get(key)
            if found:
                self.cache_hits += 1
                return user
        if (pending := self._pending.get(key)) is not None:  # the same token, asked right now
            return await asyncio.shield(pending)
        self._budget.admit(source)  # ReviewThrottled: nothing asked
        pending = self._pending[key] = asyncio.get_running_loop().create_future()
        user = None
        try:
            user = await self._ask(token)
        except ReviewUnavailable as exc:  # not an answer about the token: do not cache it
            self.calls["unavailable"] += 1
            log.warning("TokenReview unavailable: %s", exc)
        else:
            self.calls["authenticated" if user else "unauthenticated"] += 1
            self._verdicts[user is not None].put(key, user)
        finally:
            del self._pending[key]
            pending.set_result(user)
        return user

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "flowmon_agent_token_reviews",
            "TokenReviews the API server was asked, by result.",
            labels=["result"],
        )
        for result, count in self.calls.items():
            calls.add_metric([result], count)
        yield calls
        yield CounterMetricFamily(
            "flowmon_agent_token_review_cache_hits", "Bearer tokens answered from the verdict cache.",
            value=self.cache_hits,
        )  # fmt: skip
        throttled = CounterMetricFamily(
            "flowmon_agent_token_reviews_throttled",
            "Requests refused a TokenReview by the rate limit: their client address's (source: 429) or the "
            "agent's (total: 503).",
            labels=["scope"],
        )
        for scope, count in self._budget.throttled.items():
            throttled.add_metric([scope], count)
        yield throttled
        yield CounterMetricFamily(
            "flowmon_agent_token_review_sources_evicted",
            "Client addresses whose rate-limit bucket left the table of max_sources (least recently used).",
            value=self._budget.sources_evicted,
        )
        entries = GaugeMetricFamily(
            "flowmon_agent_token_review_cache_entries", "Cached TokenReview verdicts.", labels=["verdict"]
        )
        evictions = CounterMetricFamily(
            "flowmon_agent_token_review_cache_evictions",
            "Unexpired verdicts dropped (least recently used first) to keep the cache within its bound.",
            labels=["verdict"],
        )
        for positive, cache in self._verdicts.items():
            verdict = "authenticated" if positive else "unauthenticated"
            entries.add_metric([verdict], len(cache))
            evictions.add_metric([verdict], cache.evictions)
        yield entries
        yield evictions

    async def _ask(self, token: str) -> ReviewedUser | None:
        spec: dict = {"token": token}
        if self._audiences:
            spec["audiences"] = self._audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            # One session per review (a review per token per TTL): no session outlives the caller's loop.
            async with ApiClient(self._connection) as client:
                answer = await read_json(await client.request("POST", TOKEN_REVIEWS, body=body, timeout=5))
        except KubeError as exc:  # the Status message is dropped: a server may quote the request in it
            raise ReviewUnavailable(f"HTTP {exc.status} {exc.reason}".rstrip()) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ReviewUnavailable(f"{type(exc).__name__}: {exc}") from None
        return parse_token_review(answer)


def parse_token_review(answer: dict) -> ReviewedUser | None:
    status = answer.get("status") or {}
    if not status.get("authenticated"):
        return None
    username = (status.get("user") or {}).get("username")
    return ReviewedUser(username) if username else None
