"""`promtool test rules` suites generated from the same builder as the PrometheusRule.

Each suite feeds synthetic scrapes of one monitor (with the target labels a ServiceMonitor adds, two
agents and several ports per pair, and a second monitor's series that must stay invisible) and states
which alerts fire when. The causes are derived from the monitor's own thresholds, so the suites follow
the spec: a 5x spike, a drop to zero, a new dependency, staging → prod traffic, a retransmit storm,
refused connects, an RTT jump and resets, an NXDOMAIN storm, slow and unanswered DNS; the silence
cases are daily variation and idle pairs.

Only the baseline length is shortened in tests (`baseline.days`); the rule shape is the production one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowmon_contract.alerting import DAY_SECONDS
from flowmon_contract.metrics import DNS_LATENCY_BUCKETS, METRICS
from flowmon_contract.spec import DEFAULT_METRICS, DNS_METRICS, Dimension, FlowMonitor, Metric
from flowmon_operator.rules import (
    MONITOR_LABEL,
    PAIR_LABELS,
    VIOLATION_BYTES,
    VIOLATIONS,
    monitor_value,
    prom_duration,
    rule_groups,
)

OTHER_MONITOR = "other/intruder"  # a second monitor scraped by the same Prometheus
STEP = 60  # seconds between synthetic scrapes
HOUR = 3600
RULE_FILE = "rules.yml"
Rate = Callable[[int], float]  # seconds since start → rate per second


@dataclass(frozen=True, slots=True)
class Pair:
    client: str  # namespace/workload
    server: str

    def labels(self) -> dict[str, str]:
        cns, cwl = self.client.split("/")
        sns, swl = self.server.split("/")
        values = (cns, cwl, sns, swl)
        return dict(zip(PAIR_LABELS, values, strict=True))


@dataclass(frozen=True, slots=True)
class Suite:
    """One promtool test file."""

    name: str
    evaluation_interval: str
    tests: list[dict]
    groups: list[dict]  # the rule groups under test

    def document(self) -> dict:
        order = [g["name"] for g in self.groups]
        return {
            "rule_files": [RULE_FILE],
            "evaluation_interval": self.evaluation_interval,
            "group_eval_order": order,
            "tests": self.tests,
        }


# --- synthetic series ------------------------------------------------------------------------------


def _num(value: float) -> str:
    return format(value, ".12g")


def expand(values: Sequence[float | None]) -> str:
    """Samples → promtool's expanding notation; None is a missing sample. Runs of equal increments
    compress to `a+bxn`, so a day of per-minute samples with hourly rates stays a short string."""
    out: list[str] = []
    i = 0
    while i < len(values):
        if values[i] is None:
            j = i
            while j < len(values) and values[j] is None:
                j += 1
            out.append(f"_x{j - i}")
            i = j
            continue
        j = i + 1
        step = None
        while j < len(values) and values[j] is not None:
            diff = values[j] - values[j - 1]  # type: ignore[operator]
            if step is None:
                step = diff
            elif not math.isclose(diff, step, rel_tol=1e-9, abs_tol=1e-6):
                break
            j += 1
        if step is None:
            out.append(_num(values[i]))  # type: ignore[arg-type]
        else:
            out.append(f"{_num(values[i])}{'+' if step >= 0 else '-'}{_num(abs(step))}x{j - i - 1}")  # type: ignore[arg-type]
        i = j
    return " ".join(out)


def counter(rate: Rate, seconds: int, start: int = 0) -> list[float | None]:
    """A cumulative counter sampled every STEP from `start` (missing before) until `seconds`."""
    values: list[float | None] = []
    total = 0.0
    for t in range(0, seconds + 1, STEP):
        if t < start:
            values.append(None)
            continue
        if t > start:
            total += rate(t - STEP) * STEP
        values.append(total)
    return values


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


class Scrapes:
    """Input series of one test group, as the monitor's ServiceMonitor would scrape them."""

    def __init__(self, monitor: FlowMonitor, seconds: int) -> None:
        self.monitor = monitor
        self.seconds = seconds
        self.series: list[dict] = []

    def target(self, agent: str, monitor: str | None = None) -> dict[str, str]:
        return {
            "job": "flowmon-agent",
            "namespace": "flowmon-system",
            "instance": f"{agent}:9443",
            "pod": f"flowmon-agent-{agent}",
            MONITOR_LABEL: monitor or monitor_value(self.monitor),
        }

    def flow_labels(self, pair: Pair, port: int) -> dict[str, str]:
        """The monitor's groupBy labels for a flow of this pair."""
        values = {**pair.labels(), "server_port": str(port), "service": pair.server.split("/")[1]}
        group_by = self.monitor.spec.aggregation.group_by
        return {str(d): values.get(str(d), "") for d in group_by if str(d) in values}

    def add(self, name: str, labels: dict[str, str], values: Sequence[float | None]) -> None:
        self.series.append({"series": _selector(name, labels), "values": expand(values)})

    def flow(
        self,
        metric: Metric,
        pair: Pair,
        rate: Rate,
        *,
        start: int = 0,
        extra: dict[str, str] | None = None,
        monitor: str | None = None,
    ) -> None:
        """A counter of a pair, split over two agents and two server ports (aggregated away by rules)."""
        name = f"{METRICS[metric].name}_total"
        for agent, port in (("a", 8080), ("b", 9090)):
            labels = {**self.target(agent, monitor), **self.flow_labels(pair, port), **(extra or {})}
            self.add(name, labels, counter(lambda t: rate(t) / 2, self.seconds, start))

    def rtt(self, pair: Pair, samples: Rate, seconds_of: Rate) -> None:
        """An RTT histogram: `samples(t)` samples per second, all of the latency `seconds_of(t)`."""
        bounds = self.monitor.spec.aggregation.histogram_buckets.rtt
        self.histogram("flowmon_tcp_rtt_seconds", bounds, pair, samples, seconds_of)

    def histogram(
        self, name: str, bounds: Sequence[float], pair: Pair, samples: Rate, seconds_of: Rate
    ) -> None:
        """`samples(t)` observations per second, all of the value `seconds_of(t)`."""
        labels = {**self.target("a"), **self.flow_labels(pair, 8080)}
        for bound in [*bounds, math.inf]:
            le = "+Inf" if bound == math.inf else _num(bound)
            within = counter(lambda t, b=bound: samples(t) if seconds_of(t) <= b else 0.0, self.seconds)
            self.add(f"{name}_bucket", {**labels, "le": le}, within)
        self.add(f"{name}_count", labels, counter(samples, self.seconds))
        self.add(f"{name}_sum", labels, counter(lambda t: samples(t) * seconds_of(t), self.seconds))


# --- expectations ----------------------------------------------------------------------------------


def _alerting(monitor: FlowMonitor) -> dict[str, str]:
    return dict(monitor.spec.alerting.labels)


def _alerts_at(monitor: FlowMonitor, alertname: str, at: int, expected: list[dict[str, str]]) -> dict:
    """The exact set of firing alerts of one name at one time (labels only; values are 1)."""
    severity = {r["alert"]: r["labels"]["severity"] for r in _alert_rules(monitor)}
    samples = [
        {
            "labels": _selector(
                "ALERTS",
                {
                    "alertname": alertname,
                    "alertstate": "firing",
                    MONITOR_LABEL: monitor_value(monitor),
                    "severity": severity[alertname],
                    **labels,
                    **_alerting(monitor),
                },
            ),
            "value": 1,
        }
        for labels in expected
    ]
    selector = (
        f'ALERTS{{alertname="{alertname}", alertstate="firing", {MONITOR_LABEL}="{monitor_value(monitor)}"}}'
    )
    return {"expr": selector, "eval_time": prom_duration(at), "exp_samples": samples}


def _silent(selector: str, at: int, window: int) -> dict:
    """No alert (pending or firing) matching the selector at any evaluation in (at - window, at]."""
    return {
        "expr": f"count_over_time(ALERTS{{{selector}}}[{prom_duration(window)}])",
        "eval_time": prom_duration(at),
        "exp_samples": [],
    }


def _alert_rules(monitor: FlowMonitor) -> list[dict]:
    return [r for g in rule_groups(monitor) for r in g["rules"] if "alert" in r]


def _pair_selector(pair: Pair) -> str:
    return ", ".join(f'{k}="{v}"' for k, v in pair.labels().items())


def _render(template: str, labels: dict[str, str]) -> str:
    """Expand `{{ $labels.x }}` the way Prometheus does, for templates that do not use $value."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


# --- scenarios -------------------------------------------------------------------------------------


def _daily(base: float, day_factors: Sequence[float]) -> Rate:
    """A rate following the time of day (peak at 14:00, trough at 02:00, ±50%), constant within each
    hour, scaled per day: the normal variation baselines must not page on."""

    def rate(t: int) -> float:
        day, hour = divmod(t // HOUR, 24)
        return (
            base * (1 + 0.5 * math.sin(2 * math.pi * (hour - 8) / 24)) * day_factors[day % len(day_factors)]
        )

    return rate


def _between(rate: Rate, start: int, end: int, other: Rate) -> Rate:
    return lambda t: other(t) if start <= t < end else rate(t)


def _suite(
    name: str, evaluation_interval: str, monitor: FlowMonitor, scrapes: Scrapes, **checks: list
) -> Suite:
    """A suite of one test, named like it, over `scrapes` against the monitor's rule groups; `checks`:
    promtool's alert_rule_test and/or promql_expr_test."""
    test = {"name": name, "interval": f"{STEP}s", "input_series": scrapes.series, **checks}
    return Suite(name, evaluation_interval, [test], rule_groups(monitor))


def baseline_suite(monitor: FlowMonitor) -> Suite:
    """Days of daily variation, then on the last day: a 5x spike, a drop to zero, a new dependency."""
    base = monitor.spec.alerting.baseline
    days = base.days + 1
    seconds = days * DAY_SECONDS
    last = base.days * DAY_SECONDS
    s = Scrapes(monitor, seconds)
    factors = (1.0, 1.08, 0.94, 1.04, 0.97)
    steady, spiky = Pair("shop/web", "shop/api"), Pair("shop/web", "shop/db")
    dropping, idle = Pair("shop/web", "shop/cache"), Pair("shop/cron", "shop/api")
    new = Pair("shop/web", "shop/search")
    spike = (last + 14 * HOUR, last + 15 * HOUR)
    drop = (last + 16 * HOUR, last + 17 * HOUR)
    appears = last + 10 * HOUR
    # Far above the idle floors, so only the baseline decides.
    bytes_rate = max(50 * base.min_bytes_per_second, 50_000.0)
    conn_rate = max(20 * base.min_connections_per_second, 2.0)
    rates = {
        Metric.SENT_BYTES: bytes_rate,
        Metric.RECEIVED_BYTES: 4 * bytes_rate,
        Metric.CONNECTIONS_OPENED: conn_rate,
    }
    for metric, r in rates.items():
        normal = _daily(r, factors)
        s.flow(metric, steady, normal)
        s.flow(metric, spiky, _between(normal, *spike, lambda t, n=normal: 5 * n(t)))
        s.flow(metric, dropping, _between(normal, *drop, lambda t: 0.0))
        s.flow(metric, new, normal, start=appears)
        # Another monitor's spike and new pair must never reach this monitor's alerts.
        s.flow(metric, spiky, _between(normal, *spike, lambda t, n=normal: 9 * n(t)), monitor=OTHER_MONITOR)
        s.flow(metric, Pair("shop/web", "shop/ghost"), normal, start=appears, monitor=OTHER_MONITOR)
    # An idle pair: one connection every 3 hours, then a burst of 6 within 5 minutes on the last day,
    # far beyond its baseline in relative terms but below the idle floors.
    idle_floor_conns = base.min_connections_per_second
    burst = (last + 14 * HOUR, last + 14 * HOUR + 300)

    def idle_conns(t: int) -> float:
        if burst[0] <= t < burst[1]:
            return min(6 / 300, idle_floor_conns / 5)
        return 1 / STEP if t % (3 * HOUR) == 0 else 0.0

    bytes_per_conn = min(500.0, base.min_bytes_per_second)
    s.flow(Metric.CONNECTIONS_OPENED, idle, idle_conns)
    s.flow(Metric.SENT_BYTES, idle, lambda t: idle_conns(t) * bytes_per_conn)
    s.flow(Metric.RECEIVED_BYTES, idle, lambda t: idle_conns(t) * bytes_per_conn)

    baselined = [m for m in base.metrics if Metric(m) in monitor.spec.metrics]
    anomaly = "FlowmonTrafficAnomaly"
    tests = [
        _alerts_at(
            monitor, anomaly, spike[0] + 20 * 60, [{**spiky.labels(), "metric": m} for m in baselined]
        ),
        _alerts_at(
            monitor, anomaly, drop[0] + 20 * 60, [{**dropping.labels(), "metric": m} for m in baselined]
        ),
        _alerts_at(monitor, anomaly, spike[0] - 5 * 60, []),
        _alerts_at(monitor, "FlowmonNewDependency", appears + 5 * 60, [new.labels()]),
        _alerts_at(monitor, "FlowmonNewDependency", appears + 3 * HOUR, []),
        # Silence over the whole run: daily variation (steady, and the others before their cause),
        # the idle pair (server api is shared by steady and idle), the other monitor.
        _silent(f'{MONITOR_LABEL}="{monitor_value(monitor)}", server_workload="api"', seconds, seconds),
        _silent(_pair_selector(spiky), spike[0], spike[0]),
        _silent(_pair_selector(dropping), drop[0], drop[0]),
        _silent(f'alertname="{anomaly}", {_pair_selector(new)}', seconds, seconds),
        _silent('alertname="FlowmonNewDependency"', appears - STEP, appears - STEP),
        _silent(f'{MONITOR_LABEL}="{OTHER_MONITOR}"', seconds, seconds),
    ]
    return _suite("baseline", "5m", monitor, s, promql_expr_test=tests)


def health_suite(monitor: FlowMonitor) -> Suite:
    """One hour; at 20m each unhealthy pair gets its cause; normal and idle pairs stay silent."""
    h = monitor.spec.alerting.health
    seconds, cause = HOUR, 20 * 60
    s = Scrapes(monitor, seconds)
    normal, lossy = Pair("shop/web", "shop/api"), Pair("shop/web", "shop/db")
    refusing, slow = Pair("shop/web", "shop/queue"), Pair("shop/web", "shop/cache")
    resetting, idle = Pair("shop/web", "shop/auth"), Pair("shop/cron", "shop/api")
    byte_rate = 1_000_000.0
    segments = 2 * byte_rate / 1448
    quiet_retransmits = max(h.min_retransmits_per_second, segments * h.retransmit_ratio / 20)
    storm = segments * h.retransmit_ratio * 5
    opened = 10.0
    quiet_failures = min(h.min_connect_failures_per_second / 2, opened * h.connect_failure_ratio / 20)
    refused = max(5 * h.min_connect_failures_per_second, opened * h.connect_failure_ratio * 10)
    bounds = monitor.spec.aggregation.histogram_buckets.rtt
    fast_rtt = bounds[0] / 2
    slow_rtt = next((b for b in bounds if b > h.rtt_p99_seconds), h.rtt_p99_seconds * 2) * 1.5
    quiet_resets = h.reset_rate / 10

    def after(before: float, then: float) -> Rate:
        return lambda t: then if t >= cause else before

    for pair in (normal, lossy, refusing, slow, resetting):
        s.flow(Metric.SENT_BYTES, pair, lambda t: byte_rate)
        s.flow(Metric.RECEIVED_BYTES, pair, lambda t: byte_rate)
        s.flow(Metric.CONNECTIONS_OPENED, pair, lambda t: opened)
        retx = after(quiet_retransmits, storm) if pair == lossy else (lambda t: quiet_retransmits)
        s.flow(Metric.RETRANSMITS, pair, retx, extra={"direction": "server_to_client"})
        fails = after(quiet_failures, refused) if pair == refusing else (lambda t: quiet_failures)
        s.flow(Metric.CONNECT_FAILURES, pair, fails, extra={"reason": "refused"})
        s.flow(Metric.CONNECT_FAILURES, pair, lambda t: 0.0, extra={"reason": "timeout"})
        resets = after(quiet_resets, 5 * h.reset_rate) if pair == resetting else (lambda t: quiet_resets)
        s.flow(Metric.RESETS, pair, resets, extra={"direction": "server_to_client"})
        s.rtt(pair, lambda t: 50.0, after(fast_rtt, slow_rtt) if pair == slow else (lambda t: fast_rtt))
    # Idle: one retransmit, one refused connect, one reset and one very slow RTT sample at 30m.
    once = lambda t: 1 / STEP if t == 30 * 60 else 0.0  # noqa: E731
    for metric, extra in (
        (Metric.RETRANSMITS, {"direction": "client_to_server"}),
        (Metric.CONNECT_FAILURES, {"reason": "refused"}),
        (Metric.RESETS, {"direction": "client_to_server"}),
    ):
        s.flow(metric, idle, once, extra=extra)
    s.flow(Metric.SENT_BYTES, idle, lambda t: 100 * once(t))
    s.rtt(idle, once, lambda t: 10 * slow_rtt)
    sparse = lambda t: 1 / STEP if t % 600 == 0 else 0.0  # noqa: E731  a sample every 10 minutes
    s.rtt(Pair("shop/cron", "shop/auth"), sparse, lambda t: 10 * slow_rtt)

    at = cause + 15 * 60
    tests = [
        _alerts_at(monitor, "FlowmonRetransmitsHigh", at, [lossy.labels()]),
        _alerts_at(monitor, "FlowmonConnectFailuresHigh", at, [{**refusing.labels(), "reason": "refused"}]),
        _alerts_at(monitor, "FlowmonRTTHigh", at, [slow.labels()]),
        _alerts_at(monitor, "FlowmonResetsHigh", at, [resetting.labels()]),
        _silent(f'{MONITOR_LABEL}="{monitor_value(monitor)}"', cause, cause),
        _silent(f'{MONITOR_LABEL}="{monitor_value(monitor)}", server_workload="api"', seconds, seconds),
        _silent(f'{MONITOR_LABEL}="{monitor_value(monitor)}", client_workload="cron"', seconds, seconds),
    ]
    return _suite("health", "1m", monitor, s, promql_expr_test=tests)


def dns_suite(monitor: FlowMonitor) -> Suite:
    """Two hours; at 80m (an hour of baseline behind) one pair's NXDOMAIN share jumps, one resolver
    pair gets slow and one client's queries start timing out; steady and idle clients stay silent."""
    h = monitor.spec.alerting.health
    seconds, cause = 2 * HOUR, 80 * 60
    s = Scrapes(monitor, seconds)
    steady, storm = Pair("shop/web", "kube-system/dns"), Pair("shop/search", "kube-system/dns")
    slow, timing_out = Pair("shop/cache", "kube-system/dns"), Pair("shop/batch", "kube-system/dns")
    idle = Pair("shop/cron", "kube-system/dns")
    answered = 10.0
    usual_nxdomain = answered * h.dns_failure_ratio_margin / 5  # a steady share, below the margin

    def after(before: float, then: float) -> Rate:
        return lambda t: then if t >= cause else before

    def requests(pair: Pair, rcode: str, rate: Rate) -> None:
        s.flow(Metric.DNS_REQUESTS, pair, rate, extra={"rcode": rcode, "qtype": "A"})

    for pair in (steady, storm, slow, timing_out):
        requests(pair, "NOERROR", lambda t: answered)
        nxdomain = after(usual_nxdomain, answered) if pair == storm else (lambda t: usual_nxdomain)
        requests(pair, "NXDOMAIN", nxdomain)
        latency = after(0.0004, 4 * h.dns_latency_p99_seconds) if pair == slow else (lambda t: 0.0004)
        s.histogram(METRICS[Metric.DNS_LATENCY].name, DNS_LATENCY_BUCKETS, pair, lambda t: answered, latency)
    timeouts = max(5 * h.min_dns_timeouts_per_second, answered * h.dns_timeout_ratio * 3)
    requests(timing_out, "timeout", after(0.0, timeouts))
    once = lambda t: 1 / STEP if t == 30 * 60 else 0.0  # noqa: E731  one of each, once
    requests(idle, "NXDOMAIN", once)
    requests(idle, "timeout", once)
    s.histogram(METRICS[Metric.DNS_LATENCY].name, DNS_LATENCY_BUCKETS, idle, once, lambda t: 5.0)

    at = cause + 15 * 60
    this = f'{MONITOR_LABEL}="{monitor_value(monitor)}"'
    client = {k: v for k, v in timing_out.labels().items() if k.startswith("client_")}
    tests = [
        _alerts_at(monitor, "FlowmonDNSFailuresHigh", at, [{**storm.labels(), "rcode": "NXDOMAIN"}]),
        _alerts_at(monitor, "FlowmonDNSLatencyHigh", at, [slow.labels()]),
        _alerts_at(monitor, "FlowmonDNSTimeouts", at, [client]),
        _silent(this, cause, cause),
        _silent(f'{this}, client_workload="web"', seconds, seconds),
        _silent(f'{this}, client_workload="cron"', seconds, seconds),
    ]
    return _suite("dns", "1m", monitor, s, promql_expr_test=tests)


def isolation_suite(monitor: FlowMonitor) -> Suite:
    """A staging workload's first connection to prod, and bytes of an older staging → prod connection."""
    isolation = monitor.spec.alerting.isolation
    forbidden = isolation.forbidden[0]
    seconds = HOUR
    s = Scrapes(monitor, seconds)
    labels = {"from_env": forbidden.from_, "to_env": forbidden.to}
    loadgen = {**labels, **Pair(f"{forbidden.from_}-ns/loadgen", f"{forbidden.to}-ns/db").labels()}
    batch = {**labels, **Pair(f"{forbidden.from_}-ns/batch", f"{forbidden.to}-ns/db").labels()}
    first, resumes = 20 * 60, 30 * 60
    # One connection creates the series with value 1: increase() alone would never see it.
    s.add(
        VIOLATIONS,
        {**s.target("a"), **loadgen},
        [None if t < first else 1.0 for t in range(0, seconds + 1, STEP)],
    )
    # A connection opened before the agent started: bytes only, flat for a while, then flowing again.
    s.add(
        VIOLATION_BYTES,
        {**s.target("b"), **batch},
        counter(lambda t: 10_000.0 if t >= resumes else 0.0, seconds),
    )
    s.add(VIOLATIONS, {**s.target("a", OTHER_MONITOR), **loadgen}, counter(lambda t: 1.0, seconds, first))

    rule = next(r for r in _alert_rules(monitor) if r["alert"] == "FlowmonIsolationViolation")

    def expected(series_labels: dict[str, str]) -> dict:
        all_labels = {MONITOR_LABEL: monitor_value(monitor), **series_labels, **rule["labels"]}
        return {
            "exp_labels": all_labels,
            "exp_annotations": {k: _render(v, all_labels) for k, v in rule["annotations"].items()},
        }

    name = "FlowmonIsolationViolation"
    return _suite(
        "isolation",
        "1m",
        monitor,
        s,
        alert_rule_test=[
            {"eval_time": prom_duration(first + 60), "alertname": name, "exp_alerts": [expected(loadgen)]},
            {
                "eval_time": prom_duration(resumes - 5 * 60),
                "alertname": name,
                "exp_alerts": [expected(loadgen)],
            },
            {
                "eval_time": prom_duration(resumes + 3 * 60),
                "alertname": name,
                "exp_alerts": [expected(batch)],
            },
            {"eval_time": prom_duration(seconds), "alertname": name, "exp_alerts": [expected(batch)]},
        ],
        promql_expr_test=[_silent(f'{MONITOR_LABEL}="{OTHER_MONITOR}"', seconds, seconds)],
    )


def suites(monitor: FlowMonitor) -> list[Suite]:
    """Every suite this monitor's rules support (a suite needs its metrics, groupBy and isolation)."""
    spec = monitor.spec
    needs_pairs = all(Dimension(p) in spec.aggregation.group_by for p in PAIR_LABELS)
    out = []
    if needs_pairs and spec.alerting.baseline.enabled:
        out.append(baseline_suite(monitor))
    if needs_pairs and set(DEFAULT_METRICS) <= set(spec.metrics):
        out.append(health_suite(monitor))
    if needs_pairs and set(spec.metrics) >= DNS_METRICS:
        out.append(dns_suite(monitor))
    if spec.alerting.isolation.active:
        out.append(isolation_suite(monitor))
    return out
