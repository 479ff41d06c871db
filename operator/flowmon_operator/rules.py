"""A FlowMonitor's `spec.alerting` → one PrometheusRule: baselines, anomalies, isolation, health.

Pure rendering; docs/alerting.md explains the method. Every expression selects only this monitor's
series by the `flowmon_monitor="<namespace>/<name>"` target label (added by the monitor's ServiceMonitor,
see `monitor_relabeling`) and sums Prometheus target labels away, keeping the workload pair labels
present in the monitor's groupBy. Recorded series keep `flowmon_monitor`, so monitors sharing a
namespace never write the same series.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowmon_contract import metrics
from flowmon_contract.alerting import DAY_SECONDS, AlertingSpec
from flowmon_contract.metrics import METRICS
from flowmon_contract.model_base import duration_seconds
from flowmon_contract.spec import Dimension, FlowMonitor, Metric
from flowmon_operator.dns_rules import DNS_ALERT_NAMES, DNS_SEVERITY, dns_rules
from flowmon_operator.labels import monitor_labels, owned_by

MONITOR_LABEL = "flowmon_monitor"
PAIR_LABELS: tuple[str, ...] = tuple(
    str(d)
    for d in (
        Dimension.CLIENT_NAMESPACE,
        Dimension.CLIENT_WORKLOAD,
        Dimension.SERVER_NAMESPACE,
        Dimension.SERVER_WORKLOAD,
    )
)
ISOLATION_LABELS = metrics.ISOLATION_LABEL_NAMES
VIOLATIONS = f"{metrics.VIOLATIONS.name}_total"
VIOLATION_BYTES = f"{metrics.VIOLATION_BYTES.name}_total"

ALERT_NAMES = (
    "FlowmonTrafficAnomaly",
    "FlowmonNewDependency",
    "FlowmonIsolationViolation",
    "FlowmonRetransmitsHigh",
    "FlowmonConnectFailuresHigh",
    "FlowmonRTTHigh",
    "FlowmonResetsHigh",
    *DNS_ALERT_NAMES,
)

EVALUATION_INTERVAL = "1m"
MIN_RATE_WINDOW = 300  # seconds; widened to 4 scrapes so that rate() always has samples to work with
MIN_EVENT_WINDOW = 600  # how long an isolation violation keeps its alert firing
SAME_HOUR_SECONDS = 3600  # each previous day contributes its mean over the hour centred on now
NEW_PAIR_HOLD = "1h"  # a new dependency alerts for 1-2 h, then the pair counts as known
SPREAD_FLOOR_RATIO = 0.2  # spread is at least 20% of the baseline: identical days must not make the spread 0
SEGMENT_BYTES = 1448  # a full Ethernet MSS: sent segments are estimated from bytes
SEVERITY = {
    "FlowmonTrafficAnomaly": "warning",
    "FlowmonNewDependency": "info",
    "FlowmonIsolationViolation": "critical",
    "FlowmonRetransmitsHigh": "warning",
    "FlowmonConnectFailuresHigh": "warning",
    "FlowmonRTTHigh": "warning",
    "FlowmonResetsHigh": "warning",
    **DNS_SEVERITY,
}


def prom_duration(seconds: int) -> str:
    """Seconds → the shortest Prometheus duration ("90s" → "1m30s", 86400 → "1d")."""
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def monitor_value(monitor: FlowMonitor) -> str:
    return f"{monitor.metadata.namespace}/{monitor.metadata.name}"


def monitor_relabeling(monitor: FlowMonitor) -> dict:
    """The ServiceMonitor endpoint relabeling that marks every scraped series with its monitor."""
    return {"action": "replace", "targetLabel": MONITOR_LABEL, "replacement": monitor_value(monitor)}


def rule_name(monitor: FlowMonitor) -> str:
    return f"flowmon-{monitor.metadata.name}"


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What every expression of one monitor needs."""

    monitor: FlowMonitor
    sel: str  # matcher selecting this monitor's series
    pair: tuple[str, ...]  # pair labels present in groupBy
    window: str  # rate window
    event_window: str

    @property
    def alerting(self) -> AlertingSpec:
        return self.monitor.spec.alerting

    @property
    def by(self) -> str:
        return ", ".join((MONITOR_LABEL, *self.pair))

    def has(self, *metrics: Metric) -> bool:
        return all(m in self.monitor.spec.metrics for m in metrics)

    def rate(self, series: str) -> str:
        return f"sum by ({self.by}) (rate({series}{{{self.sel}}}[{self.window}]))"

    def record_name(self, metric: str, op: str) -> str:
        """`level:metric:operation`, the metric without `_total` (Prometheus' recording rule naming)."""
        return f"flowmon_pair:{metric.removesuffix('_total')}:{op}"

    def ref(self, name: str) -> str:
        return f"{name}{{{self.sel}}}"


def _context(monitor: FlowMonitor) -> _Ctx:
    scrape = duration_seconds(monitor.spec.scrape.interval)
    group_by = set(monitor.spec.aggregation.group_by)
    return _Ctx(
        monitor=monitor,
        sel=f'{MONITOR_LABEL}="{monitor_value(monitor)}"',
        pair=tuple(label for label in PAIR_LABELS if label in group_by),
        window=prom_duration(max(MIN_RATE_WINDOW, 4 * scrape)),
        event_window=prom_duration(max(MIN_EVENT_WINDOW, 4 * scrape)),
    )


def _counter(metric: Metric) -> str:
    return f"{METRICS[metric].name}_total"


def _pair_text(pair: tuple[str, ...]) -> str:
    """A template naming the pair with the labels that exist, e.g. `shop/web → shop/db`."""

    def end(side: str) -> str:
        parts = [
            f"{{{{ $labels.{side}_{what} }}}}"
            for what in ("namespace", "workload")
            if f"{side}_{what}" in pair
        ]
        return "/".join(parts) or f"any {side}"

    return f"{end('client')} → {end('server')}"


def _record(name: str, expr: str) -> dict:
    return {"record": name, "expr": expr}


def _alert(
    ctx: _Ctx, name: str, expr: str, summary: str, description: str, *, hold: bool = True, labels=None
) -> dict:
    rule: dict = {"alert": name, "expr": expr}
    if hold:
        rule["for"] = ctx.alerting.for_
    rule["labels"] = {"severity": SEVERITY[name], **(labels or {}), **ctx.alerting.labels}
    rule["annotations"] = {
        "summary": summary,
        "description": f"{description} FlowMonitor {monitor_value(ctx.monitor)}.",
        **ctx.alerting.annotations,
    }
    return rule


# --- baselines -------------------------------------------------------------------------------------


def _baseline_records(ctx: _Ctx, metric: Metric) -> list[dict]:
    base = ctx.alerting.baseline
    counter = _counter(metric)
    rate = ctx.record_name(counter, f"rate{ctx.window}")
    same_hour = ctx.record_name(counter, f"rate{ctx.window}_same_hour")
    days = []
    for k in range(1, base.days + 1):
        offset = prom_duration(k * DAY_SECONDS - SAME_HOUR_SECONDS // 2)
        window = prom_duration(SAME_HOUR_SECONDS)
        mean = f"avg_over_time({ctx.ref(rate)}[{window}] offset {offset})"
        days.append(f'label_replace({mean}, "days_ago", "{k}", "", "")')
    floor = _floor(ctx, metric)
    baseline = ctx.record_name(counter, "baseline")
    return [
        _record(rate, ctx.rate(counter)),
        _record(same_hour, "\nor ".join(days)),
        _record(baseline, f"avg without (days_ago) ({ctx.ref(same_hour)})"),
        _record(ctx.record_name(counter, "history_days"), f"count without (days_ago) ({ctx.ref(same_hour)})"),
        _record(
            ctx.record_name(counter, "spread"),
            f"stddev without (days_ago) ({ctx.ref(same_hour)})\n"
            f"  > clamp_min({SPREAD_FLOOR_RATIO} * {ctx.ref(baseline)}, {floor})\n"
            f"or clamp_min({SPREAD_FLOOR_RATIO} * {ctx.ref(baseline)}, {floor})",
        ),
        _record(
            ctx.record_name(counter, "score"),
            f"({ctx.ref(rate)} - {ctx.ref(baseline)}) / {ctx.ref(ctx.record_name(counter, 'spread'))}",
        ),
    ]


def _floor(ctx: _Ctx, metric: Metric) -> float:
    base = ctx.alerting.baseline
    return (
        base.min_connections_per_second if metric == Metric.CONNECTIONS_OPENED else base.min_bytes_per_second
    )


def _anomaly_alert(ctx: _Ctx, metric: Metric) -> dict:
    base = ctx.alerting.baseline
    counter = _counter(metric)
    score, rate = ctx.record_name(counter, "score"), ctx.record_name(counter, f"rate{ctx.window}")
    baseline, history = ctx.record_name(counter, "baseline"), ctx.record_name(counter, "history_days")
    floor, s = _floor(ctx, metric), base.sensitivity
    # Spikes page only above the idle floor, drops only for pairs whose baseline is above it.
    expr = (
        f"(\n  {ctx.ref(score)} > {s} and {ctx.ref(rate)} >= {floor}\n"
        f"or\n  {ctx.ref(score)} < -{s} and {ctx.ref(baseline)} >= {floor}\n)\n"
        f"and {ctx.ref(history)} >= {base.min_history_days}"
    )
    unit = "connections/s" if metric == Metric.CONNECTIONS_OPENED else "bytes/s"
    return _alert(
        ctx,
        "FlowmonTrafficAnomaly",
        expr,
        f"{metric} of {_pair_text(ctx.pair)} is "
        '{{ printf "%.1f" $value }} standard deviations from its baseline',
        f"The {metric} rate ({unit}, {ctx.window} window) of {_pair_text(ctx.pair)} is "
        '{{ printf "%.1f" $value }} standard deviations '
        "{{ if gt $value 0.0 }}above{{ else }}below{{ end }} its mean at this hour over the last "
        f"{base.days} days. Compare {rate} with {baseline}: look for a deploy, a retry loop, a batch job "
        "or a failing dependency.",
        labels={"metric": str(metric)},
    )


def _new_dependency(ctx: _Ctx) -> list[dict]:
    base = ctx.alerting.baseline
    present = ctx.record_name("flowmon_tcp", "present")
    present_1h = ctx.record_name("flowmon_tcp", "present_1h")
    monitor_present = "flowmon_monitor:flowmon_tcp:present"
    records = [
        _record(present, f'group by ({ctx.by}) ({{__name__=~"flowmon_tcp_.+", {ctx.sel}}})'),
        _record(present_1h, f"max_over_time({ctx.ref(present)}[1h])"),
        _record(monitor_present, f"group by ({MONITOR_LABEL}) ({ctx.ref(present)})"),
    ]
    # Known = seen in any hour of the baseline window ending NEW_PAIR_HOLD ago; hourly subquery steps
    # over the hourly maxima keep this cheap without missing short-lived pairs.
    history = prom_duration(base.min_history_days * DAY_SECONDS)
    expr = (
        f"{ctx.ref(present)}\n"
        f"unless on ({ctx.by}) max_over_time({ctx.ref(present_1h)}[{base.days}d:1h] offset {NEW_PAIR_HOLD})\n"
        f"and on ({MONITOR_LABEL}) present_over_time({ctx.ref(monitor_present)}[1d] offset {history})"
    )
    alert = _alert(
        ctx,
        "FlowmonNewDependency",
        expr,
        f"New dependency {_pair_text(ctx.pair)}",
        f"{_pair_text(ctx.pair)} talks for the first time in {base.days} days. If this dependency is "
        "intended, nothing to do (it counts as known within 2 hours); if not, find what configured the "
        "client to reach this server.",
        hold=False,
    )
    return [*records, alert]


# --- isolation and health --------------------------------------------------------------------------


def _isolation_alert(ctx: _Ctx) -> dict:
    by = ", ".join((MONITOR_LABEL, *ISOLATION_LABELS))
    w = ctx.event_window
    either = f'{{__name__=~"{VIOLATIONS}|{VIOLATION_BYTES}", {ctx.sel}}}'
    # increase() needs two samples of a series: a violation that creates its series is caught by the
    # third clause (a series that did not exist one window ago).
    expr = (
        f"sum by ({by}) (increase({VIOLATIONS}{{{ctx.sel}}}[{w}])) > 0\n"
        f"or sum by ({by}) (increase({VIOLATION_BYTES}{{{ctx.sel}}}[{w}])) > 0\n"
        f"or count by ({by}) ({either} unless {either} offset {w})"
    )
    pair = "{{ $labels.client_namespace }}/{{ $labels.client_workload }} ({{ $labels.from_env }})"
    server = "{{ $labels.server_namespace }}/{{ $labels.server_workload }} ({{ $labels.to_env }})"
    return _alert(
        ctx,
        "FlowmonIsolationViolation",
        expr,
        f"{pair} → {server}: forbidden environment pair",
        f"{pair} opened connections or sent bytes to {server} in the last {w}; spec.alerting.isolation "
        "forbids {{ $labels.from_env }} → {{ $labels.to_env }}. Find the configuration pointing the client "
        "at the server and block the path with a NetworkPolicy.",
        hold=False,
    )


def _retransmits(ctx: _Ctx) -> list[dict]:
    h = ctx.alerting.health
    rate = ctx.record_name("flowmon_tcp_retransmits", f"rate{ctx.window}")
    ratio = ctx.record_name("flowmon_tcp_retransmits", f"ratio_rate{ctx.window}")
    rates = [ctx.rate(_counter(m)) for m in (Metric.SENT_BYTES, Metric.RECEIVED_BYTES) if ctx.has(m)]
    # Both directions where a pair has both, else whichever it has.
    total = " or ".join([" + ".join(rates), *rates]) if len(rates) == 2 else rates[0]
    segments = f"({total}) / {SEGMENT_BYTES}"
    records = [
        _record(rate, ctx.rate(_counter(Metric.RETRANSMITS))),
        _record(ratio, f"{ctx.ref(rate)} / ({segments})"),
    ]
    alert = _alert(
        ctx,
        "FlowmonRetransmitsHigh",
        f"{ctx.ref(ratio)} > {h.retransmit_ratio} and {ctx.ref(rate)} >= {h.min_retransmits_per_second}",
        f"{_pair_text(ctx.pair)} retransmits {{{{ $value | humanizePercentage }}}} of its segments",
        f"About {{{{ $value | humanizePercentage }}}} of the TCP segments of {_pair_text(ctx.pair)} are "
        f"retransmitted (threshold {h.retransmit_ratio:.0%}; segments estimated as bytes / {SEGMENT_BYTES}). "
        "Look for packet loss on the path: saturated links or NICs, drops in conntrack or a node, MTU "
        "mismatches; flowmon_tcp_retransmits_total{direction} tells which side loses data.",
    )
    return [*records, alert]


def _connect_failures(ctx: _Ctx) -> list[dict]:
    h = ctx.alerting.health
    by_reason = f"{ctx.by}, reason"
    failures = ctx.record_name("flowmon_tcp_connect_failures", f"rate{ctx.window}")
    ratio = ctx.record_name("flowmon_tcp_connect_failures", f"ratio_rate{ctx.window}")
    opened = ctx.rate(_counter(Metric.CONNECTIONS_OPENED))
    # A pair whose connects all fail has no opened series: count its openings as zero.
    failed = f"sum without (reason) ({ctx.ref(failures)})"
    attempts = f"{failed} + ({opened} or {failed} * 0)"
    records = [
        _record(
            failures,
            f"sum by ({by_reason}) (rate({_counter(Metric.CONNECT_FAILURES)}{{{ctx.sel}}}[{ctx.window}]))",
        ),
        _record(ratio, f"{ctx.ref(failures)} / on ({ctx.by}) group_left () ({attempts})"),
    ]
    alert = _alert(
        ctx,
        "FlowmonConnectFailuresHigh",
        f"{ctx.ref(ratio)} > {h.connect_failure_ratio}"
        f" and {ctx.ref(failures)} >= {h.min_connect_failures_per_second}",
        f"{{{{ $value | humanizePercentage }}}} of connects {_pair_text(ctx.pair)} fail"
        " ({{ $labels.reason }})",
        f"{{{{ $value | humanizePercentage }}}} of the TCP connects from {_pair_text(ctx.pair)} fail with "
        f"reason {{{{ $labels.reason }}}} (threshold {h.connect_failure_ratio:.0%}). refused: nothing "
        "listens on the port (pods not ready, wrong port); timeout: the SYN is dropped (NetworkPolicy, "
        "firewall, dead node).",
    )
    return [*records, alert]


def _rtt(ctx: _Ctx) -> list[dict]:
    h = ctx.alerting.health
    p99 = ctx.record_name("flowmon_tcp_rtt_seconds", f"p99_rate{ctx.window}")
    buckets = f"sum by ({ctx.by}, le) (rate(flowmon_tcp_rtt_seconds_bucket{{{ctx.sel}}}[{ctx.window}]))"
    alert = _alert(
        ctx,
        "FlowmonRTTHigh",
        f"{ctx.ref(p99)} > {h.rtt_p99_seconds}\nand {ctx.rate('flowmon_tcp_rtt_seconds_count')} >= "
        f"{h.min_rtt_samples_per_second}",
        f"RTT p99 of {_pair_text(ctx.pair)} is {{{{ $value | humanizeDuration }}}}",
        f"The 99th percentile of the smoothed TCP RTT of {_pair_text(ctx.pair)} is "
        f"{{{{ $value | humanizeDuration }}}} (threshold {h.rtt_p99_seconds}s). Check the nodes and zones "
        "of both ends, network saturation and CPU throttling of the server.",
    )
    return [_record(p99, f"histogram_quantile(0.99, {buckets})"), alert]


def _resets(ctx: _Ctx) -> list[dict]:
    h = ctx.alerting.health
    rate = ctx.record_name("flowmon_tcp_resets", f"rate{ctx.window}")
    alert = _alert(
        ctx,
        "FlowmonResetsHigh",
        f"{ctx.ref(rate)} > {h.reset_rate}",
        f"{_pair_text(ctx.pair)} sees {{{{ $value | humanize }}}} TCP resets/s",
        f"{_pair_text(ctx.pair)} exchanges {{{{ $value | humanize }}}} RST segments per second "
        f"(threshold {h.reset_rate}/s). flowmon_tcp_resets_total{{direction}} tells which end resets: "
        "a crashing or overloaded server, idle timeouts that differ between client pools and proxies, "
        "or connections to a closed port.",
    )
    return [_record(rate, ctx.rate(_counter(Metric.RESETS))), alert]


# --- assembly --------------------------------------------------------------------------------------


def rule_groups(monitor: FlowMonitor) -> list[dict]:
    """Pure: the rule groups for this monitor (recording rules first, then alerts); [] when none."""
    ctx = _context(monitor)
    spec = monitor.spec.alerting
    if not spec.enabled:
        return []
    records: list[dict] = []
    alerts: list[dict] = []

    def add(rules: list[dict]) -> None:
        for rule in rules:
            (alerts if "alert" in rule else records).append(rule)

    if spec.baseline.enabled:
        for name in spec.baseline.metrics:
            metric = Metric(name)
            if ctx.has(metric):
                add([*_baseline_records(ctx, metric), _anomaly_alert(ctx, metric)])
        if ctx.pair:  # without any pair label there is no dependency to discover
            add(_new_dependency(ctx))
    if spec.isolation.active:
        add([_isolation_alert(ctx)])
    if ctx.has(Metric.RETRANSMITS) and (ctx.has(Metric.SENT_BYTES) or ctx.has(Metric.RECEIVED_BYTES)):
        add(_retransmits(ctx))
    if ctx.has(Metric.CONNECT_FAILURES, Metric.CONNECTIONS_OPENED):
        add(_connect_failures(ctx))
    if ctx.has(Metric.RTT):
        add(_rtt(ctx))
    if ctx.has(Metric.RESETS):
        add(_resets(ctx))
    client_text = _pair_text(ctx.pair).split(" → ")[0]
    add(dns_rules(ctx, _alert, _pair_text(ctx.pair), client_text))
    prefix = f"flowmon.{monitor.metadata.namespace}.{monitor.metadata.name}"
    groups = [
        {"name": f"{prefix}.records", "interval": EVALUATION_INTERVAL, "rules": records},
        {"name": f"{prefix}.alerts", "interval": EVALUATION_INTERVAL, "rules": alerts},
    ]
    return [g for g in groups if g["rules"]]


def build_prometheus_rule(monitor: FlowMonitor) -> dict | None:
    """Pure: the monitor's PrometheusRule, owned by it (offline renders: no owner); None when alerting
    renders no rule. Labelled like the monitor's other children, plus its ServiceMonitor's labels (a
    Prometheus selects rules and ServiceMonitors alike)."""
    groups = rule_groups(monitor)
    if not groups:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": rule_name(monitor),
            "namespace": monitor.metadata.namespace,
            "labels": monitor_labels(monitor, monitor.spec.scrape.service_monitor_labels),
            **owned_by(monitor),
        },
        "spec": {"groups": groups},
    }
