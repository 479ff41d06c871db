"""The tracer's configuration reaches the kernel through maps only: `cfg` flags and the sets of local IPs,
NAT peers, ignored ports and peer networks. Only what changed is written (the runner configures once per
poll). A full map never raises: what it refuses is counted (`refused`) and the filter degrades to the
side that loses nothing it can avoid losing (see ConfigMaps.apply). bpf/udp.c has the same maps but NAT
peers (its flows to a Service IP are never per connection)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterable, Mapping
from ipaddress import ip_network
from typing import Protocol

from flowmon_agent.kernel.flows import IPAddress, IPNetwork, KernelConfig
from flowmon_agent.kernel.maps import (
    CFG_FILTER,
    CFG_NAT,
    CFG_PORTS,
    CFG_TRACING,
    encode_ip_key,
    encode_peer_net,
)

log = logging.getLogger(__name__)
PRESENT = bytes([1])  # the value of a set's members (u8 1)
LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))  # always the cluster's: the host itself


class MapSet:
    """A BPF map kept equal to a wanted {key: value} (raw bytes). Removes go first, so that a full map has
    room for the adds; an add the map refuses (full) is counted in `refused` (cumulative), never raised,
    and retried at the next sync."""

    def __init__(self, table, name: str) -> None:
        self.table, self.name = table, name
        self.held: dict[bytes, bytes] = {}  # what the map holds, as this process wrote it
        self.refused = 0

    def sync(self, wanted: Mapping[bytes, bytes]) -> bool:
        """Whether the map now holds all of `wanted`."""
        table, held = self.table, self.held
        for raw in [k for k in held if k not in wanted]:
            with contextlib.suppress(KeyError):  # gone already
                del table[table.Key.from_buffer_copy(raw)]
            del held[raw]
        missing = 0
        for raw, value in wanted.items():
            if held.get(raw) == value:
                continue
            try:
                table[table.Key.from_buffer_copy(raw)] = table.Leaf.from_buffer_copy(value)
            except Exception:  # BCC raises a bare Exception when the update fails (E2BIG: full)
                missing += 1
                continue
            held[raw] = value
        if missing:
            self.refused += missing
            log.warning("kernel map %s is full: %d entries not stored", self.name, missing)
        return not missing


def ip_set(ips: Iterable[IPAddress]) -> dict[bytes, bytes]:
    return {encode_ip_key(ip): PRESENT for ip in ips}


def peer_nets(cluster: Iterable[IPAddress | IPNetwork], folded: Iterable[IPNetwork]) -> dict[bytes, bytes]:
    """`peer_nets`' content: cluster networks (and named external addresses) keep their peers exact, and
    win over a folded network with the same prefix (a monitor naming part of the cluster does not hide
    its pods)."""
    out = dict(encode_peer_net(n, fold=True) for n in folded)
    out.update(encode_peer_net(n, fold=False) for n in cluster)
    return out


class Tables(Protocol):
    def table(self, name: str): ...  # -> bcc.table.TableBase


class ConfigMaps:
    """Writes KernelConfig's filters into the program's maps; `applied` is what the kernel holds."""

    def __init__(self, program: Tables, *, nat: bool = True) -> None:
        self._cfg = program.table("cfg")
        self._fold_on = program.table("peer_fold_on")
        self.local_ips = MapSet(program.table("local_ips"), "local_ips")
        self.nat_peers = MapSet(program.table("nat_peers"), "nat_peers") if nat else None
        self.ignored_ports = MapSet(program.table("ignored_ports"), "ignored_ports")
        self.peer_nets = MapSet(program.table("peer_nets"), "peer_nets")
        self.applied: KernelConfig | None = None

    def set_flag(self, index: int, value: int) -> None:
        self._cfg[ctypes.c_int(index)] = ctypes.c_uint64(value)

    def refused(self) -> dict[str, int]:
        """Entries each map refused since start (`<map>_full`, cumulative): exported with the drops."""
        maps = (self.local_ips, self.nat_peers, self.ignored_ports, self.peer_nets)
        return {f"{m.name}_full": m.refused for m in maps if m is not None}

    def apply(self, config: KernelConfig) -> None:
        """What a full map degrades to: local IPs → every socket traced (a superset; aggregation selects);
        NAT peers → the missing Services' connections aggregate unresolved (the Service stands in for the
        backend); ignored ports → some traced; peer networks → some cluster peers folded as external
        (bounded wins: folding stays on)."""
        last = self.applied
        if last is None or config.local_ips != last.local_ips:
            self._set_local_ips(config.local_ips)
        if self.nat_peers is not None and (last is None or config.nat_peers != last.nat_peers):
            self.nat_peers.sync(ip_set(config.nat_peers))
            self.set_flag(CFG_NAT, int(bool(self.nat_peers.held)))
        if last is None or config.ignored_ports != last.ignored_ports:
            self.ignored_ports.sync({port.to_bytes(2, "little"): PRESENT for port in config.ignored_ports})
            self.set_flag(CFG_PORTS, int(bool(self.ignored_ports.held)))
        if (
            last is None
            or (
                config.cluster_networks is not last.cluster_networks
                and config.cluster_networks != last.cluster_networks
            )
            or config.fold_networks != last.fold_networks
            or config.named_peers != last.named_peers
        ):
            self._set_peer_nets(config.cluster_networks, config.named_peers, config.fold_networks)
        self.applied = config

    def start_tracing(self) -> None:
        """Until now the kernel took no socket in: BCC attached the programs before the filters were set."""
        self.set_flag(CFG_TRACING, 1)

    def _set_local_ips(self, ips: frozenset[IPAddress] | None) -> None:
        if ips is None:
            self.set_flag(CFG_FILTER, 0)
            self.local_ips.sync({})
            return
        complete = self.local_ips.sync(ip_set(ips))
        self.set_flag(CFG_FILTER, int(complete))  # incomplete: tracing every socket loses none

    def _set_peer_nets(
        self,
        cluster: frozenset[IPAddress | IPNetwork] | None,
        named: frozenset[IPAddress],
        folded: frozenset[IPNetwork],
    ) -> None:
        if cluster is None:  # the cluster is not known yet: a pod cannot be told from the internet
            self._fold_on[ctypes.c_int(0)] = ctypes.c_uint64(0)
            self.peer_nets.sync({})
            return
        self.peer_nets.sync(peer_nets((*cluster, *LOOPBACK, *named), folded))
        self._fold_on[ctypes.c_int(0)] = ctypes.c_uint64(1)
