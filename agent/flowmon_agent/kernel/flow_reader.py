"""Reading the flows: fold and flush in the kernel, one read of the flow map, decode, incarnations.

The kernel keeps a live socket's bytes and open in the socket's own slot and, at close, moves them into
a per-CPU copy of the flow's entry; before each read the kernel's fold program moves what live sockets
have had pending since the last fold, and the flush moves the copies (in the kernel: no per-socket work
in Python). Then only the flow map is read, so user-space work grows with distinct flows, not with open
connections. Totals are kept here across the LRU entries of a key (`Incarnations`), so a flow the kernel
evicts keeps its totals; within an entry the kernel only adds, so a key's totals never decrease.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import time
from collections.abc import Callable, Container, Iterable

from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel.counters import ZERO, FlowCounters, add
from flowmon_agent.kernel.flows import FlowKey
from flowmon_agent.kernel.maps import (
    ST_FLOW_FAILED,
    ST_FLOWS_CREATED,
    ST_RST_FULL,
    ST_SOCK_FULL,
    decode_flow_key,
    decode_flow_value,
    decode_pending_reset,
    encode_flow_key,
    reset_owner,
)
from flowmon_agent.kernel.program import KernelProgram

RESET_C2S, RESET_S2C = FlowCounters.of(resets_c2s=1), FlowCounters.of(resets_s2c=1)


class Incarnations:
    """One flow key's kernel entries over time: LRU eviction and re-creation (a new created_ns) restart
    the entry from zero; what the evicted one had last is kept in `base`."""

    __slots__ = ("base", "created_ns", "last", "raw", "total")

    def __init__(self, created_ns: int, counters: FlowCounters, raw: bytes = b"") -> None:
        self.created_ns, self.last, self.raw = created_ns, counters, raw
        self.base: FlowCounters | None = None
        self.total = counters  # base + last

    def observe(self, created_ns: int, counters: FlowCounters, raw: bytes = b"") -> None:
        if created_ns != self.created_ns and self.created_ns != 0:
            self.base = self.total  # the old entry was evicted: keep what it had
        self.created_ns, self.last, self.raw = created_ns, counters, raw
        self.total = counters if self.base is None else add(self.base, counters)


def cpus_to_visit(words: bpf_loader.PercpuWords) -> Iterable[int]:
    """The CPUs whose words are set; all of them where the kernel cannot batch-read (no harm: a run
    with nothing to do returns at once)."""
    cpus = words.cpus_with_any()
    return range(words.ncpus) if cpus is None else cpus


@contextlib.contextmanager
def unless_offline():
    """A run asked of an offline CPU fails with ENXIO: what it holds waits until the CPU is back."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise


class KernelFold:
    """Runs flowmon_fold, then flowmon_flush_closes, on each CPU that has something for them."""

    def __init__(self, program: KernelProgram) -> None:
        sizes = program.sizes
        self._program, self._sizes = program, sizes
        # which CPUs have marks: the others are not interrupted (waking an idle CPU costs ~150 us)
        self._marked_cpus = bpf_loader.PercpuWords(
            program.table("fold_marks"), sizes.mark_words, sizes.mark_groups
        )
        self._closing_cpus = bpf_loader.PercpuWords(program.table("close_flags"), 0, 1)

    def run(self) -> None:
        """On each CPU that marked slots since the last fold, the kernel visits them (a run per ~30 marked
        slots, words or groups). Then closed connections' counters, which wait in per-CPU copies of their
        flows, on each CPU that has some. A mark set after the check waits for the next fold; an offline
        CPU keeps its marks (and copies) until it is back."""
        fold_fd, flush_fd, sizes = self._program.fold_fd, self._program.flush_fd, self._sizes
        run = bpf_loader.run_raw_tracepoint_program
        for cpu in cpus_to_visit(self._marked_cpus):
            group = 0
            with unless_offline():
                for _ in range(sizes.fold_runs_max):
                    group = run(fold_fd, (group,), cpu=cpu)
                    if group >= sizes.mark_groups:
                        break
        for cpu in cpus_to_visit(self._closing_cpus):
            with unless_offline():
                for _ in range(sizes.flush_runs_max):  # a flow that cannot be stored waits for the next poll
                    if not run(flush_fd, (), cpu=cpu):
                        break


class FlowReader:
    """Every flow seen since start with its cumulative counters, and the kernel's drop counters."""

    def __init__(
        self,
        program: KernelProgram,
        *,
        reset_grace_s: float = 0.5,
        connection_key_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fold = None if program.fold_fd is None else KernelFold(program)  # compat: nothing to fold
        self._flows, self._stats, self._pending = (
            program.table("flows"),
            program.table("stats"),
            program.table("rst_pending"),
        )
        self._flows_reader = bpf_loader.MapReader(self._flows)
        self._pending_reader = bpf_loader.MapReader(self._pending, chunk=256)
        self._reset_grace_ns = int(reset_grace_s * 1e9)
        self._conn_ttl_s, self._clock = connection_key_ttl_s, clock
        self._conn_seen: dict[FlowKey, tuple[float, FlowCounters]] = {}  # per-connection keys: last change
        self._incarnations: dict[FlowKey, Incarnations] = {}
        self._resets: dict[FlowKey, FlowCounters] = {}  # resets received from untraced senders
        self._forgotten = 0  # kernel entries user space deleted (not evictions)
        self._evicted = 0

    def read(self) -> tuple[dict[FlowKey, FlowCounters], dict[str, int]]:
        if self._fold is not None:
            self._fold.run()
        created = self._stat(ST_FLOWS_CREATED)  # before the map read: evictions are never overestimated
        entries = self._flows_reader.items()
        incarnations = self._incarnations
        for k, v in entries:
            key = decode_flow_key(k)
            inc = incarnations.get(key)
            if inc is None:
                incarnations[key] = Incarnations(*decode_flow_value(v), v)
            elif inc.raw != v:  # unchanged entries cost a comparison
                inc.observe(*decode_flow_value(v), v)
        self._drain_resets(incarnations)
        self._evicted = max(self._evicted, created - len(entries) - self._forgotten)
        flows = {key: inc.total for key, inc in incarnations.items()}
        for key, resets in self._resets.items():
            flows[key] = add(flows[key], resets) if key in flows else resets
        self._forget_idle_connections(flows)
        dropped = {
            "socket_table_full": self._stat(ST_SOCK_FULL),
            "flow_table_evicted": self._evicted,
            "flow_insert_failed": self._stat(ST_FLOW_FAILED),
            "reset_table_full": self._stat(ST_RST_FULL),
        }
        return flows, dropped

    def _stat(self, index: int) -> int:
        return int(self._stats.sum(ctypes.c_int(index)).value)

    def _drain_resets(self, known: Container[FlowKey]) -> None:
        """RSTs received from a peer that no traced socket claimed within the grace period."""
        now_ns = time.monotonic_ns()  # the kernel's clock (bpf_ktime_get_ns)
        for k, v in self._pending_reader.items():
            p = decode_pending_reset(v)
            if now_ns - p.ts_ns < self._reset_grace_ns:
                continue
            try:
                del self._pending[self._pending.Key.from_buffer_copy(k)]
            except KeyError:
                continue  # the sender claimed it meanwhile
            owner = reset_owner(p.key, p.to_client, known)
            self._resets[owner] = add(self._resets.get(owner, ZERO), RESET_S2C if p.to_client else RESET_C2S)

    def _forget_idle_connections(self, flows: dict[FlowKey, FlowCounters]) -> None:
        """Per-connection keys (NAT peers) are dropped, here and in the kernel, once closed and unchanged
        for connection_key_ttl_s: one snapshot after another reports their final totals until then."""
        now = self._clock()
        for key, c in flows.items():
            if not key.client_port:
                continue
            seen = self._conn_seen.get(key)
            if seen is None or seen[1] != c:
                self._conn_seen[key] = (now, c)
            elif c.active == 0 and now - seen[0] >= self._conn_ttl_s:
                for state in (self._conn_seen, self._incarnations, self._resets):
                    state.pop(key, None)
                try:
                    del self._flows[self._flows.Key.from_buffer_copy(encode_flow_key(key))]
                    self._forgotten += 1
                except KeyError:
                    pass  # already evicted
