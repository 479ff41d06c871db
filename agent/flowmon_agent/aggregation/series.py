"""Per-monitor series: a flow's labels under a monitor's groupBy, the series' totals (counter vectors),
overflow beyond maxSeries, TTL expiry, and the metric families rendered from them. Pure but for the
`MonitorState` a monitor carries from poll to poll.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowmon_agent.aggregation.count_once import ResolvedFlow
from flowmon_agent.aggregation.isolation import IsolationCounter
from flowmon_agent.aggregation.view import Family, HistogramValue, LabelValues, MonitorView
from flowmon_agent.kernel.counters import (
    CLOSED,
    CONNECT_SLOTS,
    CONNECT_SUM,
    HISTOGRAM_SLOTS,
    OPENED,
    RECEIVED,
    REFUSED,
    RETX_C2S,
    RETX_S2C,
    RST_C2S,
    RST_S2C,
    RTT_SLOTS,
    RTT_SUM,
    SENT,
    TCP_WORDS,
    TIMEOUT,
    UDP_RECEIVED,
    UDP_RECEIVED_DATAGRAMS,
    UDP_SENT,
    UDP_SENT_DATAGRAMS,
    UDP_WORDS,
    WIDTH,
)
from flowmon_agent.kernel.flows import IPAddress
from flowmon_agent.metadata.resolver import KIND_EXTERNAL, Endpoint, name_network
from flowmon_contract.metrics import METRICS, OVERFLOW_VALUE, FamilyType
from flowmon_contract.policy import MonitorPolicy
from flowmon_contract.spec import DNS_METRICS, UDP_METRICS, Dimension, Metric

Sparse = tuple[tuple[int, int], ...]  # (index, growth) of the non-zero entries of a counter vector

C2S, S2C = "client_to_server", "server_to_client"
# Metric → (vector index or histogram, extra label values → index).
EXTRA_LABEL_COUNTERS = {
    Metric.CONNECT_FAILURES: (("refused", REFUSED), ("timeout", TIMEOUT)),
    Metric.RETRANSMITS: ((C2S, RETX_C2S), (S2C, RETX_S2C)),
    Metric.RESETS: ((C2S, RST_C2S), (S2C, RST_S2C)),
}
SINGLE_COUNTERS = {
    Metric.SENT_BYTES: SENT,
    Metric.RECEIVED_BYTES: RECEIVED,
    Metric.CONNECTIONS_OPENED: OPENED,
    Metric.CONNECTIONS_CLOSED: CLOSED,
    Metric.UDP_SENT_BYTES: UDP_SENT,
    Metric.UDP_RECEIVED_BYTES: UDP_RECEIVED,
    Metric.UDP_SENT_DATAGRAMS: UDP_SENT_DATAGRAMS,
    Metric.UDP_RECEIVED_DATAGRAMS: UDP_RECEIVED_DATAGRAMS,
}


def slot_range_us(slot: int) -> tuple[int, int]:
    """The integer microsecond values a kernel log2 slot holds, inclusive."""
    return (0, 0) if slot == 0 else (1 << (slot - 1), (1 << slot) - 1)


@functools.lru_cache(maxsize=256)
def slot_weights(bound_seconds: float) -> tuple[float, ...]:
    """The share of each log2 slot's values at or below the bound (1 below, 0 above, a fraction if cut)."""
    limit = math.floor(bound_seconds * 1_000_000 + 1e-6)  # values are whole microseconds
    weights = []
    for slot in range(HISTOGRAM_SLOTS):
        low, high = slot_range_us(slot)
        weights.append(
            1.0 if high <= limit else (limit - low + 1) / (high - low + 1) if low <= limit else 0.0
        )
    return tuple(weights)


def log2_to_buckets(slots: Sequence[int], sum_us: int, bounds_seconds: Sequence[float]) -> HistogramValue:
    """Map log2 microsecond slots onto arbitrary `le` bounds (see docs/aggregation.md).

    A slot entirely at or below a bound counts fully; a slot the bound cuts counts in proportion to
    the integer values below the cut (values assumed uniform inside a slot); the result is floored so
    that counts stay integers, never exceed the true count of a bound aligned with slot edges, and
    never decrease over time. +Inf is exact.
    """
    cumulative = [
        math.floor(sum(map(operator.mul, slots, slot_weights(bound))) + 1e-9) for bound in bounds_seconds
    ]
    cumulative.append(sum(slots))
    return HistogramValue(tuple(cumulative), sum_us / 1_000_000)


def _endpoint_value(ep: Endpoint, ip: IPAddress, attr: str, monitor: MonitorPolicy) -> str:
    if attr == "workload" and ep.kind == KIND_EXTERNAL and monitor.selection.networks:
        return name_network(ip, monitor.selection.networks) or ep.workload
    return getattr(ep, attr)


def flow_labels(flow: ResolvedFlow, monitor: MonitorPolicy) -> LabelValues:
    values: list[str] = []
    for dim in monitor.group_by:
        if dim == Dimension.SERVER_PORT:
            values.append(str(flow.server_port))
        elif dim == Dimension.SERVICE:
            values.append(flow.service)
        elif dim == Dimension.SERVER_DNS_NAME:  # unknown external peers stay `external` (or their network)
            external = flow.server.kind == KIND_EXTERNAL
            unnamed = _endpoint_value(flow.server, flow.server_ip, "workload", monitor) if external else ""
            values.append(flow.server_dns_name or unnamed)
        else:
            end, attr = str(dim).split("_", 1)
            ep, ip = (flow.client, flow.client_ip) if end == "client" else (flow.server, flow.server_ip)
            values.append(_endpoint_value(ep, ip, attr, monitor))
    return tuple(values)


@dataclass(slots=True)
class Series:
    totals: list[int] = field(default_factory=lambda: [0] * WIDTH)
    active: int = 0
    last_change: float = 0.0
    # Rendered histograms by (metric, bounds), until the next growth: mapping slots costs the most.
    histograms: dict[tuple[str, tuple[float, ...]], HistogramValue | None] = field(default_factory=dict)

    def add(self, growth: Sparse) -> None:
        totals = self.totals
        for i, value in growth:
            totals[i] += value
        self.histograms.clear()

    def histogram(self, metric: str, bounds: tuple[float, ...]) -> HistogramValue | None:
        """The series' histogram on these bounds; None while it has no samples."""
        key = (metric, bounds)
        try:
            return self.histograms[key]
        except KeyError:
            slots, total = (RTT_SLOTS, RTT_SUM) if metric == Metric.RTT else (CONNECT_SLOTS, CONNECT_SUM)
            counts = self.totals[slots]
            value = self.histograms[key] = (
                log2_to_buckets(counts, self.totals[total], bounds) if any(counts) else None
            )
            return value


@dataclass(slots=True)
class MonitorState:
    shape: tuple[object, ...]  # label names and metrics: a change starts the monitor afresh
    series: dict[LabelValues, Series] = field(default_factory=dict)
    overflow: Series | None = None
    overflow_members: dict[LabelValues, float] = field(default_factory=dict)  # labels → last seen
    overflowed_total: int = 0
    isolation: IsolationCounter | None = None  # set when the monitor forbids environment pairs
    # The last view and the monitor it was built for: reused while nothing changed.
    view: MonitorView | None = None
    view_of: MonitorPolicy | None = None
    dirty: bool = True


def series_for(state: MonitorState, labels: LabelValues, monitor: MonitorPolicy, now: float) -> Series:
    series = state.series.get(labels)
    if series is not None:
        return series
    if labels not in state.overflow_members and len(state.series) < monitor.max_series:
        series = state.series[labels] = Series(last_change=now)
        return series
    if labels not in state.overflow_members:
        state.overflowed_total += 1
    state.overflow_members[labels] = now
    if state.overflow is None:
        state.overflow = Series(last_change=now)
    return state.overflow


def expire_idle(state: MonitorState, ttl: float, now: float) -> None:
    idle = [k for k, s in state.series.items() if not s.active and now - s.last_change > ttl]
    for labels in idle:
        del state.series[labels]
    for labels in [k for k, seen in state.overflow_members.items() if now - seen > ttl]:
        del state.overflow_members[labels]
    overflow = state.overflow
    if overflow is not None and not overflow.active and now - overflow.last_change > ttl:
        state.overflow = None
        idle.append(())
    if idle:
        state.dirty = True


def rows_by_protocol(
    rows: Sequence[tuple[LabelValues, Series]],
) -> tuple[list[tuple[LabelValues, Series]], list[tuple[LabelValues, Series]]]:
    """(TCP rows, UDP rows): a series shows a protocol's families once it has counted some of it (a pair
    that only talks UDP has no flowmon_tcp_* series at 0). Totals only grow, so a row never leaves."""
    tcp = [(labels, s) for labels, s in rows if s.active or any(s.totals[TCP_WORDS])]
    udp = [(labels, s) for labels, s in rows if any(s.totals[UDP_WORDS])]
    return tcp, udp


def monitor_families(
    monitor: MonitorPolicy, all_rows: Sequence[tuple[LabelValues, Series]]
) -> tuple[Family, ...]:
    families: list[Family] = []
    group = tuple(str(d) for d in monitor.group_by)
    tcp_rows, udp_rows = rows_by_protocol(all_rows)
    for metric in (Metric(m) for m in monitor.metrics if m not in DNS_METRICS):  # dns_series renders DNS
        rows = udp_rows if metric in UDP_METRICS else tcp_rows
        info = METRICS[metric]
        names = (*group, info.extra_label) if info.extra_label else group
        if info.type == FamilyType.HISTOGRAM:
            buckets = monitor.histogram_buckets
            bounds = tuple(buckets.rtt if metric == Metric.RTT else buckets.connect_duration)
            rendered = ((labels, s.histogram(metric, bounds)) for labels, s in rows)
            histograms = {labels: value for labels, value in rendered if value is not None}
            families.append(Family(info, names, histograms=histograms, bucket_bounds=bounds))
        elif metric == Metric.CONNECTIONS_ACTIVE:
            families.append(Family(info, names, samples={labels: float(s.active) for labels, s in rows}))
        elif metric in EXTRA_LABEL_COUNTERS:
            samples = {
                (*labels, value): float(s.totals[index])
                for labels, s in rows
                for value, index in EXTRA_LABEL_COUNTERS[metric]
            }
            families.append(Family(info, names, samples=samples))
        else:
            index = SINGLE_COUNTERS[metric]
            families.append(
                Family(info, names, samples={labels: float(s.totals[index]) for labels, s in rows})
            )
    return tuple(families)


def monitor_view(monitor: MonitorPolicy, state: MonitorState) -> MonitorView:
    if not state.dirty and state.view is not None and state.view_of == monitor:
        return state.view
    rows = list(state.series.items())
    if state.overflow is not None:
        rows.append(((OVERFLOW_VALUE,) * len(monitor.group_by), state.overflow))
    families = monitor_families(monitor, rows)
    if state.isolation is not None:
        families += state.isolation.families()
    state.view = MonitorView(monitor.key, families, len(rows), state.overflowed_total)
    state.view_of, state.dirty = monitor, False
    return state.view
