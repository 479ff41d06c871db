"""What Python mirrors of bpf/flowmon.c: its constants, the byte layouts of its map entries, and pure
decoders from them into flows.py types (the counters' layout is counters.py's).

Kept free of BCC so that decoding is tested on synthetic bytes. tests/test_kernel_layout.py parses the C
source and checks every constant and layout here against it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Container
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_network

from flowmon_agent.kernel.counters import HISTOGRAM_SLOTS, TCP_WIDTH, UDP_ZERO, FlowCounters
from flowmon_agent.kernel.flows import FlowKey, IPAddress, IPNetwork, Reporter, Transport

AF_INET, AF_INET6 = 2, 10  # FM_AF_INET, FM_AF_INET6
ROLE_CLIENT, ROLE_SERVER = 0, 1  # FM_ROLE_CLIENT, FM_ROLE_SERVER

# Indexes of the `cfg` array, written by user space
CFG_FILTER, CFG_PORTS, CFG_ADOPT, CFG_NAT, CFG_RTT_EPOCH, CFG_TRACING = range(6)
# Indexes of the per-CPU `stats` array, summed by user space
ST_SOCK_FULL, ST_FLOW_FAILED, ST_RST_FULL, ST_FLOWS_CREATED, ST_ADOPTED = range(5)

# Map sizes (integer cflags; these are the C defaults)
DEFAULT_SIZES = {
    "SOCK_MAX": 65536,
    "FLOW_MAX": 16384,
    "RST_MAX": 4096,
    "ADOPT_MAX": 16384,
    "NAT_MAX": 16384,
    "LOCAL_IPS_MAX": 4096,
    "PEER_NETS_MAX": 65536,  # bpf/peer_fold.h
}
FOLD_STEPS = 32  # steps per run of flowmon_fold: the verifier walks ~280k instructions (limit 1M)
CLOSE_SLOTS = 64  # per-CPU copies of flows for closes
FLUSH_PER_RUN = 8  # copies flushed per run of flowmon_flush_closes
MARK_WORD_SLOTS = 64  # slots per word of the fold's bitmap, and words per group word

FLOW_KEY = struct.Struct("<16s16sHHBBH")  # struct flow_key
FLOW_VAL = struct.Struct(f"<Q{TCP_WIDTH}Q")  # struct flow_val: created_ns, then the TCP counters
RST_PENDING = struct.Struct("<40sQB7x")  # struct rst_pending_val
TUPLE_KEY = struct.Struct("<16s16sHHH2x")  # struct tuple_key
IP_KEY = struct.Struct("<16sH2x")  # struct ip_key
PEER_NET_KEY = struct.Struct("<IH2x16s")  # struct peer_net_key (bpf/peer_fold.h)
PEER_NET_VAL = struct.Struct("<16sB7x")  # struct peer_net_val
LPM_FAMILY_BITS = 32  # the family and its pad, matched before the address


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


def decode_flow_key(raw: bytes, protocol: Transport = Transport.TCP) -> FlowKey:
    """bpf/flowmon.c's flow key; bpf/udp.c's has the same layout."""
    client, server, family, port, reporter, fold, client_port = FLOW_KEY.unpack(raw[: FLOW_KEY.size])
    return FlowKey(
        client_ip=decode_addr(family, client),
        server_ip=decode_addr(family, server),
        server_port=port,
        reporter=Reporter.CLIENT if reporter == ROLE_CLIENT else Reporter.SERVER,
        client_port=client_port,
        peer_prefix=fold - 1 if fold else None,
        protocol=protocol,
    )


def encode_flow_key(key: FlowKey) -> bytes:
    family, client = encode_addr(key.client_ip)
    _, server = encode_addr(key.server_ip)
    role = ROLE_CLIENT if key.reporter is Reporter.CLIENT else ROLE_SERVER
    fold = 0 if key.peer_prefix is None else key.peer_prefix + 1
    return FLOW_KEY.pack(client, server, family, key.server_port, role, fold, key.client_port)


def decode_flow_value(raw: bytes) -> tuple[int, FlowCounters]:
    """(created_ns, counters): created_ns tells one incarnation of an LRU entry from the next."""
    words = FLOW_VAL.unpack(raw[: FLOW_VAL.size])
    return words[0], FlowCounters(words[1:] + UDP_ZERO)


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
    return TUPLE_KEY.pack(l_raw, r_raw, family, local_port, remote_port)


def encode_ip_key(ip: IPAddress) -> bytes:
    family, raw = encode_addr(ip)
    return IP_KEY.pack(raw, family)


@functools.lru_cache(maxsize=1 << 17)  # a cluster's addresses are encoded again at each metadata change
def encode_peer_net(network: IPAddress | IPNetwork, *, fold: bool) -> tuple[bytes, bytes]:
    """(key, value) of `peer_nets`: a network (a bare address: /32, /128) whose peers stay exact
    (fold=False: the cluster's) or are folded to the network's address (a monitor's named network)."""
    network = ip_network(network)
    family, raw = encode_addr(network.network_address)
    key = PEER_NET_KEY.pack(LPM_FAMILY_BITS + network.prefixlen, family, raw)
    return key, PEER_NET_VAL.pack(raw, network.prefixlen + 1 if fold else 0)
