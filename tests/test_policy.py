"""The FlowMonitor spec and the compiled agent policy: validation at the boundary, stable hashes, tenancy."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowmon_contract.model_base import duration_seconds
from flowmon_contract.policy import AgentPolicy, compile_policy, policy_hash, token_sha256
from flowmon_contract.selectors import LabelSelector, selector_matches
from flowmon_contract.spec import FlowMonitor


def monitor(namespace: str, name: str, spec: dict | None = None) -> FlowMonitor:
    return FlowMonitor.model_validate(
        {"metadata": {"name": name, "namespace": namespace}, "spec": spec or {}}
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("7d", 604800), ("1d2h", 93600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        duration_seconds(text)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"metrics": ["bytes"]}, "spec.metrics.0"),
        ({"aggregation": {"groupBy": ["client_ip"]}}, "spec.aggregation.groupBy.0"),
        ({"aggregation": {"maxSeries": 0}}, "spec.aggregation.maxSeries"),
        ({"aggregation": {"seriesTTL": "2s"}}, "spec.aggregation"),
        ({"selection": {"namespaces": {"include": ["a"], "exclude": ["a"]}}}, "spec.selection.namespaces"),
        (
            {"selection": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}},
            "podSelector",
        ),
        ({"unknownField": 1}, "spec.unknownField"),
        ({"alerting": {"isolation": {"forbidden": [{"from": "x", "to": "y"}]}}}, "spec.alerting.isolation"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict, path: str) -> None:
    with pytest.raises(ValidationError) as err:
        monitor("shop", "m", spec)
    locations = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert any(path in loc for loc in locations), locations


def test_policy_hash_is_stable_and_order_independent() -> None:
    a, b = monitor("shop", "a"), monitor("payments", "b")
    assert compile_policy([a, b]).hash == compile_policy([b, a]).hash
    changed = monitor("shop", "a", {"aggregation": {"maxSeries": 10}})
    assert compile_policy([changed, b]).hash != compile_policy([a, b]).hash


def test_policy_hash_is_kept_once_computed_and_never_copied_onto_other_content() -> None:
    policy = compile_policy([monitor("shop", "a")])
    first = policy.hash
    assert policy.hash is first and policy == compile_policy([monitor("shop", "a")])  # cache not compared
    moved = policy.model_copy(update={"operator_namespace": "elsewhere"})
    assert moved.hash == policy_hash(moved) != first


def test_policy_round_trips_through_json() -> None:
    policy = compile_policy([monitor("shop", "a")], token_hashes={"shop/a": [token_sha256("secret")]})
    again = AgentPolicy.model_validate_json(policy.model_dump_json(by_alias=True))
    assert again == policy and again.hash == policy.hash
    assert "secret" not in policy.model_dump_json()


def test_tenancy_is_decided_by_the_monitors_namespace() -> None:
    policy = compile_policy([monitor("flowmon-system", "cluster"), monitor("shop", "team")])
    assert policy.monitor("flowmon-system", "cluster").tenant_namespace is None
    assert policy.monitor("shop", "team").tenant_namespace == "shop"


def test_unsorted_or_duplicate_monitors_are_refused() -> None:
    policy = compile_policy([monitor("a", "x"), monitor("b", "y")]).dump()
    policy["monitors"].reverse()
    with pytest.raises(ValidationError, match="sorted"):
        AgentPolicy.model_validate(policy)
    policy["monitors"] = [policy["monitors"][0]] * 2
    with pytest.raises(ValidationError, match="twice"):
        AgentPolicy.model_validate(policy)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"env": "prod"}}, {"env": "prod"}, True),
        ({"matchLabels": {"env": "prod"}}, {"env": "staging"}, False),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["a", "b"]}]}, {"env": "b"}, True),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {"env": "x"}, False),
    ],
)
def test_label_selectors(selector: dict, labels: dict, expected: bool) -> None:
    assert selector_matches(LabelSelector.model_validate(selector), labels) is expected


@pytest.mark.parametrize(
    ("spec", "wanted"),
    [
        ({}, False),  # the default metrics: no DNS
        ({"metrics": ["sent_bytes", "udp_sent_bytes"]}, False),
        ({"metrics": ["sent_bytes", "dns_requests"]}, True),
        ({"metrics": ["dns_latency"]}, True),
        ({"aggregation": {"groupBy": ["client_workload", "server_dns_name"]}}, True),  # names from answers
        ({"dns": {"qnameSuffixes": ["svc.cluster.local"]}}, True),
    ],
)
def test_dns_is_wanted_when_a_monitor_exports_it_or_groups_by_its_names(spec: dict, wanted: bool) -> None:
    """The DNS capture runs on every packet of the node: only a monitor that needs it attaches it."""
    assert compile_policy([monitor("shop", "m", spec)]).wants_dns is wanted
    assert compile_policy([monitor("shop", "a"), monitor("shop", "m", spec)]).wants_dns is wanted
    assert compile_policy([]).wants_dns is False
