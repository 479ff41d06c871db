"""The DNS alerts of a monitor that exports flowmon_dns_*: failure answers above the pair's own
baseline, slow answers (p99), and a client workload whose queries go unanswered. Pure; rendered into
the monitor's PrometheusRule by flowmon_operator.rules (which passes its context and alert builder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flowmon_contract.metrics import METRICS
from flowmon_contract.spec import Dimension, Metric

if TYPE_CHECKING:
    from flowmon_operator.rules import _Ctx

DNS_ALERT_NAMES = ("FlowmonDNSFailuresHigh", "FlowmonDNSLatencyHigh", "FlowmonDNSTimeouts")
DNS_SEVERITY = dict.fromkeys(DNS_ALERT_NAMES, "warning")
FAILURE_RCODES = "NXDOMAIN|SERVFAIL"
BASELINE_GAP = "1h"  # the baseline ends an hour ago: a storm does not raise its own baseline
CLIENT_LABELS = (str(Dimension.CLIENT_NAMESPACE), str(Dimension.CLIENT_WORKLOAD))
REQUESTS = f"{METRICS[Metric.DNS_REQUESTS].name}_total"
LATENCY = METRICS[Metric.DNS_LATENCY].name

Alert = Callable[..., dict]


def _record(name: str, expr: str) -> dict:
    return {"record": name, "expr": expr}


def _failures(ctx: _Ctx, alert: Alert, pair_text: str) -> list[dict]:
    h, days = ctx.alerting.health, ctx.alerting.baseline.days
    rate = ctx.record_name("flowmon_dns_requests", f"rate{ctx.window}")
    ratio = ctx.record_name("flowmon_dns_requests", f"failure_ratio_rate{ctx.window}")
    failing = f'{rate}{{{ctx.sel}, rcode=~"{FAILURE_RCODES}"}}'
    records = [
        _record(rate, f"sum by ({ctx.by}, rcode) (rate({REQUESTS}{{{ctx.sel}}}[{ctx.window}]))"),
        _record(ratio, f"{failing} / on ({ctx.by}) group_left () sum by ({ctx.by}) ({ctx.ref(rate)})"),
    ]
    # Without history (a new pair, or an rcode it never got) the baseline is 0.
    baseline = f"(avg_over_time({ctx.ref(ratio)}[{days}d] offset {BASELINE_GAP}) or {ctx.ref(ratio)} * 0)"
    expr = (
        f"{ctx.ref(ratio)} > {baseline} + {h.dns_failure_ratio_margin}\n"
        f"and {failing} >= {h.min_dns_failures_per_second}"
    )
    return [
        *records,
        alert(
            ctx,
            "FlowmonDNSFailuresHigh",
            expr,
            f"{{{{ $value | humanizePercentage }}}} of DNS answers to {pair_text}: {{{{ $labels.rcode }}}}",
            f"{{{{ $value | humanizePercentage }}}} of the DNS requests of {pair_text} get "
            f"{{{{ $labels.rcode }}}}, more than {h.dns_failure_ratio_margin:.0%} above its average "
            f"of the previous {days} days. NXDOMAIN: a name that does not exist (a typo, a deleted Service, "
            "ndots search-path expansion); SERVFAIL: the resolver or its upstream fails.",
        ),
    ]


def _latency(ctx: _Ctx, alert: Alert, pair_text: str) -> list[dict]:
    h = ctx.alerting.health
    p99 = ctx.record_name(LATENCY, f"p99_rate{ctx.window}")
    buckets = f"sum by ({ctx.by}, le) (rate({LATENCY}_bucket{{{ctx.sel}}}[{ctx.window}]))"
    answers = ctx.rate(LATENCY + "_count")
    expr = f"{ctx.ref(p99)} > {h.dns_latency_p99_seconds}\nand {answers} >= {h.min_dns_requests_per_second}"
    return [
        _record(p99, f"histogram_quantile(0.99, {buckets})"),
        alert(
            ctx,
            "FlowmonDNSLatencyHigh",
            expr,
            f"DNS p99 of {pair_text} is {{{{ $value | humanizeDuration }}}}",
            f"The 99th percentile of DNS query → answer time of {pair_text} is "
            f"{{{{ $value | humanizeDuration }}}} (threshold {h.dns_latency_p99_seconds}s). Check the "
            "resolver's CPU and its upstream, and packet loss on the way (retries show as latency).",
        ),
    ]


def _timeouts(ctx: _Ctx, alert: Alert, client_text: str) -> list[dict]:
    h = ctx.alerting.health
    monitor_label = ctx.by.split(", ")[0]
    by = ", ".join((monitor_label, *(label for label in CLIENT_LABELS if label in ctx.pair)))
    timeouts = f"flowmon_client:flowmon_dns_timeouts:rate{ctx.window}"
    ratio = f"flowmon_client:flowmon_dns_timeouts:ratio_rate{ctx.window}"
    total = f"sum by ({by}) (rate({REQUESTS}{{{ctx.sel}}}[{ctx.window}]))"
    records = [
        _record(timeouts, f'sum by ({by}) (rate({REQUESTS}{{{ctx.sel}, rcode="timeout"}}[{ctx.window}]))'),
        _record(ratio, f"{ctx.ref(timeouts)} / {total}"),
    ]
    expr = (
        f"{ctx.ref(ratio)} > {h.dns_timeout_ratio} and {ctx.ref(timeouts)} >= {h.min_dns_timeouts_per_second}"
    )
    return [
        *records,
        alert(
            ctx,
            "FlowmonDNSTimeouts",
            expr,
            f"{{{{ $value | humanizePercentage }}}} of the DNS queries of {client_text} go unanswered",
            f"{{{{ $value | humanizePercentage }}}} of the DNS queries of {client_text} get no answer "
            f"(threshold {h.dns_timeout_ratio:.0%}). A NetworkPolicy or firewall dropping UDP 53, a "
            "resolver that is down or overloaded, or conntrack races on the node (UDP DNS over NAT).",
        ),
    ]


def dns_rules(ctx: _Ctx, alert: Alert, pair_text: str, client_text: str) -> list[dict]:
    """The DNS recording rules and alerts this monitor's metrics support."""
    out: list[dict] = []
    if ctx.has(Metric.DNS_REQUESTS):
        out += _failures(ctx, alert, pair_text)
        if any(label in ctx.pair for label in CLIENT_LABELS):  # a client to name
            out += _timeouts(ctx, alert, client_text)
    if ctx.has(Metric.DNS_LATENCY):
        out += _latency(ctx, alert, pair_text)
    return out
