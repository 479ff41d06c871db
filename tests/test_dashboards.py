"""The Grafana dashboards: the JSON is what dashboards/build.py writes, its structure holds, the
kustomization makes labelled ConfigMaps, and every panel's query returns data from a real Prometheus
scraping the running demo's agents (empty only where the demo lacks the panel's subject, listed below)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
OUTPUT = ROOT / "tests" / "output"  # git-ignored
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FLOW_DASHBOARDS = ("flowmon-overview", "flowmon-health", "flowmon-cost", "flowmon-isolation")
# (dashboard uid, panel title) → why the demo gives it no series
EMPTY_ALLOWED = {
    ("flowmon-health", "Resets/s by pair and direction"): "the service-map monitor does not export resets",
}
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__range": "5m"}


def builder():
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {d["uid"]: d for d in (json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json")))}


def test_json_files_are_what_the_builder_writes() -> None:
    rendered = builder().rendered()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for file_name, text in rendered.items():
        assert (DASHBOARDS / file_name).read_text() == text, f"run: python dashboards/build.py ({file_name})"


def datasources(node) -> list:
    """Every `datasource` value anywhere in the JSON."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "datasource"] + [
            d for v in node.values() for d in datasources(v)
        ]
    if isinstance(node, list):
        return [d for v in node for d in datasources(v)]
    return []


@pytest.mark.parametrize("uid", [*FLOW_DASHBOARDS, "flowmon-agents"])
def test_dashboard_structure(uid: str) -> None:
    board = dashboards()[uid]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert "monitor" in variables
    if uid in FLOW_DASHBOARDS:
        assert variables["namespace"]["multi"] and variables["namespace"]["allValue"] == ".*"
    # No datasource UID is written down: every reference is the variable.
    assert all(d == DATASOURCE for d in datasources(board)), {json.dumps(d) for d in datasources(board)}
    text = json.dumps(board)
    assert "$monitor" in text and (uid not in FLOW_DASHBOARDS or "$namespace" in text)
    for p in panels:
        if p["type"] == "row":  # a section header: no query
            assert not p.get("targets") and p["gridPos"]["w"] == 24, p["title"]
            continue
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))


def test_health_panels_draw_the_default_alert_thresholds() -> None:
    from flowmon_contract.alerting import HealthAlerting

    defaults = HealthAlerting()
    drawn = {
        p["title"]: p["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"]
        for p in dashboards()["flowmon-health"]["panels"]
        if "thresholds" in p.get("fieldConfig", {}).get("defaults", {})
    }
    assert sorted(drawn.values()) == sorted(
        [
            defaults.retransmit_ratio,
            defaults.connect_failure_ratio,
            defaults.rtt_p99_seconds,
            defaults.dns_latency_p99_seconds,
        ]
    )


def test_kustomization_makes_configmaps_for_the_grafana_sidecar() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(DASHBOARDS)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    maps = list(yaml.safe_load_all(built))
    assert len(maps) == len(dashboards())
    for cm in maps:
        assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((file_name, text),) = cm["data"].items()
        assert text == (DASHBOARDS / file_name).read_text()


# --- every panel's query against a real Prometheus scraping the demo's agents --------------------------


def api(prometheus_url: str, path: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/{path}?{query}", timeout=10) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as exc:  # Prometheus says why in the body
        raise AssertionError(f"{params}: {exc.read().decode()}") from None
    assert answer["status"] == "success", answer
    return answer["data"]


def variable_values(prometheus_url: str, definition: str, substitutions: dict[str, str]) -> list[str]:
    """Grafana's `label_values(SELECTOR, LABEL)`, asked of Prometheus as Grafana asks it."""
    match = re.fullmatch(r"label_values\((.*), (\w+)\)", definition)
    assert match, definition
    selector = substitute(match.group(1), substitutions)
    return api(prometheus_url, f"label/{match.group(2)}/values", **{"match[]": selector})


def substitute(expr: str, substitutions: dict[str, str]) -> str:
    for name, value in sorted({**GRAFANA_MACROS, **substitutions}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name if name.startswith("$__") else f"${name}", value)
    return expr


def resolve_variables(prometheus_url: str, board: dict) -> dict[str, str]:
    """The values a fresh Grafana would use: a multi variable's All (.*), a single one's default, which
    its query must offer."""
    values: dict[str, str] = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        if var["multi"]:  # All: the variable's allValue, or every value its query offers (Grafana's regex)
            offered = variable_values(prometheus_url, var["definition"], values)
            assert offered, var["name"]
            alternatives = "|".join(re.escape(v).replace("\\", "\\\\") for v in offered)  # in a PromQL string
            values[var["name"]] = var["allValue"] or f"({alternatives})"
            continue
        offered = variable_values(prometheus_url, var["definition"], values)
        assert var["current"]["value"] in offered, (var["name"], offered)
        values[var["name"]] = var["current"]["value"]
    return values


@pytest.mark.root
@pytest.mark.slow
def test_every_panel_query_returns_data_from_the_demo(running_demo) -> None:
    url = running_demo.prometheus.url
    pending = {}
    for uid, board in dashboards().items():
        deadline = time.monotonic() + 60
        while True:  # the variables' series appear with the first scrapes
            try:
                values = resolve_variables(url, board)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for p in board["panels"]:
            for t in p.get("targets", []):
                pending[(uid, p["title"], t["refId"])] = substitute(t["expr"], values)
    results: dict = {}
    deadline = time.monotonic() + 120  # rates over 1m need a few scrapes of the new Prometheus
    while True:
        for key, expr in pending.items():
            results[key] = api(url, "query", query=expr)["result"]
        missing = [k for k, r in results.items() if not r and k[:2] not in EMPTY_ALLOWED]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    OUTPUT.mkdir(exist_ok=True)  # what each panel answered, for whoever reads a failure
    (OUTPUT / "dashboard-queries.json").write_text(
        json.dumps(
            [{"panel": list(k), "expr": pending[k], "series": len(r)} for k, r in results.items()], indent=1
        )
    )
    assert not missing, {k: pending[k] for k in missing}
    # ... and the panels allowed to be empty are the ones whose subject the demo lacks: the list is exact.
    assert {k[:2] for k, r in results.items() if not r} == set(EMPTY_ALLOWED)
    up = results["flowmon-agents", "Agents up", "A"]
    assert sorted(r["metric"]["job"] for r in up) == ["flowmon-agent", "flowmon-agent"]  # the two agents
    # The service map's frames carry what the Node Graph panel needs.
    nodes = results["flowmon-overview", "Service map (bytes/s)", "nodes"]
    edges = results["flowmon-overview", "Service map (bytes/s)", "edges"]
    assert {"shop/frontend", "payments/api", "shop-staging/frontend"} <= {r["metric"]["id"] for r in nodes}
    assert all(r["metric"]["title"] == r["metric"]["id"] for r in nodes)
    pairs = {(r["metric"]["source"], r["metric"]["target"]) for r in edges}
    assert ("shop/frontend", "shop/cart") in pairs
    # UDP pairs too: the demo's workloads talk to the resolver in kube-system over UDP only.
    assert any(t.startswith("kube-system/") for _, t in pairs), pairs
    assert any(r["metric"]["id"].startswith("kube-system/") for r in nodes)
    cross = results["flowmon-cost", "Cross-zone bytes/s by zone pair", "A"]
    assert cross and all(r["metric"]["client_zone"] != r["metric"].get("server_zone", "") for r in cross)
    # UDP beside TCP: the demo's DNS goes to the resolver behind kube-dns over UDP, both ways.
    for ref in ("A", "B"):
        udp = results["flowmon-overview", "UDP bytes/s by pair", ref]
        assert any(r["metric"]["server_namespace"] == "kube-system" for r in udp), ref
    dns = results["flowmon-health", "DNS queries/s by client workload and answer code", "A"]
    rcodes = {(r["metric"]["client_workload"], r["metric"]["rcode"]) for r in dns}
    assert {("catalog", "NXDOMAIN"), ("frontend", "NOERROR")} <= rcodes
    share = results["flowmon-health", "DNS NXDOMAIN and SERVFAIL share by client workload", "A"]
    by_client = {r["metric"]["client_workload"]: float(r["value"][1]) for r in share}
    assert (
        by_client["catalog"] == 1 and by_client["frontend"] == 0
    )  # asks only for a missing name / existing ones
    timeouts = results["flowmon-health", "DNS timeouts/s by client workload", "A"]
    assert {r["metric"]["client_workload"] for r in timeouts} >= {"catalog", "frontend"}  # 0: all answered
    violations = results[
        "flowmon-isolation",
        "Violations by environment pair and workload pair (since the agents started)",
        "A",
    ]
    assert any(
        r["metric"]["client_namespace"] == "shop-staging" and r["metric"]["server_workload"] == "api"
        for r in violations
    )
