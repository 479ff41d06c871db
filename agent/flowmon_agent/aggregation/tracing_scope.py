"""Tracing scope: which flows each monitor sees (selection, tenancy) and, from that, what the kernel
traces on this node (`kernel_config`). Pure: policy, metadata and node names in.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address

from flowmon_agent.aggregation.count_once import ResolvedFlow
from flowmon_agent.kernel.flows import IPAddress, IPNetwork, KernelConfig
from flowmon_agent.metadata.records import Labels, PodRecord
from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.selectors import selector_matches
from flowmon_contract.spec import Selection


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


# Per store: generation → the cluster's networks (20k pods: ~20 ms to build, so once per change).
ClusterNetworks = frozenset[IPAddress | IPNetwork]
_CLUSTER_NETS: weakref.WeakKeyDictionary[MetadataStore, tuple[int, ClusterNetworks | None]] = (
    weakref.WeakKeyDictionary()
)


def outside(ips: Iterable[IPAddress], networks: Iterable[IPNetwork]) -> list[IPAddress]:
    """The addresses no network holds (a set lookup per distinct prefix length, not per network)."""
    by_length: dict[tuple[int, int], set[int]] = {}
    for net in networks:
        by_length.setdefault((net.version, net.prefixlen), set()).add(int(net.network_address))
    shifts = [
        (version, ip_bits - length, held)
        for (version, length), held in by_length.items()
        for ip_bits in (32 if version == 4 else 128,)
    ]
    return [
        ip for ip in ips if not any(ip.version == v and (int(ip) >> s) << s in held for v, s, held in shifts)
    ]


def cluster_networks(store: MetadataStore) -> ClusterNetworks | None:
    """What the kernel keeps exact as a peer: the nodes' pod CIDRs and every pod, node and Service
    address outside them (a bare address is a /32 or /128). None while the store knows no pod and no node
    (agent start): nothing is folded until the cluster is known, since a pod cannot be told from the
    internet before."""
    generation = store.current_generation()
    cached = _CLUSTER_NETS.get(store)
    if cached is not None and cached[0] == generation:
        return cached[1]
    ips, cidrs = store.cluster_addresses()
    known = store.pods() or store.node_names()
    result = frozenset((*cidrs, *outside(ips, cidrs))) if known else None
    _CLUSTER_NETS[store] = (generation, result)
    return result


# External addresses with a live DNS name kept exact in the kernel's key, the most recently learned
# (NameTable.addresses): bounded, since a pod forging answers to itself must not unfold the internet
NAMED_PEERS_MAX = 4096


def kernel_config(
    policy: AgentPolicy,
    store: MetadataStore,
    nodes: str | Collection[str],
    ignored_ports: Iterable[int] = (),
    named_peers: Iterable[str] = (),
) -> KernelConfig:
    """What the tracer on this node (or these nodes) is configured with under this policy: the local IPs
    it traces, the NAT peers (Service IPs: connections to them stay per connection, for conntrack), the
    ports it ignores (the agent's own, configured ones), whether srtt is sampled (a monitor exports
    RTT: tcp_probe, the costliest hook, runs on every received segment), whether UDP is counted (a
    monitor exports a UDP metric: bpf/udp.c runs on every packet of the node), and which peers stay exact
    (the cluster's, and `named_peers`: external addresses with a live DNS name) or are folded (the rest:
    to the monitors' named networks, or to external)."""
    return KernelConfig(
        local_ips=local_ip_filter(policy, store, nodes),
        nat_peers=frozenset(store.service_ips()),
        ignored_ports=frozenset(ignored_ports),
        rtt=policy.wants_rtt,
        cluster_networks=cluster_networks(store),
        fold_networks=frozenset(n.cidr for m in policy.monitors for n in m.selection.networks),
        named_peers=frozenset(ip_address(a) for a in named_peers),
        udp=policy.wants_udp,
    )
