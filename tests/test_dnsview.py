"""The live view's DNS rows (pure), on exposition text as the exporter renders the DNS families."""

from __future__ import annotations

import pytest

from flowmon_cli import dnsview, topview

WEB = (
    'client_namespace="shop",client_workload="web",'
    'server_namespace="kube-system",server_port="53",server_workload="coredns",service="kube-dns"'
)
CRON = (
    'client_namespace="shop",client_workload="cron",'
    'server_namespace="",server_port="53",server_workload="external"'
)


def exposition(scale: float = 1.0) -> str:
    """web: 100 queries (90 answered, 6 NXDOMAIN, 2 SERVFAIL, 2 timeouts); cron: 4 A and AAAA, all fine."""
    requests = [
        (WEB, "A", "NOERROR", 60),
        (WEB, "AAAA", "NOERROR", 30),
        (WEB, "A", "NXDOMAIN", 6),
        (WEB, "A", "SERVFAIL", 2),
        (WEB, "A", "timeout", 2),
        (CRON, "A", "NOERROR", 2),
        (CRON, "AAAA", "NOERROR", 2),
    ]
    lines = ["# TYPE flowmon_dns_requests_total counter"]
    lines += [
        f'flowmon_dns_requests_total{{{pair},qtype="{qtype}",qname_suffix="other",rcode="{rcode}"}} '
        f"{n * scale}"
        for pair, qtype, rcode, n in requests
    ]
    lines.append("# TYPE flowmon_dns_latency_seconds histogram")
    # web's 98 answers: 49 within 1 ms, all within 10 ms (the 2 timeouts have no latency)
    for le, n in (("0.001", 49), ("0.01", 98), ("+Inf", 98)):
        lines.append(f'flowmon_dns_latency_seconds_bucket{{{WEB},le="{le}"}} {n * scale}')
    lines.append(f"flowmon_dns_latency_seconds_count{{{WEB}}} {98 * scale}")
    lines.append(f"flowmon_dns_latency_seconds_sum{{{WEB}}} {0.3 * scale}")
    return "\n".join(lines) + "\n"


def test_rows_per_client_and_server_with_failures_and_latency() -> None:
    before = topview.parse_exposition(exposition())
    after = topview.parse_exposition(exposition(3))
    web, cron = dnsview.dns_rows(topview.diff(before, after), seconds=4.0)  # 200 and 8 new queries in 4 s
    assert (web.client, web.server) == ("shop/web", "kube-system/coredns:53 via kube-dns")
    assert (web.queries, web.nxdomain, web.servfail, web.timeouts) == (50, 3, 1, 1)
    assert web.failure_ratio == pytest.approx(0.1)
    # PromQL's histogram_quantile on the same buckets: p50 at the top of (0, 1ms], p99 in (1ms, 10ms]
    assert web.latency_p50 == pytest.approx(0.001)
    assert web.latency_p99 == pytest.approx(0.001 + 0.009 * (0.99 * 196 - 98) / (196 - 98))
    assert (cron.client, cron.server, cron.queries, cron.failure_ratio) == ("shop/cron", "/external:53", 2, 0)
    assert (cron.latency_p50, cron.latency_p99) == (None, None)  # no latency series: not measured


def test_cells_line_up_with_columns() -> None:
    web, cron = dnsview.dns_rows(topview.parse_exposition(exposition()))  # totals
    cells = dict(zip(dnsview.dns_columns(False), dnsview.dns_cells(web), strict=True))
    assert cells == {
        "client": "shop/web",
        "DNS server": "kube-system/coredns:53 via kube-dns",
        "queries": "100",
        "failed": "10.0%",
        "NXDOMAIN": "6",
        "SERVFAIL": "2",
        "timeout": "2",
        "latency p50": "1.0ms",
        "latency p99": "9.8ms",
    }
    assert dnsview.dns_cells(cron)[3] == "0%"
    assert "queries/s" in dnsview.dns_columns(True)


def test_no_dns_series_no_rows_and_no_queries_no_ratio() -> None:
    tcp_only = topview.parse_exposition(
        '# TYPE flowmon_tcp_sent_bytes_total counter\nflowmon_tcp_sent_bytes_total{client_workload="a"} 1.0\n'
    )
    assert dnsview.dns_rows(tcp_only) == []
    quiet = topview.diff(*(topview.parse_exposition(exposition()),) * 2)  # nothing new
    assert all(r.queries == 0 and r.failure_ratio is None for r in dnsview.dns_rows(quiet, 2.0))
    assert dnsview.percent(None) == "-"


def test_prometheus_source_asks_for_dns_requests_by_rcode_and_reads_them_back() -> None:
    from flowmon_cli import prometheus_source as ps

    queries = dict(ps.flow_queries("flowmon-system/service-map", "5m"))
    assert queries["flowmon_dns_requests_total"] == (
        f"sum by ({ps.FLOW_LABELS}, rcode) "
        '(increase(flowmon_dns_requests_total{flowmon_monitor="flowmon-system/service-map"}[5m]))'
    )
    assert queries["flowmon_dns_latency_seconds_bucket"].startswith(f"sum by ({ps.FLOW_LABELS}, le) ")
    assert (
        f"sum by ({ps.FLOW_LABELS}) (increase(flowmon_udp_sent_bytes_total"
        in (queries["flowmon_udp_sent_bytes_total"])
    )
    web = {"client_workload": "web", "server_workload": "coredns"}
    answer = [
        {"metric": web | {"rcode": rcode}, "value": [1, str(n)]}
        for rcode, n in (("NOERROR", 9), ("timeout", 1))
    ]
    snapshot = topview.parse_exposition(ps.exposition("flowmon_dns_requests_total", answer))
    (row,) = dnsview.dns_rows(snapshot, seconds=300)
    assert (row.client, row.server, row.failure_ratio) == ("web", "coredns", 0.1)


def test_top_draws_the_dns_table_below_the_flows_when_there_is_dns() -> None:
    from rich.console import Console

    from flowmon_cli.commands.top import view
    from flowmon_cli.sources import Sample

    snapshot = topview.parse_exposition(exposition())
    console = Console(width=200, record=True)
    console.print(view(Sample(snapshot, None, snapshot), title="t"))
    text = console.export_text()
    assert "DNS per client and server" in text and "(no flows yet)" in text
    line = next(x for x in text.splitlines() if "shop/web" in x)
    assert [cell.strip() for cell in line.strip("│ ").split("│")] == [
        "shop/web", "kube-system/coredns:53 via kube-dns", "100", "10.0%", "6", "2", "2", "1.0ms", "9.8ms"
    ]  # fmt: skip
    console = Console(width=200, record=True)
    tcp_only = topview.parse_exposition(
        '# TYPE flowmon_tcp_sent_bytes_total counter\nflowmon_tcp_sent_bytes_total{client_workload="a"} 1.0\n'
    )
    console.print(view(Sample(tcp_only, None, tcp_only), title="t"))
    assert "DNS" not in console.export_text()
