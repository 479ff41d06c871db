"""The live view's arithmetic: exposition text → per workload pair totals → rates and RTT quantiles.

Pure and table-tested; `flowmon top` and `flowmon demo` fetch the text and render the rows with rich.
Metric names come from `series.METRICS`, so the view follows the exporter's contract. Counters named
`*violations_total` (flowmon_isolation_violations_total) count as isolation violations of their pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

from flowmon_contract.metrics import METRICS, OVERFLOW_VALUE
from flowmon_contract.spec import Metric

PairKey = tuple[tuple[str, str], ...]  # the flow labels of one series, sorted by name

# Labels that split one flow's samples without naming another flow (isolation violations carry the
# environments, which follow from the namespaces).
_NON_FLOW_LABELS = frozenset(
    {"le", "from_env", "to_env"} | {m.extra_label for m in METRICS.values() if m.extra_label}
)

_COUNTERS: dict[str, str] = {
    METRICS[Metric.SENT_BYTES].name + "_total": "sent_bytes",
    METRICS[Metric.RECEIVED_BYTES].name + "_total": "received_bytes",
    METRICS[Metric.CONNECTIONS_OPENED].name + "_total": "opened",
    METRICS[Metric.CONNECT_FAILURES].name + "_total": "failures",
    METRICS[Metric.RETRANSMITS].name + "_total": "retransmits",
    METRICS[Metric.RESETS].name + "_total": "resets",
}
_ACTIVE = METRICS[Metric.CONNECTIONS_ACTIVE].name
_RTT_BUCKET = METRICS[Metric.RTT].name + "_bucket"
_CONNECT_BUCKET = METRICS[Metric.CONNECT_DURATION].name + "_bucket"
COUNTER_FIELDS = ("sent_bytes", "received_bytes", "opened", "failures", "retransmits", "resets", "violations")


@dataclass
class PairTotals:
    """Cumulative values of one workload pair (or differences of two, see `diff`)."""

    sent_bytes: float = 0.0
    received_bytes: float = 0.0
    opened: float = 0.0
    failures: float = 0.0
    retransmits: float = 0.0
    resets: float = 0.0
    violations: float = 0.0
    active: float = 0.0
    rtt: dict[float, float] = field(default_factory=dict)  # le (seconds, inf last) → cumulative count
    connect: dict[float, float] = field(default_factory=dict)


Snapshot = dict[PairKey, PairTotals]


def pair_key(labels: Mapping[str, str]) -> PairKey:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in _NON_FLOW_LABELS))


def parse_exposition(text: str) -> Snapshot:
    """Prometheus text format → totals per pair. Unknown families are ignored."""
    pairs: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            target = _COUNTERS.get(name)
            if target is None and name.endswith("violations_total"):
                target = "violations"
            if target is None and name not in (_ACTIVE, _RTT_BUCKET, _CONNECT_BUCKET):
                continue
            totals = pairs.setdefault(pair_key(labels), PairTotals())
            if target is not None:
                setattr(totals, target, getattr(totals, target) + value)
            elif name == _ACTIVE:
                totals.active += value
            else:
                buckets = totals.rtt if name == _RTT_BUCKET else totals.connect
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
    return pairs


def _counter_delta(current: float, previous: float) -> float:
    # A counter that went down was reset (agent restart): everything it shows now is new.
    return current - previous if current >= previous else current


def diff(previous: Snapshot | None, current: Snapshot) -> Snapshot:
    """What happened between two snapshots; with no previous, everything since the agent started."""
    if previous is None:
        return current
    result: Snapshot = {}
    for key, cur in current.items():
        prev = previous.get(key, PairTotals())
        counters = {f: _counter_delta(getattr(cur, f), getattr(prev, f)) for f in COUNTER_FIELDS}
        result[key] = PairTotals(
            **counters,
            active=cur.active,
            rtt=_buckets_delta(cur.rtt, prev.rtt),
            connect=_buckets_delta(cur.connect, prev.connect),
        )
    return result


def _buckets_delta(current: Mapping[float, float], previous: Mapping[float, float]) -> dict[float, float]:
    if any(current.get(le, 0.0) < count for le, count in previous.items()):
        return dict(current)  # reset
    return {le: count - previous.get(le, 0.0) for le, count in current.items()}


def combine(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One monitor's snapshots from several agents: summed (each connection is counted by one agent)."""
    result: Snapshot = {}
    for snapshot in snapshots:
        for key, totals in snapshot.items():
            have = result.setdefault(key, PairTotals())
            for f in (*COUNTER_FIELDS, "active"):
                setattr(have, f, getattr(have, f) + getattr(totals, f))
            for mine, theirs in ((have.rtt, totals.rtt), (have.connect, totals.connect)):
                for le, count in theirs.items():
                    mine[le] = mine.get(le, 0.0) + count
    return result


def attach_violations(base: Snapshot, isolation: Snapshot) -> Snapshot:
    """Violations counted by another monitor (the isolation monitor groups differently), added to every
    base pair whose labels include the violation's; a violation no base pair matches gets its own row."""
    result = {
        key: replace(totals, rtt=dict(totals.rtt), connect=dict(totals.connect))
        for key, totals in base.items()
    }
    for key, totals in isolation.items():
        if not totals.violations:
            continue
        labels = set(key)
        matches = [k for k in result if labels <= set(k)]
        for k in matches or [key]:
            result.setdefault(k, PairTotals()).violations += totals.violations
    return result


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Like PromQL's histogram_quantile over cumulative buckets: linear inside the bucket holding the
    rank; a rank in the +Inf bucket gives the highest finite bound. None without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


# --- rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One workload pair as the view shows it: per-second rates (or totals when seconds is None)."""

    client: str
    server: str
    sent_bytes: float
    received_bytes: float
    opened: float
    failures: float
    retransmits: float
    resets: float
    violations: float
    active: float
    rtt_p50: float | None
    rtt_p99: float | None


_SIDE_ORDER = ("namespace", "workload", "pod", "kind", "node", "zone")


def endpoint_name(labels: Mapping[str, str], side: str) -> str:
    """`shop/frontend`, or whatever the monitor groups by (zones, pods); `*` when it groups by none."""
    parts = [labels[f"{side}_{attr}"] for attr in _SIDE_ORDER if f"{side}_{attr}" in labels]
    text = "/".join(parts) or "*"
    if side == "server":
        if "server_port" in labels:
            text += f":{labels['server_port']}"
        if labels.get("service"):
            text += f" via {labels['service']}"
    return text


def rows(stats: Snapshot, seconds: float | None = None) -> list[Row]:
    """Per pair: counters divided by `seconds` (rates) or as they are (totals); busiest pair first."""
    scale = 1.0 / seconds if seconds else 1.0
    result = []
    for key, s in stats.items():
        labels = dict(key)
        result.append(
            Row(
                client=endpoint_name(labels, "client"),
                server=endpoint_name(labels, "server"),
                **{f: getattr(s, f) * scale for f in COUNTER_FIELDS},
                active=s.active,
                rtt_p50=histogram_quantile(0.5, s.rtt),
                rtt_p99=histogram_quantile(0.99, s.rtt),
            )
        )
    return sorted(result, key=lambda r: (-(r.sent_bytes + r.received_bytes), -r.opened, r.client, r.server))


def live_rows(previous: Snapshot | None, current: Snapshot, seconds: float) -> list[Row]:
    """The live view: rates since the previous refresh (totals on the first), except violations, which
    stay cumulative: a rare event must not blink away after one refresh."""
    rates = rows(diff(previous, current), seconds if previous is not None else None)
    totals = {(r.client, r.server): r.violations for r in rows(current)}
    return [replace(r, violations=totals.get((r.client, r.server), 0.0)) for r in rates]


def is_overflow(row: Row) -> bool:
    return OVERFLOW_VALUE in row.client or OVERFLOW_VALUE in row.server


# --- formatting ----------------------------------------------------------------------------------


def human_bytes(value: float, suffix: str = "B") -> str:
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            return f"{value:.0f} {unit}{suffix}" if unit == "" else f"{value:.1f} {unit}{suffix}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}µs"
    if value < 1:
        return f"{value * 1e3:.1f}ms"
    return f"{value:.2f}s"


def human_count(value: float) -> str:
    if value == 0:
        return "0"
    if value < 10 and value != int(value):
        return f"{value:.1f}"
    return f"{value:.0f}"


def row_cells(row: Row, per_second: bool) -> Sequence[str]:
    """The view's columns, as text."""
    unit = "/s" if per_second else ""
    return (
        row.client,
        row.server,
        human_bytes(row.sent_bytes, "B" + unit),
        human_bytes(row.received_bytes, "B" + unit),
        human_count(row.opened),
        human_seconds(row.rtt_p50),
        human_seconds(row.rtt_p99),
        human_count(row.retransmits),
        human_count(row.failures),
        human_count(row.violations),
    )


def columns(per_second: bool) -> Sequence[str]:
    unit = "/s" if per_second else ""
    return (
        "client",
        "server",
        "sent",
        "received",
        "conns" + unit,
        "rtt p50",
        "rtt p99",
        "retrans" + unit,
        "failed" + unit,
        "violations",
    )
