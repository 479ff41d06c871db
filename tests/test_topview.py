"""The live view's pure arithmetic, on synthetic exposition text."""

from __future__ import annotations

import math

import pytest

from flowmon_cli import topview as tv

PAIR = (
    'client_namespace="shop",client_workload="web",'
    'server_namespace="pay",server_port="80",server_workload="api"'
)
OTHER = (
    'client_namespace="shop",client_workload="cron",'
    'server_namespace="shop",server_port="5432",server_workload="db"'
)


def exposition(sent: float, opened: float, rtt: tuple[float, float, float], *, refused: float = 0) -> str:
    """Text as the exporter renders it (counters, a gauge, a histogram with le last-but-sorted labels)."""
    le1, le2, inf = rtt
    return f"""# HELP flowmon_tcp_sent_bytes_total TCP payload bytes sent from client to server.
# TYPE flowmon_tcp_sent_bytes_total counter
flowmon_tcp_sent_bytes_total{{{PAIR}}} {sent}
flowmon_tcp_sent_bytes_total{{{OTHER}}} 10.0
# TYPE flowmon_tcp_received_bytes_total counter
flowmon_tcp_received_bytes_total{{{PAIR}}} {sent * 4}
# TYPE flowmon_tcp_connections_opened_total counter
flowmon_tcp_connections_opened_total{{{PAIR}}} {opened}
# TYPE flowmon_tcp_connections_active gauge
flowmon_tcp_connections_active{{{PAIR}}} 3.0
# TYPE flowmon_tcp_connect_failures_total counter
flowmon_tcp_connect_failures_total{{{PAIR},reason="refused"}} {refused}
flowmon_tcp_connect_failures_total{{{PAIR},reason="timeout"}} 1.0
# TYPE flowmon_tcp_retransmits_total counter
flowmon_tcp_retransmits_total{{{PAIR},direction="client_to_server"}} 4.0
flowmon_tcp_retransmits_total{{{PAIR},direction="server_to_client"}} 2.0
# TYPE flowmon_isolation_violations_total counter
flowmon_isolation_violations_total{{{PAIR},from_env="staging",to_env="prod"}} 1.0
# TYPE flowmon_isolation_violation_bytes_total counter
flowmon_isolation_violation_bytes_total{{{PAIR},from_env="staging",to_env="prod"}} 999.0
# TYPE flowmon_tcp_rtt_seconds histogram
flowmon_tcp_rtt_seconds_bucket{{{PAIR},le="0.001"}} {le1}
flowmon_tcp_rtt_seconds_bucket{{{PAIR},le="0.01"}} {le2}
flowmon_tcp_rtt_seconds_bucket{{{PAIR},le="+Inf"}} {inf}
flowmon_tcp_rtt_seconds_count{{{PAIR}}} {inf}
flowmon_tcp_rtt_seconds_sum{{{PAIR}}} 0.1
# TYPE flowmon_agent_info gauge
flowmon_agent_info{{version="0.1.0"}} 1.0
"""


def test_parse_groups_samples_by_pair_and_sums_reasons_and_directions() -> None:
    snap = tv.parse_exposition(exposition(1000, 10, (5, 9, 10), refused=2))
    assert len(snap) == 2  # flowmon_agent_info is not a flow
    key = tv.pair_key(
        {"client_namespace": "shop", "client_workload": "web", "server_namespace": "pay"}
        | {"server_port": "80", "server_workload": "api"}
    )
    pair = snap[key]
    assert (pair.sent_bytes, pair.received_bytes, pair.opened, pair.active) == (1000, 4000, 10, 3)
    assert (pair.failures, pair.retransmits, pair.violations) == (3, 6, 1)
    assert pair.rtt == {0.001: 5, 0.01: 9, math.inf: 10}


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.001: 5, 0.01: 9, math.inf: 10}, 0.001),  # rank 5 at the top of the first bucket
        (0.5, {0.001: 0, 0.01: 10, math.inf: 10}, 0.0055),  # linear inside (0.001, 0.01]
        (0.25, {0.001: 4, 0.01: 4, math.inf: 4}, 0.00025),  # from 0 in the first bucket
        (0.99, {0.001: 5, 0.01: 9, math.inf: 10}, 0.01),  # rank in +Inf: highest finite bound
        (0.5, {0.001: 0, math.inf: 0}, None),  # no observations
        (0.5, {0.001: 3}, None),  # no +Inf bucket: not a histogram
        (0.5, {}, None),
    ],
)
def test_histogram_quantile_matches_promql(q: float, buckets: dict, expected: float | None) -> None:
    got = tv.histogram_quantile(q, buckets)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_rates_between_two_snapshots() -> None:
    before = tv.parse_exposition(exposition(1000, 10, (5, 9, 10)))
    after = tv.parse_exposition(exposition(3000, 30, (5, 29, 30), refused=4))
    (row, other) = tv.rows(tv.diff(before, after), seconds=2.0)
    assert (row.client, row.server) == ("shop/web", "pay/api:80")
    assert row.sent_bytes == 1000 and row.received_bytes == 4000 and row.opened == 10
    assert row.failures == 2  # refused 0 → 4 over 2 s; timeout unchanged
    assert row.retransmits == 0 and row.violations == 0 and row.active == 3
    # The window's 20 new RTT samples all fell in (1ms, 10ms]: the window's quantiles, not all-time.
    assert row.rtt_p50 == pytest.approx(0.0055) and row.rtt_p99 == pytest.approx(0.00991)
    assert other.sent_bytes == 0 and other.client == "shop/cron"


def test_a_counter_reset_counts_the_new_value_not_a_negative_rate() -> None:
    before = tv.parse_exposition(exposition(5000, 50, (5, 9, 10)))
    after = tv.parse_exposition(exposition(300, 3, (1, 1, 2)))  # agent restarted
    row = tv.rows(tv.diff(before, after), seconds=1.0)[0]
    assert (row.sent_bytes, row.opened) == (300, 3)
    assert row.rtt_p50 == pytest.approx(0.001)  # 1 of 2 samples ≤ 1ms: the median is that bound


def test_totals_without_a_previous_snapshot_and_busiest_first() -> None:
    rows = tv.rows(tv.diff(None, tv.parse_exposition(exposition(1000, 10, (5, 9, 10)))))
    assert [r.client for r in rows] == ["shop/web", "shop/cron"]
    assert rows[0].sent_bytes == 1000 and rows[0].violations == 1 and rows[0].rtt_p99 == 0.01


@pytest.mark.parametrize(
    ("labels", "side", "expected"),
    [
        ({"client_namespace": "a", "client_workload": "w"}, "client", "a/w"),
        (
            {"server_namespace": "a", "server_workload": "w", "server_port": "80", "service": "a/svc"},
            "server",
            "a/w:80 via a/svc",
        ),
        ({"client_zone": "z1", "server_zone": "z2"}, "client", "z1"),
        ({"client_zone": "z1"}, "server", "*"),
        ({"server_namespace": "a", "server_workload": "w", "service": ""}, "server", "a/w"),
    ],
)
def test_endpoint_names_follow_the_monitors_grouping(labels: dict, side: str, expected: str) -> None:
    assert tv.endpoint_name(labels, side) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_human_bytes(value: float, text: str) -> None:
    assert tv.human_bytes(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.000042, "42µs"), (0.0123, "12.3ms"), (2.5, "2.50s")],
)
def test_human_seconds(value: float | None, text: str) -> None:
    assert tv.human_seconds(value) == text


def test_row_cells_line_up_with_columns() -> None:
    row = tv.rows(tv.parse_exposition(exposition(2048, 10, (5, 9, 10))))[0]
    cells = tv.row_cells(row, per_second=True)
    assert len(cells) == len(tv.columns(per_second=True))
    assert dict(zip(tv.columns(True), cells, strict=True))["sent"] == "2.0 KiB/s"


def test_combine_sums_agents_counters_and_buckets() -> None:
    one = tv.parse_exposition(exposition(1000, 10, (5, 9, 10)))
    two = tv.parse_exposition(exposition(500, 5, (1, 2, 3)))
    both = tv.combine([one, two])
    key = next(k for k in both if ("client_workload", "web") in k)
    assert both[key].sent_bytes == 1500 and both[key].opened == 15 and both[key].active == 6
    assert both[key].rtt == {0.001: 6, 0.01: 11, math.inf: 13}
    assert one[key].sent_bytes == 1000  # inputs untouched


def test_violations_of_another_monitor_attach_to_matching_pairs() -> None:
    base = tv.parse_exposition(
        "# TYPE flowmon_tcp_sent_bytes_total counter\nflowmon_tcp_sent_bytes_total{"
        + PAIR
        + ',service="pay/api"} 10.0\n'
    )
    isolation = tv.parse_exposition(
        "# TYPE flowmon_isolation_violations_total counter\n"
        'flowmon_isolation_violations_total{from_env="staging",to_env="prod",client_namespace="shop",'
        'client_workload="web",server_namespace="pay",server_workload="api"} 2.0\n'
        'flowmon_isolation_violations_total{from_env="staging",to_env="prod",client_namespace="x",'
        'client_workload="y",server_namespace="pay",server_workload="api"} 1.0\n'
    )
    merged = tv.attach_violations(base, isolation)
    rows = {(r.client, r.server): r for r in tv.rows(merged)}
    assert rows[("shop/web", "pay/api:80 via pay/api")].violations == 2
    assert rows[("shop/web", "pay/api:80 via pay/api")].sent_bytes == 10
    assert rows[("x/y", "pay/api")].violations == 1  # no traffic row matched: its own row
    assert tv.rows(base)[0].violations == 0  # base untouched


def test_live_rows_are_rates_but_violations_stay_cumulative() -> None:
    before = tv.parse_exposition(exposition(1000, 10, (5, 9, 10)))
    after = tv.parse_exposition(exposition(2000, 10, (5, 9, 10)))
    first = tv.live_rows(None, before, 0.0)
    assert first[0].sent_bytes == 1000 and first[0].violations == 1  # totals on the first refresh
    row = tv.live_rows(before, after, 2.0)[0]
    assert row.sent_bytes == 500 and row.opened == 0 and row.violations == 1


DNS_PAIR = (
    'client_namespace="shop",client_workload="web",'
    'server_namespace="kube-system",server_port="53",server_workload="coredns",service="kube-dns"'
)


def udp_exposition(sent: float, received: float, datagrams: float) -> str:
    """UDP to the resolver (beside its DNS requests: the same pair) and TCP elsewhere."""
    return f"""# TYPE flowmon_udp_sent_bytes_total counter
flowmon_udp_sent_bytes_total{{{DNS_PAIR}}} {sent}
# TYPE flowmon_udp_received_bytes_total counter
flowmon_udp_received_bytes_total{{{DNS_PAIR}}} {received}
# TYPE flowmon_udp_sent_datagrams_total counter
flowmon_udp_sent_datagrams_total{{{DNS_PAIR}}} {datagrams}
# TYPE flowmon_udp_received_datagrams_total counter
flowmon_udp_received_datagrams_total{{{DNS_PAIR}}} {datagrams}
# TYPE flowmon_dns_requests_total counter
flowmon_dns_requests_total{{{DNS_PAIR},qtype="A",rcode="NOERROR"}} {datagrams}
# TYPE flowmon_tcp_sent_bytes_total counter
flowmon_tcp_sent_bytes_total{{{PAIR}}} 100.0
"""


def test_a_udp_pair_is_a_row_of_its_own_beside_tcp() -> None:
    snap = tv.parse_exposition(udp_exposition(4000, 9000, 50))
    udp = snap[tv.pair_key(dict(kv.split("=") for kv in DNS_PAIR.replace('"', "").split(",")))]
    assert udp.protocols == {"udp", "dns"} and udp.dns_requests == {"NOERROR": 50}
    assert (udp.udp_sent_bytes, udp.udp_received_bytes, udp.udp_sent_datagrams) == (4000, 9000, 50)
    rows = tv.rows(snap, seconds=2.0)
    assert [(r.client, r.server, r.protocol) for r in rows] == [
        ("shop/web", "kube-system/coredns:53 via kube-dns", "udp"),  # 6.5 KB/s: the busiest first
        ("shop/web", "pay/api:80", "tcp"),
    ]
    udp_row = rows[0]
    assert (udp_row.sent_bytes, udp_row.received_bytes, udp_row.datagrams) == (2000, 4500, 50)
    cells = dict(zip(tv.columns(True), tv.row_cells(udp_row, per_second=True), strict=True))
    assert cells == {
        "client": "shop/web",
        "server": "kube-system/coredns:53 via kube-dns",
        "proto": "udp",
        "sent": "2.0 KiB/s",
        "received": "4.4 KiB/s",
        "conns/s": "-",  # TCP's columns do not apply
        "dgrams/s": "50",
        "rtt p50": "-",
        "rtt p99": "-",
        "retrans/s": "-",
        "failed/s": "-",
        "violations": "-",
    }
    tcp_cells = dict(zip(tv.columns(False), tv.row_cells(rows[1], per_second=False), strict=True))
    assert (tcp_cells["proto"], tcp_cells["dgrams"], tcp_cells["conns"]) == ("tcp", "-", "0")


def test_udp_counters_and_dns_requests_take_differences_and_add_up_like_tcp() -> None:
    before, after = (tv.parse_exposition(udp_exposition(*v)) for v in ((1000, 2000, 10), (3000, 6000, 30)))
    (udp, tcp) = tv.rows(tv.diff(before, after), seconds=2.0)
    assert (udp.sent_bytes, udp.received_bytes, udp.datagrams, tcp.sent_bytes) == (1000, 2000, 20, 0)
    restarted = tv.diff(after, before)  # counters went down: an agent restart, the new values count
    assert tv.rows(restarted)[0].sent_bytes == 1000
    assert next(iter(restarted.values())).dns_requests == {"NOERROR": 10}
    both = tv.combine([before, after])
    key = next(k for k, t in both.items() if "udp" in t.protocols)
    assert (both[key].udp_sent_bytes, both[key].dns_requests) == (4000, {"NOERROR": 40})
    assert before[key].dns_requests == {"NOERROR": 10}  # inputs untouched


def test_a_pair_with_only_dns_series_has_no_flow_row() -> None:
    text = (
        "# TYPE flowmon_dns_requests_total counter\n"
        f'flowmon_dns_requests_total{{{DNS_PAIR},qtype="A",rcode="NXDOMAIN"}} 3.0\n'
    )
    assert tv.rows(tv.parse_exposition(text)) == []
