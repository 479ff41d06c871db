"""DNS requests → per-monitor series (flowmon_dns_requests_total, flowmon_dns_latency_seconds).

The tracker's counters are cumulative per (vantage, client ip, server ip, rcode, qtype[, qname suffix]);
each poll takes their growth, resolves both ends like a flow (a Service IP stands for its resolver pods),
counts each request once (below), and applies every monitor's tenancy, selection, groupBy, maxSeries and
seriesTTL, as for TCP flows. Pure but for the state carried between polls.

Count-once: a transaction seen at the client's socket is reported by the client's node (`client`
vantage); the server's view counts only for clients on no agent's node (outside the cluster, a node
without an agent), since otherwise that node's agent reports it.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address

from flowmon_agent.aggregation.count_once import ResolvedFlow
from flowmon_agent.aggregation.series import flow_labels
from flowmon_agent.aggregation.tracing_scope import flow_visible
from flowmon_agent.aggregation.view import AgentView, Family, HistogramValue, LabelValues, MonitorView
from flowmon_agent.dns.tracker import (
    OVERFLOW,
    LatencyHistogram,
    PairKey,
    RequestKey,
    Vantage,
    matching_suffix,
)
from flowmon_agent.metadata.resolver import Resolver, service_endpoint
from flowmon_contract.metrics import (
    DNS_REQUEST_LABELS,
    METRICS,
    OVERFLOW_VALUE,
    QNAME_OTHER,
    QNAME_SUFFIX_LABEL,
)
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.spec import Metric

DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class DnsTotals:
    """What the tracker counted so far (cumulative): `DnsTracker.requests()` and `.latency()`."""

    requests: Mapping[RequestKey, int]
    latency: Mapping[PairKey, LatencyHistogram]


@dataclass(slots=True)
class _Histogram:
    cumulative: list[int]  # per bound, then +Inf
    sum: float = 0.0


@dataclass(slots=True)
class DnsMonitorState:
    shape: tuple[object, ...]  # groupBy, metrics, suffixes: a change starts the monitor afresh
    requests: dict[LabelValues, float] = field(default_factory=dict)
    latency: dict[LabelValues, _Histogram] = field(default_factory=dict)
    last_change: dict[tuple[str, LabelValues], float] = field(default_factory=dict)
    overflowed_total: int = 0


@dataclass(frozen=True, slots=True)
class DnsMonitorView:
    families: tuple[Family, ...]
    series: int
    overflowed_total: int


@functools.lru_cache(maxsize=8192)
def _resolved(client: str, server: str, resolver: Resolver, generation: int) -> ResolvedFlow:
    """A (client, server) pair of the tracker as a flow to port 53 (cached per metadata generation)."""
    del generation  # part of the cache key only
    client_ip, server_ip = ip_address(client), ip_address(server)
    record = resolver.service(server_ip, DNS_PORT)
    server_end = service_endpoint(record) if record else resolver.endpoint(server_ip)
    return ResolvedFlow(
        client_ip,
        server_ip,
        resolver.endpoint(client_ip),
        server_end,
        DNS_PORT,
        record.name if record else "",
    )


def counted_here(
    vantage: Vantage, flow: ResolvedFlow, *, local: Collection[str], agent_nodes: Collection[str]
) -> bool:
    """Count-once for DNS (module docstring). `local`: this agent's nodes and "" (an unknown address
    whose socket is here)."""
    if vantage is Vantage.CLIENT:
        return flow.client.node in local
    return flow.client.node not in agent_nodes


def monitor_suffix(tracked: str, monitor: MonitorPolicy) -> str:
    """The monitor's own suffix for a query the tracker matched against every monitor's suffixes."""
    ordered = sorted(monitor.qname_suffixes, key=lambda s: (-len(s), s))
    return (matching_suffix(tracked, ordered) if tracked else "") or QNAME_OTHER


def _growth(current: int, previous: int | None) -> int:
    return current if previous is None or current < previous else current - previous


def _histogram_growth(
    current: LatencyHistogram, previous: LatencyHistogram | None
) -> tuple[list[int], float]:
    now = [*current.cumulative, current.count]
    if previous is None or previous.count > current.count:
        return now, current.sum
    before = [*previous.cumulative, previous.count]
    return [a - b for a, b in zip(now, before, strict=True)], current.sum - previous.sum


class DnsAggregator:
    """Carries the tracker's last totals and each monitor's DNS series from poll to poll."""

    def __init__(self) -> None:
        self._requests: Mapping[RequestKey, int] = {}
        self._latency: Mapping[PairKey, LatencyHistogram] = {}
        self._monitors: dict[str, DnsMonitorState] = {}

    def build(
        self,
        totals: DnsTotals,
        policy: AgentPolicy,
        resolver: Resolver,
        now: float,
        *,
        local: Collection[str],
        agent_nodes: Collection[str],
    ) -> dict[str, DnsMonitorView]:
        """Per monitor key: its DNS families (empty when it exports neither DNS metric)."""
        generation = resolver.store.current_generation()
        local_nodes = {*local, ""}

        def counted(vantage: Vantage, client: str, server: str) -> tuple[bool, ResolvedFlow | None]:
            if client == OVERFLOW:  # folded by the tracker: no ends to resolve; the client's view counts
                return vantage is Vantage.CLIENT, None
            flow = _resolved(client, server, resolver, generation)
            return counted_here(vantage, flow, local=local_nodes, agent_nodes=agent_nodes), flow

        requests = []
        for key, value in totals.requests.items():
            grown = _growth(value, self._requests.get(key))
            here, flow = counted(key.vantage, key.client, key.server) if grown else (False, None)
            if here:
                requests.append((key, flow, grown))
        latency = []
        for pair, hist in totals.latency.items():
            previous = self._latency.get(pair)
            if previous is not None and previous.count == hist.count:
                continue
            here, flow = counted(pair.vantage, pair.client, pair.server)
            if here:
                latency.append((flow, *_histogram_growth(hist, previous)))
        bounds = next(iter(totals.latency.values())).bounds if totals.latency else ()
        self._requests, self._latency = dict(totals.requests), dict(totals.latency)

        views, states = {}, {}
        for monitor in policy.monitors:
            shape = (tuple(monitor.group_by), tuple(monitor.metrics), tuple(monitor.qname_suffixes))
            state = self._monitors.get(monitor.key)
            if state is None or state.shape != shape:
                state = DnsMonitorState(shape)
            apply_requests(state, monitor, requests, resolver, now)
            apply_latency(state, monitor, latency, resolver, now, len(bounds) + 1)
            expire_dns(state, monitor.series_ttl_seconds, now)
            states[monitor.key] = state
            views[monitor.key] = dns_view(monitor, state, bounds)
        self._monitors = states
        return views


def _group_labels(
    monitor: MonitorPolicy, flow: ResolvedFlow | None, resolver: Resolver
) -> LabelValues | None:
    """The monitor's groupBy values for a pair; None when the monitor does not see it."""
    if flow is None:  # the tracker's overflow: only cluster-wide monitors may see it
        return (OVERFLOW_VALUE,) * len(monitor.group_by) if monitor.tenant_namespace is None else None
    return flow_labels(flow, monitor) if flow_visible(monitor, flow, resolver.store) else None


def _capped(
    state: DnsMonitorState,
    family: str,
    table: Mapping,
    labels: LabelValues,
    group: int,
    monitor: MonitorPolicy,
    now: float,
) -> LabelValues:
    """`labels`, or its group part folded into __overflow__ when the family holds maxSeries already."""
    if labels not in table and len(table) >= monitor.max_series:
        state.overflowed_total += 1
        labels = (OVERFLOW_VALUE,) * group + labels[group:]
    state.last_change[(family, labels)] = now
    return labels


def apply_requests(
    state: DnsMonitorState, monitor: MonitorPolicy, requests, resolver: Resolver, now: float
) -> None:
    if Metric.DNS_REQUESTS not in monitor.metrics:
        return
    width = len(monitor.group_by)
    for key, flow, grown in requests:
        group = _group_labels(monitor, flow, resolver)
        if group is None:
            continue
        extra = (key.rcode, key.qtype)
        if monitor.qname_suffixes:
            extra += (monitor_suffix(key.qname_suffix, monitor),)
        labels = _capped(state, "requests", state.requests, (*group, *extra), width, monitor, now)
        state.requests[labels] = state.requests.get(labels, 0.0) + grown


def apply_latency(
    state: DnsMonitorState, monitor: MonitorPolicy, latency, resolver: Resolver, now: float, width: int
) -> None:
    if Metric.DNS_LATENCY not in monitor.metrics:
        return
    for flow, buckets, seconds in latency:
        group = _group_labels(monitor, flow, resolver)
        if group is None:
            continue
        labels = _capped(state, "latency", state.latency, group, len(group), monitor, now)
        hist = state.latency.get(labels)
        if hist is None:
            hist = state.latency[labels] = _Histogram([0] * width)
        hist.cumulative = [a + b for a, b in zip(hist.cumulative, buckets, strict=True)]
        hist.sum += seconds


def expire_dns(state: DnsMonitorState, ttl: float, now: float) -> None:
    for family, labels in [k for k, seen in state.last_change.items() if now - seen > ttl]:
        del state.last_change[(family, labels)]
        (state.requests if family == "requests" else state.latency).pop(labels, None)


def dns_view(monitor: MonitorPolicy, state: DnsMonitorState, bounds: tuple[float, ...]) -> DnsMonitorView:
    group = tuple(str(d) for d in monitor.group_by)
    families = []
    if Metric.DNS_REQUESTS in monitor.metrics:
        names = (*group, *DNS_REQUEST_LABELS, *((QNAME_SUFFIX_LABEL,) if monitor.qname_suffixes else ()))
        families.append(Family(METRICS[Metric.DNS_REQUESTS], names, samples=dict(state.requests)))
    if Metric.DNS_LATENCY in monitor.metrics and bounds:
        histograms = {k: HistogramValue(tuple(h.cumulative), h.sum) for k, h in state.latency.items()}
        families.append(
            Family(METRICS[Metric.DNS_LATENCY], group, histograms=histograms, bucket_bounds=bounds)
        )
    return DnsMonitorView(tuple(families), len(state.requests) + len(state.latency), state.overflowed_total)


def with_dns(
    view: AgentView, dns: Mapping[str, DnsMonitorView], health: tuple[Family, ...] = ()
) -> AgentView:
    """The flows' view with each monitor's DNS families appended, and the capture's health families."""
    monitors = {}
    for key, monitor in view.monitors.items():
        extra = dns.get(key)
        monitors[key] = (
            monitor
            if extra is None or not extra.families
            else MonitorView(
                key,
                monitor.families + extra.families,
                monitor.series + extra.series,
                monitor.overflowed_total + extra.overflowed_total,
            )
        )
    return replace(view, monitors=monitors, extra_families=view.extra_families + health)
