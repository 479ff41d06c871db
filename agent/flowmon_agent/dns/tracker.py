"""DNS transactions from packets: queries matched to answers, latency, timeouts, counters, names.

Each packet was seen at a socket of this node, leaving it (`egress`) or arriving at it. A query leaving
or an answer arriving is the client's view; a query arriving or an answer leaving is the server's. When
both ends live on the node, the same transaction is seen from both, so every count carries its
`vantage`: the one who exports picks the client's view and the server's only for clients no agent sees
(the count-once rule of TCP flows).

A query waits in a bounded table keyed by (vantage, client ip, client port, server ip, server port, id);
its answer completes it (rcode, latency from the kernel's timestamps); a query still waiting after
`timeout_s` by the injectable clock counts as rcode `timeout`. Counters are cumulative (Prometheus
counters) and capped in series: past the cap, new (client, server) pairs fold into `overflow`.

With the kernel keeping transactions (bpf/dns.c DNS_MODE 3), the tracker sees only what the kernel
handed over (malformed packets, other opcodes, unmatched answers, everything while query-name suffixes
are wanted) and answers with addresses for their names (`learn_names`); the kernel's cumulative counts
arrive each poll as `KernelTotals` (`absorb_kernel`), its swept queries as `count_timeouts`, and every
output is the sum of both.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from flowmon_agent.dns.codes import TIMEOUT, qtype_name, rcode_name
from flowmon_agent.dns.kernel_counts import KernelTotals, TimedOut
from flowmon_agent.dns.names import DEFAULT_MAX_ENTRIES, NameTable, NameTableStats
from flowmon_agent.dns.parse import Malformed, Message, parse_message
from flowmon_contract.metrics import DNS_LATENCY_BUCKETS

OVERFLOW = "overflow"  # client and server of the series that did not fit under the cap
OPCODE_QUERY = 0
DEFAULT_TIMEOUT_S = 5.0  # glibc's resolver gives up on a server after 5 s (resolv.conf `timeout`)
DEFAULT_MAX_PENDING = 16_384
DEFAULT_MAX_SERIES = 4_096
DEFAULT_LATENCY_BUCKETS = DNS_LATENCY_BUCKETS


class Vantage(StrEnum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Packet:
    """One UDP datagram to or from the DNS port, as the kernel saw it at a socket of this node."""

    src: str
    sport: int
    dst: str
    dport: int
    egress: bool  # leaving the socket that sent it; False: arriving at the socket that receives it
    timestamp: float  # seconds of CLOCK_MONOTONIC (the kernel's bpf_ktime_get_ns)
    payload: bytes
    complete: bool = True  # False: the kernel copied only the first part of the payload


@dataclass(frozen=True, slots=True)
class RequestKey:
    vantage: Vantage
    client: str
    server: str
    rcode: str  # NOERROR, NXDOMAIN, ..., other, or timeout
    qtype: str  # A, AAAA, SRV, ..., other
    qname_suffix: str = ""  # the longest opted-in suffix the query name ends with; "" for none


@dataclass(frozen=True, slots=True)
class PairKey:
    vantage: Vantage
    client: str
    server: str


@dataclass(frozen=True, slots=True)
class MalformedKey:
    source: str
    destination: str
    reason: str


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]  # observations <= each bound (the Prometheus `le` buckets, +Inf = count)
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class TrackerStats:
    pending: int
    pending_full: int  # queries not tracked because the pending table was full
    retransmitted: int  # a query seen again while its first copy waited (latency runs from the first)
    unmatched_responses: int  # answers to no waiting query (late after a timeout, or never asked)
    other_opcodes: int  # NOTIFY, UPDATE, ...: not requests
    series_overflow: int  # observations folded into the `overflow` series
    names: NameTableStats


@dataclass(slots=True)
class _Pending:
    timestamp: float
    qtype: str
    qname_suffix: str


def matching_suffix(qname: str, suffixes: Sequence[str]) -> str:
    """The first of `suffixes` (longest first) that `qname` is or ends with at a label boundary; ""."""
    for suffix in suffixes:
        if qname.endswith(suffix) and (len(qname) == len(suffix) or qname[-len(suffix) - 1] == "."):
            return suffix
    return ""


@dataclass(slots=True)
class _Histogram:
    buckets: list[int]
    count: int = 0
    sum: float = 0.0


@dataclass(frozen=True, slots=True)
class KernelEvents:
    """The kernel's own event counters (bpf/dns.c dns_counts), cumulative."""

    retransmitted: int = 0
    pending_full: int = 0
    series_overflow: int = 0


@dataclass(slots=True)
class _Counters:
    pending_full: int = 0
    retransmitted: int = 0
    unmatched_responses: int = 0
    other_opcodes: int = 0
    series_overflow: int = 0
    requests: dict[RequestKey, int] = field(default_factory=dict)
    malformed: dict[MalformedKey, int] = field(default_factory=dict)
    latency: dict[PairKey, _Histogram] = field(default_factory=dict)


def _add_kernel_requests(into: dict[RequestKey, int], kernel: KernelTotals) -> None:
    for k, n in kernel.requests.items():
        key = RequestKey(Vantage(k.vantage), k.client, k.server, k.rcode, k.qtype)
        into[key] = into.get(key, 0) + n


def _add_kernel_latency(into: dict[PairKey, _Histogram], kernel: KernelTotals, bucket_count: int) -> None:
    for k, kh in kernel.latency.items():
        pair = PairKey(Vantage(k.vantage), k.client, k.server)
        hist = into.setdefault(pair, _Histogram([0] * bucket_count))
        hist.buckets = [a + b for a, b in zip(hist.buckets, kh.buckets, strict=True)]
        hist.count, hist.sum = hist.count + kh.count, hist.sum + kh.sum_s


class DnsTracker:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_series: int = DEFAULT_MAX_SERIES,
        max_names: int = DEFAULT_MAX_ENTRIES,
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        if timeout_s <= 0 or max_pending < 1 or max_series < 1:
            raise ValueError("timeout_s, max_pending and max_series must be positive")
        self._clock, self._timeout_s = clock, timeout_s
        self._max_pending, self._max_series = max_pending, max_series
        self._bounds = tuple(sorted(latency_buckets))
        self._pending: OrderedDict[tuple, _Pending] = OrderedDict()  # oldest first: timeouts pop the front
        self._c = _Counters()
        self._suffixes: tuple[str, ...] = ()
        self._kernel, self._kernel_events = KernelTotals(), KernelEvents()
        self.names = NameTable(clock=clock, max_entries=max_names)

    @property
    def qname_suffixes(self) -> tuple[str, ...]:
        return self._suffixes

    @property
    def latency_bounds(self) -> tuple[float, ...]:
        return self._bounds

    def deadline(self) -> float:
        """Queries sent at or before this time (CLOCK_MONOTONIC seconds, by the tracker's clock) are late."""
        return self._clock() - self._timeout_s

    def set_qname_suffixes(self, suffixes: Iterable[str]) -> None:
        """Query names ending in one of these (the policy's opt-in, bounded) count under that suffix."""
        self._suffixes = tuple(sorted(set(suffixes), key=lambda s: (-len(s), s)))

    # --- input ----------------------------------------------------------------------------------------
    def observe(self, packet: Packet) -> None:
        msg = parse_message(packet.payload, complete=packet.complete)
        if isinstance(msg, Malformed):
            key = MalformedKey(packet.src, packet.dst, msg.reason.value)
            self._bump(self._c.malformed, key, MalformedKey(OVERFLOW, OVERFLOW, msg.reason.value))
            return
        self.observe_message(packet, msg)

    def learn_names(self, packet: Packet, source: Hashable | None = None) -> None:
        """An answer the kernel already counted, arriving at its client: only its names are new.
        `source`: the kernel's key for this answer (it hands the same answer over once per TTL); an
        answer that does not parse gives it back, so that each copy is counted as malformed."""
        msg = parse_message(packet.payload, complete=packet.complete)
        if isinstance(msg, Malformed):
            key = MalformedKey(packet.src, packet.dst, msg.reason.value)
            self._bump(self._c.malformed, key, MalformedKey(OVERFLOW, OVERFLOW, msg.reason.value))
            if source is not None:
                self.names.release(source)
        elif msg.qname:
            for record in msg.answers:
                self.names.learn(packet.dst, record.address, msg.qname, record.ttl, source)

    def absorb_kernel(self, totals: KernelTotals, events: KernelEvents) -> None:
        """The kernel's cumulative counts as of this poll (replacing the previous poll's)."""
        self._kernel, self._kernel_events = totals, events

    def retire_kernel(self) -> None:
        """The capture was closed: its kernel's last counts become the tracker's own, so that a later
        capture, whose maps start empty, never takes an exported counter backwards. The queries the
        kernel still held are dropped uncounted (no socket answers them into a closed capture)."""
        c, k = self._c, self._kernel_events
        _add_kernel_requests(c.requests, self._kernel)
        _add_kernel_latency(c.latency, self._kernel, len(self._bounds))
        c.pending_full += k.pending_full
        c.retransmitted += k.retransmitted
        c.series_overflow += k.series_overflow
        self._kernel, self._kernel_events = KernelTotals(), KernelEvents()

    def count_timeouts(self, timed_out: Iterable[TimedOut]) -> None:
        """Queries the kernel held past their deadline (swept by user space): rcode `timeout`."""
        for t in timed_out:
            self._count(Vantage(t.vantage), t.client, t.server, TIMEOUT, t.qtype, "")

    def observe_message(self, packet: Packet, msg: Message) -> None:
        """A message already parsed (or built from a record the kernel parsed); `packet.payload` unused."""
        if msg.opcode != OPCODE_QUERY:
            self._c.other_opcodes += 1
            return
        if msg.is_response:
            self._answer(packet, msg)
        else:
            self._query(packet, msg)

    def expire(self) -> int:
        """Count queries past their deadline as `timeout` and drop expired names; how many timed out."""
        deadline = self._clock() - self._timeout_s
        timed_out = 0
        while self._pending:
            key, first = next(iter(self._pending.items()))
            if first.timestamp > deadline:
                break
            self._pending.popitem(last=False)
            vantage, client, _, server, _, _ = key
            self._count(vantage, client, server, TIMEOUT, first.qtype, first.qname_suffix)
            timed_out += 1
        self.names.expire()
        return timed_out

    def _query(self, packet: Packet, msg: Message) -> None:
        vantage = Vantage.CLIENT if packet.egress else Vantage.SERVER
        key = (vantage, packet.src, packet.sport, packet.dst, packet.dport, msg.id)
        if key in self._pending:
            self._c.retransmitted += 1
        elif len(self._pending) >= self._max_pending:
            self._c.pending_full += 1
        else:
            suffix = matching_suffix(msg.qname, self._suffixes) if self._suffixes else ""
            self._pending[key] = _Pending(packet.timestamp, qtype_name(msg.qtype), suffix)

    def _answer(self, packet: Packet, msg: Message) -> None:
        vantage = Vantage.SERVER if packet.egress else Vantage.CLIENT
        key = (vantage, packet.dst, packet.dport, packet.src, packet.sport, msg.id)
        query = self._pending.pop(key, None)
        if query is None:
            self._c.unmatched_responses += 1
            return
        client, server = packet.dst, packet.src
        pair = self._count(vantage, client, server, rcode_name(msg.rcode), query.qtype, query.qname_suffix)
        self._observe_latency(pair, max(packet.timestamp - query.timestamp, 0.0))
        if vantage is Vantage.CLIENT and msg.qname:  # a pod received it: what that pod now calls the address
            for record in msg.answers:
                self.names.learn(client, record.address, msg.qname, record.ttl)

    # --- counters -------------------------------------------------------------------------------------
    def _count(
        self, vantage: Vantage, client: str, server: str, rcode: str, qtype: str, suffix: str
    ) -> PairKey:
        key = RequestKey(vantage, client, server, rcode, qtype, suffix)
        overflow = RequestKey(vantage, OVERFLOW, OVERFLOW, rcode, qtype, suffix)
        folded = self._bump(self._c.requests, key, overflow)
        return PairKey(vantage, folded.client, folded.server)

    def _bump(self, table: dict, key, overflow_key):
        if key not in table and len(table) >= self._max_series:
            key = overflow_key
            self._c.series_overflow += 1
        table[key] = table.get(key, 0) + 1
        return key

    def _observe_latency(self, pair: PairKey, seconds: float) -> None:
        hist = self._c.latency.get(pair)
        if hist is None:
            hist = self._c.latency[pair] = _Histogram([0] * len(self._bounds))
        index = bisect.bisect_left(self._bounds, seconds)  # the first bound >= seconds
        if index < len(self._bounds):  # else only +Inf holds it
            hist.buckets[index] += 1
        hist.count += 1
        hist.sum += seconds

    # --- output ---------------------------------------------------------------------------------------
    def requests(self) -> dict[RequestKey, int]:
        out = dict(self._c.requests)
        _add_kernel_requests(out, self._kernel)
        return out

    def malformed(self) -> dict[MalformedKey, int]:
        return dict(self._c.malformed)

    def latency(self) -> dict[PairKey, LatencyHistogram]:
        merged = {pair: _Histogram(list(h.buckets), h.count, h.sum) for pair, h in self._c.latency.items()}
        _add_kernel_latency(merged, self._kernel, len(self._bounds))
        out = {}
        for pair, hist in merged.items():
            running, cumulative = 0, []
            for n in hist.buckets:
                running += n
                cumulative.append(running)
            out[pair] = LatencyHistogram(self._bounds, tuple(cumulative), hist.count, hist.sum)
        return out

    def stats(self) -> TrackerStats:
        c, k = self._c, self._kernel_events
        return TrackerStats(
            pending=len(self._pending) + self._kernel.pending,
            pending_full=c.pending_full + k.pending_full,
            retransmitted=c.retransmitted + k.retransmitted,
            unmatched_responses=c.unmatched_responses,
            other_opcodes=c.other_opcodes,
            series_overflow=c.series_overflow + k.series_overflow,
            names=self.names.stats(),
        )
