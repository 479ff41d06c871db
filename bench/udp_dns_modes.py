"""UDP and DNS on, in the interleaved overhead bench (bench/kernel_overhead.py): the DNS workloads, the
modes with UDP and the DNS capture attached through the product's public API, and their floor.

Workloads (the client pod against dnsmasq in the server pod; bench/dns_overhead.py's client and zone):
  dns-flood  A queries, 32 in flight on one UDP socket, as fast as the answers come: queries/s answered;
  dns-rate   DNS_RATE queries/s (a busy node's DNS): the rate stays put, so the cost shows in the
             workload's CPU per query (the bench's second ratio).
Modes:
  floor-skb        the TCP count-only floor (bench/count_floor.c) plus a count-only cgroup-skb program per
                   direction on the cgroup v2 root, where UDP and DNS hook: every packet of the node runs
                   one and is counted, none is read. The floor on the same hooks as the two below.
  flowmon-udp-dns  FlowTracer with UDP attached, and the DNS capture held by DnsLifecycle under a policy
                   that wants DNS, both over one cgroup-skb program pair (SharedSkbHooks), as the agent
                   holds them (runner.default_skb_hooks, default_dns_capture); both read once a second.
  agent-udp-dns    the whole `flowmon agent` in its steady state (bench/steady_agent.py) with one monitor
                   exporting the default metrics and every udp_* and dns_* one.
Switching: UDP and DNS are jobs of the shared pair (kernel/skb_hooks.py), linked while either runs. UDP
follows the tracer's configuration; DnsCapture starts its job when it is made and stops it (emptying its
maps) when closed, so each switch-on makes a capture over the loaded pair (no compile) and each
switch-off closes it after a last read; the tracker keeps its counts across (`retire_kernel`, as
DnsLifecycle does).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import statistics
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from bench.dns_overhead import QNAME, flood_argv
from bench.udp_modes import UDP_WORKLOADS
from flowmon_cli import topview
from flowmon_contract.documents import API, KIND
from flowmon_contract.metrics import METRICS
from flowmon_contract.policy import AgentPolicy, compile_policy
from flowmon_contract.spec import (
    DEFAULT_METRICS,
    DNS_METRICS,
    UDP_METRICS,
    FlowMonitor,
    FlowMonitorSpec,
    Metric,
    ObjectMeta,
)

DNS_WORKLOADS = ("dns-flood", "dns-rate")
DNS_RATE = 2_000  # queries/s
DNS_UNITS = dict.fromkeys(DNS_WORKLOADS, "queries/s")
UDP_DNS_MODES = ("floor-skb", "flowmon-udp-dns", "agent-udp-dns")
UDP_DNS_AGENT = "agent-udp-dns"
# What agent-udp-dns must have counted of each UDP and DNS workload (the TCP ones: kernel_overhead.COUNTED)
UDP_DNS_COUNTED = dict.fromkeys(UDP_WORKLOADS, "udp_sent_bytes") | dict.fromkeys(
    DNS_WORKLOADS, "dns_answered"
)
COUNTED_WHAT = {
    "opened": "connections opened per request",
    "sent_bytes": "bytes sent per byte iperf3 sent",
    "udp_sent_bytes": "UDP bytes sent per payload byte the server received",
    "dns_answered": "DNS requests answered per query answered",
}
METRIC_NAMES = [*DEFAULT_METRICS, *sorted(UDP_METRICS), *sorted(DNS_METRICS)]


# --- workloads ---------------------------------------------------------------------------------------
def dns_queries(client: Callable[[list[str], float], str], server_ip: str, workload: str, seconds: float):
    """(queries answered per second, queries answered) of one run of the flood client."""
    rate = DNS_RATE if workload == "dns-rate" else 0
    qps = float(client(flood_argv(server_ip, seconds, QNAME, rate), seconds + 30).strip())
    return qps, round(qps * seconds)


# --- what the modes are asked for --------------------------------------------------------------------
def udp_dns_monitor() -> dict:
    """The FlowMonitor document agent-udp-dns runs with (`--monitor FILE`): the bare agent's default
    monitor of every flow, host/flowmon-system, with UDP and DNS metrics too."""
    return {
        "apiVersion": API,
        "kind": KIND,
        "metadata": {"name": "host", "namespace": "flowmon-system"},
        "spec": {"metrics": [str(m) for m in METRIC_NAMES]},
    }


def udp_dns_policy() -> AgentPolicy:
    """The same monitor compiled: what flowmon-udp-dns's DnsLifecycle follows."""
    doc = udp_dns_monitor()
    spec = FlowMonitorSpec(metrics=[Metric(m) for m in doc["spec"]["metrics"]])
    return compile_policy([FlowMonitor(metadata=ObjectMeta(**doc["metadata"]), spec=spec)])


# --- the DNS capture, switched ---------------------------------------------------------------------------
class SwitchedDns:
    """A DnsSource (what DnsLifecycle polls) whose DnsCapture exists only while the bench wants it on:
    `want(on)` records the wish, `apply()` makes or closes the capture (the agent calls it from its poll
    thread, through `poll`, so the tracker is only ever touched there); `applied` is set once it has."""

    batch_max = 2048  # DnsCapture's default

    def __init__(self, tracker, factory: Callable) -> None:  # (DnsTracker, DnsTracker -> DnsCapture)
        self.tracker, self._factory = tracker, factory
        self.capture = None
        self.wanted = False
        self.applied = threading.Event()
        self._retired: Counter[str] = Counter()  # closed captures' counters
        self._lock = threading.RLock()

    def want(self, on: bool) -> None:
        with self._lock:
            self.wanted = on
            self.applied.clear()

    def apply(self) -> None:
        with self._lock:
            if self.wanted and self.capture is None:
                self.capture = self._factory(self.tracker)
                self.batch_max = self.capture.batch_max
            elif not self.wanted and self.capture is not None:
                capture, self.capture = self.capture, None
                try:
                    capture.poll()  # its last counts
                    self._retired.update(dataclasses.asdict(capture.stats()))
                finally:
                    capture.close()
                    self.tracker.retire_kernel()  # a later capture's maps start empty
            self.applied.set()

    def poll(self, timeout_ms: int = 0) -> int:
        with self._lock:
            self.apply()
            if self.capture is None:
                self.tracker.expire()
                return 0
            return self.capture.poll(timeout_ms)

    def stats(self):  # -> CaptureStats: every capture's counts summed
        from flowmon_agent.dns.capture import CaptureStats

        with self._lock:
            counts = Counter(self._retired)
            if self.capture is not None:
                counts.update(dataclasses.asdict(self.capture.stats()))
            return CaptureStats(**{f.name: counts[f.name] for f in dataclasses.fields(CaptureStats)})

    def close(self) -> None:
        self.want(False)
        self.apply()


class TracerDns:
    """flowmon-udp-dns's DNS side, as the agent holds it: the program pair UDP and DNS share (give
    `skb_hooks.get` to the FlowTracer), and DnsLifecycle following the UDP+DNS policy, its capture
    switched. Close the lifecycle (`close`) before the tracer, the pair (`skb_hooks.close`) after both."""

    def __init__(self) -> None:
        from flowmon_agent import runner
        from flowmon_agent.dns.lifecycle import DnsLifecycle
        from flowmon_agent.dns.tracker import DnsTracker
        from flowmon_agent.kernel.skb_hooks import SharedSkbHooks

        settings, tracker = runner.AgentSettings(), DnsTracker()
        self.skb_hooks = SharedSkbHooks(functools.partial(runner.default_skb_hooks, settings, tracker))
        make = functools.partial(runner.default_dns_capture, settings, skb_hooks=self.skb_hooks.get)
        self.policy = udp_dns_policy()
        self.switched = SwitchedDns(tracker, make)
        self.lifecycle = DnsLifecycle(tracker, lambda _tracker: self.switched)
        self.lifecycle.poll(self.policy)  # the policy wants DNS: the lifecycle holds the (off) source

    def poll(self) -> None:
        self.lifecycle.poll(self.policy)

    def switch(self, on: bool) -> None:
        self.switched.want(on)
        self.switched.apply()

    def close(self) -> None:
        seen = self.switched.stats().seen  # the run's log shows that DNS was seen, not only attached
        print(f"flowmon-udp-dns: its DNS capture saw {seen} datagrams to or from port 53", file=sys.stderr)
        self.lifecycle.close()


def with_skb_floor(bpf, on: Callable[[], None], off: Callable[[], None], close: Callable[[], None]):
    """floor-skb: (on, off, close) of the TCP floor's hooks and count_floor.c's cgroup-skb pair."""
    from flowmon_agent.kernel.cgroup_skb import CgroupSkbLinks

    links = CgroupSkbLinks(bpf, b"floor_skb_ingress", b"floor_skb_egress")

    def skb_on() -> None:
        on()
        links.attach(True)

    def skb_off() -> None:
        links.attach(False)
        off()

    def skb_close() -> None:
        links.close()
        close()

    return skb_on, skb_off, skb_close


# --- kernel time of every program this process holds --------------------------------------------------
def _fdinfo(fd: int) -> dict[str, str]:
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _kernel_name(fd: int) -> str:
    """A program's name as the kernel holds it (BPF_OBJ_GET_INFO_BY_FD; at most 15 characters)."""
    from bcc import lib

    info, size = ctypes.create_string_buffer(256), ctypes.c_uint32(256)  # struct bpf_prog_info, zeroed
    if lib.bpf_obj_get_info(fd, info, ctypes.byref(size)) != 0:
        return f"fd {fd}"
    return info.raw[64:80].split(b"\0", 1)[0].decode()  # its `name` field


def program_ids(bpf) -> dict[str, str]:
    """The kernel's id of each program `bpf` (a bcc.BPF) has loaded → its name there."""
    return {_fdinfo(fn.fd)["prog_id"].strip(): name.decode() for name, fn in bpf.funcs.items()}


def program_stats(bpf, foreign: set[str] = frozenset()) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per program name, summed over every BPF program this process holds open
    (kernel.bpf_stats_enabled=1) but the `foreign` ids (other modes' objects: their polls test-run
    programs while detached): a mode's programs are the only ones attached while it is measured, so
    this covers the ones `bpf` (the mode's main object) does not hold, FlowTracer's UDP programs and a DNS
    capture made at switch-on. Named as in `bpf` where it holds them, as the kernel names them otherwise."""
    names = program_ids(bpf)
    out: dict[str, tuple[int, int]] = {}
    seen: set[str] = set(foreign)
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry) != "anon_inode:bpf-prog":
                continue
            fields = _fdinfo(int(entry.name))
        except OSError:  # closed meanwhile
            continue
        prog_id = fields["prog_id"].strip()
        if prog_id in seen:  # one program, several fds
            continue
        seen.add(prog_id)
        name = names.get(prog_id) or _kernel_name(int(entry.name))
        t, c = out.get(name, (0, 0))
        out[name] = (t + int(fields.get("run_time_ns", 0)), c + int(fields.get("run_cnt", 0)))
    return out


# --- what the agent counted ----------------------------------------------------------------------------
_DNS_REQUESTS = METRICS[Metric.DNS_REQUESTS].name + "_total"


def counted_totals(exposition: str, client: str, server: str) -> dict[str, float]:
    """Pure: what a monitor's scrape holds for the pair (client, server: names as topview writes them,
    the server with or without its port): connections opened, TCP bytes sent, UDP bytes sent, and DNS
    requests answered (every rcode but `timeout`)."""
    totals = dict.fromkeys(COUNTED_WHAT, 0.0)
    for key, pair in topview.parse_exposition(exposition).items():
        labels = dict(key)
        name = topview.endpoint_name(labels, "server")
        if topview.endpoint_name(labels, "client") != client or name.split(":")[0] != server:
            continue
        totals["opened"] += pair.opened
        totals["sent_bytes"] += pair.sent_bytes
        totals["udp_sent_bytes"] += pair.udp_sent_bytes
        totals["dns_answered"] += sum(n for rcode, n in pair.dns_requests.items() if rcode != "timeout")
    return totals


# --- the report --------------------------------------------------------------------------------------
def skb_floor_lines(results: Mapping, gap_interval: Callable) -> list[str]:
    """Per workload, each mode against floor-skb measured in the same rounds: the throughput gap in points
    (90% interval over rounds) and the workload's CPU per unit over floor-skb's (median of per-round
    ratios). Empty without floor-skb."""
    lines = []
    for w, res in results.items():
        if "floor-skb" not in res.ratio:
            continue
        floor, floor_cost = res.ratio["floor-skb"], res.cost["floor-skb"]
        for mode in sorted(res.ratio):
            if mode == "floor-skb":
                continue
            ours, cost = res.ratio[mode], res.cost[mode]
            gap = 100 * (statistics.median(floor) - statistics.median(ours))
            low, high = gap_interval(floor, ours)
            over = statistics.median(c / f for c, f in zip(cost, floor_cost, strict=True))
            lines.append(
                f"- {w}: {mode} {gap:+.1f} points below floor-skb (90% interval {low:+.1f} to {high:+.1f}),"
                f" workload CPU per unit {over:.3f} of floor-skb's"
            )
    return ["Against floor-skb (same rounds):", *lines] if lines else []
