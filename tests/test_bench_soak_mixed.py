"""bench/soak_mixed.py's pure parts: the poll histogram's quantiles, reading a scrape, the report, the
profile's poll shares."""

from __future__ import annotations

import json

import aiohttp
import pytest

from bench.soak_mixed import (
    failure_kind,
    histogram_quantile,
    ms_summary,
    pair_bytes,
    parse_args,
    policies,
    poll_buckets,
    poll_shares,
    render,
    thinned,
)

INF = float("inf")

AGENT_METRICS = """\
# TYPE flowmon_agent_poll_duration_seconds histogram
flowmon_agent_poll_duration_seconds_bucket{le="0.01"} 10.0
flowmon_agent_poll_duration_seconds_bucket{le="0.1"} 90.0
flowmon_agent_poll_duration_seconds_bucket{le="+Inf"} 100.0
flowmon_agent_poll_duration_seconds_count 100.0
flowmon_agent_poll_duration_seconds_sum 4.2
"""

MONITOR = """\
# TYPE flowmon_tcp_sent_bytes_total counter
flowmon_tcp_sent_bytes_total{client_namespace="host",client_workload="mx-cli",server_namespace="host",\
server_workload="mx-srv",server_port="8080",service=""} 1500.0
flowmon_tcp_sent_bytes_total{client_namespace="host",client_workload="mx-cli",server_namespace="host",\
server_workload="mx-srv",server_port="9090",service=""} 7.0
flowmon_tcp_sent_bytes_total{client_namespace="external",client_workload="external",server_namespace="host",\
server_workload="mx-srv",server_port="8080",service=""} 9.0
"""


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = poll_buckets(AGENT_METRICS)
    assert buckets == [(0.01, 10.0), (0.1, 90.0), (INF, 100.0)]
    assert histogram_quantile(0.5, dict(buckets)) == pytest.approx(0.01 + 0.09 * 40 / 80)
    assert histogram_quantile(0.05, dict(buckets)) == pytest.approx(0.005)
    assert histogram_quantile(0.99, dict(buckets)) == 0.1  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.1: 0.0, INF: 0.0}) is None


def test_pair_bytes_is_the_one_series_of_the_pair_and_port() -> None:
    assert pair_bytes(MONITOR, "mx-cli", "mx-srv", 8080) == 1500.0
    assert pair_bytes(MONITOR, "mx-cli", "mx-srv", 7000) == 0.0


def test_failures_by_kind() -> None:
    assert failure_kind(TimeoutError()) == "timeout"
    assert failure_kind(aiohttp.ServerDisconnectedError()) == "reset"
    assert failure_kind(ConnectionResetError()) == "reset"
    assert failure_kind(aiohttp.ClientOSError()) == "reset"
    assert failure_kind(ValueError()) == "ValueError"


def test_the_two_pushed_policies_differ_and_both_serve_the_soak_monitor() -> None:
    (first, first_hash), (second, second_hash) = policies()
    assert first_hash != second_hash
    for document in (first, second):
        monitors = json.loads(document)["monitors"]
        assert ("flowmon-system", "soak") in [(m["namespace"], m["name"]) for m in monitors]


def test_report_rows() -> None:
    result = {
        "rss_curve": [(0.5, 209.2), (60.0, 236.1)],
        "poll": {"p50_ms": 87.0, "p99_ms": 246.3},
        "scrape": ms_summary([0.004, 0.01, 0.2]),
        "scrape_failures": {"reset": 3, "429": 1},
        "pushes": {"pushed": 6},
        "slow_clients": {"dribble_shed": 2},
        "bytes_exact": True,
        "bytes_counted": 200.0,
        "bytes_sent": 200,
    }
    assert render(result).splitlines() == [
        "| minute | 0.0 | 1.0 |",
        "| --- | --- | --- |",
        "| agent RSS, MB | 209 | 236 |",
        "",
        "| poll p50 / p99, ms | scrapes | scrape p50 / p99 / max, ms | scrape failures | pushes | "
        "slow clients | bytes exact |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| 87.0 / 246.3 | 3 | 10.0 / 200.0 / 200.0 | 429: 1, reset: 3 | {'pushed': 6} | "
        "{'dribble_shed': 2} | yes (200 of 200 B) |",
    ]


def test_a_long_curve_is_thinned_to_a_small_table() -> None:
    curve = [(30.0 * i, 200.0 + i) for i in range(61)]
    kept = thinned(curve)
    assert len(kept) == 13 and kept[0] == curve[0] and kept[-1] == curve[-1]
    assert [t for t, _ in kept] == [150.0 * i for i in range(13)]
    assert thinned(curve[:3]) == curve[:3]


def test_defaults_are_the_issues_numbers() -> None:
    args = parse_args([])
    assert (args.minutes, args.connections, args.peers, args.scrapers, args.push_interval) == (
        30.0,
        100_000,
        1_000_000,
        500,
        10.0,
    )


def test_poll_shares_count_only_the_polls_samples_by_call_path() -> None:
    poll = "thread (1): asyncio_0;_worker (t.py:83);Agent.poll_once (runner.py:368)"
    raw = "\n".join(
        [
            f"{poll};FlowTracer.poll (tracer.py:203);FlowReader.read (flow_reader.py:229) 7",
            f"{poll};FlowTracer.poll (tracer.py:203);FlowReader.read (flow_reader.py:231) 5",
            f"{poll};Agent._view (runner.py:393);Aggregator.build_view (aggregator.py:202) 3",
            f"{poll} 1",
            "thread (2): MainThread;BaseEventLoop._run_once (base_events.py:1922) 40",
        ]
    )
    total, shares = poll_shares(raw, depth=2)
    assert total == 16
    assert shares == {
        "FlowTracer.poll > FlowReader.read": 12,
        "Agent._view > Aggregator.build_view": 3,
        "Agent.poll_once": 1,
    }
