"""Authorization decisions (pure): static tokens from the policy and admin file, TokenReview verdicts;
and KubeTokenReviewer's HTTP call against the Kubernetes API emulator's tokenreviews (tests/kubeapi)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flowmon_agent.export.auth import (
    AGENT,
    Decision,
    KubeTokenReviewer,
    ReviewedUser,
    Target,
    decide_reviewed,
    decide_static,
    digest,
    matches_any,
    monitor_digests,
    parse_token_review,
)
from flowmon_agent.export.review_budget import ReviewLimits, ReviewThrottled
from flowmon_contract.policy import compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from tests.kubeapi.shipped import agent_token as shipped_agent_token
from tests.kubeapi.shipped import install_rbac

ADMIN = [digest("root-token")]
MONITORS = {"shop/web": [digest("shop-a"), digest("shop-b")], "ops/all": [digest("ops")]}
SHOP, OPS = Target("shop/web"), Target("ops/all")


@pytest.mark.parametrize(
    ("token", "target", "expected"),
    [
        (None, SHOP, Decision.UNAUTHENTICATED),
        ("root-token", SHOP, Decision.ALLOW),
        ("root-token", AGENT, Decision.ALLOW),
        ("shop-a", SHOP, Decision.ALLOW),
        ("shop-b", SHOP, Decision.ALLOW),  # several tokens per monitor (rotation)
        ("ops", SHOP, Decision.FORBIDDEN),
        ("shop-a", OPS, Decision.FORBIDDEN),
        ("shop-a", AGENT, Decision.FORBIDDEN),
        ("shop-a", Target("gone/monitor"), Decision.FORBIDDEN),
        ("stranger", SHOP, None),  # unknown: TokenReview may still know it, else 401
        ("root-token ", SHOP, None),  # exact match only
    ],
)
def test_decide_static(token, target, expected):
    assert decide_static(token, target, admin=ADMIN, monitors=MONITORS) is expected


@pytest.mark.parametrize(
    ("user", "target", "expected"),
    [
        (None, SHOP, Decision.UNAUTHENTICATED),
        (ReviewedUser("system:serviceaccount:shop:prometheus"), SHOP, Decision.ALLOW),
        (ReviewedUser("system:serviceaccount:shop:prometheus"), OPS, Decision.FORBIDDEN),
        (ReviewedUser("system:serviceaccount:shop:prometheus"), AGENT, Decision.FORBIDDEN),
        (ReviewedUser("system:serviceaccount:flowmon-system:operator"), AGENT, Decision.ALLOW),
        (ReviewedUser("system:serviceaccount:flowmon-system:operator"), OPS, Decision.ALLOW),
        (ReviewedUser("alice"), SHOP, Decision.FORBIDDEN),  # a human, not a ServiceAccount
        (ReviewedUser("system:serviceaccount:shopping:x"), SHOP, Decision.FORBIDDEN),  # no prefix match
    ],
)
def test_decide_reviewed(user, target, expected):
    admins = ["system:serviceaccount:flowmon-system:operator"]
    assert decide_reviewed(user, target, admin_users=admins) is expected


PROMETHEUS = ReviewedUser("system:serviceaccount:monitoring:prometheus")


@pytest.mark.parametrize(
    ("target", "expected"),
    [(SHOP, Decision.ALLOW), (OPS, Decision.ALLOW), (AGENT, Decision.FORBIDDEN)],  # reads, never admin
)
def test_readers_read_every_monitor_and_nothing_else(target, expected):
    readers = [PROMETHEUS.username]
    assert decide_reviewed(PROMETHEUS, target, admin_users=(), readers=readers) is expected
    assert decide_reviewed(PROMETHEUS, SHOP, admin_users=(), readers=()) is Decision.FORBIDDEN


@pytest.mark.parametrize(
    ("answer", "user"),
    [
        (
            {"status": {"authenticated": True, "user": {"username": "system:serviceaccount:a:b"}}},
            "system:serviceaccount:a:b",
        ),
        ({"status": {"authenticated": False, "error": "expired"}}, None),
        ({"status": {"authenticated": True}}, None),
        ({}, None),
    ],
)
def test_parse_token_review(answer, user):
    parsed = parse_token_review(answer)
    assert (parsed.username if parsed else None) == user


def test_matches_any():
    assert matches_any(digest("x"), [digest("a"), digest("x")])
    assert not matches_any(digest("x"), [])
    assert not matches_any(digest("x"), [digest("a")])


def test_monitor_digests_come_from_the_policy_hashes():
    monitor = FlowMonitor.model_validate({"metadata": {"namespace": "shop", "name": "web"}})
    policy = compile_policy([monitor], token_hashes={"shop/web": [token_sha256("t1")]})
    assert monitor_digests(policy) == {"shop/web": [digest("t1")]}
    assert monitor_digests(None) == {}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_kube_token_reviewer_asks_the_api_server(kube_api_https, tmp_path: Path):
    """The real HTTPS call (verified against the cluster CA): the agent's own ServiceAccount token
    authenticates the TokenReview; answers are cached per token for the TTL; a registered ServiceAccount
    token comes back as its user."""
    kube_api = kube_api_https
    agent_token = tmp_path / "token"
    install_rbac(kube_api)  # the shipped token-review overlay lets the agent ask
    agent_token.write_text(shipped_agent_token(kube_api) + "\n")
    prometheus = kube_api.service_account_token("monitoring", "prometheus")
    clock = Clock()
    reviewer = KubeTokenReviewer(
        kube_api.url,
        sa_token_file=agent_token,
        ca_file=kube_api.pki.ca_file,
        limits=ReviewLimits(positive_ttl=60),
        clock=clock,
    )

    async def reviews() -> list:
        return [await reviewer.review(t) for t in (prometheus, "forged-token", prometheus)]

    user, stranger, again = asyncio.run(reviews())
    assert user == ReviewedUser("system:serviceaccount:monitoring:prometheus") == again
    assert stranger is None
    posts = [p for m, p in kube_api.requests if m == "POST" and p.endswith("/tokenreviews")]
    assert len(posts) == 2  # the repeated token came from the cache
    kube_api.tokens.revoke(prometheus)
    assert asyncio.run(reviewer.review(prometheus)) is not None  # still cached
    clock.now = 61
    assert asyncio.run(reviewer.review(prometheus)) is None  # the TTL is over: asked again
    # A server the CA did not sign gets no token: no verdict, nothing asked.
    untrusting = KubeTokenReviewer(kube_api.url, sa_token_file=agent_token, ca_file=None)
    posts = len(kube_api.requests)
    assert asyncio.run(untrusting.review(prometheus)) is None
    assert len(kube_api.requests) == posts


def test_kube_token_reviewer_audiences_and_an_unauthorized_agent(kube_api, tmp_path: Path):
    agent_token = tmp_path / "token"
    install_rbac(kube_api)  # the shipped token-review overlay lets the agent ask
    agent_token.write_text(shipped_agent_token(kube_api))
    scoped = kube_api.service_account_token("shop", "prometheus", audiences=["flowmon"])
    plain = kube_api.service_account_token("shop", "other")

    def review(audiences: list[str], token: str, token_file: Path = agent_token):
        reviewer = KubeTokenReviewer(
            kube_api.url, sa_token_file=token_file, ca_file=None, audiences=audiences
        )
        return asyncio.run(reviewer.review(token))

    assert review(["flowmon"], scoped) == ReviewedUser("system:serviceaccount:shop:prometheus")
    assert review(["flowmon"], plain) is None  # a token for the API server is not one for flowmon
    assert review([], plain) == ReviewedUser("system:serviceaccount:shop:other")
    # The agent's own credentials refused: no verdict, and nothing is cached either.
    stranger = tmp_path / "stranger"
    stranger.write_text("not-a-token")
    assert review([], plain, stranger) is None


def reviews_asked(kube_api) -> int:
    return sum(1 for m, p in kube_api.requests if m == "POST" and p.endswith("/tokenreviews"))


def agent_reviewer(kube_api, tmp_path: Path, clock: Clock, **limits) -> KubeTokenReviewer:
    agent_token = tmp_path / "token"
    install_rbac(kube_api)  # the shipped token-review overlay lets the agent ask
    agent_token.write_text(shipped_agent_token(kube_api))
    return KubeTokenReviewer(
        kube_api.url, sa_token_file=agent_token, ca_file=None, limits=ReviewLimits(**limits), clock=clock
    )


def test_unknown_tokens_are_cached_negative_and_known_ones_survive_a_flood(kube_api, tmp_path: Path):
    """A refused token is not asked about again within negative_ttl; a flood of made-up tokens evicts
    made-up tokens only (one at a time, counted), never a known token's verdict."""
    clock = Clock()
    reviewer = agent_reviewer(kube_api, tmp_path, clock, max_entries=3, negative_ttl=30, source_burst=100)
    prometheus = kube_api.service_account_token("monitoring", "prometheus")

    async def run() -> None:
        assert await reviewer.review(prometheus, "10.0.0.9") is not None
        assert await reviewer.review("forged-0", "10.0.0.66") is None
        assert await reviewer.review("forged-0", "10.0.0.66") is None
        assert reviews_asked(kube_api) == 2  # the second refusal came from the cache
        for n in range(1, 6):  # five more made-up tokens into a cache of three
            assert await reviewer.review(f"forged-{n}", "10.0.0.66") is None
        assert reviews_asked(kube_api) == 7
        assert await reviewer.review(prometheus, "10.0.0.9") is not None  # still cached: not asked
        assert await reviewer.review("forged-5", "10.0.0.66") is None  # the newest three stayed
        assert reviews_asked(kube_api) == 7
        clock.now += 30  # negative_ttl over: the made-up token is asked about again
        assert await reviewer.review("forged-5", "10.0.0.66") is None
        assert reviews_asked(kube_api) == 8

    asyncio.run(run())
    samples = {(s.name, tuple(s.labels.values())): s.value for m in reviewer.collect() for s in m.samples}
    assert samples[("flowmon_agent_token_review_cache_evictions_total", ("unauthenticated",))] == 3.0
    assert samples[("flowmon_agent_token_review_cache_evictions_total", ("authenticated",))] == 0.0
    assert samples[("flowmon_agent_token_review_cache_entries", ("unauthenticated",))] == 3.0
    assert samples[("flowmon_agent_token_reviews_total", ("unauthenticated",))] == 7.0
    assert samples[("flowmon_agent_token_reviews_total", ("authenticated",))] == 1.0


def test_reviews_over_the_rate_are_refused_without_asking(kube_api, tmp_path: Path):
    """One client address past its burst: 429 (scope source), nothing asked; other clients go on until the
    agent's own burst is spent: 503 (scope total); tokens come back with time."""
    clock = Clock()
    reviewer = agent_reviewer(kube_api, tmp_path, clock, source_burst=3, source_rate=1, burst=5, rate=2)

    async def run() -> None:
        for n in range(3):
            await reviewer.review(f"guess-{n}", "10.0.0.66")
        with pytest.raises(ReviewThrottled) as throttled:
            await reviewer.review("guess-3", "10.0.0.66")
        assert (throttled.value.status, throttled.value.retry_after_header) == (429, "1")
        assert await reviewer.review("guess-0", "10.0.0.66") is None  # a cached verdict costs no budget
        await reviewer.review("other-0", "10.0.0.7")
        await reviewer.review("other-1", "10.0.0.7")
        with pytest.raises(ReviewThrottled) as throttled:  # five asked in all: the agent's burst
            await reviewer.review("other-2", "10.0.0.8")
        assert (throttled.value.status, throttled.value.scope) == (503, "total")
        assert reviews_asked(kube_api) == 5
        clock.now += 1.0  # two agent tokens back, one for 10.0.0.66
        await reviewer.review("guess-3", "10.0.0.66")
        assert reviews_asked(kube_api) == 6

    asyncio.run(run())


def test_concurrent_requests_with_one_token_share_one_review(kube_api, tmp_path: Path):
    reviewer = agent_reviewer(kube_api, tmp_path, Clock(), source_burst=1)
    prometheus = kube_api.service_account_token("monitoring", "prometheus")

    async def run() -> list:
        return await asyncio.gather(*(reviewer.review(prometheus, "10.0.0.9") for _ in range(20)))

    users = asyncio.run(run())
    assert set(users) == {ReviewedUser("system:serviceaccount:monitoring:prometheus")}
    assert reviews_asked(kube_api) == 1  # and the one call fit in a burst of one
