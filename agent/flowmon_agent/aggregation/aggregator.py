"""IP flows → per-monitor series, each poll: deltas of the counter vectors, resolution and count-once
(count_once.py), selection (tracing_scope.py), the monitors' series (series.py).

No I/O: the tracer's snapshot, the resolver, the policy, conntrack's answers and the time come in; an
`AgentView` goes out. The state carried between polls (each flow's last counters, each monitor's
series) lives in `Aggregator`, so that exported counters grow by deltas and stay monotonic when a
flow re-keys (its pod changes, its NAT backend becomes known) or the tracer restarts a key.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from flowmon_agent.aggregation.count_once import (
    Backend,
    NatBackends,
    PeerNames,
    ResolvedFlow,
    Share,
    effective_agent_nodes,
    flow_share,
    resolve_flow,
    share_of,
)
from flowmon_agent.aggregation.isolation import IsolationCounter
from flowmon_agent.aggregation.series import (
    MonitorState,
    Sparse,
    expire_idle,
    flow_labels,
    monitor_view,
    series_for,
)
from flowmon_agent.aggregation.tracing_scope import TraceSet, flow_visible, trace_set
from flowmon_agent.aggregation.view import AgentView, LabelValues, MonitorView
from flowmon_agent.kernel.counters import CLOSED, OPENED, RECEIVED, REFUSED, SENT, TIMEOUT, ZERO
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot
from flowmon_agent.metadata.resolver import KIND_EXTERNAL, Resolver
from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.policy import AgentPolicy, MonitorPolicy

Vector = tuple[int, ...]


def vector_delta(current: Vector, previous: Vector | None) -> Vector:
    """Growth since the previous poll. A counter that went down means the key restarted from zero (the
    tracer forgot a closed per-connection key and a new connection brought it back): its counters are
    all growth. The one place where exported counters are kept monotonic (the tracer keeps totals
    across the kernel's LRU entries; within an entry the kernel only adds)."""
    if previous is None:
        return current
    if current is previous or current == previous:
        return ZERO
    delta = tuple(map(operator.sub, current, previous))
    return current if min(delta) < 0 else delta


class FlowInfo:
    """What a flow resolves to, cached across polls until metadata, policy or its NAT backend changes;
    each monitor's verdict (its labels, or None when it does not see the flow) is cached on it."""

    __slots__ = ("backend", "flow", "labels", "names", "share")

    def __init__(self, flow: ResolvedFlow, share: Share, backend: Backend | None, names: int = -1) -> None:
        self.flow, self.share, self.backend = flow, share, backend
        self.names = names  # the generation of the DNS names an external server was named from
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

    __slots__ = ("epoch", "info", "vector")

    def __init__(self, vector: Vector) -> None:
        self.vector = vector
        self.info: FlowInfo | None = None
        self.epoch = -1


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


class Aggregator:
    """Builds the agent's view each poll. `node`: the node this agent runs on, or the names of every node
    whose sockets live on its kernel (standalone mode: one host playing several nodes); `agent_nodes`:
    nodes that run an agent when the policy does not say (default: every known node)."""

    def __init__(
        self,
        node: str | Iterable[str],
        agent_nodes: Iterable[str] | None = None,
        peer_names: PeerNames | None = None,
    ) -> None:
        self.node: str | frozenset[str] = node if isinstance(node, str) else frozenset(node)
        self._local = frozenset({self.node}) if isinstance(self.node, str) else self.node
        self.agent_nodes = None if agent_nodes is None else set(agent_nodes)
        self.peer_names = peer_names  # names external servers from DNS answers (server_dns_name)
        self._flows: dict[FlowKey, FlowState] = {}
        # the flows whose last counters had no open connection, with those counters: while a snapshot
        # brings them back unchanged they yield nothing, and they are skipped in C (`updates`)
        self._quiet: dict[FlowKey, Vector] = {}
        self.visited = 0  # flows the last poll looked at (new, changed, or with open connections)
        self._monitors: dict[str, MonitorState] = {}
        self._info_version: tuple[object, ...] = ()
        self._info_epoch = 0

    def _flow_info(
        self, key: FlowKey, resolver: Resolver, backends: NatBackends, agent_nodes: set[str], traced: TraceSet
    ) -> FlowInfo:
        names = self.peer_names
        flow = resolve_flow(key, resolver, backends, names)
        share = flow_share(key.reporter, flow, node=self.node, agent_nodes=agent_nodes, traced=traced)
        generation = names.generation if names is not None else -1
        return FlowInfo(flow, share, backends.get(key) if key.client_port else None, generation)

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
        epoch, known, quiet = self._info_epoch, self._flows, self._quiet
        names = self.peer_names.generation if self.peer_names is not None else -1
        out: list[FlowUpdate] = []
        visited = 0
        # in the snapshot's order, every flow but those quiet and unchanged (most of them, each poll)
        for key, vector in itertools.filterfalse(quiet.items().__contains__, snapshot.flows.items()):
            visited += 1
            state = known.get(key)
            if state is None:
                state = known[key] = FlowState(vector)
                delta = vector
            else:
                delta = vector_delta(vector, state.vector)
                state.vector = vector
            active = vector[OPENED] - vector[CLOSED]  # FlowCounters.active, inlined: the hot loop
            if active <= 0:
                quiet[key] = vector
            else:
                quiet.pop(key, None)
            if delta is ZERO and active <= 0:
                continue
            info = state.info
            if (
                info is None
                or state.epoch != epoch
                or (key.client_port and backends.get(key) != info.backend)
                or (info.names != names and info.flow.server.kind == KIND_EXTERNAL)  # a name came or went
            ):
                info = state.info = self._flow_info(key, resolver, backends, agent_nodes, traced)
                state.epoch = epoch
            if info.share == Share.NONE:
                continue
            growth = tuple((i, v) for i, v in enumerate(share_of(delta, info.share)) if v)
            active = 0 if info.share == Share.SERVER_SENT or active < 0 else active
            if growth or active:
                out.append(FlowUpdate(key, info, growth, active))
        self.visited = visited
        if len(known) > len(snapshot.flows):  # entries the tracer no longer reports
            gone = set(known)  # sets from dicts reuse the keys' hashes: no hashing here
            gone.difference_update(set(snapshot.flows))
            for key in gone:
                del known[key]
                quiet.pop(key, None)
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
        series = series_for(state, labels, monitor, now)
        series.add(update.growth)
        series.active += update.active
        series.last_change = now
        if state.isolation is not None:
            count_violation(state.isolation, update, store)
    expire_idle(state, monitor.series_ttl_seconds, now)


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
