"""Authorization decisions (pure): static tokens from the policy and admin file, TokenReview verdicts.

The TokenReview HTTP call itself (KubeTokenReviewer) is not exercised here: the Kubernetes API emulator in
tests/kubeapi does not serve authentication.k8s.io yet; only the decision logic and the answer parser are.
"""

from __future__ import annotations

import pytest

from flowmon_agent.auth import (
    AGENT,
    Decision,
    ReviewedUser,
    Target,
    bearer_token,
    decide_reviewed,
    decide_static,
    digest,
    matches_any,
    monitor_digests,
    parse_token_review,
)
from flowmon_agent.policy import compile_policy, token_sha256
from flowmon_agent.spec import FlowMonitor

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


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


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
