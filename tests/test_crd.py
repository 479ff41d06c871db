"""The FlowMonitor CRD: committed = generated, structural, documented, and it accepts and rejects exactly
the documents the pydantic spec does (schema + defaults + CEL rules evaluated, see tests/schemas.py)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from flowmon_cli.crd_check import to_json_schema
from flowmon_contract.spec import FlowMonitorSpec
from flowmon_operator import crd as crd_module
from flowmon_operator.crd import RULES, build_crd, crd_yaml, validate_spec
from tests import schemas

CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
ROOT = VERSION["schema"]["openAPIV3Schema"]
SPEC = ROOT["properties"]["spec"]


def walk(node: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every schema node with its path (properties, items, additionalProperties)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_generated():
    committed = (schemas.REPO / "crds" / "flowmonitors.flowmon.io.yaml").read_text()
    assert committed == crd_yaml(), (
        "regenerate: python -m flowmon_operator.crd > crds/flowmonitors.flowmon.io.yaml"
    )
    assert yaml.safe_load(committed) == CRD


def test_crd_is_a_valid_kubernetes_object():
    schemas.validate_k8s(CRD)


def test_names_scope_and_printer_columns():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "flowmonitors.flowmon.io"
    assert (spec["group"], spec["scope"]) == ("flowmon.io", "Namespaced")
    assert spec["names"]["kind"] == "FlowMonitor" and spec["names"]["shortNames"] == ["fm"]
    assert VERSION["name"] == "v1alpha1" and VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Agents", "Series", "Reason", "Age"]
    assert columns["Age"]["jsonPath"] == ".metadata.creationTimestamp"
    # every column's path exists in the status schema
    status = ROOT["properties"]["status"]["properties"]
    assert "summary" in status["agents"]["properties"] and "predictedSeries" in status
    assert status["conditions"]["items"]["properties"]["type"]["enum"] == [
        "Ready",
        "PolicyApplied",
        "Degraded",
        "Scraped",
    ]


FORBIDDEN_KEYS = {
    "$ref",
    "$defs",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "patternProperties",
    "propertyNames",
    "title",
}


@pytest.mark.parametrize("part", ["spec", "status"])
def test_schema_is_structural_and_documented(part):
    for path, node in walk(ROOT["properties"][part], part):
        assert not FORBIDDEN_KEYS & node.keys(), f"{path}: {FORBIDDEN_KEYS & node.keys()}"
        assert "type" in node, f"{path}: structural schemas need a type everywhere"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{name} has no description (kubectl explain shows it)"


def test_defaults_validate_against_their_own_schema():
    """The API server rejects a CRD whose defaults (after their own nested defaulting) do not validate."""
    checked = 0
    for _path, node in walk(SPEC, "spec"):
        if "default" in node:
            plain = to_json_schema(node)
            jsonschema.Draft202012Validator(plain).validate(
                schemas.apply_defaults(node, copy.deepcopy(node["default"]))
            )
            checked += 1
    assert checked > 20


def test_cel_rules_are_within_cost_bounds():
    """The API server estimates each rule's cost from the maximum sizes of everything it touches and of
    the lists it sits in: every string, list and map under a rule, and every list above one, is bounded.
    Rules on maps look at keys only (checked), so map values need no bound."""
    unbounded = []
    for path, node in walk(SPEC, "spec"):
        rules = node.get("x-kubernetes-validations", [])
        if not rules:
            continue
        if isinstance(node.get("additionalProperties"), dict):
            assert all(r["rule"].startswith("self.all(k, ") and "self[" not in r["rule"] for r in rules), path
            assert "maxProperties" in node, path
            continue
        for sub_path, sub in walk(node, path):
            kind = sub.get("type")
            if kind == "string" and "maxLength" not in sub:
                unbounded.append(sub_path)
            if kind == "array" and "maxItems" not in sub:
                unbounded.append(sub_path)
            if (
                kind == "object"
                and isinstance(sub.get("additionalProperties"), dict)
                and "maxProperties" not in sub
            ):
                unbounded.append(sub_path)
    for path, node in walk(SPEC, "spec"):
        below = [p for p, n in walk(node, path) if "x-kubernetes-validations" in n]
        if node.get("type") == "array" and below and "maxItems" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_every_rule_in_the_table_is_in_the_crd():
    text = json.dumps(SPEC)
    for rules in RULES.values():
        for rule in rules:
            assert json.dumps(rule["rule"]) in text


def test_status_helper_fills_the_agents_column():
    assert crd_module.agent_counts(3, 2, 1) == {"desired": 3, "ready": 2, "inSync": 1, "summary": "1/3"}


# --- drift: pydantic and the CRD accept and reject the same documents ------------------------------------
NETWORKS = [{"name": "partner", "cidr": "203.0.113.0/24"}, {"name": "v6", "cidr": "2001:db8::/32"}]
ENVIRONMENTS = [
    {"name": "staging", "namespaceSelector": {"matchLabels": {"env": "staging"}}},
    {
        "name": "prod",
        "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
    },
]
FULL = {
    "selection": {
        "namespaces": {"include": ["shop", "pay"], "exclude": ["kube-system"]},
        "namespaceSelector": {"matchLabels": {"team": "a", "example.com/tier": "web"}},
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
        "networks": NETWORKS,
    },
    "metrics": ["sent_bytes", "rtt", "connect_failures"],
    "aggregation": {
        "groupBy": ["client_workload", "server_workload", "server_zone"],
        "maxSeries": 500,
        "seriesTTL": "1h30m",
        "histogramBuckets": {"rtt": [0.001, 0.01, 0.1], "connectDuration": [1, 2.5, 10]},
    },
    "scrape": {"interval": "30s", "serviceMonitorLabels": {"release": "kps", "example.com/team": "a-1"}},
    "alerting": {
        "isolation": {"environments": ENVIRONMENTS, "forbidden": [{"from": "staging", "to": "prod"}]}
    },
}


def at(path: str, value) -> dict:
    """A spec with one value set at a dotted path (e.g. "aggregation.maxSeries")."""
    doc: dict = {}
    node = doc
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


VALID = {
    "empty": {},
    "full": FULL,
    "null selectors": {"selection": {"namespaceSelector": None, "podSelector": None}},
    "In with values": at(
        "selection.podSelector", {"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}
    ),
    "DoesNotExist": at(
        "selection.podSelector.matchExpressions", [{"key": "a/b", "operator": "DoesNotExist"}]
    ),
    "empty label value": at("selection.podSelector.matchLabels", {"a": ""}),
    "ttl 10s": at("aggregation.seriesTTL", "10s"),
    "ttl 1d": at("aggregation.seriesTTL", "1d"),
    "ttl 23h59m60s": at("aggregation.seriesTTL", "23h59m60s"),
    "interval 1s": at("scrape.interval", "1s"),
    "interval 60m": at("scrape.interval", "60m"),
    "maxSeries 1": at("aggregation.maxSeries", 1),
    "maxSeries 100000": at("aggregation.maxSeries", 100000),
    "one bucket 3600": at("aggregation.histogramBuckets.rtt", [3600]),
    "all dimensions": at("aggregation.groupBy", ["client_pod", "server_pod", "service", "client_zone"]),
    "ipv6 network": at("selection.networks", [{"name": "n", "cidr": "fd00::/8"}]),
    "/32 network": at("selection.networks", [{"name": "n", "cidr": "198.51.100.7/32"}]),
    "64 networks": at("selection.networks", [{"name": f"n{i}", "cidr": f"10.{i}.0.0/16"} for i in range(64)]),
    "256 namespaces": at("selection.namespaces.include", [f"ns-{i}" for i in range(256)]),
    "alerting off": at("alerting.enabled", False),
    "sensitivity 10": at("alerting.baseline.sensitivity", 10),
    "integer float": at("alerting.health.rttP99Seconds", 1),
    "forbidden both ways": at(
        "alerting.isolation", {"environments": ENVIRONMENTS, "forbidden": [{"from": "prod", "to": "staging"}]}
    ),
    "alert labels free-form": at("alerting.labels", {"severity": "page", "team": "A B"}),
    "runbook annotation": at("alerting.annotations", {"runbook_url": "https://runbooks.example/flowmon"}),
    "prefixed label key": at("selection.podSelector.matchLabels", {"app.kubernetes.io/name": "web"}),
    "63-char label key": at("selection.podSelector.matchLabels", {"a" * 63: "x"}),
}

INVALID = {
    "unknown field": {"bogus": 1},
    "unknown nested field": at("aggregation.maxSerie", 5),
    "include and exclude": at("selection.namespaces", {"include": ["a", "b"], "exclude": ["b"]}),
    "bad namespace": at("selection.namespaces.include", ["Bad_NS"]),
    "namespace too long": at("selection.namespaces.exclude", ["a" * 64]),
    "257 namespaces": at("selection.namespaces.include", [f"ns-{i}" for i in range(257)]),
    "In without values": at("selection.podSelector.matchExpressions", [{"key": "a", "operator": "In"}]),
    "NotIn empty values": at(
        "selection.podSelector.matchExpressions", [{"key": "a", "operator": "NotIn", "values": []}]
    ),
    "Exists with values": at(
        "selection.podSelector.matchExpressions", [{"key": "a", "operator": "Exists", "values": ["x"]}]
    ),
    "unknown operator": at("selection.podSelector.matchExpressions", [{"key": "a", "operator": "Has"}]),
    "bad expression key": at(
        "selection.podSelector.matchExpressions", [{"key": "a b", "operator": "Exists"}]
    ),
    "bad matchLabels key": at("selection.namespaceSelector.matchLabels", {"a b": "x"}),
    "bad matchLabels value": at("selection.namespaceSelector.matchLabels", {"a": "-x"}),
    "33 matchLabels": at("selection.namespaceSelector.matchLabels", {f"k{i}": "v" for i in range(33)}),
    "network without prefix": at("selection.networks", [{"name": "n", "cidr": "10.0.0.0"}]),
    "network netmask": at("selection.networks", [{"name": "n", "cidr": "10.0.0.0/255.0.0.0"}]),
    "network /33": at("selection.networks", [{"name": "n", "cidr": "10.0.0.0/33"}]),
    "network garbage": at("selection.networks", [{"name": "n", "cidr": "not-a-net"}]),
    "network name": at("selection.networks", [{"name": "N!", "cidr": "10.0.0.0/8"}]),
    "65 networks": at("selection.networks", [{"name": f"n{i}", "cidr": f"10.{i}.0.0/16"} for i in range(65)]),
    "no metrics": at("metrics", []),
    "unknown metric": at("metrics", ["bytes"]),
    "metric twice": at("metrics", ["rtt", "rtt"]),
    "groupBy twice": at("aggregation.groupBy", ["service", "service"]),
    "groupBy empty": at("aggregation.groupBy", []),
    "unknown dimension": at("aggregation.groupBy", ["client_ip"]),
    "maxSeries 0": at("aggregation.maxSeries", 0),
    "maxSeries too big": at("aggregation.maxSeries", 100001),
    "maxSeries string": at("aggregation.maxSeries", "10"),
    "maxSeries bool": at("aggregation.maxSeries", True),
    "ttl 9s": at("aggregation.seriesTTL", "9s"),
    "ttl 24h1s": at("aggregation.seriesTTL", "24h1s"),
    "ttl 2d": at("aggregation.seriesTTL", "2d"),
    "ttl empty": at("aggregation.seriesTTL", ""),
    "ttl with space": at("aggregation.seriesTTL", "5 m"),
    "ttl weeks": at("aggregation.seriesTTL", "1w"),
    "ttl wrong order": at("aggregation.seriesTTL", "5s1m"),
    "interval 0s": at("scrape.interval", "0s"),
    "interval 61m": at("scrape.interval", "61m"),
    "interval 1h1s": at("scrape.interval", "1h1s"),
    "buckets descending": at("aggregation.histogramBuckets.rtt", [0.1, 0.01]),
    "buckets duplicate": at("aggregation.histogramBuckets.connectDuration", [0.1, 0.1]),
    "bucket zero": at("aggregation.histogramBuckets.rtt", [0, 1]),
    "bucket negative": at("aggregation.histogramBuckets.rtt", [-1]),
    "bucket too big": at("aggregation.histogramBuckets.rtt", [3601]),
    "no buckets": at("aggregation.histogramBuckets.rtt", []),
    "31 buckets": at("aggregation.histogramBuckets.rtt", [i + 1 for i in range(31)]),
    "monitor label value": at("scrape.serviceMonitorLabels", {"release": "a b"}),
    "monitor label key": at("scrape.serviceMonitorLabels", {"-x": "a"}),
    "sensitivity low": at("alerting.baseline.sensitivity", 0.5),
    "ratio zero": at("alerting.health.retransmitRatio", 0),
    "ratio above one": at("alerting.health.connectFailureRatio", 1.5),
    "for not a duration": at("alerting.for", "abc"),
    "enabled string": at("alerting.enabled", "yes"),
    "baseline metric": at("alerting.baseline.metrics", ["rtt"]),
    "forbidden unknown env": at(
        "alerting.isolation",
        {"environments": ENVIRONMENTS[:1], "forbidden": [{"from": "staging", "to": "prod"}]},
    ),
    "forbidden without envs": at("alerting.isolation.forbidden", [{"from": "a", "to": "b"}]),
    "duplicate environments": at("alerting.isolation.environments", [ENVIRONMENTS[0], ENVIRONMENTS[0]]),
    "environment without selector": at("alerting.isolation.environments", [{"name": "x"}]),
    "include not a list": at("selection.namespaces.include", "shop"),
    "alert label reserved": at("alerting.labels", {"client_workload": "x"}),
    "alert label alertname": at("alerting.labels", {"alertname": "x"}),
    "alert label not a label name": at("alerting.labels", {"a-b": "x"}),
    "annotation not a label name": at("alerting.annotations", {"runbook url": "x"}),
    "33 alert labels": at("alerting.labels", {f"l{i}": "x" for i in range(33)}),
    "label key name too long": at("selection.podSelector.matchLabels", {"a" * 64: "x"}),
    "label key prefix uppercase": at("selection.podSelector.matchLabels", {"A.com/b": "x"}),
}


def flowmonitor(spec: dict, name: str = "web") -> dict:
    return {
        "apiVersion": "flowmon.io/v1alpha1",
        "kind": "FlowMonitor",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


def pydantic_accepts(spec: dict) -> bool:
    try:
        validate_spec(spec)
    except ValidationError:
        return False
    return True


def crd_errors(spec: dict) -> list[str]:
    return schemas.custom_resource_errors(flowmonitor(spec), CRD)


@pytest.mark.parametrize("spec", VALID.values(), ids=VALID.keys())
def test_both_accept(spec):
    assert pydantic_accepts(spec)
    assert crd_errors(spec) == []


@pytest.mark.parametrize("spec", INVALID.values(), ids=INVALID.keys())
def test_both_reject(spec):
    assert not pydantic_accepts(spec)
    assert crd_errors(spec), "the CRD accepts what pydantic rejects"


# What the CRD cannot check on Kubernetes 1.30 (the CEL IP/CIDR library needs 1.31): the API server stores
# it, and the operator refuses it with Ready=False naming the field (test_operator_e2e).
OPERATOR_ONLY = {
    "network host bits": at("selection.networks", [{"name": "n", "cidr": "10.0.0.1/8"}]),
    "ipv6 host bits": at("selection.networks", [{"name": "n", "cidr": "fd00::1/8"}]),
    "ipv6 three colons": at("selection.networks", [{"name": "n", "cidr": "fd00:::/8"}]),
}


@pytest.mark.parametrize("spec", OPERATOR_ONLY.values(), ids=OPERATOR_ONLY.keys())
def test_pydantic_alone_rejects_what_cel_of_kubernetes_1_30_cannot_check(spec):
    assert not pydantic_accepts(spec)
    assert crd_errors(spec) == []


# CEL libraries of the Kubernetes API server, by the first minor that accepts them in a stored CRD (the
# apiserver's compatibility version lags a library's introduction by one minor).
CEL_FUNCTIONS_AFTER_1_30 = {
    **dict.fromkeys(
        ["ip", "isIP", "cidr", "isCIDR", "containsIP", "containsCIDR", "masked", "prefixLength",
         "isCanonical", "family", "isLoopback", "isUnspecified", "isLinkLocalMulticast",
         "isLinkLocalUnicast", "isGlobalUnicast"],
        "1.31 (IP/CIDR library)",
    ),
    "format": "1.31 (format library)",
    **dict.fromkeys(["semver", "isSemver", "major", "minor", "patch"], "1.33 (semver library)"),
}  # fmt: skip


def test_cel_rules_use_only_libraries_the_oldest_supported_kubernetes_has():
    used = {
        name: path
        for path, node in walk(SPEC, "spec")
        for rule in node.get("x-kubernetes-validations", [])
        for name in re.findall(
            r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.sub(r"'(?:[^'\\]|\\.)*'", "''", rule["rule"])
        )
    }
    too_new = {
        name: (path, CEL_FUNCTIONS_AFTER_1_30[name])
        for name, path in used.items()
        if name in CEL_FUNCTIONS_AFTER_1_30
    }
    assert too_new == {}
    assert {"matches", "all", "isSorted"} <= set(used)  # the scan sees the rules


@pytest.mark.parametrize("spec", VALID.values(), ids=VALID.keys())
def test_crd_defaults_equal_pydantic_defaults(spec):
    """The API server's structural defaulting yields the spec pydantic would (so the stored object is
    the whole truth, and `kubectl get -o yaml` shows the effective settings)."""
    defaulted = schemas.apply_defaults(SPEC, copy.deepcopy(spec))
    assert without_nulls(defaulted) == validate_spec(spec).dump()


def without_nulls(value):
    """An explicit null of a nullable field is stored as null; pydantic's dump omits None: same meaning."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("name", "accepted"), [("web", True), ("a" * 63, True), ("a.b", False), ("a" * 64, False), ("-a", False)]
)
def test_monitor_names_are_dns_labels(name, accepted):
    from flowmon_contract.spec import ObjectMeta

    try:
        ObjectMeta(name=name)
        model_ok = True
    except ValidationError:
        model_ok = False
    errors = schemas.custom_resource_errors(flowmonitor({}, name=name), CRD)
    assert model_ok is accepted and (errors == []) is accepted, errors


def test_validator_flags_the_reason():
    """The evaluation names the CEL rule's message and path, so a failure above is debuggable."""
    errors = crd_errors(at("selection.namespaces", {"include": ["a"], "exclude": ["a"]}))
    assert errors == ["spec.selection.namespaces: a namespace may not be both included and excluded"]


def test_lax_pydantic_differs_only_on_json_types():
    """Why validate_spec is strict: pydantic's default lax mode would take "10" as an integer."""
    doc = at("aggregation.maxSeries", "10")
    assert FlowMonitorSpec.model_validate(doc).aggregation.max_series == 10
    assert not pydantic_accepts(doc) and crd_errors(doc)
