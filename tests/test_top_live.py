"""`flowmon top` on the running demo: from the demo's real Prometheus (--prometheus, rates over a range)
and from its agents (totals). The demo's DNS is known by construction: catalog asks only for a name that
does not exist (every answer NXDOMAIN), frontend only for Services that exist (none fails); both reach
the resolver behind kube-dns over UDP, which the service-map monitor exports beside TCP."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESOLVER = "kube-system/kube-dns via kube-dns"  # the kube-dns Service IP stands for its pods


def flowmon_top(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "top", "--once", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def cells(text: str) -> list[list[str]]:
    """The table rows of rich's output, as lists of cells."""
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in text.splitlines() if "│" in line]


def tables(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """(flow rows, DNS rows): the DNS table comes after its title."""
    flows, _, dns = text.partition("DNS per client and server")
    return cells(flows), cells(dns)


def wait_for_top(args: list[str], ready, tries: int = 30) -> tuple[list[list[str]], list[list[str]]]:
    flows = dns = []
    for _ in range(tries):  # the new Prometheus needs a few scrapes of each pair for its increase
        flows, dns = tables(flowmon_top(*args))
        if ready(flows, dns):
            return flows, dns
        time.sleep(3)
    raise AssertionError(f"top never showed what the demo does:\nflows {flows}\ndns {dns}")


def demo_dns_shown(flows: list[list[str]], dns: list[list[str]]) -> bool:
    clients = {r[0] for r in dns if r[1] == RESOLVER}
    udp = {r[0] for r in flows if r[1:3] == [RESOLVER, "udp"]}
    return {"shop/catalog", "shop/frontend"} <= clients and {"shop/catalog", "shop/frontend"} <= udp


def test_top_from_the_demo_prometheus_shows_dns_per_client_and_udp_beside_tcp(running_demo) -> None:
    flows, dns = wait_for_top(["--prometheus", running_demo.prometheus_url, "--range", "1m"], demo_dns_shown)
    header = ["client", "DNS server", "queries/s", "failed", "NXDOMAIN/s", "SERVFAIL/s", "timeout/s"]
    assert cells_named(dns, header, "shop/catalog")["failed"] == "100%"
    assert cells_named(dns, header, "shop/frontend")["failed"] == "0%"
    catalog = cells_named(dns, header, "shop/catalog")
    assert catalog["queries/s"] != "0" and catalog["NXDOMAIN/s"] == catalog["queries/s"]
    # The same Prometheus, the same pairs: TCP rows next to the UDP ones.
    tcp = {(r[0], r[2]) for r in flows if len(r) > 2}
    assert ("shop/frontend", "tcp") in tcp and ("shop/frontend", "udp") in tcp
    udp_row = next(r for r in flows if r[:3] == ["shop/frontend", RESOLVER, "udp"])
    assert udp_row[3].endswith("B/s") and udp_row[5] == "-" and udp_row[6] != "-"  # no conns; datagrams


def test_top_from_the_demo_agents_shows_the_same_dns_totals(running_demo) -> None:
    demo = running_demo
    args = [
        *demo.monitor_urls("flowmon-system/service-map"),
        "--ca",
        str(demo.ca),
        "--token",
        str(demo.token),
    ]
    _, dns = wait_for_top(args, demo_dns_shown, tries=10)
    header = ["client", "DNS server", "queries", "failed", "NXDOMAIN", "SERVFAIL", "timeout"]
    catalog = cells_named(dns, header, "shop/catalog")
    assert catalog["failed"] == "100%" and catalog["NXDOMAIN"] == catalog["queries"] != "0"
    assert cells_named(dns, header, "shop/frontend")["failed"] == "0%"


def cells_named(rows: list[list[str]], header: list[str], client: str) -> dict[str, str]:
    row = next(r for r in rows if r[0] == client and r[1] == RESOLVER)
    return dict(zip(header, row, strict=False))
