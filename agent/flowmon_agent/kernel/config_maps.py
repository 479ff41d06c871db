"""The tracer's configuration reaches the kernel through maps only: `cfg` flags and the sets of local IPs,
NAT peers and ignored ports. Only what changed is written (the runner configures once per poll).
bpf/udp.c has the same maps but NAT peers (its flows to a Service IP are never per connection)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Protocol

from flowmon_agent.kernel.flows import IPAddress, KernelConfig
from flowmon_agent.kernel.maps import CFG_FILTER, CFG_NAT, CFG_PORTS, CFG_TRACING, encode_ip_key


def sync_ips(table, ips: Iterable[IPAddress]) -> int:
    """Make an IP set map hold exactly `ips`; how many it holds."""
    wanted = {encode_ip_key(ip) for ip in ips}
    for raw in wanted:  # add before removing, so a kept address is never briefly missing
        table[table.Key.from_buffer_copy(raw)] = ctypes.c_uint8(1)
    for key in list(table.keys()):
        if bytes(key) not in wanted:
            del table[key]
    return len(wanted)


class Tables(Protocol):
    def table(self, name: str): ...  # -> bcc.table.TableBase


class ConfigMaps:
    """Writes KernelConfig's filters into the program's maps; `applied` is what the kernel holds."""

    def __init__(self, program: Tables, *, nat: bool = True) -> None:
        self._cfg = program.table("cfg")
        self._local_ips = program.table("local_ips")
        self._nat = program.table("nat_peers") if nat else None
        self._ports = program.table("ignored_ports")
        self.applied: KernelConfig | None = None

    def set_flag(self, index: int, value: int) -> None:
        self._cfg[ctypes.c_int(index)] = ctypes.c_uint64(value)

    def apply(self, config: KernelConfig) -> None:
        last = self.applied
        if last is None or config.local_ips != last.local_ips:
            self._set_local_ips(config.local_ips)
        if self._nat is not None and (last is None or config.nat_peers != last.nat_peers):
            self.set_flag(CFG_NAT, int(sync_ips(self._nat, config.nat_peers) > 0))
        if last is None or config.ignored_ports != last.ignored_ports:
            self._set_ignored_ports(config.ignored_ports)
        self.applied = config

    def start_tracing(self) -> None:
        """Until now the kernel took no socket in: BCC attached the programs before the filters were set."""
        self.set_flag(CFG_TRACING, 1)

    def _set_local_ips(self, ips: frozenset[IPAddress] | None) -> None:
        if ips is None:
            self.set_flag(CFG_FILTER, 0)
            self._local_ips.clear()
            return
        sync_ips(self._local_ips, ips)
        self.set_flag(CFG_FILTER, 1)

    def _set_ignored_ports(self, ports: frozenset[int]) -> None:
        for port in ports:
            self._ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        for key in list(self._ports.keys()):
            if key.value not in ports:
                del self._ports[key]
        self.set_flag(CFG_PORTS, int(bool(ports)))
