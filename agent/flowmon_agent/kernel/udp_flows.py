"""UDP flows: bpf/udp.c on the cgroup v2 root (a job of kernel/skb_hooks.py's program pair, shared with
the DNS capture), its flow map read each poll like the TCP flows.

The kernel adds each datagram's payload bytes into its pair's entry (no per-packet output); a poll reads
only the flow map, so user-space work grows with distinct pairs. Totals are kept across the LRU entries
of a key (flow_reader.Incarnations); evictions are counted from the entries the kernel created.
Bounded like the TCP flows: a key is remembered only while the kernel holds its entry (gone: forgotten),
and one whose counters have not changed for `idle_flow_ttl_s` is forgotten and deleted from the kernel
(its last totals were reported; if it comes back it starts from zero, a restart to aggregation). The
5-tuples that remember who sent first (`udp_tuples`, a plain hash: never evicts a live tuple) are swept
here: tuples idle for longer than the kernel's idle time are deleted every `sweep_every_s`.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel.config_maps import ConfigMaps
from flowmon_agent.kernel.counters import TCP_ZERO, FlowCounters
from flowmon_agent.kernel.flow_reader import Incarnations, delete_unchanged
from flowmon_agent.kernel.flows import FlowKey, KernelConfig, Transport
from flowmon_agent.kernel.maps import decode_flow_key, encode_flow_key
from flowmon_agent.kernel.skb_hooks import Job, SkbHooks

UDP_VAL = struct.Struct("<Q4Q")  # struct udp_val: created_ns, c2s/s2c bytes, c2s/s2c datagrams
UDP_ROLE = struct.Struct("<QQ")  # struct udp_role: last_ns, local_is_client
# enum udp_stat in bpf/udp.c
UST_FLOWS_CREATED, UST_FLOW_FAILED, UST_TUPLE_FULL, UST_NOT_WALKED, UST_SEEN = range(5)
DEFAULT_UDP_SIZES = {"UDP_TUPLE_MAX": 65536, "UDP_FLOW_MAX": 16384, "UDP_IDLE_S": 120}
# UDP_MODE: the product; for benches, the hook's count-only floor, and roles by ports (no tuple map)
MODE_PRODUCT, MODE_COUNT_ONLY, MODE_PORTS_ONLY = 1, 0, 2


def udp_cflags(sizes: Mapping[str, int] | None = None, mode: int = MODE_PRODUCT) -> dict[str, int]:
    """bpf/udp.c's integer defines: the map sizes and idle time (DEFAULT_UDP_SIZES), and UDP_MODE."""
    return {**DEFAULT_UDP_SIZES, **(sizes or {}), "UDP_MODE": mode}


def decode_udp_value(raw: bytes) -> tuple[int, FlowCounters]:
    """(created_ns, counters): the vector's UDP words set, its TCP words zero."""
    words = UDP_VAL.unpack(raw[: UDP_VAL.size])
    return words[0], FlowCounters(TCP_ZERO + words[1:])


def idle_tuples(entries: list[tuple[bytes, bytes]], now_ns: int, idle_ns: int) -> list[bytes]:
    """Keys of the tuples whose last datagram is idle_ns or more ago (the kernel decides them afresh)."""
    return [k for k, v in entries if now_ns - UDP_ROLE.unpack_from(v)[0] >= idle_ns]


@dataclass(frozen=True, slots=True)
class UdpDrops:
    flow_table_evicted: int  # flow entries the LRU map replaced (their totals are kept here)
    flow_insert_failed: int  # datagrams not counted: no flow entry could be made
    tuple_table_full: int  # new 5-tuples not remembered: their role was decided by ports
    not_walked: int  # IPv6 packets with extension headers, not counted
    flows_forgotten_idle: int = 0  # keys forgotten (and deleted from the kernel): unchanged for the TTL
    flows_forgotten_gone: int = 0  # keys forgotten: the kernel no longer held their entry

    def as_dropped(self) -> dict[str, int]:
        """Named like the TCP tracer's drop reasons, `udp_` first."""
        return {f"udp_{name}": getattr(self, name) for name in self.__slots__}


class UdpFlows:
    """`configure()` runs the UDP job while the config asks for UDP; `read()` every flow seen since start.
    `hooks`: the program pair shared with the DNS capture (compiled with udp_cflags; its owner closes it);
    without, one of its own is loaded from `sizes`, `mode` and `cgroup`, and closed with this."""

    def __init__(
        self,
        hooks: SkbHooks | None = None,
        *,
        sizes: Mapping[str, int] | None = None,
        mode: int = MODE_PRODUCT,
        cgroup: Path | None = None,
        sweep_every_s: float = 30.0,
        idle_flow_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock`: when to sweep tuples and how long a key has been unchanged (`idle_flow_ttl_s`)."""
        self._owns_hooks = hooks is None
        if hooks is None:
            hooks = SkbHooks(udp_cflags(sizes, mode), jobs=Job.UDP, cgroup=cgroup)
        self._hooks: SkbHooks | None = hooks
        self._idle_ns = int(hooks.cflags["UDP_IDLE_S"] * 1e9)
        self._sweep_every_s, self._idle_ttl_s, self._clock = sweep_every_s, idle_flow_ttl_s, clock
        self._next_sweep = clock() + sweep_every_s
        try:
            self._maps = ConfigMaps(self, nat=False)
            self._flows, self._tuples = self.table("udp_flows"), self.table("udp_tuples")
            self._flows_reader = bpf_loader.MapReader(self._flows)
        except BaseException:
            self.close()
            raise
        self._incarnations: dict[FlowKey, Incarnations] = {}
        self._evicted = self._deleted = self._reads = 0  # _deleted: entries deleted here (not evictions)
        self.forgotten_idle = self.forgotten_gone = 0

    def table(self, name: str):  # -> bcc.table.TableBase
        return self.bpf[name.encode()]

    @property
    def bpf(self):  # -> bcc.BPF: benches profile its programs
        assert self._hooks is not None
        return self._hooks.bpf

    @property
    def attached(self) -> bool:
        """Whether UDP is counted right now (its job runs, the pair is linked)."""
        return self._hooks is not None and self._hooks.running(Job.UDP) and self._hooks.attached

    @property
    def cgroup(self) -> Path:
        """The cgroup v2 root the pair links to (`cgroup`: where it is mounted, at or below)."""
        assert self._hooks is not None
        return self._hooks.cgroup

    def configure(self, config: KernelConfig) -> None:
        """Filters first, then the job: a datagram is never counted under the previous filters' gap."""
        self._maps.apply(config)
        assert self._hooks is not None
        self._hooks.set_job(Job.UDP, config.udp)

    def stat(self, index: int) -> int:
        return int(self.table("udp_stats").sum(ctypes.c_int(index)).value)

    def tracked(self) -> int:
        """Keys user space holds: at most the kernel's flow map, whatever the traffic."""
        return len(self._incarnations)

    def read(self) -> dict[FlowKey, FlowCounters]:
        created = self.stat(UST_FLOWS_CREATED)  # before the map read: evictions are never overestimated
        entries = self._flows_reader.items()
        now, incarnations = self._clock(), self._incarnations
        self._reads = read = self._reads + 1
        for k, v in entries:
            key = decode_flow_key(k, Transport.UDP)
            inc = incarnations.get(key)
            if inc is None:
                inc = incarnations[key] = Incarnations(*decode_udp_value(v), v, now)
            elif inc.raw != v:
                inc.observe(*decode_udp_value(v), v, now)
            inc.seen = read
        self._evicted = max(self._evicted, created - len(entries) - self._deleted)
        if len(incarnations) > len(entries):  # entries the kernel no longer holds: their totals were reported
            gone = [key for key, inc in incarnations.items() if inc.seen != read]
            for key in gone:
                del incarnations[key]
            self.forgotten_gone += len(gone)
        self._forget_idle(now)
        if now >= self._next_sweep:
            self.sweep_idle_tuples()
        return {key: inc.total for key, inc in incarnations.items()}

    def _forget_idle(self, now: float) -> None:
        """Keys unchanged for the TTL: deleted in the kernel unless changed since read (then kept, and
        read again next time), and forgotten here."""
        idle = [key for key, inc in self._incarnations.items() if now - inc.changed_at >= self._idle_ttl_s]
        for key in idle:
            outcome = delete_unchanged(self._flows, encode_flow_key(key), self._incarnations[key].raw)
            if outcome != "changed":
                self._deleted += outcome == "deleted"
                del self._incarnations[key]
                self.forgotten_idle += 1

    def drops(self) -> UdpDrops:
        return UdpDrops(
            flow_table_evicted=self._evicted,
            flow_insert_failed=self.stat(UST_FLOW_FAILED),
            tuple_table_full=self.stat(UST_TUPLE_FULL),
            not_walked=self.stat(UST_NOT_WALKED),
            flows_forgotten_idle=self.forgotten_idle,
            flows_forgotten_gone=self.forgotten_gone,
        )

    def refused(self) -> dict[str, int]:
        """Entries the config maps refused (full), named like the TCP tracer's, `udp_` first."""
        return {f"udp_{name}": n for name, n in self._maps.refused().items()}

    def sweep_idle_tuples(self) -> int:
        """Delete the tuples idle for the kernel's idle time; how many."""
        self._next_sweep = self._clock() + self._sweep_every_s
        entries = bpf_loader.MapReader(self._tuples).items()
        stale = idle_tuples(entries, time.monotonic_ns(), self._idle_ns)  # the kernel's clock
        for raw in stale:
            with contextlib.suppress(KeyError):  # gone meanwhile
                del self._tuples[self._tuples.Key.from_buffer_copy(raw)]
        return len(stale)

    def close(self) -> None:
        """Stop the UDP job (the maps stay with a shared pair: its owner closes it), or close our own pair."""
        hooks, self._hooks = self._hooks, None
        if hooks is not None and self._owns_hooks:
            hooks.close()
        elif hooks is not None:
            hooks.set_job(Job.UDP, False)

    def __enter__(self) -> UdpFlows:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
