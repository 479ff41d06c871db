"""Who may read what: bearer tokens scoped per monitor path, an admin token, optional TokenReview.

Tokens are never stored, only their SHA-256; every comparison is `hmac.compare_digest` over digests and
runs over the whole candidate list (no early exit), so timing does not tell how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import aiohttp

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
    async def review(self, token: str) -> ReviewedUser | None: ...


IN_CLUSTER_SA = SERVICE_ACCOUNT
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


class KubeTokenReviewer:
    """Asks the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`, on flowmon_kube's client)
    with the agent's own ServiceAccount token. Answers are cached for `ttl` seconds by token digest, so that
    a scrape every few seconds costs one review per minute, not one per scrape. The reviewed token is in
    the request body only: never in a log or an exception."""

    def __init__(
        self,
        api_url: str,
        *,
        sa_token_file: Path = IN_CLUSTER_SA / "token",
        ca_file: Path | None = IN_CLUSTER_SA / "ca.crt",
        audiences: Iterable[str] = (),
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._connection = Connection(
            server=self.api_url, token_file=sa_token_file, ca_path=str(ca_file) if ca_file else None
        )
        self._audiences = list(audiences)
        self._ttl, self._clock = ttl, clock
        self._cache: dict[bytes, tuple[float, ReviewedUser | None]] = {}

    async def review(self, token: str) -> ReviewedUser | None:
        key, now = digest(token), self._clock()
        cached = self._cache.get(key)
        if cached and now - cached[0] < self._ttl:
            return cached[1]
        try:
            user = await self._ask(token)
        except ReviewUnavailable as exc:  # not an answer about the token: do not cache it
            log.warning("TokenReview unavailable: %s", exc)
            return None
        if len(self._cache) > 10_000:  # bounded: unknown tokens must not grow memory forever
            self._cache.clear()
        self._cache[key] = (now, user)
        return user

    async def _ask(self, token: str) -> ReviewedUser | None:
        spec: dict = {"token": token}
        if self._audiences:
            spec["audiences"] = self._audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            # One session per review (a review per token per TTL): no session outlives the caller's loop.
            async with ApiClient(self._connection) as client:
                answer = await read_json(await client.request("POST", TOKEN_REVIEWS, body=body, timeout=5))
        except (KubeError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ReviewUnavailable(str(exc)) from exc
        return parse_token_review(answer)


def parse_token_review(answer: dict) -> ReviewedUser | None:
    status = answer.get("status") or {}
    if not status.get("authenticated"):
        return None
    username = (status.get("user") or {}).get("username")
    return ReviewedUser(username) if username else None
