"""The pure parts of a reconciliation round (flowmon_operator.reconcile)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowmon_contract.policy import compile_policy
from flowmon_contract.spec import FlowMonitor
from flowmon_operator.desired import merge_policy
from flowmon_operator.reconcile import monitor_key, parse_monitor


def monitor(namespace: str, name: str, **spec) -> FlowMonitor:
    return FlowMonitor.model_validate({"metadata": {"namespace": namespace, "name": name}, "spec": spec})


def test_merge_policy_keeps_the_last_good_policy_of_invalid_monitors_in_order():
    last_good = compile_policy([monitor("a", "x"), monitor("b", "y", aggregation={"maxSeries": 9})])
    fresh = compile_policy([monitor("a", "x"), monitor("c", "z")])
    merged = merge_policy(fresh, [last_good.monitor("b", "y")])
    assert [m.key for m in merged.monitors] == ["a/x", "b/y", "c/z"]
    assert merged.monitor("b", "y").max_series == 9
    assert merge_policy(fresh, []).hash == fresh.hash


def test_parse_monitor_reads_the_api_object_and_names_invalid_fields():
    body = {
        "apiVersion": "flowmon.io/v1alpha1",
        "kind": "FlowMonitor",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "u-1",
            "generation": 3,
            "resourceVersion": "7",
        },
        "spec": {"aggregation": {"maxSeries": 10}},
        "status": {"observedGeneration": 2},
    }
    parsed = parse_monitor(body)
    assert (parsed.key, parsed.metadata.uid, parsed.spec.aggregation.max_series) == ("shop/web", "u-1", 10)
    assert monitor_key(body) == "shop/web"
    with pytest.raises(ValidationError) as info:
        parse_monitor({**body, "spec": {"unknownField": 1}})
    assert info.value.errors()[0]["loc"] == ("spec", "unknownField")
