"""Byte layouts of bpf/flowmon.c's map entries, and pure decoders from them into flows.py types.

Kept free of BCC so that decoding is tested on synthetic bytes. Each format mirrors a C struct.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from flowmon_agent.kernel.flows import (
    HISTOGRAM_SLOTS,
    FlowCounters,
    FlowKey,
    IPAddress,
    Log2Histogram,
    Reporter,
)

AF_INET, AF_INET6 = 2, 10
ROLE_CLIENT, ROLE_SERVER = 0, 1

FLOW_KEY = struct.Struct("<16s16sHHBxH")  # struct flow_key
FLOW_VAL = struct.Struct(f"<13Q{HISTOGRAM_SLOTS}Q{HISTOGRAM_SLOTS}Q")  # struct flow_val
RST_PENDING = struct.Struct("<40sQB7x")  # struct rst_pending_val
TUPLE_KEY = struct.Struct("<16s16sHHHH")  # struct tuple_key
IP_KEY = struct.Struct("<16sHH")  # struct ip_key

# struct stats indexes
ST_SOCK_FULL, ST_FLOW_FAILED, ST_RST_FULL, ST_FLOWS_CREATED, ST_ADOPTED = range(5)


def decode_addr(family: int, raw: bytes) -> IPAddress:
    if family == AF_INET:
        return IPv4Address(raw[:4])
    if family == AF_INET6:
        return IPv6Address(raw[:16])
    raise ValueError(f"unknown address family {family}")


def encode_addr(ip: IPAddress) -> tuple[int, bytes]:
    """(family, 16 bytes) as the kernel stores them: IPv4 and IPv4-mapped IPv6 in the first 4 bytes."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, IPv4Address):
        return AF_INET, ip.packed + bytes(12)
    return AF_INET6, ip.packed


def decode_flow_key(raw: bytes) -> FlowKey:
    client, server, family, port, reporter, client_port = FLOW_KEY.unpack(raw[: FLOW_KEY.size])
    return FlowKey(
        client_ip=decode_addr(family, client),
        server_ip=decode_addr(family, server),
        server_port=port,
        reporter=Reporter.CLIENT if reporter == ROLE_CLIENT else Reporter.SERVER,
        client_port=client_port,
    )


def encode_flow_key(key: FlowKey) -> bytes:
    family, client = encode_addr(key.client_ip)
    _, server = encode_addr(key.server_ip)
    role = ROLE_CLIENT if key.reporter is Reporter.CLIENT else ROLE_SERVER
    return FLOW_KEY.pack(client, server, family, key.server_port, role, key.client_port)


@dataclass(frozen=True, slots=True)
class KernelFlow:
    created_ns: int  # identifies one incarnation of an LRU entry
    counters: FlowCounters


def decode_flow_value(raw: bytes) -> KernelFlow:
    v = FLOW_VAL.unpack(raw[: FLOW_VAL.size])
    (
        created,
        c2s,
        s2c,
        opened,
        closed,
        refused,
        timeout,
        rt_c2s,
        rt_s2c,
        rst_c2s,
        rst_s2c,
        lat_sum,
        rtt_sum,
    ) = v[:13]
    lat_slots = list(v[13 : 13 + HISTOGRAM_SLOTS])
    rtt_slots = list(v[13 + HISTOGRAM_SLOTS :])
    return KernelFlow(
        created_ns=created,
        counters=FlowCounters(
            sent_bytes=c2s,
            received_bytes=s2c,
            opened=opened,
            closed=closed,
            active=opened - closed,
            failed_refused=refused,
            failed_timeout=timeout,
            retransmits_c2s=rt_c2s,
            retransmits_s2c=rt_s2c,
            resets_c2s=rst_c2s,
            resets_s2c=rst_s2c,
            connect_latency=Log2Histogram(lat_slots, lat_sum),
            rtt=Log2Histogram(rtt_slots, rtt_sum),
        ),
    )


def log2_slot(value: int) -> int:
    """The kernel's slot for a value (slot k holds 2**(k-1) <= v < 2**k; 0 holds 0)."""
    return min(value.bit_length(), HISTOGRAM_SLOTS - 1)


@dataclass(frozen=True, slots=True)
class PendingReset:
    key: FlowKey
    ts_ns: int  # bpf_ktime_get_ns (CLOCK_MONOTONIC)
    to_client: bool


def decode_pending_reset(raw: bytes) -> PendingReset:
    key, ts, to_client = RST_PENDING.unpack(raw[: RST_PENDING.size])
    return PendingReset(decode_flow_key(key), ts, bool(to_client))


def reset_owner(receiver: FlowKey, to_client: bool, known: Container[FlowKey]) -> FlowKey:
    """The key that carries an RST no traced socket claimed (netfilter REJECT, a reply for no socket, a
    remote host): the sending end's key when that end's sockets are traced here, so that count-once
    (what the server sent comes from the server's key) sees it; otherwise the receiver's key."""
    sender = Reporter.SERVER if to_client else Reporter.CLIENT
    mirror = FlowKey(receiver.client_ip, receiver.server_ip, receiver.server_port, sender)
    return mirror if mirror in known else receiver


def encode_tuple(local: IPAddress, local_port: int, remote: IPAddress, remote_port: int) -> bytes:
    family, l_raw = encode_addr(local)
    _, r_raw = encode_addr(remote)
    return TUPLE_KEY.pack(l_raw, r_raw, family, local_port, remote_port, 0)


def encode_ip_key(ip: IPAddress) -> bytes:
    family, raw = encode_addr(ip)
    return IP_KEY.pack(raw, family, 0)


# --- counter arithmetic (pure) ---------------------------------------------------------------------------
_SCALARS = (
    "sent_bytes",
    "received_bytes",
    "opened",
    "closed",
    "active",
    "failed_refused",
    "failed_timeout",
    "retransmits_c2s",
    "retransmits_s2c",
    "resets_c2s",
    "resets_s2c",
)


def copy_counters(c: FlowCounters) -> FlowCounters:
    out = FlowCounters(**{name: getattr(c, name) for name in _SCALARS})
    out.connect_latency = Log2Histogram(list(c.connect_latency.slots), c.connect_latency.sum_us)
    out.rtt = Log2Histogram(list(c.rtt.slots), c.rtt.sum_us)
    return out


def add_counters(total: FlowCounters, other: FlowCounters) -> None:
    """total += other, in place."""
    for name in _SCALARS:
        setattr(total, name, getattr(total, name) + getattr(other, name))
    total.connect_latency.add(other.connect_latency)
    total.rtt.add(other.rtt)


def clamp_monotonic(previous: FlowCounters | None, current: FlowCounters) -> FlowCounters:
    """Counters never go back (a socket closing between two map reads can hide it for one poll);
    `active` is a gauge and is taken as is."""
    if previous is None:
        return current
    out = copy_counters(current)
    for name in _SCALARS:
        if name != "active":
            setattr(out, name, max(getattr(previous, name), getattr(current, name)))
    for attr in ("connect_latency", "rtt"):
        p, c = getattr(previous, attr), getattr(current, attr)
        setattr(
            out,
            attr,
            Log2Histogram(
                [max(a, b) for a, b in zip(p.slots, c.slots, strict=True)], max(p.sum_us, c.sum_us)
            ),
        )
    return out
