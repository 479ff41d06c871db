"""What aggregation hands to the exporter: per monitor, ready-to-render metric families.

Plain immutable data, built by pure functions each poll and swapped atomically, so that the
Prometheus collectors only render (no state carried between scrapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowmon_contract.metrics import MetricInfo

LabelValues = tuple[str, ...]


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
