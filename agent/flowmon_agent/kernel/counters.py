"""The flow counters, defined once: `COUNTERS` names every word of bpf/flowmon.c's `struct flow_val` after
`created_ns`, in the C order (`TCP_COUNTERS`), then every word of bpf/udp.c's `struct udp_val` after
`created_ns` (`UDP_COUNTERS`), and a flow's counters are one integer vector in that order, from the map
read to the exported series (`FlowCounters`); a TCP flow's UDP words are zero and the reverse.
`struct.unpack` of a map value gives the vector as it is (with the other protocol's zeros);
aggregation adds and subtracts vectors; `active` (open connections, a gauge) is derived, never stored.

tests/test_kernel_layout.py checks the table against the C source.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

# Kernel histograms are log2 slots of microseconds: slot k holds values v with 2**(k-1) <= v < 2**k
# (slot 0 holds v == 0). User space turns them into Prometheus buckets with le = 2**k microseconds.
HISTOGRAM_SLOTS = 32  # FM_SLOTS


class Kind(StrEnum):
    COUNTER = "counter"  # cumulative, never decreases within an entry
    HISTOGRAM_SUM = "histogram_sum"  # a histogram's sum of microseconds
    HISTOGRAM_SLOTS = "histogram_slots"  # a histogram's HISTOGRAM_SLOTS log2 slots


@dataclass(frozen=True, slots=True)
class Counter:
    name: str  # FlowCounters' attribute
    c_name: str  # the field of struct flow_val
    kind: Kind
    index: int  # the first word in the vector
    width: int = 1

    @property
    def words(self) -> slice:
        return slice(self.index, self.index + self.width)


def _table(*fields: tuple[str, str, Kind], start: int = 0) -> tuple[Counter, ...]:
    out: list[Counter] = []
    index = start
    for name, c_name, kind in fields:
        width = HISTOGRAM_SLOTS if kind is Kind.HISTOGRAM_SLOTS else 1
        out.append(Counter(name, c_name, kind, index, width))
        index += width
    return tuple(out)


# Directions are always client→server ("c2s") and server→client ("s2c"), whichever end reported.
TCP_COUNTERS = _table(
    ("sent_bytes", "c2s_bytes", Kind.COUNTER),  # client → server payload bytes
    ("received_bytes", "s2c_bytes", Kind.COUNTER),  # server → client payload bytes
    ("opened", "opened", Kind.COUNTER),  # connections that reached ESTABLISHED
    ("closed", "closed", Kind.COUNTER),  # established connections that closed
    ("failed_refused", "failed_refused", Kind.COUNTER),  # SYN answered by RST
    ("failed_timeout", "failed_timeout", Kind.COUNTER),  # SYN never answered
    ("retransmits_c2s", "retrans_c2s", Kind.COUNTER),
    ("retransmits_s2c", "retrans_s2c", Kind.COUNTER),
    ("resets_c2s", "resets_c2s", Kind.COUNTER),  # RST sent by the client
    ("resets_s2c", "resets_s2c", Kind.COUNTER),  # RST sent by the server
    ("connect_latency_sum_us", "latency_sum_us", Kind.HISTOGRAM_SUM),
    ("rtt_sum_us", "rtt_sum_us", Kind.HISTOGRAM_SUM),
    ("connect_latency_slots", "latency_slots", Kind.HISTOGRAM_SLOTS),
    ("rtt_slots", "rtt_slots", Kind.HISTOGRAM_SLOTS),
)
TCP_WIDTH = sum(c.width for c in TCP_COUNTERS)
# UDP's client is the end that sent the first datagram of the 5-tuple (bpf/udp.c).
UDP_COUNTERS = _table(
    ("udp_sent_bytes", "c2s_bytes", Kind.COUNTER),  # client → server application payload bytes
    ("udp_received_bytes", "s2c_bytes", Kind.COUNTER),
    ("udp_sent_datagrams", "c2s_datagrams", Kind.COUNTER),
    ("udp_received_datagrams", "s2c_datagrams", Kind.COUNTER),
    start=TCP_WIDTH,
)
COUNTERS = TCP_COUNTERS + UDP_COUNTERS
BY_NAME: Mapping[str, Counter] = {c.name: c for c in COUNTERS}
WIDTH = sum(c.width for c in COUNTERS)

# Vector indexes, for the hot paths (aggregation's masks and sums).
SENT, RECEIVED, OPENED, CLOSED = (
    BY_NAME[n].index for n in ("sent_bytes", "received_bytes", "opened", "closed")
)
REFUSED, TIMEOUT = BY_NAME["failed_refused"].index, BY_NAME["failed_timeout"].index
RETX_C2S, RETX_S2C = BY_NAME["retransmits_c2s"].index, BY_NAME["retransmits_s2c"].index
RST_C2S, RST_S2C = BY_NAME["resets_c2s"].index, BY_NAME["resets_s2c"].index
CONNECT_SUM, CONNECT_SLOTS = BY_NAME["connect_latency_sum_us"].index, BY_NAME["connect_latency_slots"].words
RTT_SUM, RTT_SLOTS = BY_NAME["rtt_sum_us"].index, BY_NAME["rtt_slots"].words
UDP_SENT, UDP_RECEIVED, UDP_SENT_DATAGRAMS, UDP_RECEIVED_DATAGRAMS = (c.index for c in UDP_COUNTERS)
TCP_WORDS, UDP_WORDS = slice(0, TCP_WIDTH), slice(TCP_WIDTH, WIDTH)


@dataclass(frozen=True, slots=True)
class Log2Histogram:
    """A cumulative log2 histogram of microsecond values, read out of a vector."""

    slots: tuple[int, ...]
    sum_us: int

    @property
    def count(self) -> int:
        return sum(self.slots)


class FlowCounters(tuple[int, ...]):
    """A flow's cumulative counters: the vector itself (COUNTERS order), with a name for each word.

    Aggregation treats it as the plain tuple it is; `active`, `rtt` and `connect_latency` are derived.
    """

    __slots__ = ()

    @classmethod
    def of(cls, **values: int | Iterable[int]) -> FlowCounters:
        """Counters by name (COUNTERS' names; slots as sequences), the others zero: tests and tools."""
        vector = [0] * WIDTH
        for name, value in values.items():
            counter = BY_NAME[name]
            vector[counter.words] = list(value) if counter.width > 1 else [value]  # type: ignore[arg-type]
        if len(vector) != WIDTH:
            raise ValueError(f"histogram slots must number {HISTOGRAM_SLOTS}")
        return cls(vector)

    @property
    def active(self) -> int:
        """Connections open now; an entry evicted while its connections were open loses their opens, and
        their closes must not make it negative."""
        return max(self[OPENED] - self[CLOSED], 0)

    @property
    def connect_latency(self) -> Log2Histogram:
        return Log2Histogram(self[CONNECT_SLOTS], self[CONNECT_SUM])

    @property
    def rtt(self) -> Log2Histogram:
        return Log2Histogram(self[RTT_SLOTS], self[RTT_SUM])

    def named(self) -> dict[str, int | tuple[int, ...]]:
        return {c.name: self[c.words] if c.width > 1 else self[c.index] for c in COUNTERS}


for _counter in COUNTERS:  # one read-only attribute per word: c.sent_bytes, c.rtt_slots...
    _getter = operator.itemgetter(_counter.words if _counter.width > 1 else _counter.index)
    setattr(FlowCounters, _counter.name, property(_getter, doc=f"struct flow_val.{_counter.c_name}"))

ZERO = FlowCounters((0,) * WIDTH)
TCP_ZERO, UDP_ZERO = (0,) * TCP_WIDTH, (0,) * (WIDTH - TCP_WIDTH)  # the other protocol's words


def add(a: tuple[int, ...], b: tuple[int, ...]) -> FlowCounters:
    return FlowCounters(map(operator.add, a, b))
