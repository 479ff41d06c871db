"""`spec.alerting` of a FlowMonitor: baselines, environment isolation and health thresholds.

The operator renders these into a PrometheusRule (flowmon_operator.rules); isolation is also compiled
into the agent policy, because the agent counts violations itself (flowmon_agent.aggregation.isolation).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import Field, model_validator

from flowmon_contract.model_base import Duration, StrictModel, duration_seconds
from flowmon_contract.selectors import LabelSelector

EnvName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
BaselineMetric = Annotated[str, Field(pattern=r"^(sent_bytes|received_bytes|connections_opened)$")]
DAY_SECONDS = 86_400
# Alert labels and annotations must be Prometheus label names; the labels below carry the workload pair
# and the alert's identity, so routing labels may not overwrite them.
PromLabelName = Annotated[str, Field(max_length=128, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
# Bounds on lists, maps and keys keep the CRD's CEL rules within the API server's cost budget.
MAX_ENVIRONMENTS, MAX_FORBIDDEN, MAX_ALERT_LABELS = 32, 64, 32
RESERVED_LABELS = re.compile(
    r"^(alertname|flowmon_.*|client_.*|server_.*|service|metric|reason|from_env|to_env|rcode|qtype)$"
)


class BaselineAlerting(StrictModel):
    """Per workload pair: learn the normal rate, alert on anomalies and on new dependencies."""

    enabled: bool = Field(
        default=True, description="Render baseline recording rules, anomaly and new-dependency alerts."
    )
    metrics: list[BaselineMetric] = Field(
        default_factory=lambda: ["sent_bytes", "connections_opened"],
        description="Metrics baselined per workload pair (sent_bytes, received_bytes, connections_opened); "
        "only those also listed in spec.metrics are rendered.",
    )
    sensitivity: float = Field(
        default=3.0,
        ge=1.0,
        le=10.0,
        description="Standard deviations from the baseline that count as anomaly.",
    )
    days: int = Field(
        default=7,
        ge=1,
        le=28,
        description="Previous days whose same hour forms the baseline; also the window in which a "
        "workload pair counts as known (no new-dependency alert).",
    )
    min_history: Duration = Field(
        default="1d",
        description="History required before anomaly and new-dependency alerts may fire; rounded up to "
        "whole days, at least 1d and at most `days` days.",
    )
    min_bytes_per_second: float = Field(
        default=1024.0,
        gt=0,
        description="Idle floor for byte rates: below it a pair never pages, and its spread is never "
        "taken smaller than this.",
    )
    min_connections_per_second: float = Field(
        default=0.1,
        gt=0,
        description="Idle floor for connection rates, like minBytesPerSecond.",
    )

    @property
    def min_history_days(self) -> int:
        return max(1, math.ceil(duration_seconds(self.min_history) / DAY_SECONDS))

    @model_validator(mode="after")
    def _history_within_window(self) -> BaselineAlerting:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("baseline metrics lists a metric twice")
        if self.min_history_days > self.days:
            raise ValueError(f"minHistory {self.min_history} exceeds the baseline window of {self.days}d")
        return self


class Environment(StrictModel):
    """An environment: the namespaces whose labels match the selector."""

    name: EnvName = Field(description="Environment name, e.g. staging.")
    namespace_selector: LabelSelector = Field(
        description="Namespaces of this environment, by label; a namespace belongs to the first "
        "environment (in list order) whose selector matches."
    )


class ForbiddenPair(StrictModel):
    """Traffic from one environment to another that must never happen."""

    from_: EnvName = Field(alias="from", description="Client environment.")
    to: EnvName = Field(description="Server environment.")


class IsolationAlerting(StrictModel):
    """Environment isolation: named environments and the pairs that must never talk."""

    environments: list[Environment] = Field(
        default_factory=list, max_length=MAX_ENVIRONMENTS, description="Environments by namespace label."
    )
    forbidden: list[ForbiddenPair] = Field(
        default_factory=list,
        max_length=MAX_FORBIDDEN,
        description="Forbidden client → server pairs; the agent counts every connection attempt and "
        "byte between them (flowmon_isolation_violations_total, flowmon_isolation_violation_bytes_total).",
    )

    @model_validator(mode="after")
    def _known_environments(self) -> IsolationAlerting:
        names = [env.name for env in self.environments]
        if len(set(names)) != len(names):
            raise ValueError("environment names must be unique")
        for pair in self.forbidden:
            for end in (pair.from_, pair.to):
                if end not in names:
                    raise ValueError(f"forbidden pair names unknown environment {end!r}")
        return self

    @property
    def active(self) -> bool:
        return bool(self.forbidden)


class HealthAlerting(StrictModel):
    """Health thresholds per workload pair."""

    retransmit_ratio: float = Field(
        default=0.02,
        gt=0,
        le=1,
        description="Retransmitted / sent segments; sent segments are estimated as bytes / 1448 (a full "
        "Ethernet MSS), so chatty small-message pairs read higher than their true ratio.",
    )
    min_retransmits_per_second: float = Field(
        default=0.1, gt=0, description="Retransmit alerts need at least this many retransmits per second."
    )
    connect_failure_ratio: float = Field(default=0.05, gt=0, le=1, description="Failed / attempted connects.")
    min_connect_failures_per_second: float = Field(
        default=0.05,
        gt=0,
        description="Connect-failure alerts need at least this many failures per second.",
    )
    rtt_p99_seconds: float = Field(default=0.25, gt=0, le=60, description="RTT 99th percentile, seconds.")
    min_rtt_samples_per_second: float = Field(
        default=0.2,
        gt=0,
        description="RTT alerts need at least this many RTT samples per second: one slow sample of an "
        "idle pair is no percentile.",
    )
    reset_rate: float = Field(default=1.0, gt=0, description="Resets per second.")
    dns_failure_ratio_margin: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="NXDOMAIN or SERVFAIL answers / DNS requests of a pair, above its own average of the "
        "baseline days (up to an hour ago) by more than this, alert.",
    )
    min_dns_failures_per_second: float = Field(
        default=0.1, gt=0, description="DNS failure alerts need at least this many such answers per second."
    )
    dns_latency_p99_seconds: float = Field(
        default=0.5, gt=0, le=60, description="DNS query → answer 99th percentile, seconds."
    )
    min_dns_requests_per_second: float = Field(
        default=0.2, gt=0, description="DNS latency alerts need at least this many answers per second."
    )
    dns_timeout_ratio: float = Field(
        default=0.05, gt=0, le=1, description="Unanswered / all DNS queries of a client workload."
    )
    min_dns_timeouts_per_second: float = Field(
        default=0.02, gt=0, description="DNS timeout alerts need at least this many timeouts per second."
    )


class AlertingSpec(StrictModel):
    """Alert rules rendered into a PrometheusRule owned by the monitor."""

    enabled: bool = Field(default=True, description="Render a PrometheusRule for this monitor.")
    baseline: BaselineAlerting = Field(
        default_factory=BaselineAlerting, description="Baselines and anomalies."
    )
    isolation: IsolationAlerting = Field(
        default_factory=IsolationAlerting, description="Environment isolation."
    )
    health: HealthAlerting = Field(default_factory=HealthAlerting, description="Health thresholds.")
    for_: Duration = Field(
        default="5m",
        alias="for",
        description="How long an anomaly or health condition holds before firing; new dependencies and "
        "isolation violations are events and fire at once.",
    )
    labels: dict[PromLabelName, str] = Field(
        default_factory=dict,
        max_length=MAX_ALERT_LABELS,
        description="Extra labels on every alert (routing); they override the default severity but may "
        "not name the pair labels (client_*, server_*, service, metric, reason, from_env, to_env, "
        "flowmon_*, alertname).",
    )
    annotations: dict[PromLabelName, str] = Field(
        default_factory=dict,
        max_length=MAX_ALERT_LABELS,
        description="Extra annotations on every alert, e.g. runbook_url.",
    )

    @model_validator(mode="after")
    def _labels_not_reserved(self) -> AlertingSpec:
        reserved = sorted(k for k in self.labels if RESERVED_LABELS.match(k))
        if reserved:
            raise ValueError(f"alert labels may not override {', '.join(reserved)}")
        return self
