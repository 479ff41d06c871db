"""Writes flowmon's Grafana dashboards (`python dashboards/build.py`); tests/test_dashboards.py holds
the JSON files equal to what this writes, runs every panel's query against a real Prometheus, and
checks their structure. Metric names come from flowmon_contract.metrics, the health thresholds drawn
from the defaults of spec.alerting.health, so the dashboards follow the exporter and the alert rules.

Every dashboard has a `datasource` variable (no datasource UID is written anywhere) and a `monitor`
variable (the `flowmon_monitor` target label the operator's ServiceMonitors add); flow dashboards
also have `namespace` (a pair is shown when either end is in it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flowmon_contract.alerting import HealthAlerting
from flowmon_contract.metrics import METRICS, VIOLATION_BYTES, VIOLATIONS
from flowmon_contract.spec import Metric

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PAIR = "client_namespace, client_workload, server_namespace, server_workload"
WINDOW = "$__rate_interval"
MSS = 1448  # as the alert rules estimate segments from bytes
HEALTH = HealthAlerting()


def name(metric: Metric, suffix: str = "") -> str:
    info = METRICS[metric]
    return info.name + ("_total" if info.type == "counter" else "") + suffix


SENT, RECEIVED = name(Metric.SENT_BYTES), name(Metric.RECEIVED_BYTES)
OPENED, FAILURES = name(Metric.CONNECTIONS_OPENED), name(Metric.CONNECT_FAILURES)
RETRANSMITS, RESETS = name(Metric.RETRANSMITS), name(Metric.RESETS)
RTT = name(Metric.RTT, "_bucket")
UDP_SENT, UDP_RECEIVED = name(Metric.UDP_SENT_BYTES), name(Metric.UDP_RECEIVED_BYTES)
UDP_SENT_DATAGRAMS, UDP_RECEIVED_DATAGRAMS = (
    name(Metric.UDP_SENT_DATAGRAMS),
    name(Metric.UDP_RECEIVED_DATAGRAMS),
)
DNS_REQUESTS, DNS_LATENCY = name(Metric.DNS_REQUESTS), name(Metric.DNS_LATENCY, "_bucket")
CLIENT = "client_namespace, client_workload"
PAIR_LEGEND = "{{client_namespace}}/{{client_workload}} → {{server_namespace}}/{{server_workload}}"


def flows(metric: str, fn: str = "rate", window: str = WINDOW, matchers: str = "") -> str:
    """`fn(metric[window])` of the selected monitor's pairs with either end in $namespace."""
    monitor = 'flowmon_monitor="$monitor"' + (f",{matchers}" if matchers else "")
    client = f'{metric}{{{monitor},client_namespace=~"$namespace"}}'
    server = f'{metric}{{{monitor},server_namespace=~"$namespace"}}'
    if fn == "":
        return f"({client} or {server})"
    return f"({fn}({client}[{window}]) or {fn}({server}[{window}]))"


def by(labels: str, expr: str) -> str:
    return f"sum by ({labels}) ({expr})"


def cross_zone(expr_by_zones: str) -> str:
    """Only the series whose client_zone differs from server_zone (PromQL cannot compare two labels:
    drop those matching a copy of server_zone into client_zone)."""
    same = (
        f'label_replace(sum by (server_zone) ({expr_by_zones}), "client_zone", "$1", "server_zone", "(.+)")'
    )
    return f"({expr_by_zones} unless on (client_zone, server_zone) {same})"


# --- panels --------------------------------------------------------------------------------------


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> dict:
    result = {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        result |= {"instant": True, "range": False, "format": "table"}
    return result


def panel(title: str, targets: list[dict], *, kind: str = "timeseries", unit: str = "short",
          width: int = 12, height: int = 8, threshold: float | None = None, description: str = "",
          **extra) -> dict:  # fmt: skip
    defaults: dict = {"unit": unit}
    if threshold is not None:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": threshold}],
        }
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"w": width, "h": height},
        **extra,
    }


def row(title: str) -> dict:
    """A section header (Grafana's row panel, expanded): it has no query."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[dict]) -> list[dict]:
    """Ids 1..n and positions left to right, top to bottom (24 columns)."""
    x = y = row_height = 0
    for i, p in enumerate(panels, start=1):
        grid = p["gridPos"]
        if x + grid["w"] > 24:
            x, y, row_height = 0, y + row_height, 0
        p["id"], grid["x"], grid["y"] = i, x, y
        x, row_height = x + grid["w"], max(row_height, grid["h"])
    return panels


# --- variables -----------------------------------------------------------------------------------


def datasource_variable() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"}


def query_variable(
    var: str, query: str, *, current: str = "", multi: bool = False, all_value: str | None = ".*"
) -> dict:
    """A variable from `label_values(...)`; a multi one starts at All (`all_value`, or when None
    every value the query offers)."""
    result = {
        "name": var,
        "label": var.capitalize(),
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{var}-values"},
        "definition": query,
        "refresh": 2,  # on time range change: monitors and namespaces come and go
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
    }
    if multi:
        result |= {"allValue": all_value, "current": {"text": "All", "value": "$__all"}}
    elif current:
        result["current"] = {"text": current, "value": current}
    return result


def flow_variables(monitor_query: str, default_monitor: str, namespace_metric: str) -> list[dict]:
    return [
        datasource_variable(),
        query_variable("monitor", monitor_query, current=default_monitor),
        query_variable(
            "namespace",
            f'label_values({namespace_metric}{{flowmon_monitor="$monitor"}}, client_namespace)',
            multi=True,
        ),
    ]


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["flowmon"],
        "timezone": "browser",
        "schemaVersion": 39,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": layout(panels),
    }


# --- the dashboards ------------------------------------------------------------------------------


def all_bytes(labels: str, metrics: tuple[str, ...] = (SENT, RECEIVED, UDP_SENT, UDP_RECEIVED)) -> str:
    """Bytes/s of TCP and UDP together, summed by `labels`. Each rate is tagged with its metric first:
    rate() drops the name, and `or` would otherwise keep only TCP's series for a pair that has both."""
    tagged = " or ".join(f'label_replace({flows(m)}, "metric", "{m}", "", "")' for m in metrics)
    return by(labels, tagged)


def node_graph() -> dict:
    """Grafana's Node Graph: a `nodes` frame (id, title, mainstat) and an `edges` frame (id, source,
    target, mainstat), built from the pairs with label_join; TCP and UDP bytes (DNS is a UDP pair)."""
    source = f'label_join(({all_bytes(PAIR)}), "source", "/", "client_namespace", "client_workload")'
    target_ = f'label_join({source}, "target", "/", "server_namespace", "server_workload")'
    edges = f'sum by (id, source, target) (label_join({target_}, "id", " → ", "source", "target"))'
    as_client, as_server = (
        f"label_join({all_bytes(f'{side}_namespace, {side}_workload', metrics)}, "
        f'"id", "/", "{side}_namespace", "{side}_workload")'
        for side, metrics in (("client", (SENT, UDP_SENT)), ("server", (RECEIVED, UDP_RECEIVED)))
    )
    nodes = f'label_join(sum by (id) ({as_client} or {as_server}), "title", "", "id")'
    return panel(
        "Service map (bytes/s)",
        [target(nodes, ref="nodes", instant=True), target(edges, ref="edges", instant=True)],
        kind="nodeGraph",
        unit="Bps",
        width=24,
        height=14,
        description="Workloads and the pairs that talked, by TCP and UDP bytes/s both ways.",
        transformations=[
            {
                "id": "organize",
                "options": {"renameByName": {"Value #nodes": "mainstat", "Value #edges": "mainstat"}},
            }
        ],
    )


def both_ways(title: str, sent: str, received: str, unit: str, description: str) -> dict:
    """One panel, a line per pair and direction (→ client to server, ← back)."""
    return panel(
        title,
        [
            target(by(PAIR, flows(sent)), f"{PAIR_LEGEND} →"),
            target(by(PAIR, flows(received)), f"{PAIR_LEGEND} ←", "B"),
        ],
        unit=unit,
        description=description,
    )


def udp_panels() -> list[dict]:
    return [
        row("UDP"),
        both_ways(
            "UDP bytes/s by pair",
            UDP_SENT,
            UDP_RECEIVED,
            "Bps",
            "Payload bytes; the client is the end that sent the pair's first datagram.",
        ),
        both_ways(
            "UDP datagrams/s by pair",
            UDP_SENT_DATAGRAMS,
            UDP_RECEIVED_DATAGRAMS,
            "pps",
            "Datagrams each way (a GSO/GRO train counts its datagrams).",
        ),
    ]


def overview() -> dict:
    panels = [
        node_graph(),
        panel(
            "Top pairs by bytes/s (both ways)",
            [target(f"topk(20, {all_bytes(PAIR)})", instant=True)],
            kind="table",
            unit="Bps",
            description="TCP and UDP bytes/s together.",
        ),
        panel("Bytes/s sent by pair", [target(by(PAIR, flows(SENT)))], unit="Bps"),
        panel("Connections opened/s by pair", [target(by(PAIR, flows(OPENED)))], unit="cps"),
        panel(
            "Failed connects/s by pair and reason",
            [target(by(f"{PAIR}, reason", flows(FAILURES)))],
            unit="cps",
        ),
        *udp_panels(),
    ]
    return dashboard(
        "flowmon-overview",
        "flowmon / Overview",
        "The service map of a FlowMonitor: who talks to whom, how much, and what fails.",
        flow_variables(
            f'label_values({SENT}{{client_workload!=""}}, flowmon_monitor)',
            "flowmon-system/service-map",
            SENT,
        ),
        panels,
    )


def health() -> dict:
    failures, opened = by(PAIR, flows(FAILURES)), by(PAIR, flows(OPENED))
    panels = [
        panel(
            "RTT p50 by pair", [target(f"histogram_quantile(0.5, {by(f'le, {PAIR}', flows(RTT))})")], unit="s"
        ),
        panel(
            "RTT p99 by pair",
            [target(f"histogram_quantile(0.99, {by(f'le, {PAIR}', flows(RTT))})")],
            unit="s",
            threshold=HEALTH.rtt_p99_seconds,
            description="The line is the default rttP99Seconds alert threshold.",
        ),
        panel(
            "Retransmit ratio by pair (segments ≈ bytes / 1448)",
            [target(f"{by(PAIR, flows(RETRANSMITS))} / ({by(PAIR, flows(SENT))} / {MSS})")],
            unit="percentunit",
            threshold=HEALTH.retransmit_ratio,
            description="The line is the default retransmitRatio alert threshold.",
        ),
        panel("Retransmits/s by pair and direction", [target(by(f"{PAIR}, direction", flows(RETRANSMITS)))]),
        panel(
            "Failed connect ratio by pair",
            [target(f"{failures} / ({failures} + ({opened} or {failures} * 0))")],
            unit="percentunit",
            threshold=HEALTH.connect_failure_ratio,
            description="The line is the default connectFailureRatio alert threshold.",
        ),
        panel(
            "Failed connects/s by pair and reason",
            [target(by(f"{PAIR}, reason", flows(FAILURES)))],
            unit="cps",
        ),
        panel("Resets/s by pair and direction", [target(by(f"{PAIR}, direction", flows(RESETS)))], width=24),
        *dns_panels(),
    ]
    return dashboard(
        "flowmon-health",
        "flowmon / Health",
        "Per workload pair: RTT, retransmits, resets and failed connects, with the default alert thresholds; "
        "DNS per client workload and server.",
        flow_variables(
            f'label_values({RTT}{{client_workload!=""}}, flowmon_monitor)', "flowmon-system/service-map", SENT
        ),
        panels,
    )


def dns_panels() -> list[dict]:
    """DNS per client workload (and server): what the DNS alert rules watch (flowmon_operator.dns_rules)."""
    requests = by(CLIENT, flows(DNS_REQUESTS))
    failing = by(CLIENT, flows(DNS_REQUESTS, matchers='rcode=~"NXDOMAIN|SERVFAIL"'))
    timeouts = by(CLIENT, flows(DNS_REQUESTS, matchers='rcode="timeout"'))
    client_legend = "{{client_namespace}}/{{client_workload}}"
    return [
        row("DNS"),
        panel(
            "DNS queries/s by client workload and answer code",
            [target(by(f"{CLIENT}, rcode", flows(DNS_REQUESTS)), f"{client_legend} {{{{rcode}}}}")],
            unit="reqps",
            description="rcode `timeout`: a query never answered.",
        ),
        panel(
            "DNS NXDOMAIN and SERVFAIL share by client workload",
            [target(f"({failing} or {requests} * 0) / {requests}", client_legend)],
            unit="percentunit",
            description="Answers that say the name does not exist or the resolver failed, of all queries.",
        ),
        panel(
            "DNS p99 latency by client workload and server",
            [target(f"histogram_quantile(0.99, {by(f'le, {PAIR}', flows(DNS_LATENCY))})", PAIR_LEGEND)],
            unit="s",
            threshold=HEALTH.dns_latency_p99_seconds,
            description="Query → answer. The line is the default dnsLatencyP99Seconds alert threshold.",
        ),
        panel(
            "DNS timeouts/s by client workload",
            [target(f"{timeouts} or {requests} * 0", client_legend)],
            unit="reqps",
            description="Queries never answered (0 for a workload whose queries were all answered).",
        ),
    ]


def cost() -> dict:
    zones = "client_zone, server_zone"
    zoned = 'client_zone!="",server_zone!=""'  # both ends in a known zone (not a node or external peer)
    both = " + ".join(
        by(f"{zones}, client_namespace, server_namespace", flows(m, matchers=zoned)) for m in (SENT, RECEIVED)
    )
    total_range = " + ".join(by(zones, flows(m, "increase", "$__range")) for m in (SENT, RECEIVED))
    outside = 'flowmon_monitor="$monitor",client_namespace=~"$namespace",server_namespace=""'
    external = " + ".join(
        by(f"{zones}, client_namespace", f"rate({m}{{{outside}}}[{WINDOW}])") for m in (SENT, RECEIVED)
    )
    panels = [
        panel(
            "Cross-zone bytes/s by zone pair",
            [target(by(zones, cross_zone(both)), "{{client_zone}} → {{server_zone}}")],
            unit="Bps",
        ),
        panel(
            "Cross-zone bytes/s by namespace pair",
            [target(f"topk(20, {cross_zone(both)})", instant=True)],
            kind="table",
            unit="Bps",
        ),
        panel(
            "Bytes by zone pair over the time range",
            [target(total_range, instant=True)],
            kind="table",
            unit="bytes",
        ),
        panel(
            "External bytes/s by namespace (the server outside every namespace)",
            [target(external)],
            unit="Bps",
        ),
    ]
    return dashboard(
        "flowmon-cost",
        "flowmon / Cost",
        "Bytes that cross zones or leave the cluster, by pair and zone.",
        flow_variables(
            f'label_values({SENT}{{client_zone!=""}}, flowmon_monitor)', "flowmon-system/cost-by-zone", SENT
        ),
        panels,
    )


def isolation() -> dict:
    violations, vbytes = VIOLATIONS.name + "_total", VIOLATION_BYTES.name + "_total"
    envs = "from_env, to_env"
    panels = [
        panel(
            "Violations by environment pair and workload pair (since the agents started)",
            [target(by(f"{envs}, {PAIR}", flows(violations, "")), instant=True)],
            kind="table",
            width=24,
        ),
        panel(
            "New violations by environment pair",
            [target(by(envs, flows(violations, "increase")), "{{from_env}} → {{to_env}}")],
        ),
        panel(
            "Violation bytes by environment pair",
            [target(by(envs, flows(vbytes, "increase")), "{{from_env}} → {{to_env}}")],
            unit="bytes",
        ),
        panel(
            "Violations in the time range",
            [target(f"sum({flows(violations, 'increase', '$__range')})", instant=True)],
            kind="stat",
            width=24,
            height=5,
        ),
    ]
    return dashboard(
        "flowmon-isolation",
        "flowmon / Isolation",
        "Connections between environments that spec.alerting.isolation forbids.",
        flow_variables(
            f"label_values({violations}, flowmon_monitor)", "flowmon-system/environment-isolation", violations
        ),
        panels,
    )


def agents() -> dict:
    job = 'job=~"$job"'
    poll = by("le, instance", f"rate(flowmon_agent_poll_duration_seconds_bucket{{{job}}}[{WINDOW}])")
    panels = [
        panel("Agents up", [target(f"up{{{job}}}", "{{instance}}")], kind="stat"),
        panel(
            "Series exported per monitor",
            [target(f'sum by (monitor) (flowmon_agent_series{{{job},monitor=~"$monitor"}})', "{{monitor}}")],
        ),
        panel(
            "Poll time p50 and p99",
            [
                target(
                    f"histogram_quantile(0.5, {poll})",
                    "p50 {{instance}}",
                ),
                target(
                    f"histogram_quantile(0.99, {poll})",
                    "p99 {{instance}}",
                    "B",
                ),
            ],
            unit="s",
        ),
        panel(
            "Poll errors/s",
            [
                target(
                    f"sum by (instance) (rate(flowmon_agent_poll_errors_total{{{job}}}[{WINDOW}]))",
                    "{{instance}}",
                )
            ],
        ),
        panel(
            "Flows folded into __overflow__ /s (maxSeries reached)",
            [
                target(
                    by(
                        "monitor",
                        f'rate(flowmon_agent_series_overflow_total{{{job},monitor=~"$monitor"}}[{WINDOW}])',
                    ),
                    "{{monitor}}",
                )
            ],
        ),
        panel(
            "Flow entries dropped/s (full kernel maps)",
            [
                target(
                    f"sum by (instance, reason) (rate(flowmon_agent_flows_dropped_total{{{job}}}[{WINDOW}]))",
                    "{{instance}} {{reason}}",
                )
            ],
        ),
        panel(
            "Resident memory",
            [target(f"process_resident_memory_bytes{{{job}}}", "{{instance}}")],
            unit="bytes",
        ),
        panel(
            "CPU",
            [target(f"rate(process_cpu_seconds_total{{{job}}}[{WINDOW}])", "{{instance}}")],
            unit="percentunit",
        ),
        panel(
            "Scrape time per target",
            [
                target(
                    'scrape_duration_seconds{flowmon_monitor=~"$monitor"} or scrape_duration_seconds{'
                    + job
                    + "}",
                    "{{job}} {{instance}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Collector time in the last scrape",
            [
                target(
                    f"flowmon_agent_scrape_collector_duration_seconds{{{job}}}", "{{instance}} {{collector}}"
                )
            ],
            unit="s",
        ),
        panel(
            "Metadata age",
            [target(f"flowmon_agent_metadata_age_seconds{{{job}}}", "{{instance}}")],
            unit="s",
            width=24,
        ),
    ]
    variables = [
        datasource_variable(),
        # only the jobs that scrape the agents' own /metrics (not .*: every monitor's job has `up` too)
        query_variable("job", "label_values(flowmon_agent_info, job)", multi=True, all_value=None),
        query_variable("monitor", "label_values(flowmon_agent_series, monitor)", multi=True),
    ]
    return dashboard(
        "flowmon-agents",
        "flowmon / Agents",
        "The agents themselves: up, poll time, overflow and full-map counters, memory, scrape time.",
        variables,
        panels,
    )


DASHBOARDS = {"overview": overview, "health": health, "cost": cost, "isolation": isolation, "agents": agents}


def rendered() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {
        f"flowmon-{key}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
        for key, build in DASHBOARDS.items()
    }


def main() -> int:
    for file_name, text in rendered().items():
        (HERE / file_name).write_text(text)
        print(f"wrote dashboards/{file_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
