"""Synthetic AgentViews for the exporter and server tests (pure data, as aggregation would build it)."""

from __future__ import annotations

from flowmon_agent.aggregation.view import AgentView, Family, HistogramValue, MonitorView
from flowmon_contract.metrics import METRICS, OVERFLOW_VALUE
from flowmon_contract.spec import Metric

FLOW = ("shop", "web", "shop", "db", "5432")
FLOW_LABELS = ("client_namespace", "client_workload", "server_namespace", "server_workload", "server_port")
OVERFLOW = (OVERFLOW_VALUE,) * 5


def shop_view(sent_bytes: float = 12345.0, received_bytes: float = 67890.0) -> MonitorView:
    """One monitor with every family kind: counters, a gauge, extra labels, a histogram, overflow."""

    def family(metric: Metric, samples: dict, extra: str | None = None) -> Family:
        return Family(METRICS[metric], FLOW_LABELS + ((extra,) if extra else ()), samples)

    families = (
        family(Metric.SENT_BYTES, {FLOW: sent_bytes, OVERFLOW: 7.0}),
        family(Metric.RECEIVED_BYTES, {FLOW: received_bytes}),
        family(Metric.CONNECTIONS_OPENED, {FLOW: 3.0}),
        family(Metric.CONNECTIONS_ACTIVE, {FLOW: 1.0}),
        family(Metric.CONNECT_FAILURES, {(*FLOW, "refused"): 2.0, (*FLOW, "timeout"): 0.0}, "reason"),
        family(Metric.RETRANSMITS, {(*FLOW, "client_to_server"): 4.0}, "direction"),
        Family(
            METRICS[Metric.RTT],
            FLOW_LABELS,
            histograms={FLOW: HistogramValue((1, 5, 6), 0.0125)},
            bucket_bounds=(0.0005, 0.005),
        ),
    )
    return MonitorView(key="shop/web", families=families, series=2, overflowed_total=9)


def other_view() -> MonitorView:
    fam = Family(METRICS[Metric.SENT_BYTES], ("client_workload",), {("batch",): 1.0})
    return MonitorView(key="ops/all", families=(fam,), series=1, overflowed_total=0)


def agent_view(
    policy_hash: str = "ab" * 32, sent_bytes: float = 12345.0, received_bytes: float = 67890.0
) -> AgentView:
    monitors = {"shop/web": shop_view(sent_bytes, received_bytes), "ops/all": other_view()}
    return AgentView(policy_hash=policy_hash, monitors=monitors)
