"""`flowmon map` on real agents: exact totals of a known netns exchange; the running demo's agents and
Prometheus (every pair of the traffic mix, the violation marked); the demo's live page in a real
headless Chromium (no console errors, the workloads shown, a new pair drawn after new traffic)."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flowmon_cli.map import dot
from flowmon_lab.network import Lab
from tests.browser import chromium
from tests.test_cli_agent import bare_agent, loopback_exchange, row_when_opened
from tests.test_map import svg_groups, svg_text

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "tests" / "output"  # git-ignored: screenshots and maps of the last run
pytestmark = [pytest.mark.root, pytest.mark.root]

DEMO_PAIRS = {  # client → server workload of scenario.CALLS
    ("shop/frontend", "shop/cart"),
    ("shop/frontend", "payments/api"),
    ("shop/frontend", "shop/catalog"),
    ("shop/cart", "shop/recommendations"),
    ("payments/settlement", "payments/ledger"),
    ("shop-staging/frontend", "payments/api"),
}
VIOLATION = "edge:shop-staging/frontend->payments/api"


def flowmon_map(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "map", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def graphviz_present() -> None:
    import shutil

    if shutil.which("dot") is None:
        pytest.fail("Graphviz's dot is missing: run `make setup` (scripts/apt-packages.txt)")


@pytest.mark.root
def test_map_totals_are_the_bytes_of_a_known_exchange_between_namespaces(tmp_path) -> None:
    graphviz_present()
    with Lab("fmm", ["a", "b"]) as lab, bare_agent() as (base, _):
        a, b = lab.pod("a"), lab.pod("b")
        port = loopback_exchange(
            1111, 2222, 3, str(b.ipv4), None, lambda: lab.inside(b), lambda: lab.inside(a)
        )
        row_when_opened(base, (f"host/{a.netns}", f"host/{b.netns}:{port}"), 3)  # the agent has counted them
        out = tmp_path / "map.svg"
        flowmon_map(base, "--totals", "-o", str(out))
        groups = svg_groups(out.read_text())
        edge = groups[f"edge:host/{a.netns}->host/{b.netns}"]
        assert {f"node:host/{a.netns}", f"node:host/{b.netns}"} <= set(groups)
        # 3 x 1111 B = 3.3 KiB sent, 3 x 2222 B = 6.5 KiB received, 3 connections
        assert svg_text(edge).splitlines()[:2] == ["→ 3.3 KiB · ← 6.5 KiB", "3 conn"]
        tooltip = edge.find(".//{http://www.w3.org/2000/svg}a").get("{http://www.w3.org/1999/xlink}title")
        assert "conns: 3" in tooltip


@pytest.mark.slow
def test_map_of_the_demo_agents_has_every_pair_and_marks_the_violation(running_demo, tmp_path) -> None:
    graphviz_present()
    out = OUTPUT / "map-demo.svg"
    OUTPUT.mkdir(exist_ok=True)
    demo = running_demo
    flowmon_map(
        *demo.monitor_urls("flowmon-system/service-map"),
        "--violations", *demo.monitor_urls("flowmon-system/environment-isolation"),
        "--ca", str(demo.ca), "--token", str(demo.token), "--interval", "3", "-o", str(out),
    )  # fmt: skip
    groups = svg_groups(out.read_text())
    edges = {tuple(i.removeprefix("edge:").split("->")) for i in groups if i.startswith("edge:")}
    # the forbidden call happens once, 3 s in: the map may be drawn before; it is there once counted
    assert DEMO_PAIRS - {tuple(VIOLATION.removeprefix("edge:").split("->"))} <= edges
    nodes = {i.removeprefix("node:") for i in groups if i.startswith("node:")}
    assert {c for c, _ in DEMO_PAIRS} | {s for _, s in DEMO_PAIRS} <= nodes
    steady = svg_text(groups["edge:shop/frontend->shop/cart"])
    assert "B/s" in steady and "conn/s" in steady and "via cart" in steady
    failing = svg_text(groups["edge:shop/cart->shop/recommendations"])
    assert "failed/s" in failing
    if VIOLATION in groups:
        assert "ISOLATION VIOLATION" in svg_text(groups[VIOLATION])
        assert dot.VIOLATION_COLOR in ET.tostring(groups[VIOLATION], encoding="unicode")
    # The cost monitor groups by zone: namespaces inside their zones, cross-zone edges dashed.
    zoned = tmp_path / "zones.dot"
    flowmon_map(
        *demo.monitor_urls("flowmon-system/cost-by-zone"), "--by-zone", "--ca", str(demo.ca),
        "--token", str(demo.token), "--interval", "3", "-o", str(zoned),
    )  # fmt: skip
    text = zoned.read_text()
    assert '"cluster_zone:zone-a"' in text and '"cluster_zone:zone-b"' in text
    assert "cross-zone" in text and f'color="{dot.CROSS_ZONE_COLOR}"' in text


@pytest.mark.slow
def test_map_from_the_demo_prometheus_over_a_range(running_demo, tmp_path) -> None:
    graphviz_present()
    out = tmp_path / "map.svg"
    pairs: set = set()
    for _ in range(20):  # the demo's Prometheus needs two scrapes of a pair for its increase
        flowmon_map("--prometheus", running_demo.prometheus_url, "--range", "1m", "-o", str(out))
        groups = svg_groups(out.read_text())
        pairs = {tuple(i.removeprefix("edge:").split("->")) for i in groups if i.startswith("edge:")}
        if pairs >= DEMO_PAIRS and VIOLATION in groups:
            break
        time.sleep(3)
    assert pairs >= DEMO_PAIRS
    assert "ISOLATION VIOLATION" in svg_text(groups[VIOLATION])


NODES_JS = "Array.from(document.querySelectorAll('#map g.node')).map(g => g.id)"
EDGES_JS = "Array.from(document.querySelectorAll('#map g.edge')).map(g => g.id)"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_live_page_in_headless_chromium(running_demo) -> None:
    import asyncio

    from flowmon_lab.cluster_plan import plan_cluster
    from flowmon_lab.demo import scenario

    graphviz_present()
    async with chromium(running_demo.map_url) as page:
        await page.wait_for(f"{NODES_JS}.length > 0", 60, "the map's nodes")
        wanted = [f"node:{c}" for c, _ in DEMO_PAIRS] + [f"node:{s}" for _, s in DEMO_PAIRS]
        await page.wait_for(f"{wanted!r}.every(id => {NODES_JS}.includes(id))", 60, "every demo workload")
        rows = await page.evaluate("document.querySelectorAll('#health tbody tr').length")
        assert rows >= len(DEMO_PAIRS) - 1
        await page.wait_for(f"document.getElementById({VIOLATION!r}) !== null", 60, "the violation")
        assert await page.evaluate("document.querySelector('#health tbody tr.violation') !== null")
        # New traffic: catalog never calls the ledger in the demo; three calls draw a new edge.
        plan = plan_cluster(scenario.CLUSTER, scenario.PREFIX)
        catalog = next(p for p in plan.pods if (p.namespace, p.deployment) == ("shop", "catalog"))
        ledger = next(p for p in plan.pods if (p.namespace, p.deployment) == ("payments", "ledger"))
        new_edge = "edge:shop/catalog->payments/ledger"
        assert not await page.evaluate(f"document.getElementById({new_edge!r}) !== null")
        argv = ["ip", "netns", "exec", catalog.netns, *scenario.trafficgen(
            "call", f"{ledger.ip}:{scenario.LEDGER_PORT}", "--count", "3", "--rate", "5", "--request", "100",
            "--response", "100", "--seconds", "20", "--timeout", "5",
        )]  # fmt: skip
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        await page.wait_for(f"document.getElementById({new_edge!r}) !== null", 30, "the new pair on the page")
        await page.screenshot(OUTPUT / "map-live.png")
        assert page.errors() == []
        status = await page.evaluate("document.getElementById('status').textContent")
        assert "per second" in status and "workloads" in status
