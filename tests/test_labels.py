"""Ownership marks (flowmon_operator.labels): one set of labels and one owner reference on every child."""

from __future__ import annotations

import pytest

from flowmon_contract.spec import FlowMonitor
from flowmon_operator import builders, labels, rules
from flowmon_operator.settings import OperatorSettings


def monitor(uid: str | None = "u-1") -> FlowMonitor:
    meta = {"name": "web", "namespace": "shop", **({"uid": uid} if uid else {})}
    spec = {"scrape": {"serviceMonitorLabels": {"release": "kps", labels.MANAGED_BY_LABEL: "me"}}}
    return FlowMonitor.model_validate({"metadata": meta, "spec": spec})


def test_every_child_of_a_monitor_carries_the_same_ownership_labels():
    m, settings = monitor(), OperatorSettings()
    children = [
        builders.build_scrape_secret(settings, m, "t", "ca"),
        builders.build_service_monitor(settings, m, "secret"),
        rules.build_prometheus_rule(m),
    ]
    owned = labels.monitor_labels(m)
    for child in children:
        assert owned.items() <= child["metadata"]["labels"].items(), child["kind"]
        assert child["metadata"]["ownerReferences"] == [labels.owner_reference(m)]
    # A user's label never overrides ownership; the ServiceMonitor and the rule keep the user's others.
    for child in children[1:]:
        assert child["metadata"]["labels"]["release"] == "kps"


def test_owner_reference_needs_a_uid():
    with pytest.raises(ValueError, match="uid"):
        labels.owner_reference(monitor(uid=None))
    assert labels.owned_by(monitor(uid=None)) == {}
