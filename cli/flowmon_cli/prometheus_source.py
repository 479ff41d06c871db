"""Flows read from Prometheus instead of the agents: what one monitor's series did over a PromQL range.

Each counter and histogram bucket is `increase(...[range])` summed by the flow labels (so agents,
instances and scrape jobs add up), the active gauge its current sum, and isolation violations their
current totals. The answers are turned back into exposition text, so that `topview.parse_exposition`
stays the one place that knows the metric names.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flowmon_cli import topview
from flowmon_cli.sources import Sample
from flowmon_contract.metrics import ISOLATION_LABEL_NAMES, METRICS, VIOLATIONS, FamilyType
from flowmon_contract.spec import Dimension, Metric

MONITOR_LABEL = "flowmon_monitor"  # the target label the ServiceMonitors (and the demo) add
FLOW_LABELS = ", ".join(d.value for d in Dimension)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Labels a family keeps beside the flow labels: the views split DNS requests by answer code (qtypes and
# query name suffixes are summed).
_KEPT = {metric: info.extra_label for metric, info in METRICS.items() if info.extra_label} | {
    Metric.DNS_REQUESTS: "rcode"
}


def range_seconds(text: str) -> float:
    """A PromQL range such as `5m` → seconds; ValueError for anything else."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a PromQL range such as 30s, 5m, 1h")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def flow_queries(monitor: str, window: str) -> list[tuple[str, str]]:
    """Pure: (the sample name parse_exposition knows, PromQL) for every flow metric of `monitor`."""
    selector = f'{{{MONITOR_LABEL}="{monitor}"}}'
    result = []
    for metric, info in METRICS.items():
        extra = f", {_KEPT[metric]}" if metric in _KEPT else ""
        if info.type is FamilyType.COUNTER:
            name = info.name + "_total"
            expr = f"sum by ({FLOW_LABELS}{extra}) (increase({name}{selector}[{window}]))"
        elif info.type is FamilyType.GAUGE:
            name = info.name
            expr = f"sum by ({FLOW_LABELS}{extra}) ({name}{selector})"
        else:
            name = info.name + "_bucket"
            expr = f"sum by ({FLOW_LABELS}, le) (increase({name}{selector}[{window}]))"
        result.append((name, expr))
    return result


def violations_query(monitor: str | None) -> tuple[str, str]:
    """Pure: isolation violations since the agents started, of one monitor or of every monitor."""
    name = VIOLATIONS.name + "_total"
    selector = f'{{{MONITOR_LABEL}="{monitor}"}}' if monitor else ""
    return name, f"sum by ({', '.join(ISOLATION_LABEL_NAMES)}) ({name}{selector})"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(name: str, vector: Iterable[Mapping]) -> str:
    """Pure: an instant-vector answer (`data.result`) as exposition lines of one sample name."""
    lines = []
    for item in vector:
        value = float(item["value"][1])
        if math.isnan(value):
            continue
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(item["metric"].items()))
        lines.append(f"{name}{{{labels}}} {value!r}")
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True)
class PrometheusSource:
    """One monitor in a Prometheus (its HTTP API), over `window` (a PromQL range)."""

    url: str
    monitor: str
    window: str
    fetch: Callable[[str], str]  # URL → body (sources.Endpoints.fetch: a token, a CA)
    violations_monitor: str | None = None

    def query(self, expr: str) -> list[dict]:
        body = self.fetch(f"{self.url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise OSError(f"Prometheus refused {expr!r}: {answer.get('error', answer)}")
        return answer["data"]["result"]

    def sample(self) -> Sample:
        text = "".join(
            exposition(name, self.query(expr)) for name, expr in flow_queries(self.monitor, self.window)
        )
        delta = topview.parse_exposition(text)
        name, expr = violations_query(self.violations_monitor)
        violations = topview.parse_exposition(exposition(name, self.query(expr)))
        return Sample(delta, range_seconds(self.window), topview.attach_violations(delta, violations))

    def describe(self) -> str:
        return f"{self.url} {self.monitor} over {self.window}"
