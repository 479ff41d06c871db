"""The agent policy: every FlowMonitor compiled into one document, the contract between operator and agent.

The operator compiles it (stored in a ConfigMap, pushed over HTTPS); the agent validates it at the
boundary (strictly: `AgentPolicy.model_validate_json(data, strict=True)`, no type coercion) and applies it.
It is identified by a content hash that agents report back. Every list has a bound, so that the work of
validating a pushed body is bounded too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, model_validator

from flowmon_contract.alerting import IsolationAlerting
from flowmon_contract.model_base import StrictModel, duration_seconds
from flowmon_contract.spec import (
    DNS_METRICS,
    MAX_QNAME_SUFFIXES,
    UDP_METRICS,
    Dimension,
    DnsSuffix,
    FlowMonitor,
    HistogramBuckets,
    Metric,
    NamespaceName,
    Selection,
)

DEFAULT_OPERATOR_NAMESPACE = "flowmon-system"
MAX_MONITORS = 10_000
MAX_AGENT_NODES = 15_000  # Kubernetes supports 5,000 nodes per cluster
MAX_TOKENS_PER_MONITOR = 64  # a few during a rotation
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
NodeName = Annotated[str, Field(min_length=1, max_length=253)]


class MonitorPolicy(StrictModel):
    """One FlowMonitor as the agent needs it."""

    namespace: NamespaceName
    name: NamespaceName
    tenant_namespace: NamespaceName | None = Field(
        default=None,
        description="Flows must have one end in this namespace; None for cluster-wide monitors "
        "(those in the operator's namespace). Always the monitor's own namespace otherwise: AgentPolicy "
        "refuses any other value, so that a pushed field can never widen a tenant's scope.",
    )
    selection: Selection
    metrics: list[Metric]
    group_by: list[Dimension]
    max_series: int = Field(ge=1, le=100_000)
    series_ttl_seconds: int = Field(ge=10, le=86_400)
    histogram_buckets: HistogramBuckets
    isolation: IsolationAlerting = Field(default_factory=IsolationAlerting)
    qname_suffixes: list[DnsSuffix] = Field(
        default_factory=list,
        max_length=MAX_QNAME_SUFFIXES,
        description="spec.dns.qnameSuffixes: a qname_suffix label on the DNS metrics when not empty.",
    )
    token_sha256: list[Sha256Hex] = Field(
        default_factory=list,
        max_length=MAX_TOKENS_PER_MONITOR,
        description="SHA-256 of each bearer token that may read this monitor's path.",
    )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def path(self) -> str:
        return f"/metrics/{self.namespace}/{self.name}"


class AgentPolicy(StrictModel):
    """All monitors, sorted by namespace/name so that equal content gives an equal hash."""

    schema_version: Literal[1] = 1
    operator_namespace: NamespaceName = DEFAULT_OPERATOR_NAMESPACE
    monitors: list[MonitorPolicy] = Field(default_factory=list, max_length=MAX_MONITORS)
    agent_nodes: list[NodeName] | None = Field(
        default=None,
        max_length=MAX_AGENT_NODES,
        description="Nodes whose agent is ready (count-once: a client there is reported by its agent); "
        "None: every known node (standalone mode, older operators).",
    )

    @model_validator(mode="after")
    def _unique_sorted(self) -> AgentPolicy:
        keys = [m.key for m in self.monitors]
        if len(set(keys)) != len(keys):
            raise ValueError("a monitor appears twice")
        if keys != sorted(keys):
            raise ValueError("monitors must be sorted by namespace/name")
        if self.agent_nodes is not None and self.agent_nodes != sorted(set(self.agent_nodes)):
            raise ValueError("agentNodes must be sorted and unique")
        for index, monitor in enumerate(self.monitors):
            expected = tenant_of(monitor.namespace, self.operator_namespace)
            if monitor.tenant_namespace != expected:
                raise ValueError(
                    f"monitors.{index}.tenantNamespace must be "
                    + (f"{expected!r}, the monitor's own namespace" if expected else "absent")
                    + f" (the monitor lives in {monitor.namespace!r}; operator namespace "
                    f"{self.operator_namespace!r})"
                )
        return self

    @cached_property
    def hash(self) -> str:  # immutable model: hashed once (the agent compares it on every poll)
        return policy_hash(self)

    def model_copy(self, *, update: Mapping | None = None, deep: bool = False) -> AgentPolicy:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("hash", None)  # the cached hash belongs to the original's content
        return copied

    def monitor(self, namespace: str, name: str) -> MonitorPolicy | None:
        return next((m for m in self.monitors if m.namespace == namespace and m.name == name), None)

    @property
    def qname_suffixes(self) -> frozenset[str]:
        """Every monitor's qname suffixes: what the DNS tracker matches query names against."""
        return frozenset(s for m in self.monitors for s in m.qname_suffixes)

    @property
    def wants_rtt(self) -> bool:
        """Whether any monitor exports RTT: without one, the kernel's costliest hook can be detached."""
        return any(Metric.RTT in m.metrics or Metric.MIN_RTT in m.metrics for m in self.monitors)

    @property
    def wants_udp(self) -> bool:
        """Whether any monitor exports a UDP metric: without one, bpf/udp.c stays detached."""
        return any(not UDP_METRICS.isdisjoint(m.metrics) for m in self.monitors)

    @property
    def wants_dns(self) -> bool:
        """Whether any monitor needs the DNS capture (bpf/dns.c, on every packet of the node): one that
        exports a DNS metric, names a qname suffix, or groups by server_dns_name (whose names come from
        DNS answers). Without one, the capture stays detached."""
        return any(
            not DNS_METRICS.isdisjoint(m.metrics)
            or m.qname_suffixes
            or Dimension.SERVER_DNS_NAME in m.group_by
            for m in self.monitors
        )


def canonical_json(policy: AgentPolicy) -> str:
    return json.dumps(policy.dump(), sort_keys=True, separators=(",", ":"))


def policy_hash(policy: AgentPolicy) -> str:
    """Content hash of the policy (hex SHA-256): what agents report and FlowMonitor status compares."""
    return hashlib.sha256(canonical_json(policy).encode()).hexdigest()


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tenant_of(monitor_namespace: str, operator_namespace: str) -> str | None:
    """Pure: the tenancy boundary of a monitor, from where it lives: none (cluster-wide) in the
    operator's namespace, else its own namespace."""
    return None if monitor_namespace == operator_namespace else monitor_namespace


def compile_monitor(
    monitor: FlowMonitor, *, operator_namespace: str, token_hashes: Iterable[str] = ()
) -> MonitorPolicy:
    """Pure: one FlowMonitor → its policy. Tenancy is decided here, once, by where the monitor lives."""
    spec = monitor.spec
    return MonitorPolicy(
        namespace=monitor.metadata.namespace,
        name=monitor.metadata.name,
        tenant_namespace=tenant_of(monitor.metadata.namespace, operator_namespace),
        selection=spec.selection,
        metrics=spec.metrics,
        group_by=spec.aggregation.group_by,
        max_series=spec.aggregation.max_series,
        series_ttl_seconds=duration_seconds(spec.aggregation.series_ttl),
        histogram_buckets=spec.aggregation.histogram_buckets,
        isolation=spec.alerting.isolation,
        qname_suffixes=spec.dns.qname_suffixes,
        token_sha256=sorted(set(token_hashes)),
    )


def compile_policy(
    monitors: Iterable[FlowMonitor],
    *,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
    token_hashes: Mapping[str, Iterable[str]] | None = None,
    agent_nodes: Iterable[str] | None = None,
) -> AgentPolicy:
    """Pure: all FlowMonitors (already validated) → one agent policy. token_hashes is keyed by ns/name;
    agent_nodes: the nodes whose agent is ready (None: let agents assume every node has one)."""
    hashes = token_hashes or {}
    compiled = [
        compile_monitor(m, operator_namespace=operator_namespace, token_hashes=hashes.get(m.key, ()))
        for m in monitors
    ]
    compiled.sort(key=lambda m: m.key)
    return AgentPolicy(
        operator_namespace=operator_namespace,
        monitors=compiled,
        agent_nodes=None if agent_nodes is None else sorted(set(agent_nodes)),
    )
