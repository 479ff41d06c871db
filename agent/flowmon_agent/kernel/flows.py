"""The kernel tracer's output: IP-level flows with cumulative counters (the contract with aggregation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

# Kernel histograms are log2 slots of microseconds: slot k holds values v with 2**(k-1) <= v < 2**k
# (slot 0 holds v == 0). User space turns them into Prometheus buckets with le = 2**k microseconds.
HISTOGRAM_SLOTS = 32


class Reporter(StrEnum):
    """Which end's socket lives on this node and produced the counters."""

    CLIENT = "client"  # the socket that sent the SYN
    SERVER = "server"  # the accepted socket


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow without the ephemeral port: every connection from client_ip to server_ip:server_port."""

    client_ip: IPAddress
    server_ip: IPAddress
    server_port: int
    reporter: Reporter
    # Non-zero only for connections to a Service IP (see FlowTracer.set_nat_peers): those stay per
    # connection so that user space can undo the NAT through conntrack before aggregating.
    client_port: int = 0


@dataclass(slots=True)
class Log2Histogram:
    """Cumulative log2 histogram of microsecond values."""

    slots: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_SLOTS)
    sum_us: int = 0

    @property
    def count(self) -> int:
        return sum(self.slots)

    def add(self, other: Log2Histogram) -> None:
        self.slots = [a + b for a, b in zip(self.slots, other.slots, strict=True)]
        self.sum_us += other.sum_us


@dataclass(slots=True)
class FlowCounters:
    """Cumulative counters of one flow since the agent started; never decrease (except `active`).

    Directions are always client→server ("c2s") and server→client ("s2c"), whichever end reported.
    """

    sent_bytes: int = 0  # client → server payload bytes
    received_bytes: int = 0  # server → client payload bytes
    opened: int = 0  # connections that reached ESTABLISHED
    closed: int = 0  # established connections that closed
    active: int = 0  # opened - closed (a gauge)
    failed_refused: int = 0  # SYN answered by RST
    failed_timeout: int = 0  # SYN never answered
    retransmits_c2s: int = 0
    retransmits_s2c: int = 0
    resets_c2s: int = 0  # RST sent by the client
    resets_s2c: int = 0  # RST sent by the server
    connect_latency: Log2Histogram = field(default_factory=Log2Histogram)
    rtt: Log2Histogram = field(default_factory=Log2Histogram)


@dataclass(slots=True)
class FlowSnapshot:
    """What one poll returns: every flow seen since start, and the kernel's drop counters."""

    flows: dict[FlowKey, FlowCounters]
    dropped: dict[str, int]  # reason -> cumulative count of entries the kernel could not store
    kernel_path: str  # "default" or "compat"
    monotonic_time: float
