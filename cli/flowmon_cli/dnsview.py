"""The live view's DNS rows: per client and DNS server, queries per second, the share that failed
(NXDOMAIN, SERVFAIL, `timeout`: never answered) and the answer latency's p50 and p99.

Pure and table-tested, like `flowmon_cli.topview`, whose snapshots hold each pair's DNS requests by
rcode and latency buckets (the DNS families carry the monitor's groupBy labels, so a DNS pair is the
client and the resolver, e.g. the kube-dns Service's pods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowmon_cli.topview import DNS, Snapshot, endpoint_name, histogram_quantile, human_count, human_seconds

FAILED_RCODES = ("NXDOMAIN", "SERVFAIL", "timeout")  # what the DNS alert rules watch too


@dataclass(frozen=True)
class DnsRow:
    """One client and DNS server: requests and failures per second (or totals when seconds is None)."""

    client: str
    server: str
    queries: float
    nxdomain: float
    servfail: float
    timeouts: float
    latency_p50: float | None
    latency_p99: float | None

    @property
    def failed(self) -> float:
        return self.nxdomain + self.servfail + self.timeouts

    @property
    def failure_ratio(self) -> float | None:
        return self.failed / self.queries if self.queries else None


def dns_rows(stats: Snapshot, seconds: float | None = None) -> list[DnsRow]:
    """Per pair with DNS series: busiest first."""
    scale = 1.0 / seconds if seconds else 1.0
    result = []
    for key, s in stats.items():
        if DNS not in s.protocols:
            continue
        labels = dict(key)
        nxdomain, servfail, timeouts = (s.dns_requests.get(rcode, 0.0) * scale for rcode in FAILED_RCODES)
        result.append(
            DnsRow(
                client=endpoint_name(labels, "client"),
                server=endpoint_name(labels, "server"),
                queries=sum(s.dns_requests.values()) * scale,
                nxdomain=nxdomain,
                servfail=servfail,
                timeouts=timeouts,
                latency_p50=histogram_quantile(0.5, s.dns_latency),
                latency_p99=histogram_quantile(0.99, s.dns_latency),
            )
        )
    return sorted(result, key=lambda r: (-r.queries, r.client, r.server))


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}" if ratio in (0, 1) else f"{ratio:.1%}"


def dns_cells(row: DnsRow) -> Sequence[str]:
    return (
        row.client,
        row.server,
        human_count(row.queries),
        percent(row.failure_ratio),
        human_count(row.nxdomain),
        human_count(row.servfail),
        human_count(row.timeouts),
        human_seconds(row.latency_p50),
        human_seconds(row.latency_p99),
    )


def dns_columns(per_second: bool) -> Sequence[str]:
    unit = "/s" if per_second else ""
    return (
        "client",
        "DNS server",
        "queries" + unit,
        "failed",
        "NXDOMAIN" + unit,
        "SERVFAIL" + unit,
        "timeout" + unit,
        "latency p50",
        "latency p99",
    )
