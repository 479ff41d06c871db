"""The live view's arithmetic: exposition text → per workload pair totals → rates and RTT quantiles.

Pure and table-tested; `flowmon top` and `flowmon demo` fetch the text and render the rows with rich.
Metric names come from `flowmon_contract.metrics`, so the view follows the exporter's contract. Counters
named `*violations_total` (flowmon_isolation_violations_total) count as isolation violations of their
pair. A pair holds its TCP and UDP counters and its DNS requests (by rcode) and latency; `rows` gives a
row per pair and protocol, `flowmon_cli.dnsview` the DNS rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

from flowmon_contract.metrics import DNS_REQUEST_LABELS, METRICS, OVERFLOW_VALUE, QNAME_SUFFIX_LABEL
from flowmon_contract.spec import Metric

PairKey = tuple[tuple[str, str], ...]  # the flow labels of one series, sorted by name

# Labels that split one flow's samples without naming another flow (isolation violations carry the
# environments, which follow from the namespaces; DNS requests carry their rcode, qtype, qname suffix).
_NON_FLOW_LABELS = frozenset(
    {"le", "from_env", "to_env", *DNS_REQUEST_LABELS, QNAME_SUFFIX_LABEL}
    | {m.extra_label for m in METRICS.values() if m.extra_label}
)

_COUNTERS: dict[str, str] = {
    METRICS[Metric.SENT_BYTES].name + "_total": "sent_bytes",
    METRICS[Metric.RECEIVED_BYTES].name + "_total": "received_bytes",
    METRICS[Metric.CONNECTIONS_OPENED].name + "_total": "opened",
    METRICS[Metric.CONNECT_FAILURES].name + "_total": "failures",
    METRICS[Metric.RETRANSMITS].name + "_total": "retransmits",
    METRICS[Metric.RESETS].name + "_total": "resets",
    METRICS[Metric.UDP_SENT_BYTES].name + "_total": "udp_sent_bytes",
    METRICS[Metric.UDP_RECEIVED_BYTES].name + "_total": "udp_received_bytes",
    METRICS[Metric.UDP_SENT_DATAGRAMS].name + "_total": "udp_sent_datagrams",
    METRICS[Metric.UDP_RECEIVED_DATAGRAMS].name + "_total": "udp_received_datagrams",
}
_ACTIVE = METRICS[Metric.CONNECTIONS_ACTIVE].name
_DNS_REQUESTS = METRICS[Metric.DNS_REQUESTS].name + "_total"
_BUCKETS = {  # histogram bucket samples → the PairTotals field holding them
    METRICS[Metric.RTT].name + "_bucket": "rtt",
    METRICS[Metric.CONNECT_DURATION].name + "_bucket": "connect",
    METRICS[Metric.DNS_LATENCY].name + "_bucket": "dns_latency",
}
TCP_FIELDS = ("sent_bytes", "received_bytes", "opened", "failures", "retransmits", "resets", "violations")
UDP_FIELDS = ("udp_sent_bytes", "udp_received_bytes", "udp_sent_datagrams", "udp_received_datagrams")
COUNTER_FIELDS = TCP_FIELDS + UDP_FIELDS
_DICT_FIELDS = ("rtt", "connect", "dns_requests", "dns_latency")  # counts by bucket bound or rcode
TCP, UDP, DNS = "tcp", "udp", "dns"


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
    udp_sent_bytes: float = 0.0
    udp_received_bytes: float = 0.0
    udp_sent_datagrams: float = 0.0
    udp_received_datagrams: float = 0.0
    active: float = 0.0
    rtt: dict[float, float] = field(default_factory=dict)  # le (seconds, inf last) → cumulative count
    connect: dict[float, float] = field(default_factory=dict)
    dns_requests: dict[str, float] = field(default_factory=dict)  # rcode → requests (qtypes summed)
    dns_latency: dict[float, float] = field(default_factory=dict)
    protocols: frozenset[str] = frozenset()  # whose series the pair has: tcp, udp, dns (none: tcp)

    def copy(self) -> PairTotals:
        return replace(self, **{f: dict(getattr(self, f)) for f in _DICT_FIELDS})


Snapshot = dict[PairKey, PairTotals]


def pair_key(labels: Mapping[str, str]) -> PairKey:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in _NON_FLOW_LABELS))


def _protocol(sample_name: str) -> str:
    return UDP if "_udp_" in sample_name else DNS if "_dns_" in sample_name else TCP


def parse_exposition(text: str) -> Snapshot:
    """Prometheus text format → totals per pair. Unknown families are ignored."""
    pairs: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            target = _COUNTERS.get(name)
            if target is None and name.endswith("violations_total"):
                target = "violations"
            if target is None and name not in (_ACTIVE, _DNS_REQUESTS) and name not in _BUCKETS:
                continue
            totals = pairs.setdefault(pair_key(labels), PairTotals())
            totals.protocols |= {_protocol(name)}
            if target is not None:
                setattr(totals, target, getattr(totals, target) + value)
            elif name == _ACTIVE:
                totals.active += value
            else:
                counts, slot = (
                    (totals.dns_requests, labels.get("rcode", ""))
                    if name == _DNS_REQUESTS
                    else (getattr(totals, _BUCKETS[name]), float(labels["le"]))
                )
                counts[slot] = counts.get(slot, 0.0) + value
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
        counts = {f: _counts_delta(getattr(cur, f), getattr(prev, f)) for f in _DICT_FIELDS}
        result[key] = PairTotals(**counters, **counts, active=cur.active, protocols=cur.protocols)
    return result


def _counts_delta(current: Mapping, previous: Mapping) -> dict:
    """Buckets (or requests by rcode) that grew; all of them as they are when one went down (a reset)."""
    if any(current.get(slot, 0.0) < count for slot, count in previous.items()):
        return dict(current)
    return {slot: count - previous.get(slot, 0.0) for slot, count in current.items()}


def combine(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One monitor's snapshots from several agents: summed (each connection is counted by one agent)."""
    result: Snapshot = {}
    for snapshot in snapshots:
        for key, totals in snapshot.items():
            have = result.setdefault(key, PairTotals())
            for f in (*COUNTER_FIELDS, "active"):
                setattr(have, f, getattr(have, f) + getattr(totals, f))
            for f in _DICT_FIELDS:
                mine = getattr(have, f)
                for slot, count in getattr(totals, f).items():
                    mine[slot] = mine.get(slot, 0.0) + count
            have.protocols |= totals.protocols
    return result


def attach_violations(base: Snapshot, isolation: Snapshot) -> Snapshot:
    """Violations counted by another monitor (the isolation monitor groups differently), added to every
    base pair whose labels include the violation's; a violation no base pair matches gets its own row."""
    result = {key: totals.copy() for key, totals in base.items()}
    for key, totals in isolation.items():
        if not totals.violations:
            continue
        labels = set(key)
        matches = [k for k in result if labels <= set(k)]
        for k in matches or [key]:
            result.setdefault(k, PairTotals(protocols=frozenset({TCP}))).violations += totals.violations
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
    """One workload pair and protocol as the view shows it: per-second rates (or totals when seconds is
    None). A UDP row has bytes and datagrams, nothing of TCP's connections."""

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
    protocol: str = TCP  # tcp, udp, or both joined by "+" (a map edge)
    datagrams: float = 0.0  # UDP, both ways


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
    """Per pair and protocol: counters divided by `seconds` (rates) or as they are (totals); busiest
    first. A pair with only DNS series has no row here (flowmon_cli.dnsview shows it)."""
    scale = 1.0 / seconds if seconds else 1.0
    result = []
    for key, s in stats.items():
        labels = dict(key)
        client, server = endpoint_name(labels, "client"), endpoint_name(labels, "server")
        if TCP in s.protocols or not s.protocols:
            result.append(
                Row(
                    client,
                    server,
                    **{f: getattr(s, f) * scale for f in TCP_FIELDS},
                    active=s.active,
                    rtt_p50=histogram_quantile(0.5, s.rtt),
                    rtt_p99=histogram_quantile(0.99, s.rtt),
                )
            )
        if UDP in s.protocols:
            result.append(udp_row(client, server, s, scale))
    return sorted(
        result,
        key=lambda r: (-(r.sent_bytes + r.received_bytes), -r.opened, r.client, r.server, r.protocol),
    )


def udp_row(client: str, server: str, s: PairTotals, scale: float) -> Row:
    quiet = dict.fromkeys(TCP_FIELDS[2:], 0.0)  # connections, failures, retransmits, resets, violations
    return Row(
        client,
        server,
        sent_bytes=s.udp_sent_bytes * scale,
        received_bytes=s.udp_received_bytes * scale,
        **quiet,
        active=0.0,
        rtt_p50=None,
        rtt_p99=None,
        protocol=UDP,
        datagrams=(s.udp_sent_datagrams + s.udp_received_datagrams) * scale,
    )


def rows_with_violations(delta: Snapshot, seconds: float | None, totals: Snapshot) -> list[Row]:
    """`rows(delta, seconds)` with the violations of `totals`: a rare event must not blink away after
    one refresh."""
    cumulative = {(r.client, r.server, r.protocol): r.violations for r in rows(totals)}
    return [
        replace(r, violations=cumulative.get((r.client, r.server, r.protocol), 0.0))
        for r in rows(delta, seconds)
    ]


def live_rows(previous: Snapshot | None, current: Snapshot, seconds: float) -> list[Row]:
    """The live view: rates since the previous refresh (totals on the first), violations cumulative."""
    return rows_with_violations(diff(previous, current), seconds if previous is not None else None, current)


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
    """The view's columns, as text; `-` where the row's protocol has no such thing."""
    unit = "/s" if per_second else ""
    protocols = row.protocol.split("+")
    tcp, udp = TCP in protocols, UDP in protocols

    def count(value: float, applies: bool) -> str:
        return human_count(value) if applies else "-"

    return (
        row.client,
        row.server,
        row.protocol,
        human_bytes(row.sent_bytes, "B" + unit),
        human_bytes(row.received_bytes, "B" + unit),
        count(row.opened, tcp),
        count(row.datagrams, udp),
        human_seconds(row.rtt_p50),
        human_seconds(row.rtt_p99),
        count(row.retransmits, tcp),
        count(row.failures, tcp),
        count(row.violations, tcp),
    )


def columns(per_second: bool) -> Sequence[str]:
    unit = "/s" if per_second else ""
    return (
        "client",
        "server",
        "proto",
        "sent",
        "received",
        "conns" + unit,
        "dgrams" + unit,
        "rtt p50",
        "rtt p99",
        "retrans" + unit,
        "failed" + unit,
        "violations",
    )
