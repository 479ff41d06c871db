"""The PrometheusRule builder: schema-valid, accepted by promtool, and proven by generated promtool suites
(each alert fires on its cause, stays silent on daily variation and idle pairs) that fail on broken rules.

Schema validation reuses tests/schemas.py (the Prometheus Operator CRDs in ../shared/schemas).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flowmon_contract.spec import FlowMonitor, Metric
from flowmon_operator.dns_rules import DNS_ALERT_NAMES
from flowmon_operator.rules import (
    ALERT_NAMES,
    MONITOR_LABEL,
    build_prometheus_rule,
    monitor_relabeling,
    prom_duration,
)
from tests.rule_tests import RULE_FILE, Suite, suites
from tests.schemas import validate_prometheus_operator

ISOLATION = {
    "environments": [
        {"name": "staging", "namespaceSelector": {"matchLabels": {"env": "staging"}}},
        {
            "name": "prod",
            "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
        },
    ],
    "forbidden": [{"from": "staging", "to": "prod"}],
}
# The monitor the promtool suites run against; only baseline.days is shortened for speed.
SUITE_SPEC = {
    "metrics": list(Metric),  # the TCP defaults and the opt-in DNS metrics
    "scrape": {"interval": "1m", "serviceMonitorLabels": {"release": "kps"}},
    "alerting": {
        "labels": {"team": "shop"},
        "annotations": {"runbook_url": "https://runbooks.example/flowmon"},
        "baseline": {"days": 2},
        "isolation": ISOLATION,
    },
}
ALL = set(ALERT_NAMES)
DNS = set(DNS_ALERT_NAMES)
TCP = ALL - DNS
HEALTH = {"FlowmonRetransmitsHigh", "FlowmonConnectFailuresHigh", "FlowmonRTTHigh", "FlowmonResetsHigh"}


def monitor(
    spec: dict, namespace: str = "shop", name: str = "web", uid: str | None = "3f1c-uid"
) -> FlowMonitor:
    meta = {"name": name, "namespace": namespace, **({"uid": uid} if uid else {})}
    return FlowMonitor.model_validate({"metadata": meta, "spec": spec})


def alerts(rule: dict) -> list[dict]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def check_rules(groups: list[dict], tmp_path: Path) -> None:
    (tmp_path / RULE_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = promtool("check", "rules", RULE_FILE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def run_suite(suite: Suite, groups: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / RULE_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    test_file = f"{suite.name}_test.yml"
    (tmp_path / test_file).write_text(yaml.safe_dump(suite.document(), sort_keys=False, width=1000))
    return promtool("test", "rules", test_file, cwd=tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, TCP - {"FlowmonIsolationViolation"}, id="defaults"),
        pytest.param(SUITE_SPEC, ALL, id="isolation"),
        pytest.param(
            {"aggregation": {"groupBy": ["client_namespace", "server_namespace", "server_port"]}},
            TCP - {"FlowmonIsolationViolation"},
            id="namespace-pairs",
        ),
        pytest.param(
            {"aggregation": {"groupBy": ["server_port"]}},
            TCP - {"FlowmonIsolationViolation", "FlowmonNewDependency"},
            id="no-pair-labels",
        ),
        pytest.param(
            {
                "metrics": ["sent_bytes", "rtt"],
                "alerting": {"baseline": {"metrics": ["sent_bytes", "received_bytes"]}},
            },
            {"FlowmonTrafficAnomaly", "FlowmonNewDependency", "FlowmonRTTHigh"},
            id="metrics-subset",
        ),
        pytest.param({"alerting": {"baseline": {"enabled": False}}}, HEALTH, id="baseline-off"),
        pytest.param(
            {"scrape": {"interval": "2m"}, "alerting": {"for": "15m"}},
            TCP - {"FlowmonIsolationViolation"},
            id="slow-scrape",
        ),
        pytest.param(
            {"metrics": ["dns_requests", "dns_latency"], "alerting": {"baseline": {"enabled": False}}},
            DNS,
            id="dns-only",
        ),
        pytest.param(
            {
                "metrics": ["dns_requests"],
                "aggregation": {"groupBy": ["server_namespace", "server_workload"]},
                "alerting": {"baseline": {"enabled": False}},
            },
            {"FlowmonDNSFailuresHigh"},  # no client to name: no timeout alert
            id="dns-no-client",
        ),
        pytest.param({"alerting": {"enabled": False}}, None, id="disabled"),
        pytest.param(
            {"metrics": ["connections_active"], "alerting": {"baseline": {"enabled": False}}},
            None,
            id="nothing",
        ),
    ],
)
def test_rule_is_valid_and_renders_the_alerts_the_spec_supports(
    spec: dict, expected: set[str] | None, tmp_path: Path
) -> None:
    mon = monitor(spec)
    rule = build_prometheus_rule(mon)
    if expected is None:
        assert rule is None
        return
    validate_prometheus_operator(rule)
    check_rules(rule["spec"]["groups"], tmp_path)
    assert {a["alert"] for a in alerts(rule)} == expected

    meta = rule["metadata"]
    assert meta["namespace"] == "shop"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "flowmon-operator"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "flowmon"  # like every other child
    assert meta["labels"]["flowmon.io/monitor-namespace"] == "shop"
    assert meta["labels"]["flowmon.io/monitor-name"] == "web"
    for key, value in mon.spec.scrape.service_monitor_labels.items():
        assert meta["labels"][key] == value
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "flowmon.io/v1alpha1",
        "kind": "FlowMonitor",
        "name": "web",
        "uid": "3f1c-uid",
        "controller": True,
    }
    window = "8m" if spec.get("scrape", {}).get("interval") == "2m" else "5m"
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            # Every selector reads only this monitor's series (or recordings).
            for selector in re.findall(r"(?<!\{)\{([^{}]*)\}", r["expr"]):
                assert f'{MONITOR_LABEL}="shop/web"' in selector, (r.get("record") or r["alert"], selector)
            if "rate(" in r["expr"]:
                assert f"[{window}]" in r["expr"]
    for a in alerts(rule):
        assert a["labels"]["severity"] in ("info", "warning", "critical")
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        holds = a["alert"] not in ("FlowmonNewDependency", "FlowmonIsolationViolation")
        assert a.get("for") == (mon.spec.alerting.for_ if holds else None)
        for key, value in mon.spec.alerting.labels.items():
            assert a["labels"][key] == value
        for key, value in mon.spec.alerting.annotations.items():
            assert a["annotations"][key] == value


def test_pair_labels_follow_group_by() -> None:
    rule = build_prometheus_rule(
        monitor({"aggregation": {"groupBy": ["client_namespace", "server_namespace"]}})
    )
    rate = next(
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record", "").endswith(":rate5m")
    )
    assert "sum by (flowmon_monitor, client_namespace, server_namespace) (" in rate["expr"]
    summary = next(a for a in alerts(rule) if a["alert"] == "FlowmonNewDependency")["annotations"]["summary"]
    assert summary == "New dependency {{ $labels.client_namespace }} → {{ $labels.server_namespace }}"


def test_routing_labels_override_severity_but_not_pair_labels() -> None:
    rule = build_prometheus_rule(monitor({"alerting": {"labels": {"severity": "page"}}}))
    assert {a["labels"]["severity"] for a in alerts(rule)} == {"page"}
    with pytest.raises(ValidationError, match="client_workload"):
        monitor({"alerting": {"labels": {"client_workload": "x"}}})
    with pytest.raises(ValidationError):
        monitor({"alerting": {"annotations": {"runbook-url": "x"}}})


@pytest.mark.parametrize(
    ("baseline", "message"),
    [({"days": 2, "minHistory": "3d"}, "exceeds"), ({"metrics": ["sent_bytes", "sent_bytes"]}, "twice")],
)
def test_bad_baselines_are_refused(baseline: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        monitor({"alerting": {"baseline": baseline}})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(300, "5m"), (90, "1m30s"), (86_400, "1d"), (84_600, "23h30m"), (171_000, "1d23h30m"), (0, "0s")],
)
def test_prom_duration(seconds: int, text: str) -> None:
    assert prom_duration(seconds) == text


def test_an_offline_monitor_without_uid_gets_a_rule_without_owner() -> None:
    """`flowmon render` reads files: no uid, so no owner reference (never a made-up one)."""
    rule = build_prometheus_rule(monitor({}, uid=None))
    assert rule is not None and "ownerReferences" not in rule["metadata"]
    assert rule["spec"]["groups"] == build_prometheus_rule(monitor({}))["spec"]["groups"]


def test_relabeling_marks_series_with_the_monitor() -> None:
    assert monitor_relabeling(monitor({})) == {
        "action": "replace",
        "targetLabel": "flowmon_monitor",
        "replacement": "shop/web",
    }


# --- promtool test rules --------------------------------------------------------------------------

SUITE_MONITOR = monitor(SUITE_SPEC)
SUITES = {s.name: s for s in suites(SUITE_MONITOR)}


def test_every_alert_has_a_suite() -> None:
    assert set(SUITES) == {"baseline", "health", "isolation", "dns"}
    tested = {
        a
        for s in SUITES.values()
        for a in re.findall(r'alertname[=:] ?"?(Flowmon\w+)', yaml.safe_dump(s.tests))
    }
    assert tested == ALL


@pytest.mark.parametrize("name", ["baseline", "health", "isolation", "dns"])
def test_alerts_fire_on_their_cause_and_stay_silent_otherwise(name: str, tmp_path: Path) -> None:
    suite = SUITES[name]
    result = run_suite(suite, suite.groups, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _mutate(groups: list[dict], transform) -> list[dict]:
    return [{**g, "rules": [transform(dict(r)) for r in g["rules"]]} for g in groups]


def _never(rule: dict) -> dict:
    if "alert" in rule:
        rule["expr"] = f"({rule['expr']}) and on () vector(0) > 1"
    return rule


def _any_monitor(rule: dict) -> dict:
    rule["expr"] = rule["expr"].replace(f'{MONITOR_LABEL}="shop/web"', f'{MONITOR_LABEL}=~".+"')
    return rule


FLOORLESS = monitor(
    {
        **SUITE_SPEC,
        "alerting": {
            **SUITE_SPEC["alerting"],
            "baseline": {"days": 2, "minBytesPerSecond": 1e-6, "minConnectionsPerSecond": 1e-6},
            "health": {
                "minRetransmitsPerSecond": 1e-6,
                "minConnectFailuresPerSecond": 1e-6,
                "minRttSamplesPerSecond": 1e-6,
                "minDnsFailuresPerSecond": 1e-6,
                "minDnsRequestsPerSecond": 1e-6,
                "minDnsTimeoutsPerSecond": 1e-6,
            },
        },
    }
)


@pytest.mark.parametrize(
    ("name", "broken", "symptom"),
    [
        ("baseline", lambda: _mutate(SUITES["baseline"].groups, _never), "FlowmonTrafficAnomaly"),
        ("health", lambda: _mutate(SUITES["health"].groups, _never), "FlowmonRetransmitsHigh"),
        ("isolation", lambda: _mutate(SUITES["isolation"].groups, _never), "FlowmonIsolationViolation"),
        ("dns", lambda: _mutate(SUITES["dns"].groups, _never), "FlowmonDNS"),
        # Without idle floors the idle pairs page.
        ("baseline", lambda: suites(FLOORLESS)[0].groups, 'client_workload="cron"'),
        ("health", lambda: suites(FLOORLESS)[1].groups, 'client_workload="cron"'),
        ("dns", lambda: suites(FLOORLESS)[2].groups, 'client_workload="cron"'),
        # Without the monitor selector another monitor's series raise this monitor's alerts.
        ("baseline", lambda: _mutate(SUITES["baseline"].groups, _any_monitor), "intruder"),
        ("isolation", lambda: _mutate(SUITES["isolation"].groups, _any_monitor), "intruder"),
    ],
    ids=[
        "baseline-never",
        "health-never",
        "isolation-never",
        "dns-never",
        "baseline-floorless",
        "health-floorless",
        "dns-floorless",
        "baseline-any-monitor",
        "isolation-any-monitor",
    ],
)
def test_suites_catch_broken_rules(name: str, broken, symptom: str, tmp_path: Path) -> None:
    result = run_suite(SUITES[name], broken(), tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert symptom in output, output[-3000:]
