"""Reading the flows: fold and flush in the kernel, one read of the flow map, decode, incarnations.

The kernel keeps a live socket's bytes and open in the socket's own slot and, at close, moves them into
a per-CPU copy of the flow's entry; before each read the kernel's fold program moves what live sockets
have had pending since the last fold, and the flush moves the copies (in the kernel: no per-socket work
in Python). Then only the flow map is read, so user-space work grows with distinct flows, not with open
connections. Totals are kept here across the LRU entries of a key (`Incarnations`), so a flow the kernel
evicts and re-creates between two reads keeps its totals; within an entry the kernel only adds.

Bounded: a key is remembered only while the kernel holds its entry. A key whose entry is gone (evicted)
is forgotten, and so is one whose connections are all closed and whose counters have not changed for a
TTL (deleted from the kernel too): its last totals were reported, and a key that comes back starts from
zero, which aggregation takes as a restart. So user space holds at most FLOW_MAX flows (the kernel's
flow map), whatever the traffic; `forgotten` counts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
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
    reset_owner,
)
from flowmon_agent.kernel.program import KernelProgram

RESET_C2S, RESET_S2C = FlowCounters.of(resets_c2s=1), FlowCounters.of(resets_s2c=1)


class Incarnations:
    """One flow key's kernel entries over time: LRU eviction and re-creation (a new created_ns) restart
    the entry from zero; what the evicted one had last is kept in `base`. `changed_at`: when the entry
    last changed (the reader's clock); `seen`: the last read that found it."""

    __slots__ = ("base", "changed_at", "created_ns", "last", "raw", "seen", "total")

    def __init__(self, created_ns: int, counters: FlowCounters, raw: bytes = b"", now: float = 0.0) -> None:
        self.created_ns, self.last, self.raw = created_ns, counters, raw
        self.base: FlowCounters | None = None
        self.total = counters  # base + last
        self.changed_at, self.seen = now, 0

    def observe(self, created_ns: int, counters: FlowCounters, raw: bytes = b"", now: float = 0.0) -> None:
        if created_ns != self.created_ns and self.created_ns != 0:
            self.base = self.total  # the old entry was evicted: keep what it had
        self.created_ns, self.last, self.raw = created_ns, counters, raw
        self.total = counters if self.base is None else add(self.base, counters)
        self.changed_at = now


class FlowEntry(Incarnations):
    """A flow key's incarnations, with the key its bytes decode to."""

    __slots__ = ("key",)

    def __init__(self, key: FlowKey, created_ns: int, counters: FlowCounters, raw: bytes, now: float) -> None:
        super().__init__(created_ns, counters, raw, now)
        self.key = key


class FlowBook:
    """The flows user space holds, by the bytes of their kernel keys, in the order they last changed.

    A read of the whole flow map is compared with the previous one in C (the entries whose bytes are
    the same, most of them, cost no Python code): only new keys are decoded (`decoded_keys`), only
    changed values (`decoded_values`), and `totals` (each key's cumulative counters, in the order first
    seen) is kept up to date in place. Because the entries stay ordered by their last change, idle ones
    are found from the oldest on (`unchanged_for`) instead of by a scan of every flow."""

    def __init__(
        self,
        decode_key: Callable[[bytes], FlowKey] = decode_flow_key,
        decode_value: Callable[[bytes], tuple[int, FlowCounters]] = decode_flow_value,
    ) -> None:
        self._decode_key, self._decode_value = decode_key, decode_value
        self._entries: dict[bytes, FlowEntry] = {}
        self._last: dict[bytes, bytes] = {}  # each held entry's value bytes (its `raw`), as last read
        self.totals: dict[FlowKey, FlowCounters] = {}
        self.decoded_keys = self.decoded_values = 0

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, keys: list[bytes], values: list[bytes], now: float) -> list[bytes]:
        """One read of the map (every entry it holds); returns the keys held here that the read did not
        find (the kernel evicted them), still held until `forget`."""
        read = dict(zip(keys, values, strict=True))
        entries, last, totals, decode_value = self._entries, self._last, self.totals, self._decode_value
        for raw_key, raw in itertools.filterfalse(last.items().__contains__, read.items()):
            last[raw_key] = raw  # the bytes the entry holds: kept once
            entry = entries.get(raw_key)
            if entry is None:
                key = self._decode_key(raw_key)
                entry = entries[raw_key] = FlowEntry(key, *decode_value(raw), raw, now)
                self.decoded_keys += 1
            else:
                entry.observe(*decode_value(raw), raw, now)
                del entries[raw_key]  # re-inserted last: the order of last change
                entries[raw_key] = entry
            self.decoded_values += 1
            totals[entry.key] = entry.total
        if len(entries) > len(read):
            return list(entries.keys() - read.keys())
        return []

    def unchanged_for(self, now: float, age: float) -> list[tuple[bytes, FlowEntry]]:
        """The entries that have not changed for `age` or more, the oldest first: they lead the order, so
        the scan stops at the first younger one."""
        old: list[tuple[bytes, FlowEntry]] = []
        for raw_key, entry in self._entries.items():
            if now - entry.changed_at < age:
                break
            old.append((raw_key, entry))
        return old

    def forget(self, raw_key: bytes) -> FlowKey:
        key = self._entries.pop(raw_key).key
        self._last.pop(raw_key, None)  # a new entry with these bytes is new again
        self.totals.pop(key, None)
        return key


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
        idle_flow_ttl_s: float = 600.0,
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
        self._conn_ttl_s, self._idle_ttl_s, self._clock = connection_key_ttl_s, idle_flow_ttl_s, clock
        self._book = FlowBook()
        # resets received from untraced senders, and when the last one came
        self._resets: dict[FlowKey, tuple[FlowCounters, float]] = {}
        self._deleted = 0  # kernel entries user space deleted (not evictions)
        self._evicted = 0
        self.forgotten_idle = self.forgotten_gone = 0  # keys forgotten (idle past the TTL; entry gone)

    def tracked(self) -> dict[str, int]:
        """How many keys user space holds per table: at most the kernel's flow map, whatever the traffic."""
        return {"flows": len(self._book), "resets": len(self._resets)}

    @property
    def decoded(self) -> dict[str, int]:
        """Keys and values decoded since start: new keys and changed values only."""
        return {"keys": self._book.decoded_keys, "values": self._book.decoded_values}

    def read(self) -> tuple[dict[FlowKey, FlowCounters], dict[str, int]]:
        if self._fold is not None:
            self._fold.run()
        created = self._stat(ST_FLOWS_CREATED)  # before the map read: evictions are never overestimated
        keys, values = self._flows_reader.columns()
        now, book = self._clock(), self._book
        gone = book.update(keys, values, now)
        self._drain_resets(book.totals, now)
        self._evicted = max(self._evicted, created - len(keys) - self._deleted)
        for raw_key in gone:  # entries the kernel no longer holds: their totals were reported
            self._resets.pop(book.forget(raw_key), None)
        self.forgotten_gone += len(gone)
        self._forget_idle(now)
        flows = book.totals.copy()
        for key, (resets, _) in self._resets.items():
            flows[key] = add(flows[key], resets) if key in flows else resets
        dropped = {
            "socket_table_full": self._stat(ST_SOCK_FULL),
            "flow_table_evicted": self._evicted,
            "flow_insert_failed": self._stat(ST_FLOW_FAILED),
            "reset_table_full": self._stat(ST_RST_FULL),
        }
        return flows, dropped

    def _stat(self, index: int) -> int:
        return int(self._stats.sum(ctypes.c_int(index)).value)

    def _drain_resets(self, known: Container[FlowKey], now: float) -> None:
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
            resets = self._resets.get(owner, (ZERO, now))[0]
            self._resets[owner] = (add(resets, RESET_S2C if p.to_client else RESET_C2S), now)

    def _forget_idle(self, now: float) -> None:
        """Keys whose connections are all closed and whose counters have not changed for their TTL
        (connection_key_ttl_s for per-connection keys, NAT peers; idle_flow_ttl_s for the others) are
        dropped, here and in the kernel: snapshots reported their final totals until then. Only the
        entries unchanged for the shorter TTL are looked at."""
        idle: list[tuple[bytes, FlowEntry]] = []
        for raw_key, entry in self._book.unchanged_for(now, min(self._conn_ttl_s, self._idle_ttl_s)):
            ttl = self._conn_ttl_s if entry.key.client_port else self._idle_ttl_s
            resets = self._resets.get(entry.key)
            changed = max(entry.changed_at, resets[1]) if resets else entry.changed_at
            if now - changed >= ttl and entry.total.active == 0:
                idle.append((raw_key, entry))
        forgotten = 0
        for raw_key, entry in idle:
            if self._delete_entry(raw_key, entry.raw):
                self._resets.pop(self._book.forget(raw_key), None)
                forgotten += 1
        orphans = [
            key
            for key, (_, at) in self._resets.items()
            if key not in self._book.totals and now - at >= self._idle_ttl_s
        ]
        for key in orphans:
            del self._resets[key]
        self.forgotten_idle += forgotten + len(orphans)

    def _delete_entry(self, raw_key: bytes, raw: bytes) -> bool:
        """Delete the kernel entry unless it changed since it was read. True: the entry is gone."""
        outcome = delete_unchanged(self._flows, raw_key, raw)
        self._deleted += outcome == "deleted"
        return outcome != "changed"


def delete_unchanged(table, key: bytes, raw: bytes) -> str:  # table: bcc.table.TableBase
    """Delete a kernel entry unless it changed since it was read as `raw` (then it is kept, and read
    again next time: an add in between would be lost; one between this look and the delete,
    microseconds, still is). `deleted`, `changed` (kept) or `evicted` (gone meanwhile)."""
    k = table.Key.from_buffer_copy(key)
    try:
        if bytes(table[k]) != raw:
            return "changed"
        del table[k]
    except KeyError:
        return "evicted"
    return "deleted"
