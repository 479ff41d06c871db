"""The FlowMonitor resource's spec: what a team asks for. The CRD schema is generated from these models
(flowmon_operator.crd), so `kubectl explain` and pydantic validation cannot drift apart."""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from flowmon_contract.alerting import AlertingSpec
from flowmon_contract.model_base import Duration, StrictModel, duration_seconds
from flowmon_contract.selectors import LabelKey, LabelSelector, LabelValue

API_GROUP = "flowmon.io"
API_VERSION = "v1alpha1"
KIND = "FlowMonitor"
PLURAL = "flowmonitors"

NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class Metric(StrEnum):
    """Metric families a monitor may export (the allow-list); names map to flowmon_tcp_* metrics, the
    udp_* ones to flowmon_udp_* metrics."""

    SENT_BYTES = "sent_bytes"
    RECEIVED_BYTES = "received_bytes"
    CONNECTIONS_OPENED = "connections_opened"
    CONNECTIONS_CLOSED = "connections_closed"
    CONNECTIONS_ACTIVE = "connections_active"
    CONNECT_FAILURES = "connect_failures"
    CONNECT_DURATION = "connect_duration"
    RTT = "rtt"
    MIN_RTT = "min_rtt"
    RETRANSMITS = "retransmits"
    SYN_RETRANSMITS = "syn_retransmits"
    RESETS = "resets"
    UDP_SENT_BYTES = "udp_sent_bytes"
    UDP_RECEIVED_BYTES = "udp_received_bytes"
    UDP_SENT_DATAGRAMS = "udp_sent_datagrams"
    UDP_RECEIVED_DATAGRAMS = "udp_received_datagrams"
    DNS_REQUESTS = "dns_requests"
    DNS_LATENCY = "dns_latency"


UDP_METRICS = frozenset(m for m in Metric if m.startswith("udp_"))
DNS_METRICS = frozenset({Metric.DNS_REQUESTS, Metric.DNS_LATENCY})
# min_rtt is a histogram like rtt (len(buckets) + 3 samples per series): opt in, so that a default monitor's
# series do not grow by a quarter. DNS is opt in too. UDP is opt in because its cgroup-skb programs run on
# every packet of the node, TCP's too: +2 points of TCP churn CPU (docs/BENCHMARKS.md); a node loads them
# only while a monitor lists a udp_* metric.
DEFAULT_METRICS = tuple(
    m for m in Metric if m not in DNS_METRICS and m not in UDP_METRICS and m is not Metric.MIN_RTT
)


class Dimension(StrEnum):
    """Flow labels a monitor may group by. Pod-level labels multiply series: opt in deliberately."""

    CLIENT_NAMESPACE = "client_namespace"
    CLIENT_WORKLOAD = "client_workload"
    CLIENT_KIND = "client_kind"
    CLIENT_POD = "client_pod"
    CLIENT_NODE = "client_node"
    CLIENT_ZONE = "client_zone"
    SERVER_NAMESPACE = "server_namespace"
    SERVER_WORKLOAD = "server_workload"
    SERVER_KIND = "server_kind"
    SERVER_POD = "server_pod"
    SERVER_NODE = "server_node"
    SERVER_ZONE = "server_zone"
    SERVER_PORT = "server_port"
    SERVICE = "service"
    SERVER_DNS_NAME = "server_dns_name"


DEFAULT_GROUP_BY = (
    Dimension.CLIENT_NAMESPACE,
    Dimension.CLIENT_WORKLOAD,
    Dimension.SERVER_NAMESPACE,
    Dimension.SERVER_WORKLOAD,
    Dimension.SERVER_PORT,
    Dimension.SERVICE,
)
# Prometheus histogram upper bounds, in seconds.
DEFAULT_RTT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
DEFAULT_CONNECT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)

SERIES_TTL_SECONDS = (10, 86_400)  # inclusive bounds, shared with the CRD's CEL rules
SCRAPE_INTERVAL_SECONDS = (1, 3600)
MAX_NAMESPACES = 256  # bounds keep the CRD's CEL rules within the API server's cost budget

Buckets = Annotated[
    list[Annotated[float, Field(gt=0, le=3600)]],
    Field(min_length=1, max_length=30),
]


class NamespaceFilter(StrictModel):
    """Namespaces by name."""

    include: list[NamespaceName] = Field(
        default_factory=list,
        max_length=MAX_NAMESPACES,
        description="Namespaces whose flows are monitored; empty means all namespaces (within tenancy).",
    )
    exclude: list[NamespaceName] = Field(
        default_factory=list,
        max_length=MAX_NAMESPACES,
        description="Namespaces never monitored, even when included otherwise.",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> NamespaceFilter:
        both = sorted(set(self.include) & set(self.exclude))
        if both:
            raise ValueError(f"namespaces both included and excluded: {', '.join(both)}")
        return self


def _prefix_notation(value: object) -> object:
    # Only "address/length" strings, as the CRD's format (isCIDR) accepts: no bare addresses, no netmasks.
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", value):
        raise ValueError(f"{value!r} is not a network in prefix notation like 203.0.113.0/24")
    try:
        ip_network(value)  # strict: no host bits
    except ValueError as exc:  # the CRD checks only the shape (no CEL IP library before 1.31): say why
        try:
            network = ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid network: {exc}") from None
        raise ValueError(f"{value!r} has host bits set: the network is {network}") from None
    return value  # a string still: strict JSON validation takes networks as strings only


CIDR_MAX_LENGTH = 43  # an IPv6 address (39) plus /128


class NamedNetwork(StrictModel):
    """A CIDR outside the cluster that deserves its own name instead of `external`."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] = (
        Field(description="The workload name flows to or from this network get.")
    )
    cidr: Annotated[IPv4Network | IPv6Network, BeforeValidator(_prefix_notation)] = Field(
        description="The network in prefix notation, without host bits, e.g. 203.0.113.0/24."
    )


MAX_QNAME_SUFFIXES = 16
DnsSuffix = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$",
    ),
]


class DnsSpec(StrictModel):
    """DNS requests (flowmon_dns_*): query names are no label unless a suffix here opts in."""

    qname_suffixes: list[DnsSuffix] = Field(
        default_factory=list,
        max_length=MAX_QNAME_SUFFIXES,
        description="Domain suffixes (lower case, no trailing dot, e.g. payment-provider.example) that "
        "add a qname_suffix label to the DNS metrics: the longest listed suffix a query name ends with, "
        "`other` for the rest. Empty: no qname_suffix label.",
    )

    @model_validator(mode="after")
    def _unique(self) -> DnsSpec:
        if len(set(self.qname_suffixes)) != len(self.qname_suffixes):
            raise ValueError("qnameSuffixes lists a suffix twice")
        return self


class Selection(StrictModel):
    """Which flows the monitor sees: a flow is selected when either end is a selected pod."""

    namespaces: NamespaceFilter = Field(default_factory=NamespaceFilter, description="Namespaces by name.")
    namespace_selector: LabelSelector | None = Field(
        default=None, description="Namespaces by label; combined with `namespaces` (both must match)."
    )
    pod_selector: LabelSelector | None = Field(
        default=None, description="Pods by label within the selected namespaces; empty selects all pods."
    )
    networks: list[NamedNetwork] = Field(
        default_factory=list,
        max_length=64,
        description="Named external networks: their addresses get this workload name instead of `external`.",
    )


class HistogramBuckets(StrictModel):
    """Histogram upper bounds in seconds (ascending)."""

    rtt: Buckets = Field(default_factory=lambda: list(DEFAULT_RTT_BUCKETS), description="RTT buckets.")
    connect_duration: Buckets = Field(
        default_factory=lambda: list(DEFAULT_CONNECT_BUCKETS), description="Connect latency buckets."
    )

    @model_validator(mode="after")
    def _ascending(self) -> HistogramBuckets:
        for name, bounds in (("rtt", self.rtt), ("connectDuration", self.connect_duration)):
            if list(bounds) != sorted(set(bounds)):
                raise ValueError(f"{name} buckets must be strictly ascending")
        return self


class Aggregation(StrictModel):
    """How flows are grouped into series and how many series may exist."""

    group_by: list[Dimension] = Field(
        default_factory=lambda: list(DEFAULT_GROUP_BY),
        min_length=1,
        max_length=len(Dimension),
        description="Flow labels that form series; flows differing only in other labels are summed.",
    )
    max_series: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="Series per metric; beyond it flows fold into one series labelled __overflow__.",
    )
    series_ttl: Duration = Field(
        default="5m",
        alias="seriesTTL",
        description="Idle series (no change) disappear after this long, e.g. 5m.",
    )
    histogram_buckets: HistogramBuckets = Field(
        default_factory=HistogramBuckets, description="Histogram bucket bounds in seconds."
    )

    @model_validator(mode="after")
    def _checks(self) -> Aggregation:
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("groupBy lists a dimension twice")
        low, high = SERIES_TTL_SECONDS
        if not low <= duration_seconds(self.series_ttl) <= high:
            raise ValueError("seriesTTL must be between 10s and 24h")
        return self


class Scrape(StrictModel):
    """How Prometheus scrapes this monitor."""

    interval: Duration = Field(default="15s", description="Scrape interval of the ServiceMonitor.")
    service_monitor_labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Labels put on the ServiceMonitor so that a Prometheus selects it (e.g. release: kps).",
    )

    @model_validator(mode="after")
    def _interval_bounds(self) -> Scrape:
        low, high = SCRAPE_INTERVAL_SECONDS
        if not low <= duration_seconds(self.interval) <= high:
            raise ValueError("interval must be between 1s and 1h")
        return self


class FlowMonitorSpec(StrictModel):
    """What a FlowMonitor asks for: which flows, which metrics, how aggregated, how scraped, how alerted."""

    selection: Selection = Field(default_factory=Selection, description="Which flows the monitor sees.")
    metrics: list[Metric] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        min_length=1,
        max_length=len(Metric),
        description="Metric families to export (allow-list); default all TCP and UDP ones but min_rtt (a "
        "second RTT histogram per series); min_rtt, dns_requests and dns_latency are opt-in.",
    )
    aggregation: Aggregation = Field(default_factory=Aggregation, description="Grouping and cardinality.")
    scrape: Scrape = Field(default_factory=Scrape, description="Prometheus scrape settings.")
    alerting: AlertingSpec = Field(default_factory=AlertingSpec, description="Alert rules for this monitor.")
    dns: DnsSpec = Field(default_factory=DnsSpec, description="DNS request metrics.")

    @model_validator(mode="after")
    def _unique_metrics(self) -> FlowMonitorSpec:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics lists a metric twice")
        return self


class ObjectMeta(StrictModel):
    """The parts of metadata flowmon reads."""

    model_config = StrictModel.model_config | {"extra": "ignore"}

    name: NamespaceName
    namespace: NamespaceName = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class FlowMonitor(StrictModel):
    """A whole FlowMonitor object as kubectl or the API server gives it."""

    model_config = StrictModel.model_config | {"extra": "ignore"}  # status, kind, apiVersion pass through

    metadata: ObjectMeta
    spec: FlowMonitorSpec = Field(default_factory=FlowMonitorSpec)

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"
