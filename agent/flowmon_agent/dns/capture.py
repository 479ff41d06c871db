"""Run `bpf/dns.c` on the cgroup v2 root (a job of kernel/skb_hooks.py's program pair, shared with UDP
accounting), and feed what it counts and hands over to a `DnsTracker`: the kernel keeps the
transactions (its counter maps are read each poll, its pending
queries swept for timeouts by the tracker's clock, dns/kernel_counts.py); the ring brings what the kernel
cannot vouch for (parsed and counted here) and answers with addresses (for the names only), each once per
TTL: the kernel keys it in `dns_answers`, and each poll the keys whose names the tracker's table no longer
holds are deleted there (`NameTable.take_forgotten`), so that their next answer is handed over again.

The pair (ingress, egress) is attached with BPF links, not BPF_PROG_ATTACH: a link goes away
with its file descriptor, so an agent that dies, even by SIGKILL, leaves nothing attached behind (a
prog-attach stays on the cgroup until someone detaches it). Needs Linux 5.8+ (links on cgroups, ring
buffer). `poll()` reads at most `batch_max` records: a flood costs a bounded amount per poll, and what the
kernel could not hand over while the ring was full is counted there, not lost silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from flowmon_agent.dns.kernel_counts import TotalsReader, address_text, sweep_pending
from flowmon_agent.dns.tracker import DnsTracker, KernelEvents, Packet
from flowmon_agent.kernel.cgroup import cgroup2_mounts, cgroup2_root
from flowmon_agent.kernel.skb_hooks import Job, SkbHooks

# cgroup2_mounts and cgroup2_root live in kernel/cgroup.py (shared with UDP and sock_ops); re-exported
__all__ = ["CaptureStats", "DnsCapture", "cgroup2_mounts", "cgroup2_root", "decode_event", "dns_cflags"]

# struct dns_event up to its payload: ts, saddr, daddr, sport, dport, payload_len, captured, family, egress,
# (then kind, 5 bytes of padding, answer_hash, answers_at and 4 bytes of padding)
EVENT_HEADER = struct.Struct("=Q16s16sHHHHBB22x")
KIND_OFFSET = 50
DADDR_OFFSET, FAMILY_OFFSET, ANSWER_HASH = 24, 48, struct.Struct("=56xQ")
RECORD_NAMES = 1  # DNS_RECORD_NAMES: an answer the kernel counted, handed over for its names
ANSWER_KEY = struct.Struct("=16sQB7x")  # struct dns_answer_key: client, hash, family
MAX_CAPTURE_BYTES = 4096
MAX_LATENCY_BOUNDS = 16  # DNS_LE_0..15 in bpf/dns.c
# enum dns_count in bpf/dns.c
_COUNT_NAMES = ("seen", "handed", "ring_full", "not_walked", "kept")
_KERNEL_EVENTS = ("retransmitted", "pending_full", "series_overflow")  # indexes 5, 6, 7
_ANSWER_COUNTS = ("answers_handed", "answers_deduplicated", "answers_unwalked")  # indexes 8, 9, 10
# What a capture leaves in a shared pair's maps: emptied at its close, as unloading its own does
_HASHES = (b"dns_pending", b"dns_requests", b"dns_latency", b"dns_answers")
_ARRAYS = (b"dns_counts", b"dns_since_wake", b"dns_config")


@dataclass(frozen=True, slots=True)
class CaptureStats:
    seen: int  # datagrams to or from the DNS port
    handed: int  # records the kernel wrote to the ring
    ring_full: int  # records lost because the ring was full
    not_walked: int  # IPv6 packets with extension headers, not inspected
    kept: int  # datagrams counted in the kernel, nothing handed over
    read: int  # records this process read from the ring
    answers_handed: int = 0  # answers with addresses handed over for their names
    answers_deduplicated: int = 0  # ... not handed over: the names table has them (counted in kept)
    answers_unwalked: int = 0  # ... handed over without a key (not walked in the kernel: every copy)


def answer_key(raw: bytes) -> bytes | None:
    """The kernel's dns_answers key of a names record (None: the kernel gave it none)."""
    if len(raw) < EVENT_HEADER.size:
        return None
    (answer_hash,) = ANSWER_HASH.unpack_from(raw)
    if not answer_hash:
        return None
    client = raw[DADDR_OFFSET : DADDR_OFFSET + 16]
    return ANSWER_KEY.pack(client, answer_hash, raw[FAMILY_OFFSET])


def decode_event(raw: bytes) -> Packet | None:
    """A ring record as a Packet (None when it is shorter than its header says: never trusted either)."""
    if len(raw) < EVENT_HEADER.size:
        return None
    ts_ns, saddr, daddr, sport, dport, payload_len, captured, family, egress = EVENT_HEADER.unpack_from(raw)
    if family not in (4, 6):
        return None
    payload = raw[EVENT_HEADER.size : EVENT_HEADER.size + min(captured, MAX_CAPTURE_BYTES)]
    return Packet(
        src=address_text(family, saddr),
        sport=sport,
        dst=address_text(family, daddr),
        dport=dport,
        egress=bool(egress),
        timestamp=ts_ns / 1e9,
        payload=payload,
        complete=len(payload) >= payload_len,
    )


def dns_cflags(
    latency_bounds: tuple[float, ...],
    *,
    port: int = 53,
    capture_bytes: int = 512,
    ring_pages: int = 64,
    answers_once: bool = True,
) -> dict[str, int]:
    """bpf/dns.c's integer defines; `latency_bounds`: the tracker's (seconds). `answers_once=False`:
    every answer with addresses handed over (bench/dns_overhead.py's before). The answer hash's basis is
    random per call."""
    if not 1 <= port <= 65535 or not 12 <= capture_bytes <= MAX_CAPTURE_BYTES:
        raise ValueError("port 1-65535 and capture_bytes 12-4096")
    if ring_pages < 1 or ring_pages & (ring_pages - 1):
        raise ValueError(f"ring_pages must be a power of two, got {ring_pages}")
    if not 1 <= len(latency_bounds) <= MAX_LATENCY_BOUNDS:
        got = len(latency_bounds)
        raise ValueError(f"the kernel counts 1-{MAX_LATENCY_BOUNDS} latency buckets, got {got}")
    cflags = {"DNS_PORT": port, "DNS_CAPTURE_BYTES": capture_bytes, "DNS_RING_PAGES": ring_pages}
    cflags |= {"DNS_BUCKETS": len(latency_bounds)}
    cflags |= {"DNS_ANSWERS_ONCE": int(answers_once), "DNS_ANSWER_SEED": secrets.randbits(63)}
    return cflags | {f"DNS_LE_{i}": round(b * 1e9) for i, b in enumerate(latency_bounds)}


class DnsCapture:
    """`with DnsCapture(tracker) as cap: cap.poll()`; `close()` stops the capture. `hooks`: the program
    pair shared with UDP (compiled with the tracker's dns_cflags; its owner closes it); without, one of
    its own is loaded from the arguments (`cgroup`: where the node's cgroup v2 root is mounted, at or
    below; default the shallowest cgroup2 mount) and closed with this."""

    def __init__(
        self,
        tracker: DnsTracker,
        *,
        hooks: SkbHooks | None = None,
        cgroup: Path | None = None,
        port: int = 53,
        capture_bytes: int = 512,
        ring_pages: int = 64,
        batch_max: int = 2048,
        answers_once: bool = True,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max >= 1")
        bounds = tracker.latency_bounds
        cflags = dns_cflags(
            bounds, port=port, capture_bytes=capture_bytes, ring_pages=ring_pages, answers_once=answers_once
        )
        buckets = [k for k in cflags if k.startswith(("DNS_LE", "DNS_BUCKETS"))]
        if hooks is not None and any(hooks.cflags.get(k) != cflags[k] for k in buckets):
            raise ValueError("the shared cgroup-skb programs count other latency buckets than the tracker's")
        self.tracker, self.batch_max = tracker, batch_max
        self._read = self._left = 0
        self._copy_all: bool | None = None
        self._totals = TotalsReader(len(bounds))
        self._owns_hooks = hooks is None
        self._hooks: SkbHooks | None = hooks or SkbHooks(cflags, jobs=Job.DNS, cgroup=cgroup)
        try:
            self._hooks.read_ring_with(self._on_record)
            self._hooks.set_job(Job.DNS, True)
        except BaseException:
            self.close()
            raise

    def _on_record(self, _ctx, data, size) -> int:
        raw = ctypes.string_at(data, size)
        packet = decode_event(raw)
        if packet is not None and raw[KIND_OFFSET] == RECORD_NAMES:
            self.tracker.learn_names(packet, answer_key(raw))
        elif packet is not None:
            self.tracker.observe(packet)
        self._read += 1
        self._left -= 1
        return -1 if self._left <= 0 else 0  # < 0 stops this consume after this record

    def poll(self, timeout_ms: int = 0) -> int:
        """Feed the tracker at most `batch_max` records (waiting up to timeout_ms for a wake-up), count
        the kernel's overdue queries as timeouts, hand the tracker the kernel's counts, then expire the
        tracker's own overdue queries; how many records were read."""
        self._hand_queries_over(bool(self.tracker.qname_suffixes))
        before, self._left = self._read, self.batch_max
        if timeout_ms > 0:
            self.bpf.ring_buffer_poll(timeout_ms)  # returns at a wake-up (every DNS_WAKE_EVERY records)
        if self._left > 0:
            self.bpf.ring_buffer_consume()  # and what was written without waking anyone
        timed_out, waiting = sweep_pending(self.bpf[b"dns_pending"], self.tracker.deadline())
        self.tracker.count_timeouts(timed_out)
        totals = self._totals.read(self.bpf[b"dns_requests"], self.bpf[b"dns_latency"])
        totals.pending = waiting
        events = self._counts()[len(_COUNT_NAMES) : len(_COUNT_NAMES) + len(_KERNEL_EVENTS)]
        self.tracker.absorb_kernel(totals, KernelEvents(*events))
        self.tracker.expire()
        self._forget_answers()
        return self._read - before

    def _forget_answers(self) -> None:
        """Delete the kernel's keys of answers whose names the table no longer holds."""
        forgotten = self.tracker.names.take_forgotten()
        table = self.bpf[b"dns_answers"]
        if forgotten.everything:
            table.clear()
            return
        for key in forgotten.sources:
            with contextlib.suppress(KeyError):  # evicted, or never inserted (a zero TTL)
                del table[table.Key.from_buffer_copy(key)]

    def _hand_queries_over(self, copy_all: bool) -> None:
        """Query-name suffixes need the names: then queries (and their answers) go to user space."""
        if copy_all != self._copy_all:
            table = self.bpf[b"dns_config"]
            table[table.Key(0)] = table.Leaf(int(copy_all))
            self._copy_all = copy_all

    def _counts(self) -> list[int]:
        table = self.bpf[b"dns_counts"]
        total = len(_COUNT_NAMES) + len(_KERNEL_EVENTS) + len(_ANSWER_COUNTS)
        return [sum(table[table.Key(i)]) for i in range(total)]

    @property
    def bpf(self):  # -> bcc.BPF
        """The loaded programs and maps (bench/dns_overhead.py reads the programs' run time)."""
        assert self._hooks is not None
        return self._hooks.bpf

    @property
    def cgroup(self) -> Path:
        """The cgroup v2 root the programs are linked to."""
        assert self._hooks is not None
        return self._hooks.cgroup

    def stats(self) -> CaptureStats:
        counts = self._counts()
        answers = dict(zip(_ANSWER_COUNTS, counts[-len(_ANSWER_COUNTS) :], strict=True))
        return CaptureStats(*counts[: len(_COUNT_NAMES)], read=self._read, **answers)

    def close(self) -> None:
        """Stop the DNS job. A shared pair keeps its maps: what this capture left there (records not read,
        counts, pending queries) is dropped, so that a later capture starts from empty maps, as one that
        loads its own does (DnsTracker.retire_kernel keeps the exported counters from going backwards)."""
        hooks, self._hooks = self._hooks, None
        if hooks is None:
            return
        if self._owns_hooks:
            hooks.close()
            return
        try:
            hooks.set_job(Job.DNS, False)
        finally:
            hooks.read_ring_with(None)
            hooks.bpf.ring_buffer_consume()
            for name in _HASHES:
                hooks.bpf[name].clear()
            for name in _ARRAYS:
                table = hooks.bpf[name]
                for i in range(table.max_entries):
                    table.clearitem(i)

    def __enter__(self) -> DnsCapture:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
