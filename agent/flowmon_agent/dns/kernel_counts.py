"""The DNS transactions bpf/dns.c keeps in the kernel (DNS_MODE 3), read into the tracker's terms.

The kernel counts requests per (vantage, client, server, rcode, qtype) and latency per (vantage, client,
server) in two hash maps, cumulative like Prometheus counters; each poll reads them whole (bounded by
DNS_SERIES_MAX keys each) into a `KernelTotals` the tracker merges with what it counted itself. Queries
wait in `dns_pending`; `sweep_pending` deletes those past the tracker's deadline (injectable clock, so
tests can move it) and returns them for the tracker to count as `timeout`. A query the kernel answers
while the sweep deletes it is counted once: by whichever delete succeeds.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import socket
from dataclasses import dataclass, field

from flowmon_agent.dns.codes import qtype_name, rcode_name

VANTAGES = ("client", "server")  # index = the kernel's DNS_VANTAGE_*
OVERFLOW = "overflow"
SWEEP_MAX = 16_384  # pending entries looked at per poll (DNS_PENDING_MAX): a bounded sweep


@functools.lru_cache(maxsize=4096)
def address_text(family: int, raw: bytes) -> str:
    """The text form flows key peers by (inet_ntop writes IPv4-mapped IPv6 otherwise)."""
    if family == 4:
        return socket.inet_ntoa(raw[:4])
    return str(ipaddress.IPv6Address(raw))


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """A request or latency key of the kernel's maps, in labels (rcode and qtype: "" for latency)."""

    vantage: str
    client: str
    server: str
    rcode: str = ""
    qtype: str = ""


@dataclass(slots=True)
class KernelHistogram:
    buckets: list[int]  # per bound, not cumulative (as the kernel counts them)
    count: int = 0
    sum_s: float = 0.0


@dataclass(slots=True)
class KernelTotals:
    """Cumulative counts read from the kernel; the kernel's own event counters come from dns_counts."""

    requests: dict[SeriesKey, int] = field(default_factory=dict)
    latency: dict[SeriesKey, KernelHistogram] = field(default_factory=dict)
    pending: int = 0


@dataclass(frozen=True, slots=True)
class TimedOut:
    vantage: str
    client: str
    server: str
    qtype: str


def _ends(key) -> tuple[str, str]:
    if key.overflow:
        return OVERFLOW, OVERFLOW
    return address_text(key.family, bytes(key.client)), address_text(key.family, bytes(key.server))


def read_totals(requests_map, latency_map, bucket_count: int) -> KernelTotals:
    """Both counter maps as labels; keys that differ only in raw values sharing a label are summed."""
    totals = KernelTotals()
    for key, value in requests_map.items():
        client, server = _ends(key)
        series = SeriesKey(
            VANTAGES[key.vantage & 1], client, server, rcode_name(key.rcode), qtype_name(key.qtype)
        )
        totals.requests[series] = totals.requests.get(series, 0) + value.value
    for key, value in latency_map.items():
        client, server = _ends(key)
        pair = SeriesKey(VANTAGES[key.vantage & 1], client, server)
        hist = totals.latency.setdefault(pair, KernelHistogram([0] * bucket_count))
        for i in range(bucket_count):
            hist.buckets[i] += value.buckets[i]
        hist.count += value.count
        hist.sum_s += value.sum_ns / 1e9
    return totals


def sweep_pending(pending_map, deadline_s: float, limit: int = SWEEP_MAX) -> tuple[list[TimedOut], int]:
    """Delete the pending queries sent at or before `deadline_s` (CLOCK_MONOTONIC seconds); those this
    sweep deleted (the kernel may answer one meanwhile: then it is its), and how many still wait."""
    timed_out: list[TimedOut] = []
    waiting = 0
    for key, txn in list(itertools.islice(pending_map.items(), limit)):  # not deleting while walking
        if txn.ts_ns / 1e9 > deadline_s:
            waiting += 1
            continue
        try:
            del pending_map[key]
        except KeyError:
            continue  # answered (or swept) meanwhile
        client = address_text(key.family, bytes(key.client))
        server = address_text(key.family, bytes(key.server))
        timed_out.append(TimedOut(VANTAGES[key.vantage & 1], client, server, qtype_name(txn.qtype)))
    return timed_out, waiting
