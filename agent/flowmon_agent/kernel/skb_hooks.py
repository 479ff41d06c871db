"""The node's cgroup-skb programs (bpf/skb.c): UDP accounting and DNS capture in one program per direction
on the cgroup v2 root, loaded once, linked while either job is on.

Every packet of the node runs every cgroup-skb program attached to the root, TCP's included (~70 ns a run,
docs/BENCHMARKS.md), so UDP (kernel/udp_flows.py) and DNS (dns/capture.py) share one program pair: a job
is a bit of the `skb_jobs` map, flipped by `set_job` without a reload; the links are made when the first
job turns on and closed when the last one turns off. The maps stay loaded across that (UDP's flows and
tuples, DNS's counters and ring), so UdpFlows and DnsCapture are readers over one object: whoever made
the SkbHooks closes it. `SharedSkbHooks` is the agent's: at most one, loaded when the first job wants it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flowmon_agent.kernel.cgroup_skb import CgroupSkbLinks
from flowmon_agent.kernel.loader import load_sources

ENTRY = "skb.c"
RingReader = Callable[[object, int, int], int]  # BCC's ring callback: (ctx, data, size) -> < 0 stops


class Job(enum.IntFlag):
    """Bits of skb_jobs[0] (SKB_JOB_* in bpf/skb.c)."""

    UDP = 1
    DNS = 2


BODIES = {Job.UDP: "udp.c", Job.DNS: "dns.c"}  # in this order before ENTRY: one source text


class SkbHooks:
    """bpf/skb.c with the bodies of `jobs` compiled in (a job not compiled can never run), every job off
    and nothing linked until `set_job`. `cflags`: the bodies' integer defines (udp_flows.udp_cflags,
    capture.dns_cflags); `cgroup`: where the cgroup v2 root is mounted (cgroup.cgroup2_root's `under`)."""

    def __init__(
        self, cflags: Mapping[str, int], *, jobs: Job = Job.UDP | Job.DNS, cgroup: Path | None = None
    ) -> None:
        self.compiled = jobs
        self.cflags = {**cflags, "SKB_UDP": int(Job.UDP in jobs), "SKB_DNS": int(Job.DNS in jobs)}
        self._running, self._closed = Job(0), False
        self._ring_reader: RingReader | None = None
        self._lock = threading.Lock()  # the tracer's UDP and the agent's DNS switch from their own threads
        self._bpf = load_sources([*(BODIES[job] for job in Job if job in jobs), ENTRY], self.cflags)
        try:
            self._links = CgroupSkbLinks(self._bpf, b"skb_ingress", b"skb_egress", cgroup)
            if Job.DNS in jobs:  # once per object: BCC cannot remove a ring callback
                self._bpf[b"dns_events"].open_ring_buffer(self._on_ring_record)
        except BaseException:
            self._bpf.cleanup()
            raise

    @property
    def bpf(self):  # -> bcc.BPF: the maps, and the programs benches profile
        return self._bpf

    @property
    def cgroup(self) -> Path:
        return self._links.cgroup

    @property
    def attached(self) -> bool:
        """Whether the pair is linked to the cgroup (while any job runs)."""
        return self._links.attached

    def running(self, job: Job) -> bool:
        return job in self._running

    def set_job(self, job: Job, on: bool) -> None:
        """Run `job` or not from the next packet; link the pair for the first job, unlink it after the last.
        Raises what linking raises (the job is then off); turning a job off after close does nothing."""
        with self._lock:
            if self._closed:
                if on:
                    raise RuntimeError("the cgroup-skb programs are closed")
                return
            if job not in self.compiled:
                raise ValueError(f"{job!r} is not compiled into these cgroup-skb programs")
            wanted = self._running | job if on else self._running & ~job
            self._write_jobs(wanted)  # on: before the links, so the first packet runs it; off: at once
            try:
                self._links.attach(bool(wanted))
            except BaseException:
                self._write_jobs(self._running)
                raise
            self._running = wanted

    def _write_jobs(self, jobs: Job) -> None:
        table = self._bpf[b"skb_jobs"]
        table[table.Key(0)] = table.Leaf(int(jobs))

    # --- the DNS ring (one reader at a time; records without one are dropped when consumed) -----------
    def read_ring_with(self, reader: RingReader | None) -> None:
        self._ring_reader = reader

    def _on_ring_record(self, ctx, data, size) -> int:
        return 0 if self._ring_reader is None else self._ring_reader(ctx, data, size)

    def close(self) -> None:
        """Unlink and free the programs and maps."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._running = Job(0)
            self._links.close()  # closing the links detaches the programs
            self._bpf.cleanup()


class SharedSkbHooks:
    """The agent's one SkbHooks, made by `load` on the first `get()`; a failed load raises there and is
    tried again by the next `get()` (the tracer's UDP and the DNS lifecycle each retry on their terms).
    After `close()` nothing loads again."""

    def __init__(self, load: Callable[[], SkbHooks]) -> None:
        self._load, self._hooks, self._closed = load, None, False
        self._lock = threading.Lock()

    def get(self) -> SkbHooks:
        with self._lock:
            if self._closed:
                raise RuntimeError("the agent's cgroup-skb programs are closed")
            if self._hooks is None:
                self._hooks = self._load()
            return self._hooks

    def close(self) -> None:
        with self._lock:
            hooks, self._hooks, self._closed = self._hooks, None, True
        if hooks is not None:
            hooks.close()
