"""The service map as data: workloads (nodes) and the workload pairs that talked (edges). Pure.

Built from one reading of the flows (`sources.Sample`): rates are the reading's counters over its
seconds (totals when it has none), violations stay cumulative. A node is whatever the monitor groups
by on that side (namespace/workload, a pod, a namespace alone); an end with an empty namespace is
outside the cluster (a node's address, an external peer or a named network). Edges join every port
and Service of a pair, TCP and UDP (`protocol`: tcp, udp or tcp+udp; a pair with only DNS series is no
edge); beyond `max_edges`, the heaviest stay and the rest is counted in the map's note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flowmon_cli import topview
from flowmon_cli.sources import Sample

DEFAULT_MAX_EDGES = 150
_FLOW_PROTOCOLS = (topview.TCP, topview.UDP)  # in the order an edge's protocol names them
_NAME_ATTRS = ("workload", "pod")


@dataclass(frozen=True)
class Node:
    id: str
    namespace: str
    name: str
    zone: str = ""
    external: bool = False


@dataclass(frozen=True)
class Edge(topview.Row):
    """One client → server pair of nodes: `top`'s row (rates per second, or totals, see
    ServiceMap.per_second; violations cumulative, so a single forbidden connection stays marked), and
    what the map draws besides."""

    udp_sent_bytes: float = 0.0  # sent_bytes and received_bytes are TCP's
    udp_received_bytes: float = 0.0
    services: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    cross_zone: bool = False
    external: bool = False

    @property
    def tcp_bytes(self) -> float:
        return self.sent_bytes + self.received_bytes

    @property
    def udp_bytes(self) -> float:
        return self.udp_sent_bytes + self.udp_received_bytes

    @property
    def bytes(self) -> float:
        return self.tcp_bytes + self.udp_bytes

    @property
    def troubled(self) -> bool:
        return bool(self.failures or self.resets)


@dataclass(frozen=True)
class ServiceMap:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    per_second: bool
    by_zone: bool = False
    omitted_edges: int = 0
    omitted_bytes: float = 0.0

    def note(self) -> str:
        """What was left out, in words (empty when nothing was)."""
        if not self.omitted_edges:
            return ""
        unit = "/s" if self.per_second else ""
        return (
            f"{self.omitted_edges} lighter edges left out "
            f"({topview.human_bytes(self.omitted_bytes, 'B' + unit)} together)"
        )


def endpoint(labels: Mapping[str, str], side: str, by_zone: bool) -> Node:
    """Pure: the node one side of a series stands for."""
    namespace = labels.get(f"{side}_namespace", "")
    parts = [labels[f"{side}_{attr}"] for attr in _NAME_ATTRS if labels.get(f"{side}_{attr}")]
    external = f"{side}_namespace" in labels and not namespace
    name = "/".join(parts) or namespace or "*"
    zone = labels.get(f"{side}_zone", "") if by_zone else ""
    node_id = f"{namespace}/{name}" if parts and namespace else name
    return Node(node_id + (f"@{zone}" if zone else ""), namespace, name, zone, external)


def _weight(edge: Edge) -> tuple:
    return (edge.violations > 0, edge.bytes, edge.opened + edge.failures, edge.client, edge.server)


def build(sample: Sample, *, by_zone: bool = False, max_edges: int = DEFAULT_MAX_EDGES) -> ServiceMap:
    """Pure: the map of one reading; heaviest edges first (violations before everything)."""
    scale = 1.0 / sample.seconds if sample.seconds else 1.0
    nodes: dict[str, Node] = {}
    groups: dict[tuple[str, str], list[topview.PairKey]] = {}
    flows = {
        k for k, t in sample.delta.items() if not t.protocols or t.protocols.intersection(_FLOW_PROTOCOLS)
    }
    for key in flows | {k for k, t in sample.totals.items() if t.violations}:
        labels = dict(key)
        client, server = endpoint(labels, "client", by_zone), endpoint(labels, "server", by_zone)
        nodes.setdefault(client.id, client)
        nodes.setdefault(server.id, server)
        groups.setdefault((client.id, server.id), []).append(key)
    edges = []
    for (client, server), keys in groups.items():
        delta = topview.combine({(): sample.delta[k]} for k in keys if k in sample.delta).get(
            (), topview.PairTotals()
        )
        labels = [dict(k) for k in keys]
        edges.append(
            Edge(
                client,
                server,
                **{f: getattr(delta, f) * scale for f in topview.TCP_FIELDS if f != "violations"},
                violations=sum(sample.totals[k].violations for k in keys if k in sample.totals),
                active=delta.active,
                rtt_p50=topview.histogram_quantile(0.5, delta.rtt),
                rtt_p99=topview.histogram_quantile(0.99, delta.rtt),
                protocol="+".join(p for p in _FLOW_PROTOCOLS if p in delta.protocols) or topview.TCP,
                datagrams=(delta.udp_sent_datagrams + delta.udp_received_datagrams) * scale,
                udp_sent_bytes=delta.udp_sent_bytes * scale,
                udp_received_bytes=delta.udp_received_bytes * scale,
                services=tuple(sorted({s for lb in labels if (s := lb.get("service"))})),
                ports=tuple(sorted({p for lb in labels if (p := lb.get("server_port"))}, key=_port_order)),
                cross_zone=any(_crosses_zones(lb) for lb in labels),
                external=nodes[client].external or nodes[server].external,
            )
        )
    edges.sort(key=_weight, reverse=True)
    kept, left = edges[:max_edges], edges[max_edges:]
    used = {e.client for e in kept} | {e.server for e in kept}
    return ServiceMap(
        nodes=tuple(sorted((nodes[i] for i in used), key=lambda n: n.id)),
        edges=tuple(kept),
        per_second=bool(sample.seconds),
        by_zone=by_zone,
        omitted_edges=len(left),
        omitted_bytes=sum(e.bytes for e in left),
    )


def _crosses_zones(labels: Mapping[str, str]) -> bool:
    client, server = labels.get("client_zone", ""), labels.get("server_zone", "")
    return bool(client and server and client != server)


def _port_order(port: str) -> tuple[int, str]:
    return (int(port), port) if port.isdigit() else (1 << 30, port)


def health_row(edge: Edge) -> topview.Row:
    """The edge as a `flowmon top` row (its health columns, for the live page's table and tooltips):
    bytes of both protocols."""
    via = f" via {', '.join(edge.services)}" if edge.services else ""
    return topview.Row(
        client=edge.client,
        server=edge.server + via,
        sent_bytes=edge.sent_bytes + edge.udp_sent_bytes,
        received_bytes=edge.received_bytes + edge.udp_received_bytes,
        opened=edge.opened,
        failures=edge.failures,
        retransmits=edge.retransmits,
        resets=edge.resets,
        violations=edge.violations,
        active=edge.active,
        rtt_p50=edge.rtt_p50,
        rtt_p99=edge.rtt_p99,
        protocol=edge.protocol,
        datagrams=edge.datagrams,
    )
