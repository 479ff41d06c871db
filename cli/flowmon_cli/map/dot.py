"""The service map as Graphviz DOT. Pure: the same map gives the same text (a golden file holds it).

Namespaces are clusters (inside zone clusters with --by-zone); ends outside the cluster are grey
ellipses. Edges carry bytes/s both ways (UDP's on a line of its own, with datagrams/s), connections/s
and the Services they went through; the line grows with the bytes (relative to the map's heaviest
edge). Marks: red and bold for isolation violations, orange for failed connects and resets, dashed for
cross-zone, dotted for external peers, a hollow arrowhead for a UDP-only pair.
Every node and edge has an SVG id and a tooltip with the health columns of `flowmon top`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flowmon_cli import topview
from flowmon_cli.map.model import Edge, Node, ServiceMap, health_row

VIOLATION_COLOR = "#c0142b"
TROUBLE_COLOR = "#d9730d"
CROSS_ZONE_COLOR = "#6f42c1"
PLAIN_COLOR = "#4a5568c0"  # a little transparent: crossings stay legible
FONT = "Helvetica"


def quote(text: str) -> str:
    """A DOT string: quotes and backslashes escaped (so no label can start a DOT escape)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**attrs: str | float) -> str:
    return "[" + ", ".join(f"{k}={quote(str(v))}" for k, v in attrs.items()) + "]"


def _rate(value: float, per_second: bool, what: str = "") -> str:
    unit = "/s" if per_second else ""
    return f"{topview.human_count(value)}{(' ' + what) if what else ''}{unit}"


def edge_label(edge: Edge, per_second: bool) -> str:
    unit = "B/s" if per_second else "B"
    lines = []
    if edge.tcp_bytes:
        sent, received = (topview.human_bytes(v, unit) for v in (edge.sent_bytes, edge.received_bytes))
        lines.append(f"→ {sent} · ← {received}")
    if edge.udp_bytes or edge.datagrams:
        sent, received = (
            topview.human_bytes(v, unit) for v in (edge.udp_sent_bytes, edge.udp_received_bytes)
        )
        lines.append(f"UDP → {sent} · ← {received} · {_rate(edge.datagrams, per_second, 'dgram')}")
    if edge.opened:
        lines.append(_rate(edge.opened, per_second, "conn"))
    if edge.failures:
        lines.append("✗ " + _rate(edge.failures, per_second, "failed"))
    if edge.resets:
        lines.append("RST " + _rate(edge.resets, per_second))
    if edge.retransmits:
        lines.append("↻ " + _rate(edge.retransmits, per_second, "retrans"))
    if edge.violations:
        lines.append(f"⚠ ISOLATION VIOLATION ({topview.human_count(edge.violations)})")
    if edge.services:
        lines.append("via " + ", ".join(edge.services))
    if edge.cross_zone:
        lines.append("cross-zone")
    return "\n".join(lines)


def edge_tooltip(edge: Edge, per_second: bool) -> str:
    row = health_row(edge)
    cells = topview.row_cells(row, per_second)
    return "\n".join(
        f"{name}: {value}" for name, value in zip(topview.columns(per_second), cells, strict=True)
    )


def _edge_style(edge: Edge, heaviest: float) -> dict[str, str | float]:
    # Relative to the map's heaviest edge: a busy map is not a wall of thick lines.
    width = 0.8 + 3.7 * math.sqrt(edge.bytes / heaviest) if heaviest else 0.8
    color = PLAIN_COLOR
    style = "solid"
    if edge.cross_zone:
        color, style = CROSS_ZONE_COLOR, "dashed"
    if edge.external:
        style = "dotted"
    if edge.troubled:
        color = TROUBLE_COLOR
    if edge.violations:
        color, style, width = VIOLATION_COLOR, "bold", max(width, 3.0)
    marks: dict[str, str | float] = {"color": color, "fontcolor": color, "style": style}
    if edge.protocol == topview.UDP:
        marks["arrowhead"] = "empty"
    return marks | {"penwidth": f"{width:.2f}"}


def _node_line(node: Node, indent: str) -> str:
    shape = {"shape": "ellipse", "style": "filled,dashed", "fillcolor": "#eeeeee"} if node.external else {}
    tooltip = f"{node.id}" + (f"\nzone {node.zone}" if node.zone else "")
    return (
        f"{indent}{quote(node.id)} {_attrs(label=node.name, id='node:' + node.id, tooltip=tooltip, **shape)};"
    )


def _cluster(name: str, label: str, body: Iterable[str], indent: str, style: str) -> list[str]:
    return [
        f"{indent}subgraph {quote('cluster_' + name)} {{",
        f'{indent}  label={quote(label)}; style={quote(style)}; color="#a0aec0";',
        *body,
        f"{indent}}}",
    ]


def _namespaces(nodes: list[Node], indent: str, prefix: str) -> list[str]:
    lines: list[str] = []
    for namespace in sorted({n.namespace for n in nodes if not n.external}):
        members = [_node_line(n, indent + "  ") for n in nodes if n.namespace == namespace and not n.external]
        lines += _cluster(f"{prefix}ns:{namespace}", namespace, members, indent, "rounded")
    lines += [_node_line(n, indent) for n in nodes if n.external]
    return lines


def render(service_map: ServiceMap, title: str = "flowmon service map") -> str:
    """Pure: the DOT text of the map."""
    note = service_map.note()
    label = title + (f"\n{note}" if note else "")
    graph = _attrs(
        label=label, labelloc="t", rankdir="LR", fontname=FONT, fontsize=14, newrank="true",
        nodesep="0.3", ranksep="0.9", pad="0.3", tooltip=title,
    )  # fmt: skip
    node = _attrs(
        shape="box", style="rounded,filled", fillcolor="#e8f0fe", color="#4a6fa5", fontname=FONT, fontsize=11
    )
    lines = ["digraph flowmon {", f"  graph {graph};", f"  node {node};"]
    lines.append(f"  edge {_attrs(fontname=FONT, fontsize=9, arrowsize='0.7')};")
    nodes = list(service_map.nodes)
    if service_map.by_zone:
        for zone in sorted({n.zone for n in nodes}):
            in_zone = [n for n in nodes if n.zone == zone]
            body = _namespaces(in_zone, "    ", f"{zone}:")
            lines += _cluster(f"zone:{zone}", f"zone {zone}" if zone else "no zone", body, "  ", "dashed")
    else:
        lines += _namespaces(nodes, "  ", "")
    heaviest = max((e.bytes for e in service_map.edges), default=0.0)
    for edge in service_map.edges:
        attrs = _attrs(
            label=edge_label(edge, service_map.per_second),
            id=f"edge:{edge.client}->{edge.server}",
            tooltip=edge_tooltip(edge, service_map.per_second),
            **_edge_style(edge, heaviest),
        )
        lines.append(f"  {quote(edge.client)} -> {quote(edge.server)} {attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"
