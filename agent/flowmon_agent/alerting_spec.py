"""`spec.alerting` of a FlowMonitor: baselines, environment isolation and health thresholds."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from flowmon_agent.model_base import Duration, StrictModel
from flowmon_agent.selectors import LabelSelector

EnvName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class BaselineAlerting(StrictModel):
    """Per workload pair: learn the normal rate, alert on anomalies and on new dependencies."""

    enabled: bool = Field(default=True, description="Render baseline recording rules and anomaly alerts.")
    metrics: list[Annotated[str, Field(pattern=r"^(sent_bytes|received_bytes|connections_opened)$")]] = Field(
        default_factory=lambda: ["sent_bytes", "connections_opened"],
        description="Metrics baselined per workload pair.",
    )
    sensitivity: float = Field(
        default=3.0,
        ge=1.0,
        le=10.0,
        description="Standard deviations from the baseline that count as anomaly.",
    )
    min_history: Duration = Field(
        default="1d", description="History required before anomaly alerts may fire."
    )


class Environment(StrictModel):
    """An environment: the namespaces whose labels match the selector."""

    name: EnvName = Field(description="Environment name, e.g. staging.")
    namespace_selector: LabelSelector = Field(description="Namespaces of this environment, by label.")


class ForbiddenPair(StrictModel):
    """Traffic from one environment to another that must never happen."""

    from_: EnvName = Field(alias="from", description="Client environment.")
    to: EnvName = Field(description="Server environment.")


class IsolationAlerting(StrictModel):
    """Environment isolation: named environments and the pairs that must never talk."""

    environments: list[Environment] = Field(
        default_factory=list, max_length=32, description="Environments by namespace label."
    )
    forbidden: list[ForbiddenPair] = Field(
        default_factory=list, max_length=64, description="Forbidden client → server pairs."
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


class HealthAlerting(StrictModel):
    """Health thresholds per workload pair."""

    retransmit_ratio: float = Field(default=0.02, gt=0, le=1, description="Retransmitted / sent segments.")
    connect_failure_ratio: float = Field(default=0.05, gt=0, le=1, description="Failed / attempted connects.")
    rtt_p99_seconds: float = Field(default=0.25, gt=0, le=60, description="RTT 99th percentile, seconds.")
    reset_rate: float = Field(default=1.0, gt=0, description="Resets per second.")


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
    for_: Duration = Field(default="5m", alias="for", description="How long a condition holds before firing.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every alert (routing).")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on every alert.")
