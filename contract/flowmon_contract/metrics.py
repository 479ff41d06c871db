"""The metrics flowmon exports: names, types, help and label sets (what dashboards and rules query).

The agent renders them and the operator's rules and ServiceMonitors refer to them: one table, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flowmon_contract.spec import Metric

OVERFLOW_VALUE = "__overflow__"


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
    # UDP: the client is the end that sent the first datagram of the 5-tuple (idle 120 s: decided afresh).
    Metric.UDP_SENT_BYTES: MetricInfo(
        "flowmon_udp_sent_bytes", FamilyType.COUNTER, "UDP payload bytes sent from client to server."
    ),
    Metric.UDP_RECEIVED_BYTES: MetricInfo(
        "flowmon_udp_received_bytes", FamilyType.COUNTER, "UDP payload bytes sent from server to client."
    ),
    Metric.UDP_SENT_DATAGRAMS: MetricInfo(
        "flowmon_udp_sent_datagrams", FamilyType.COUNTER, "UDP datagrams sent from client to server."
    ),
    Metric.UDP_RECEIVED_DATAGRAMS: MetricInfo(
        "flowmon_udp_received_datagrams", FamilyType.COUNTER, "UDP datagrams sent from server to client."
    ),
    Metric.DNS_REQUESTS: MetricInfo(
        "flowmon_dns_requests",
        FamilyType.COUNTER,
        "DNS queries of a client workload to a server, by answer code (rcode; `timeout`: never answered) "
        "and query type (qtype).",
    ),
    Metric.DNS_LATENCY: MetricInfo(
        "flowmon_dns_latency_seconds",
        FamilyType.HISTOGRAM,
        "Time from a DNS query leaving the client to its answer arriving, per client and server.",
    ),
}
# Labels the DNS families add after the monitor's groupBy labels (qname_suffix only when opted in).
DNS_REQUEST_LABELS = ("rcode", "qtype")
QNAME_SUFFIX_LABEL = "qname_suffix"
QNAME_OTHER = "other"  # a query name ending in none of the monitor's suffixes
# Values the DNS labels can take (flowmon_agent.dns.codes: 12 rcodes + other + timeout; 17 qtypes + other).
DNS_RCODE_VALUES, DNS_QTYPE_VALUES = 14, 18
# flowmon_dns_latency_seconds bounds: a local cache answers well under a millisecond, a remote resolver in
# tens of milliseconds, a query that times out after 5 s.
DNS_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# Environment isolation (flowmon_agent.aggregation.isolation counts, flowmon_operator.rules alerts).
VIOLATIONS = MetricInfo(
    "flowmon_isolation_violations",
    FamilyType.COUNTER,
    "TCP connection attempts (established or failed) from a client environment to a server environment "
    "that spec.alerting.isolation forbids.",
)
VIOLATION_BYTES = MetricInfo(
    "flowmon_isolation_violation_bytes",
    FamilyType.COUNTER,
    "TCP payload bytes, both directions, between a forbidden pair of environments.",
)
ISOLATION_LABEL_NAMES = (
    "from_env",
    "to_env",
    "client_namespace",
    "client_workload",
    "server_namespace",
    "server_workload",
)
