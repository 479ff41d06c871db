"""Exporter rendering: pure functions over synthetic views, a golden file, promtool on every output."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from flowmon_agent.aggregation.view import AgentView, Family, HistogramValue, MonitorView
from flowmon_agent.export.collectors import (
    AgentCollector,
    AgentStatus,
    Exporter,
    InstrumentedCollector,
    MonitorCollector,
    StatusHolder,
    render_agent,
    render_family,
    render_monitor,
    text_exposition,
)
from flowmon_contract.metrics import METRICS
from flowmon_contract.spec import Metric
from tests.export_samples import FLOW, FLOW_LABELS, OVERFLOW, agent_view

GOLDEN = Path(__file__).parent / "golden" / "exporter.txt"
LABELS = dict(zip(FLOW_LABELS, FLOW, strict=True))


class _Families:
    """Registers fixed families so that get_sample_value can read them."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def _registry(*collectors) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def _status(**kw) -> AgentStatus:
    return AgentStatus(
        view=agent_view(**kw),
        kernel_path="default",
        rtt_at_close="sock_ops",
        dropped={"flows_full": 3},
        metadata_age_seconds=2.5,
    )


def _promtool(text: bytes) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@pytest.mark.parametrize(
    ("metric", "sample_name", "labels", "value"),
    [
        (Metric.SENT_BYTES, "flowmon_tcp_sent_bytes_total", LABELS, 12345.0),
        (Metric.RECEIVED_BYTES, "flowmon_tcp_received_bytes_total", LABELS, 67890.0),
        (Metric.CONNECTIONS_ACTIVE, "flowmon_tcp_connections_active", LABELS, 1.0),
        (Metric.CONNECT_FAILURES, "flowmon_tcp_connect_failures_total", {**LABELS, "reason": "refused"}, 2.0),
        (
            Metric.RETRANSMITS,
            "flowmon_tcp_retransmits_total",
            {**LABELS, "direction": "client_to_server"},
            4.0,
        ),
        (Metric.RTT, "flowmon_tcp_rtt_seconds_bucket", {**LABELS, "le": "0.0005"}, 1.0),
        (Metric.RTT, "flowmon_tcp_rtt_seconds_bucket", {**LABELS, "le": "0.005"}, 5.0),
        (Metric.RTT, "flowmon_tcp_rtt_seconds_bucket", {**LABELS, "le": "+Inf"}, 6.0),
        (Metric.RTT, "flowmon_tcp_rtt_seconds_count", LABELS, 6.0),
        (Metric.RTT, "flowmon_tcp_rtt_seconds_sum", LABELS, 0.0125),
    ],
)
def test_render_family(metric, sample_name, labels, value):
    family = next(f for f in agent_view().monitors["shop/web"].families if f.info == METRICS[metric])
    registry = _registry(_Families([render_family(family)]))
    assert registry.get_sample_value(sample_name, labels) == value


@pytest.mark.parametrize(
    ("family", "error"),
    [
        (Family(METRICS[Metric.SENT_BYTES], ("a", "b"), {("x",): 1.0}), "do not match"),
        (
            Family(
                METRICS[Metric.RTT],
                ("a",),
                histograms={("x",): HistogramValue((1, 2), 0.1)},
                bucket_bounds=(0.1, 1.0),
            ),
            "2 bucket counts for 3 bounds",
        ),
    ],
)
def test_render_family_rejects_misshapen_input(family, error):
    with pytest.raises(ValueError, match=error):
        render_family(family)


def test_monitor_collector_renders_only_its_monitor_from_the_current_view():
    holder = StatusHolder(_status())
    registry = _registry(MonitorCollector(holder, "shop/web"))
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", LABELS) == 12345.0
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", {"client_workload": "batch"}) is None
    holder.swap(_status(sent_bytes=20000.0))  # the next scrape sees the next poll, nothing carried over
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", LABELS) == 20000.0
    holder.swap(AgentStatus(view=AgentView(policy_hash="", monitors={})))  # a vanished monitor vanishes
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", LABELS) is None


@pytest.mark.parametrize(
    ("sample_name", "labels", "value"),
    [
        (
            "flowmon_agent_info",
            {
                "version": "0.1.0",
                "policy_hash": "ab" * 32,
                "kernel_path": "default",
                "rtt_at_close": "sock_ops",
            },
            1.0,
        ),
        ("flowmon_agent_flows_dropped_total", {"reason": "flows_full"}, 3.0),
        ("flowmon_agent_series", {"monitor": "shop/web"}, 2.0),
        ("flowmon_agent_series", {"monitor": "ops/all"}, 1.0),
        ("flowmon_agent_series_overflow_total", {"monitor": "shop/web"}, 9.0),
        ("flowmon_agent_metadata_age_seconds", {}, 2.5),
    ],
)
def test_agent_collector(sample_name, labels, value):
    registry = _registry(AgentCollector(StatusHolder(_status())))
    assert registry.get_sample_value(sample_name, labels) == value


def test_agent_collector_renders_extra_families():
    extra = Family(METRICS[Metric.SENT_BYTES], ("monitor",), {("shop/web",): 5.0})
    view = AgentView(policy_hash="", monitors={}, extra_families=(extra,))
    registry = _registry(AgentCollector(StatusHolder(AgentStatus(view=view))))
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", {"monitor": "shop/web"}) == 5.0
    assert registry.get_sample_value("flowmon_agent_metadata_age_seconds") is None  # unknown, not 0


class _Broken:
    def collect(self):
        raise RuntimeError("boom")


def test_instrumented_collector_reports_success_and_duration():
    clock = itertools.count(10.0, 0.25).__next__  # every call advances 0.25 s
    ok = InstrumentedCollector(
        "monitor:shop/web", MonitorCollector(StatusHolder(_status()), "shop/web"), clock
    )
    registry = _registry(ok, InstrumentedCollector("broken", _Broken()))
    assert (
        registry.get_sample_value("flowmon_agent_scrape_collector_success", {"collector": "monitor:shop/web"})
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "flowmon_agent_scrape_collector_duration_seconds", {"collector": "monitor:shop/web"}
        )
        == 0.25
    )
    assert registry.get_sample_value("flowmon_tcp_sent_bytes_total", LABELS) == 12345.0
    assert registry.get_sample_value("flowmon_agent_scrape_collector_success", {"collector": "broken"}) == 0.0


def test_golden_text_output():
    """The whole exposition of a monitor path and of the agent collector, byte for byte."""
    holder = StatusHolder(_status())
    clock = itertools.count(1.0, 0.5).__next__
    text = generate_latest(
        InstrumentedCollector("monitor:shop/web", MonitorCollector(holder, "shop/web"), clock)
    )
    text += generate_latest(InstrumentedCollector("agent", AgentCollector(holder), clock))
    if os.environ.get("FLOWMON_UPDATE_GOLDEN"):
        GOLDEN.write_bytes(text)
    assert text.decode() == GOLDEN.read_text()


def test_promtool_accepts_every_endpoint_output():
    exporter = Exporter()
    exporter.swap(_status())
    exporter.instruments.poll_duration.observe(0.003)
    for key in ("shop/web", "ops/all"):
        _promtool(exporter.monitor_text(key))
    _promtool(exporter.agent_text())
    _promtool(exporter.monitor_text("absent/monitor"))  # an empty path is still valid exposition


def _odd_view() -> AgentView:
    """Label values that need escaping, values Go formats with exponents, a histogram with +Inf only."""
    weird = ('quote"d', "back\\slash", "new\nline", "ünïcode", "")
    fam = Family(METRICS[Metric.SENT_BYTES], FLOW_LABELS, {weird: 1_234_567.0, FLOW: 0.5, OVERFLOW: 1e21})
    hist = Family(METRICS[Metric.RTT], ("client_workload",), histograms={("x",): HistogramValue((3,), 1e-9)})
    return AgentView(policy_hash="", monitors={"a/b": MonitorView("a/b", (fam, hist), 3, 0)})


@pytest.mark.parametrize(
    "families",
    [
        render_monitor(agent_view().monitors["shop/web"]),
        render_agent(_status()),
        render_monitor(_odd_view().monitors["a/b"]),
        render_agent(AgentStatus(view=_odd_view())),
        [],
    ],
)
def test_fast_text_exposition_equals_prometheus_client(families):
    assert text_exposition(families) == generate_latest(_Families(families))
