"""`flowmon map`'s pure parts on fixed scrapes: the graph model, golden DOT, Graphviz output, the
PromQL source's queries, the live page's answer; and a 200-workload map drawn within a bound."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.map_draw import synthetic_exposition
from flowmon_cli import prometheus_source as ps
from flowmon_cli import topview
from flowmon_cli.map import dot, graphviz, model, server
from flowmon_cli.sources import Sample
from tests.waiting import until

GOLDEN = Path(__file__).parent / "golden" / "map"
SVG = "{http://www.w3.org/2000/svg}"


def fixed_sample(seconds: float | None = 2.0) -> Sample:
    """The golden scrape as `flowmon map` reads it: the service map plus the isolation monitor."""
    base = topview.parse_exposition((GOLDEN / "scrape.txt").read_text())
    isolation = topview.parse_exposition((GOLDEN / "isolation.txt").read_text())
    return Sample(base, seconds, topview.attach_violations(base, isolation))


def test_golden_dot_of_a_fixed_scrape() -> None:
    text = dot.render(model.build(fixed_sample()))
    assert text == (GOLDEN / "service-map.dot").read_text()


def test_model_marks_violations_failures_cross_zone_and_external_peers() -> None:
    graph = model.build(fixed_sample())
    edges = {(e.client, e.server): e for e in graph.edges}
    assert set(edges) == {
        ("shop/frontend", "shop/cart"),
        ("shop/frontend", "payments/api"),
        ("shop-staging/frontend", "payments/api"),
        ("shop/cart", "shop/recommendations"),
        ("payments/settlement", "object-storage"),
        ("shop/frontend", "kube-system/coredns"),  # UDP only; catalog's DNS-only pair draws no edge
    }
    assert graph.edges[0].violations == 1  # a violation sorts first, whatever its bytes
    staging = edges["shop-staging/frontend", "payments/api"]
    assert (staging.sent_bytes, staging.received_bytes, staging.opened) == (400, 600, 0.5)  # per second
    assert edges["shop/frontend", "payments/api"].cross_zone
    assert not edges["shop/frontend", "shop/cart"].cross_zone
    failing = edges["shop/cart", "shop/recommendations"]
    assert (failing.failures, failing.resets, failing.troubled) == (1, 1, True)
    external = edges["payments/settlement", "object-storage"]
    assert external.external and external.retransmits == 1.5
    assert {n.id for n in graph.nodes if n.external} == {"object-storage"}
    assert edges["shop/frontend", "shop/cart"].services == ("cart",)
    assert edges["shop/frontend", "shop/cart"].ports == ("8080",)
    udp = edges["shop/frontend", "kube-system/coredns"]
    assert (udp.protocol, udp.udp_sent_bytes, udp.udp_received_bytes, udp.datagrams) == (
        "udp",
        2000,
        4500,
        50,
    )
    assert (udp.sent_bytes, udp.opened, udp.bytes) == (0, 0, 6500)
    assert edges["shop/frontend", "shop/cart"].protocol == "tcp"


def test_totals_without_seconds_and_zone_grouping() -> None:
    graph = model.build(fixed_sample(seconds=None), by_zone=True)
    assert not graph.per_second
    ids = {n.id for n in graph.nodes}
    assert {"shop/frontend@zone-a", "payments/api@zone-b", "object-storage"} <= ids
    text = dot.render(graph)
    assert '"cluster_zone:zone-a"' in text and "B/s" not in text and "20.0 KiB" in text


def test_max_edges_keeps_the_heaviest_and_says_what_was_left_out() -> None:
    graph = model.build(fixed_sample(), max_edges=2)
    assert [(e.client, e.server) for e in graph.edges] == [
        ("shop-staging/frontend", "payments/api"),  # the violation
        ("payments/settlement", "object-storage"),  # 514 KiB/s
    ]
    assert graph.omitted_edges == 4
    assert graph.note() == "4 lighter edges left out (96.3 KiB/s together)"  # 90 KiB/s TCP, 6500 B/s UDP
    assert "4 lighter edges left out" in dot.render(graph)


def test_dot_strings_cannot_break_out_of_their_quotes() -> None:
    assert dot.quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def svg_groups(svg: str) -> dict[str, ET.Element]:
    """Graphviz's node and edge groups of an SVG, by their (unescaped) id."""
    root = ET.fromstring(svg)
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("class") in ("node", "edge")}


def svg_text(group: ET.Element) -> str:
    return "\n".join(t.text or "" for t in group.iter(f"{SVG}text"))


def test_svg_holds_every_workload_and_pair_with_its_marks() -> None:
    graph = model.build(fixed_sample())
    groups = svg_groups(graphviz.layout(dot.render(graph), "svg").decode())
    assert {i for i in groups if i.startswith("node:")} == {f"node:{n.id}" for n in graph.nodes}
    assert {i for i in groups if i.startswith("edge:")} == {
        f"edge:{e.client}->{e.server}" for e in graph.edges
    }
    violation = groups["edge:shop-staging/frontend->payments/api"]
    assert dot.VIOLATION_COLOR in ET.tostring(violation, encoding="unicode")
    assert "ISOLATION VIOLATION (1)" in svg_text(violation)
    assert "→ 10.0 KiB/s · ← 75.0 KiB/s" in svg_text(groups["edge:shop/frontend->shop/cart"])
    udp = groups["edge:shop/frontend->kube-system/coredns"]
    assert "UDP → 2.0 KiB/s · ← 4.4 KiB/s · 50 dgram/s" in svg_text(udp)
    (arrowhead,) = udp.iter(f"{SVG}polygon")
    assert arrowhead.get("fill") == "none"  # hollow: UDP only
    (tcp_arrowhead,) = groups["edge:shop/frontend->shop/cart"].iter(f"{SVG}polygon")
    assert tcp_arrowhead.get("fill") != "none"
    png = graphviz.layout(dot.render(graph), "png")
    assert png.startswith(b"\x89PNG")


def test_a_200_workload_map_keeps_the_heaviest_edges_and_says_what_it_left_out() -> None:
    """The time it takes is bench/map_draw.py's (docs/BENCHMARKS.md), not a test's."""
    snapshot = topview.parse_exposition(synthetic_exposition(200, 12, 3))
    graph = model.build(Sample(snapshot, 2.0, snapshot))
    svg = graphviz.layout(dot.render(graph), "svg")
    assert len(graph.edges) == model.DEFAULT_MAX_EDGES and graph.omitted_edges == 600 - 150
    assert b"450 lighter edges left out" in svg


def test_promql_of_a_monitor_and_its_answers_read_back_as_exposition() -> None:
    queries = dict(ps.flow_queries("flowmon-system/service-map", "5m"))
    assert queries["flowmon_tcp_sent_bytes_total"] == (
        f"sum by ({ps.FLOW_LABELS}) "
        '(increase(flowmon_tcp_sent_bytes_total{flowmon_monitor="flowmon-system/service-map"}[5m]))'
    )
    assert "le)" in queries["flowmon_tcp_rtt_seconds_bucket"]
    assert ", reason)" in queries["flowmon_tcp_connect_failures_total"]
    assert "increase" not in queries["flowmon_tcp_connections_active"]
    answer = [
        {"metric": {"client_workload": 'a"b', "server_workload": "db"}, "value": [1, "300"]},
        {"metric": {"client_workload": "x", "server_workload": "y"}, "value": [1, "NaN"]},
    ]
    snapshot = topview.parse_exposition(ps.exposition("flowmon_tcp_sent_bytes_total", answer))
    assert {dict(k)["client_workload"]: t.sent_bytes for k, t in snapshot.items()} == {'a"b': 300.0}
    assert ps.range_seconds("5m") == 300 and ps.range_seconds("90s") == 90
    with pytest.raises(ValueError, match="PromQL range"):
        ps.range_seconds("5 minutes")


def test_live_page_answer_carries_the_health_columns_per_edge() -> None:
    graph = model.build(fixed_sample())
    answer = server.payload(graph, "<svg/>", "fixed", 3.0)
    assert answer["columns"] == list(topview.columns(True))
    violation = next(r for r in answer["rows"] if r["violation"])
    assert violation["edge"] == "edge:shop-staging/frontend->payments/api"
    assert violation["cells"][:2] == ["shop-staging/frontend", "payments/api via api"]
    assert answer["nodes"] == [n.id for n in graph.nodes]


@pytest.mark.parametrize(
    ("text", "expected"), [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0))]
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert server.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8080", ":80", "host:http", "h:70000"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        server.parse_listen(text)


def test_output_format_follows_the_file_name() -> None:
    assert [graphviz.format_for(Path(p)) for p in ("m.svg", "m.PNG", "m.dot")] == ["svg", "png", "dot"]
    with pytest.raises(ValueError, match="svg"):
        graphviz.format_for(Path("m.pdf"))


@pytest.mark.asyncio
async def test_live_page_serves_only_its_own_assets_and_reports_a_failed_reading() -> None:

    from aiohttp.test_utils import TestClient, TestServer

    from flowmon_cli.sources import AgentSource, Endpoints
    from flowmon_lab.prometheus import free_port

    dead = f"http://127.0.0.1:{free_port()}/metrics/a/b"  # nothing listens there
    live = server.LiveMap(AgentSource(Endpoints([dead])), server.PageOptions(interval=0.2))
    async with TestClient(TestServer(server.application(live))) as client:
        page = await (await client.get("/")).text()
        references = re.findall(r'(?:src|href)="([^"]*)"', page)
        assert references and all(r.startswith("/") or r.startswith("data:") for r in references), references
        for asset in ("/map.js", "/map.css"):
            response = await client.get(asset)
            assert response.status == 200 and "http://" not in await response.text()

        async def reading() -> dict | None:  # the first reading fails within a refresh or two
            answer = await (await client.get("/api/map")).json()
            return answer if answer["generation"] else None

        answer = await until(reading)
        assert "Connection refused" in answer["error"] and "svg" not in answer
