"""What aggregation hands to the exporter: per monitor, ready-to-render metric families.

Plain immutable data, built by pure functions each poll and swapped atomically, so that the
Prometheus collectors only render (no state carried between scrapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from flowmon_agent.spec import Metric

OVERFLOW_VALUE = "__overflow__"
LabelValues = tuple[str, ...]


class FamilyType(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """How one allow-listed Metric is exported. `name` has no `_total`: the renderer adds it to counters."""

    name: str
    type: FamilyType
    help: str
    extra_label: str | None = None  # e.g. reason, direction: appended after the flow labels


METRICS: dict[Metric, MetricInfo] = {
    Metric.SENT_BYTES: MetricInfo(
        "flowmon_tcp_sent_bytes", FamilyType.COUNTER, "TCP payload bytes sent from client to server."
    ),
    Metric.RECEIVED_BYTES: MetricInfo(
        "flowmon_tcp_received_bytes", FamilyType.COUNTER, "TCP payload bytes sent from server to client."
    ),
    Metric.CONNECTIONS_OPENED: MetricInfo(
        "flowmon_tcp_connections_opened", FamilyType.COUNTER, "TCP connections that reached ESTABLISHED."
    ),
    Metric.CONNECTIONS_CLOSED: MetricInfo(
        "flowmon_tcp_connections_closed", FamilyType.COUNTER, "Established TCP connections that closed."
    ),
    Metric.CONNECTIONS_ACTIVE: MetricInfo(
        "flowmon_tcp_connections_active", FamilyType.GAUGE, "TCP connections open now."
    ),
    Metric.CONNECT_FAILURES: MetricInfo(
        "flowmon_tcp_connect_failures",
        FamilyType.COUNTER,
        "TCP connects that failed: refused (SYN answered by RST) or timeout (SYN never answered).",
        extra_label="reason",
    ),
    Metric.CONNECT_DURATION: MetricInfo(
        "flowmon_tcp_connect_duration_seconds",
        FamilyType.HISTOGRAM,
        "Time from SYN sent to ESTABLISHED at the client.",
    ),
    Metric.RTT: MetricInfo(
        "flowmon_tcp_rtt_seconds", FamilyType.HISTOGRAM, "Smoothed TCP round-trip time samples."
    ),
    Metric.RETRANSMITS: MetricInfo(
        "flowmon_tcp_retransmits",
        FamilyType.COUNTER,
        "Retransmitted TCP segments, by the direction of the retransmitted data.",
        extra_label="direction",
    ),
    Metric.RESETS: MetricInfo(
        "flowmon_tcp_resets",
        FamilyType.COUNTER,
        "TCP RST segments, by which end sent them.",
        extra_label="direction",
    ),
}


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Cumulative bucket counts aligned with the family's bounds (+Inf last), and the sum in seconds."""

    cumulative_counts: tuple[int, ...]
    sum_seconds: float

    @property
    def count(self) -> int:
        return self.cumulative_counts[-1]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family's samples for one monitor."""

    info: MetricInfo
    label_names: tuple[str, ...]
    samples: dict[LabelValues, float] = field(default_factory=dict)  # counters and gauges
    histograms: dict[LabelValues, HistogramValue] = field(default_factory=dict)
    bucket_bounds: tuple[float, ...] = ()  # histograms only, without +Inf


@dataclass(frozen=True, slots=True)
class MonitorView:
    """Everything one monitor's endpoint shows."""

    key: str  # namespace/name
    families: tuple[Family, ...]
    series: int  # distinct flow label sets currently exported
    overflowed_total: int  # cumulative flows folded into the overflow series


@dataclass(frozen=True, slots=True)
class AgentView:
    """One poll's result for the whole agent; the exporter swaps in a new one each second."""

    policy_hash: str
    monitors: dict[str, MonitorView]
    extra_families: tuple[Family, ...] = ()  # agent-level families, e.g. isolation violations
