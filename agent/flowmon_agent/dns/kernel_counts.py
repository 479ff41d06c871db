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
import struct
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


def _entries(table):
    """(key, value) pairs in batches of the kernel (BPF_MAP_LOOKUP_BATCH: ~25x faster than one
    get-next-key and lookup per entry, measured at 1,000 entries)."""
    return table.items_lookup_batch()


def _ends(key) -> tuple[str, str]:
    if key.overflow:
        return OVERFLOW, OVERFLOW
    return address_text(key.family, bytes(key.client)), address_text(key.family, bytes(key.server))


class TotalsReader:
    """Reads both counter maps as labels; keys that differ only in raw values sharing a label are summed.
    A key's labels are decoded once and kept by its bytes (at most `cache_max`, then decoded afresh):
    a poll then costs a batch read and a dict look-up per key."""

    def __init__(self, bucket_count: int, cache_max: int = 4 * SWEEP_MAX) -> None:
        self._buckets, self._cache_max = bucket_count, cache_max
        self._latency_value = struct.Struct(f"={bucket_count + 2}Q")  # struct dns_latency_val
        self._labels: dict[bytes, SeriesKey] = {}

    def _series(self, key, with_codes: bool) -> SeriesKey:
        raw = bytes(key)
        series = self._labels.get(raw)
        if series is None:
            if len(self._labels) >= self._cache_max:
                self._labels.clear()
            client, server = _ends(key)
            vantage = VANTAGES[key.vantage & 1]
            if with_codes:
                series = SeriesKey(vantage, client, server, rcode_name(key.rcode), qtype_name(key.qtype))
            else:
                series = SeriesKey(vantage, client, server)
            self._labels[raw] = series
        return series

    def read(self, requests_map, latency_map) -> KernelTotals:
        totals = KernelTotals()
        requests, latency = totals.requests, totals.latency
        for key, value in _entries(requests_map):
            series = self._series(key, True)
            requests[series] = requests.get(series, 0) + int(getattr(value, "value", value))
        n = self._buckets
        for key, value in _entries(latency_map):
            words = self._latency_value.unpack_from(bytes(value))
            pair = self._series(key, False)
            hist = latency.get(pair)
            if hist is None:
                latency[pair] = KernelHistogram(list(words[:n]), words[n], words[n + 1] / 1e9)
            else:  # an overflow key shared by several raw keys
                hist.buckets = [a + b for a, b in zip(hist.buckets, words[:n], strict=True)]
                hist.count, hist.sum_s = hist.count + words[n], hist.sum_s + words[n + 1] / 1e9
        return totals


def sweep_pending(pending_map, deadline_s: float, limit: int = SWEEP_MAX) -> tuple[list[TimedOut], int]:
    """Delete the pending queries sent at or before `deadline_s` (CLOCK_MONOTONIC seconds); those this
    sweep deleted (the kernel may answer one meanwhile: then it is its), and how many still wait."""
    timed_out: list[TimedOut] = []
    waiting = 0
    for key, txn in list(itertools.islice(_entries(pending_map), limit)):  # not deleting while walking
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
