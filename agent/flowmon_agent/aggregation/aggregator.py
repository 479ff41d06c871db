"""IP flows → per-monitor series: NAT re-keying, count-once, selection, tenancy, groupBy, overflow, TTL.

No I/O: the tracer's snapshot, the resolver, the policy, conntrack's answers and the time come in; an
`AgentView` goes out. The state carried between polls (each flow's last counters, each monitor's
series) lives in `Aggregator`, so that exported counters grow by deltas and stay monotonic when a
flow re-keys (its pod changes, its NAT backend becomes known) or the tracer drops an entry.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from flowmon_agent.aggregation.isolation import IsolationCounter
from flowmon_agent.aggregation.view import AgentView, Family, HistogramValue, LabelValues, MonitorView
from flowmon_agent.kernel.flows import (
    HISTOGRAM_SLOTS,
    FlowCounters,
    FlowKey,
    FlowSnapshot,
    IPAddress,
    Reporter,
)
from flowmon_agent.metadata.records import Labels, PodRecord
from flowmon_agent.metadata.resolver import KIND_EXTERNAL, Endpoint, Resolver, name_network, service_endpoint
from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.metrics import METRICS, OVERFLOW_VALUE, FamilyType
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.selectors import selector_matches
from flowmon_contract.spec import Dimension, Metric, Selection

# Conntrack's answer for a per-connection flow to a Service IP: the backend (ip, port).
Backend = tuple[IPAddress, int]
NatBackends = Mapping[FlowKey, Backend]

# --- counters as flat integer vectors: cheap deltas and sums ------------------------------------
SENT, RECEIVED, OPENED, CLOSED, REFUSED, TIMEOUT, RETX_C2S, RETX_S2C, RST_C2S, RST_S2C = range(10)
CONNECT_SUM = 10
CONNECT_SLOTS = slice(11, 11 + HISTOGRAM_SLOTS)
RTT_SUM = 11 + HISTOGRAM_SLOTS
RTT_SLOTS = slice(RTT_SUM + 1, RTT_SUM + 1 + HISTOGRAM_SLOTS)
WIDTH = RTT_SUM + 1 + HISTOGRAM_SLOTS
# What the server's agent reports when the client's agent reports the rest: what only the server sees.
SERVER_SENT_ONLY = (RETX_S2C, RST_S2C)

Vector = tuple[int, ...]
Sparse = tuple[tuple[int, int], ...]  # (index, growth) of the non-zero entries
ZERO: Vector = (0,) * WIDTH

C2S, S2C = "client_to_server", "server_to_client"
# Metric → (vector index or histogram, extra label values → index).
_EXTRA = {
    Metric.CONNECT_FAILURES: (("refused", REFUSED), ("timeout", TIMEOUT)),
    Metric.RETRANSMITS: ((C2S, RETX_C2S), (S2C, RETX_S2C)),
    Metric.RESETS: ((C2S, RST_C2S), (S2C, RST_S2C)),
}
_SINGLE = {
    Metric.SENT_BYTES: SENT,
    Metric.RECEIVED_BYTES: RECEIVED,
    Metric.CONNECTIONS_OPENED: OPENED,
    Metric.CONNECTIONS_CLOSED: CLOSED,
}


def to_vector(c: FlowCounters) -> Vector:
    return (
        c.sent_bytes,
        c.received_bytes,
        c.opened,
        c.closed,
        c.failed_refused,
        c.failed_timeout,
        c.retransmits_c2s,
        c.retransmits_s2c,
        c.resets_c2s,
        c.resets_s2c,
        c.connect_latency.sum_us,
        *c.connect_latency.slots,
        c.rtt.sum_us,
        *c.rtt.slots,
    )


def vector_delta(current: Vector, previous: Vector | None) -> Vector:
    """Growth since the previous poll; a counter that went down means the entry restarted."""
    if previous is None:
        return current
    if current == previous:
        return ZERO
    delta = tuple(map(operator.sub, current, previous))
    return current if min(delta) < 0 else delta


# --- histograms ---------------------------------------------------------------------------------


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


# --- resolution and count-once ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedFlow:
    client_ip: IPAddress
    server_ip: IPAddress  # the backend's for a Service connection conntrack could resolve
    client: Endpoint
    server: Endpoint
    server_port: int
    service: str  # the Service's name when the client connected to a ClusterIP


def resolve_flow(key: FlowKey, resolver: Resolver, backends: NatBackends) -> ResolvedFlow:
    client = resolver.endpoint(key.client_ip)
    service_record = resolver.service(key.server_ip, key.server_port)
    if service_record is None:
        server_ip, port = key.server_ip, key.server_port
        server = resolver.endpoint(server_ip)
    elif key in backends:
        server_ip, port = backends[key]
        server = resolver.endpoint(server_ip)
    else:  # conntrack had no entry (yet, or any more): the Service stands in for its backend
        server_ip, port = key.server_ip, key.server_port
        server = service_endpoint(service_record)
    service = service_record.name if service_record else ""
    return ResolvedFlow(key.client_ip, server_ip, client, server, port, service)


class Share(Enum):
    """How much of a flow this agent reports (DESIGN: each connection is counted once)."""

    NONE = 0
    SERVER_SENT = 1  # only what the server sent (retransmits, resets): the client's agent reports the rest
    ALL_BUT_SERVER_SENT = 2  # the server's agent reports what the server sent
    FULL = 3


def flow_share(
    reporter: Reporter,
    flow: ResolvedFlow,
    *,
    node: str | Collection[str],
    agent_nodes: Collection[str],
    traced: TraceSet,
) -> Share:
    """The client socket's agent reports a connection; the server's agent reports what only the server
    sees (its retransmits and resets) when it traces the server, and everything when no agent traces the
    client. Every agent evaluates the same rule on the same policy and metadata, so they agree. An
    endpoint with no node (an unknown address) belongs to whichever agent saw it. `node` may name several
    nodes: an agent standing for all the nodes whose sockets share its kernel (standalone mode).

    Resets: a socket counts the RSTs it sends, and RSTs it receives from a peer no traced socket on its
    kernel sent; on two nodes both ends may count one RST, hence the masks.
    """
    client, server = flow.client, flow.server
    local = {node, ""} if isinstance(node, str) else {*node, ""}
    client_traced = client.is_pod and client.node in agent_nodes and traced.has(flow.client_ip)
    server_traced = server.is_pod and server.node in agent_nodes and traced.has(flow.server_ip)
    if reporter == Reporter.CLIENT:
        if client.node not in local:
            return Share.NONE
        if client.is_pod:
            return Share.ALL_BUT_SERVER_SENT if server_traced else Share.FULL
        # A host process or an unknown address: the server's agent reports it when it traces it.
        return Share.NONE if server_traced else Share.FULL
    if server.node not in local:
        return Share.NONE
    return Share.SERVER_SENT if client_traced else Share.FULL


# --- selection and the kernel filter ------------------------------------------------------------


def pod_selected(selection: Selection, namespace: str, labels: Mapping[str, str], ns_labels: Labels) -> bool:
    names = selection.namespaces
    if names.include and namespace not in names.include:
        return False
    if namespace in names.exclude:
        return False
    return selector_matches(selection.namespace_selector, ns_labels) and selector_matches(
        selection.pod_selector, labels
    )


def selects_everything(monitor: MonitorPolicy) -> bool:
    sel = monitor.selection
    return (
        monitor.tenant_namespace is None
        and not sel.namespaces.include
        and not sel.namespaces.exclude
        and (sel.namespace_selector is None or sel.namespace_selector.is_empty)
        and (sel.pod_selector is None or sel.pod_selector.is_empty)
    )


def traced_pods(
    policy: AgentPolicy, pods: Iterable[PodRecord], store: MetadataStore
) -> list[PodRecord] | None:
    """Pods whose sockets must be traced so that every monitor sees its flows; None = everything.

    Every selected flow has a selected pod at one end, so tracing the selected pods suffices. A tenant
    monitor's flows also have an end in its namespace: when it selects pods elsewhere, tracing its own
    namespace suffices instead. A cluster-wide monitor without restrictions gives None: all sockets,
    so that new pods are traced before their metadata arrives.
    """
    if any(selects_everything(m) for m in policy.monitors):
        return None
    pods = list(pods)
    chosen: dict[tuple[str, str], PodRecord] = {}
    for monitor in policy.monitors:
        selected = [
            p
            for p in pods
            if pod_selected(monitor.selection, p.namespace, p.labels, store.namespace_labels(p.namespace))
        ]
        tenant = monitor.tenant_namespace
        if tenant is not None and any(p.namespace != tenant for p in selected):
            selected = [p for p in pods if p.namespace == tenant]
        chosen.update(((p.namespace, p.name), p) for p in selected)
    return list(chosen.values())


@dataclass(frozen=True, slots=True)
class TraceSet:
    """Pod IPs the agents trace (cluster-wide); `ips is None` means every socket is traced."""

    ips: frozenset[IPAddress] | None
    pods: tuple[PodRecord, ...] = ()

    def has(self, ip: IPAddress) -> bool:
        return self.ips is None or ip in self.ips


# Per store: (generation, policy hash) → its trace set. Agents ask every poll; pods change far less.
_TRACE_SETS: weakref.WeakKeyDictionary[MetadataStore, tuple[tuple[int, str], TraceSet]] = (
    weakref.WeakKeyDictionary()
)


def trace_set(policy: AgentPolicy, store: MetadataStore) -> TraceSet:
    """What every agent traces under this policy, cluster-wide (cached until metadata or policy change)."""
    version = (store.current_generation(), policy.hash)
    cached = _TRACE_SETS.get(store)
    if cached is not None and cached[0] == version:
        return cached[1]
    pods = traced_pods(policy, store.pods(), store)
    result = (
        TraceSet(None) if pods is None else TraceSet(frozenset(ip for p in pods for ip in p.ips), tuple(pods))
    )
    _TRACE_SETS[store] = (version, result)
    return result


def local_ip_filter(
    policy: AgentPolicy, store: MetadataStore, node: str | Collection[str]
) -> set[IPAddress] | None:
    """The tracer's filter on this node (or these nodes): IPs of local pods some monitor needs traced;
    None = all."""
    nodes = {node} if isinstance(node, str) else set(node)
    traced = trace_set(policy, store)
    if traced.ips is None:
        return None
    return {ip for p in traced.pods if p.node in nodes for ip in p.ips}


# --- per-monitor series -------------------------------------------------------------------------


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


def _mask(delta: Vector, share: Share) -> Vector:
    if share == Share.FULL:
        return delta
    if share == Share.ALL_BUT_SERVER_SENT:
        return tuple(0 if i in SERVER_SENT_ONLY else v for i, v in enumerate(delta))
    masked = [0] * WIDTH
    for i in SERVER_SENT_ONLY:
        masked[i] = delta[i]
    return tuple(masked)


def _series_for(state: MonitorState, labels: LabelValues, monitor: MonitorPolicy, now: float) -> Series:
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


def _expire(state: MonitorState, ttl: float, now: float) -> None:
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


def _families(monitor: MonitorPolicy, rows: Sequence[tuple[LabelValues, Series]]) -> tuple[Family, ...]:
    families: list[Family] = []
    group = tuple(str(d) for d in monitor.group_by)
    for metric in (Metric(m) for m in monitor.metrics):
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
        elif metric in _EXTRA:
            samples = {
                (*labels, value): float(s.totals[index])
                for labels, s in rows
                for value, index in _EXTRA[metric]
            }
            families.append(Family(info, names, samples=samples))
        else:
            index = _SINGLE[metric]
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
    families = _families(monitor, rows)
    if state.isolation is not None:
        families += state.isolation.families()
    state.view = MonitorView(monitor.key, families, len(rows), state.overflowed_total)
    state.view_of, state.dirty = monitor, False
    return state.view


# --- the whole agent ----------------------------------------------------------------------------


class FlowInfo:
    """What a flow resolves to, cached across polls until metadata, policy or its NAT backend changes;
    each monitor's verdict (its labels, or None when it does not see the flow) is cached on it."""

    __slots__ = ("backend", "flow", "labels", "share")

    def __init__(self, flow: ResolvedFlow, share: Share, backend: Backend | None) -> None:
        self.flow, self.share, self.backend = flow, share, backend
        self.labels: dict[str, LabelValues | None] = {}

    def labels_for(self, monitor: MonitorPolicy, store: MetadataStore) -> LabelValues | None:
        try:
            return self.labels[monitor.key]
        except KeyError:
            visible = flow_visible(monitor, self.flow, store)
            found = self.labels[monitor.key] = flow_labels(self.flow, monitor) if visible else None
            return found


class FlowState:
    """Per flow, between polls: its last counters, and what it resolved to (valid for one epoch)."""

    __slots__ = ("epoch", "info", "seen", "vector")

    def __init__(self, vector: Vector) -> None:
        self.vector = vector
        self.info: FlowInfo | None = None
        self.epoch = -1
        self.seen = 0


@dataclass(frozen=True, slots=True)
class FlowUpdate:
    """One flow in one poll: what grew since the last poll, and its open connections now."""

    key: FlowKey
    info: FlowInfo
    growth: Sparse
    active: int

    @property
    def flow(self) -> ResolvedFlow:
        return self.info.flow


def effective_agent_nodes(
    policy: AgentPolicy, configured: Collection[str] | None, store: MetadataStore
) -> set[str]:
    """Nodes whose agent reports its clients' connections: the policy's list (the operator knows which
    agents are ready), else the agent's own setting, else every known node (standalone mode)."""
    if policy.agent_nodes is not None:
        return set(policy.agent_nodes)
    return set(configured) if configured is not None else set(store.node_names())


class Aggregator:
    """Builds the agent's view each poll. `node`: the node this agent runs on, or the names of every node
    whose sockets live on its kernel (standalone mode: one host playing several nodes); `agent_nodes`:
    nodes that run an agent when the policy does not say (default: every known node)."""

    def __init__(self, node: str | Iterable[str], agent_nodes: Iterable[str] | None = None) -> None:
        self.node: str | frozenset[str] = node if isinstance(node, str) else frozenset(node)
        self._local = frozenset({self.node}) if isinstance(self.node, str) else self.node
        self.agent_nodes = None if agent_nodes is None else set(agent_nodes)
        self._flows: dict[FlowKey, FlowState] = {}
        self._monitors: dict[str, MonitorState] = {}
        self._info_version: tuple[object, ...] = ()
        self._info_epoch = 0
        self._poll = 0

    def _flow_info(
        self, key: FlowKey, resolver: Resolver, backends: NatBackends, agent_nodes: set[str], traced: TraceSet
    ) -> FlowInfo:
        flow = resolve_flow(key, resolver, backends)
        share = flow_share(key.reporter, flow, node=self.node, agent_nodes=agent_nodes, traced=traced)
        return FlowInfo(flow, share, backends.get(key) if key.client_port else None)

    def updates(
        self, snapshot: FlowSnapshot, policy: AgentPolicy, resolver: Resolver, backends: NatBackends
    ) -> list[FlowUpdate]:
        """Deltas since the last poll, resolved and shared out; advances the per-flow state."""
        store = resolver.store
        agent_nodes = effective_agent_nodes(policy, self.agent_nodes, store) | self._local
        traced = trace_set(policy, store)
        version = (store.current_generation(), policy.hash, frozenset(agent_nodes))
        if version != self._info_version:  # resolutions and verdicts may have changed
            self._info_version, self._info_epoch = version, self._info_epoch + 1
        self._poll += 1
        poll, epoch, known = self._poll, self._info_epoch, self._flows
        out: list[FlowUpdate] = []
        for key, counters in snapshot.flows.items():
            vector = to_vector(counters)
            state = known.get(key)  # one lookup per flow and poll: hashing FlowKeys is the hot spot
            if state is None:
                state = known[key] = FlowState(vector)
                delta = vector
            else:
                delta = vector_delta(vector, state.vector)
                state.vector = vector
            state.seen = poll
            if delta is ZERO and not counters.active:
                continue
            info = state.info
            if (
                info is None
                or state.epoch != epoch
                or (key.client_port and backends.get(key) != info.backend)
            ):
                info = state.info = self._flow_info(key, resolver, backends, agent_nodes, traced)
                state.epoch = epoch
            if info.share == Share.NONE:
                continue
            growth = tuple((i, v) for i, v in enumerate(_mask(delta, info.share)) if v)
            active = 0 if info.share == Share.SERVER_SENT else counters.active
            if growth or active:
                out.append(FlowUpdate(key, info, growth, active))
        if len(known) > len(snapshot.flows):  # entries the tracer no longer reports
            for key in [k for k, state in known.items() if state.seen != poll]:
                del known[key]
        return out

    def build_view(
        self,
        snapshot: FlowSnapshot,
        policy: AgentPolicy,
        resolver: Resolver,
        now: float,
        backends: NatBackends | None = None,
    ) -> AgentView:
        updates = self.updates(snapshot, policy, resolver, backends or {})
        store = resolver.store
        views: dict[str, MonitorView] = {}
        states: dict[str, MonitorState] = {}
        for monitor in policy.monitors:
            shape = (tuple(monitor.group_by), tuple(monitor.metrics))
            state = self._monitors.get(monitor.key)
            if state is None or state.shape != shape:
                state = MonitorState(shape)
            if monitor.isolation.forbidden and (
                state.isolation is None or state.isolation.isolation != monitor.isolation
            ):
                state.isolation, state.dirty = IsolationCounter(monitor.isolation, monitor.max_series), True
            elif not monitor.isolation.forbidden and state.isolation is not None:
                state.isolation, state.dirty = None, True
            apply_updates(state, monitor, updates, store, now)
            states[monitor.key] = state
            views[monitor.key] = monitor_view(monitor, state)
        self._monitors = states
        return AgentView(policy_hash=policy.hash, monitors=views)


def flow_visible(monitor: MonitorPolicy, flow: ResolvedFlow, store: MetadataStore) -> bool:
    """Tenancy (an end in the tenant's namespace) and selection (an end is a selected pod)."""
    tenant = monitor.tenant_namespace
    if tenant is not None and tenant not in (flow.client.namespace, flow.server.namespace):
        return False
    return any(
        ep.is_pod
        and pod_selected(monitor.selection, ep.namespace, ep.labels, store.namespace_labels(ep.namespace))
        for ep in (flow.client, flow.server)
    )


def apply_updates(
    state: MonitorState,
    monitor: MonitorPolicy,
    updates: Iterable[FlowUpdate],
    store: MetadataStore,
    now: float,
) -> None:
    for series in (*state.series.values(), *([state.overflow] if state.overflow else [])):
        if series.active:  # open connections are counted afresh each poll
            series.active = 0
            state.dirty = True
    for update in updates:
        labels = update.info.labels_for(monitor, store)
        if labels is None:
            continue
        state.dirty = True
        series = _series_for(state, labels, monitor, now)
        series.add(update.growth)
        series.active += update.active
        series.last_change = now
        if state.isolation is not None:
            count_violation(state.isolation, update, store)
    _expire(state, monitor.series_ttl_seconds, now)


def count_violation(counter: IsolationCounter, update: FlowUpdate, store: MetadataStore) -> None:
    """Connection attempts (established or failed) and bytes of a flow between forbidden environments,
    counted in the same poll that saw them (within a second, before any rule evaluation)."""
    growth = dict(update.growth)
    attempts = growth.get(OPENED, 0) + growth.get(REFUSED, 0) + growth.get(TIMEOUT, 0)
    bytes_ = growth.get(SENT, 0) + growth.get(RECEIVED, 0)
    flow = update.flow
    counter.add(
        (flow.client.namespace, flow.client.workload),
        (flow.server.namespace, flow.server.workload),
        attempts=attempts,
        bytes_=bytes_,
        namespace_labels=store.namespace_labels,
    )
