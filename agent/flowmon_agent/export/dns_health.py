"""The DNS capture's own health as agent metrics (/metrics): attached or not, what the kernel and the
tracker could not handle (a full ring, a full pending table, malformed packets). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flowmon_agent.aggregation.view import Family
from flowmon_contract.metrics import FamilyType, MetricInfo

CAPTURE_UP = MetricInfo(
    "flowmon_agent_dns_capture_up", FamilyType.GAUGE, "Whether the DNS capture is attached (1) or not (0)."
)
ATTACH_FAILURES = MetricInfo(
    "flowmon_agent_dns_attach_failures",
    FamilyType.COUNTER,
    "Attempts to attach the DNS capture that failed (the rest of the agent keeps working).",
)
EVENTS = MetricInfo(
    "flowmon_agent_dns_events",
    FamilyType.COUNTER,
    "DNS capture and tracker counters by event: seen, handed and read records, kept (counted in the "
    "kernel, nothing handed over), ring_full (lost: the ring was full), not_walked (IPv6 extension "
    "headers), answers_handed, answers_deduplicated (answers with addresses user space already had), "
    "answers_unwalked, pending_full, retransmitted, "
    "unmatched_responses, other_opcodes, series_overflow, names_evicted, names_expired.",
)
MALFORMED = MetricInfo(
    "flowmon_agent_dns_malformed",
    FamilyType.COUNTER,
    "DNS packets that did not parse, by reason (never trusted: counted, never a crash).",
)


@dataclass(frozen=True, slots=True)
class DnsHealth:
    attached: bool
    attach_failures: int
    events: Mapping[str, int] = field(default_factory=dict)
    malformed: Mapping[str, int] = field(default_factory=dict)  # reason -> count


def dns_health_families(health: DnsHealth) -> tuple[Family, ...]:
    return (
        Family(CAPTURE_UP, (), samples={(): 1.0 if health.attached else 0.0}),
        Family(ATTACH_FAILURES, (), samples={(): float(health.attach_failures)}),
        Family(EVENTS, ("event",), samples={(k,): float(v) for k, v in sorted(health.events.items())}),
        Family(MALFORMED, ("reason",), samples={(k,): float(v) for k, v in sorted(health.malformed.items())}),
    )
