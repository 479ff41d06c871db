"""The kernel hop's interface with the rest of the agent: what a tracer is configured with (`KernelConfig`),
what one poll returns (`FlowSnapshot`: IP-level flows with cumulative counters), and the `Tracer` protocol
the runner drives (`FlowTracer`, or a fake in tests)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Protocol

from flowmon_agent.kernel.counters import FlowCounters

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Transport(StrEnum):
    TCP = "tcp"
    UDP = "udp"  # client: the end that sent the first datagram of the 5-tuple (bpf/udp.c)


class Reporter(StrEnum):
    """Which end's socket lives on this node and produced the counters."""

    CLIENT = "client"  # the socket that sent the SYN (UDP: the first datagram)
    SERVER = "server"  # the accepted socket


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow without the ephemeral port: every connection from client_ip to server_ip:server_port."""

    client_ip: IPAddress
    server_ip: IPAddress
    server_port: int
    reporter: Reporter
    # Non-zero only for connections to a NAT peer (KernelConfig.nat_peers, Service IPs): those stay per
    # connection so that user space can undo the NAT through conntrack before aggregating.
    client_port: int = 0
    # Not None: the peer (the end that is not the reporter) is folded (KernelConfig.cluster_networks),
    # its address is its network's and this the network's prefix length; 0: external, every address
    # outside the cluster's and the monitors' networks (address 0.0.0.0 or ::).
    peer_prefix: int | None = None
    protocol: Transport = Transport.TCP  # a UDP flow's counters are in the vector's UDP words
    # Computed once: every poll looks flows up by key (the tracer's, aggregation's tables), and the
    # generated hash would hash both addresses and the enums again, in Python, at each lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self._fields()))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:  # another process hashes strings differently: the hash is not carried
        return FlowKey, self._fields()

    def _fields(self) -> tuple:
        return (self.client_ip, self.server_ip, self.server_port, self.reporter, self.client_port,
                self.peer_prefix, self.protocol)  # fmt: skip

    @property
    def peer_network(self) -> IPNetwork | None:
        """The network a folded peer stands for (None: the peer is exact)."""
        if self.peer_prefix is None:
            return None
        peer = self.client_ip if self.reporter is Reporter.SERVER else self.server_ip
        return ip_network((peer, self.peer_prefix))


@dataclass(slots=True)
class FlowSnapshot:
    """What one poll returns: every flow seen since start, and the kernel's drop counters.

    A key's counters never decrease from one snapshot to the next, except a per-connection key
    (client_port set) that the tracer forgot once closed and idle, and that a new connection on the same
    port brought back: it starts from zero (aggregation takes a decrease as a restart)."""

    flows: dict[FlowKey, FlowCounters]
    dropped: dict[str, int]  # reason -> cumulative count of entries the kernel could not store
    kernel_path: str  # "default" or "compat"
    monotonic_time: float
    # where closing connections' srtt samples come from: "sock_ops" (every connection) or "window" (only
    # those that received a segment while tcp_probe was attached: no cgroup v2 to link sock_ops to)
    rtt_at_close: str = ""


def _ips(ips: Iterable[IPAddress] | None) -> frozenset[IPAddress] | None:
    return None if ips is None else frozenset(ips)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """What the kernel traces. Applies to sockets created from then on (existing ones keep their verdict)."""

    local_ips: frozenset[IPAddress] | None = None  # sockets whose local address is one of these; None: all
    nat_peers: frozenset[IPAddress] = field(default_factory=frozenset)  # Service IPs: keys per connection
    ignored_ports: frozenset[int] = field(default_factory=frozenset)  # server ports never traced
    rtt: bool = True  # srtt samples (tcp:tcp_probe, the costliest hook): only when a monitor exports RTT
    # Peers inside these (a bare address: /32, /128) stay exact; any other peer is folded
    # (FlowKey.peer_prefix), so the flows grow with the cluster, not with the internet. None: nothing is
    # folded (the cluster is not known yet).
    cluster_networks: frozenset[IPAddress | IPNetwork] | None = None
    # Networks outside the cluster's whose peers are folded each to its own network (monitors' names)
    fold_networks: frozenset[IPNetwork] = field(default_factory=frozenset)
    # External addresses kept exact while the cluster is known (a live DNS name: docs/dns.md, "Names on
    # folded flows"), so that their flows can carry the name
    named_peers: frozenset[IPAddress] = field(default_factory=frozenset)
    udp: bool = True  # UDP accounting (bpf/udp.c attached): only when a monitor exports a UDP metric

    def __post_init__(self) -> None:  # iterables in, frozensets kept: configs compare by value
        object.__setattr__(self, "local_ips", _ips(self.local_ips))
        object.__setattr__(self, "nat_peers", frozenset(self.nat_peers))
        if self.cluster_networks is not None:  # frozenset of a frozenset is itself: no copy per poll
            object.__setattr__(self, "cluster_networks", frozenset(self.cluster_networks))
        object.__setattr__(self, "fold_networks", frozenset(self.fold_networks))
        object.__setattr__(self, "named_peers", frozenset(self.named_peers))
        ports = frozenset(int(p) for p in self.ignored_ports)
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be 1-65535: {sorted(ports)}")
        object.__setattr__(self, "ignored_ports", ports)


class Tracer(Protocol):
    """What the runner needs from a tracer (flowmon_agent.kernel.tracer.FlowTracer)."""

    def poll(self) -> FlowSnapshot: ...

    def configure(self, config: KernelConfig) -> None:
        """Apply what changed since the last configuration (a call per poll is cheap)."""
        ...

    def close(self) -> None: ...
