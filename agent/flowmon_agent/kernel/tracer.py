"""FlowTracer: loads the kernel side and turns its maps into cumulative per-flow counters.

poll() (call it about once a second) returns every flow seen since start. The kernel keeps a live
socket's bytes and open in the socket's own slot and, at close, moves them into a per-CPU copy of the
flow's entry; a poll first runs the kernel's fold program, which moves what live sockets have had pending
since the last fold, and the flush of the copies (in the kernel: no per-socket work in Python), then
reads only the flow map, so user-space work grows with distinct flows, not with open connections.
Counters are kept in user space too, so a flow that the kernel's LRU map evicts keeps its totals, and
they never go backwards.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import sys
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flowmon_agent.kernel import adoption as existing
from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel import maps as kernel_maps
from flowmon_agent.kernel import paths as kernel_paths
from flowmon_agent.kernel.flows import FlowCounters, FlowKey, FlowSnapshot, IPAddress
from flowmon_agent.kernel.maps import (
    ROLE_CLIENT,
    ROLE_SERVER,
    ST_FLOW_FAILED,
    ST_FLOWS_CREATED,
    ST_RST_FULL,
    ST_SOCK_FULL,
    add_counters,
    clamp_monotonic,
    copy_counters,
)
from flowmon_agent.kernel.window_clock import WindowClock

T = TypeVar("T")
CFG_FILTER, CFG_PORTS, CFG_ADOPT, CFG_NAT, CFG_RTT_EPOCH, CFG_TRACING = 0, 1, 2, 3, 4, 5
FOLD_STEPS = 32  # steps per run of flowmon_fold: the verifier walks ~280k instructions (limit 1M)
CLOSE_SLOTS, FLUSH_PER_RUN = 64, 8  # per-CPU copies of flows for closes; copies flushed per run (bpf/)
MARK_WORD_SLOTS = 64  # slots per word of the fold's bitmap, and words per group word (bpf/flowmon.c)
DEFAULT_SIZES = {"SOCK_MAX": 65536, "FLOW_MAX": 16384, "RST_MAX": 4096, "ADOPT_MAX": 16384, "NAT_MAX": 16384}


def _cpus_to_visit(words: bpf_loader.PercpuWords) -> Iterable[int]:
    """The CPUs whose words are set; all of them where the kernel cannot batch-read (no harm: a run
    with nothing to do returns at once)."""
    cpus = words.cpus_with_any()
    return range(words.ncpus) if cpus is None else cpus


@contextlib.contextmanager
def _unless_offline():
    """A run asked of an offline CPU fails with ENXIO: what it holds waits until the CPU is back."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise


@dataclass(slots=True)
class _Incarnations:
    """One flow key's kernel entry over time: LRU eviction and re-creation restart it from zero."""

    created_ns: int
    last: FlowCounters
    base: FlowCounters = field(default_factory=FlowCounters)

    def observe(self, created_ns: int, counters: FlowCounters) -> None:
        if created_ns != self.created_ns and self.created_ns != 0:
            add_counters(self.base, self.last)  # the old entry was evicted: keep what it had
        self.created_ns = created_ns
        self.last = counters

    def total(self) -> FlowCounters:
        out = copy_counters(self.base)
        add_counters(out, self.last)
        return out


def _adopt_key(c: existing.ExistingConnection) -> bytes:
    return kernel_maps.encode_tuple(c.local, c.local_port, c.remote, c.remote_port)


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def run(self: FlowTracer, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return run


class FlowTracer:
    """Exact TCP flow accounting on this host. Use as a context manager, or call close()."""

    def __init__(
        self,
        *,
        force_compat: bool = False,
        raw: bool | None = None,
        sizes: Mapping[str, int] | None = None,
        rtt_interval_ms: int = 1000,
        rtt_window_ms: int = 100,
        adopt_existing: bool = True,
        adopt_window_s: float = 300.0,
        adopt_recheck_s: float = 10.0,
        reset_grace_s: float = 0.5,
        connection_key_ttl_s: float = 300.0,
        local_ips: Iterable[IPAddress] | None = None,
        ignored_ports: Iterable[int] = (),
    ) -> None:
        """`local_ips` and `ignored_ports` apply from the first socket (the setters apply to new sockets
        from the moment they are called): BCC attaches the programs as it loads them, and until the
        tracer has been configured the kernel takes no socket in."""
        for name, value in (("rtt_interval_ms", rtt_interval_ms), ("rtt_window_ms", rtt_window_ms)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        cflags = {**DEFAULT_SIZES, "FOLD_STEPS": FOLD_STEPS, **(sizes or {})}
        sock_slots, fold_steps = int(cflags["SOCK_MAX"]), int(cflags["FOLD_STEPS"])
        if sock_slots < 8 or sock_slots & (sock_slots - 1):
            raise ValueError(f"SOCK_MAX must be a power of two >= 8, not {sock_slots}")
        if fold_steps < 4:
            raise ValueError(f"FOLD_STEPS must be at least 4, not {fold_steps}")
        close_slots = int(cflags.get("CLOSE_SLOTS", CLOSE_SLOTS))
        if not 1 <= close_slots <= 64 or close_slots & (close_slots - 1):  # a bit each in one u64
            raise ValueError(f"CLOSE_SLOTS must be a power of two up to 64, not {close_slots}")
        self._flush_runs_max = 2 + close_slots // FLUSH_PER_RUN
        self._path, self._bpf = kernel_paths.load(force_compat=force_compat, raw=raw, sizes=cflags)
        self.kernel_path = self._path.name
        self.raw_tracepoints = bool(self._path.cflags.get("FLOWMON_RAW"))
        b = self._bpf
        # default path: live sockets' pending counters are folded into `flows` before each read
        self._fold_fd = (
            None
            if self.kernel_path == "compat"
            else bpf_loader.load_raw_tracepoint_program(b, "flowmon_fold")
        )
        # the fold's bitmap: its words, then its group words (MARK_WORDS, MARK_GROUPS in the C); a bound
        # on the fold's runs per CPU: every run but the last takes FOLD_STEPS - 2 slots, words or groups
        mark_words = -(-sock_slots // MARK_WORD_SLOTS)
        self._mark_groups = -(-mark_words // MARK_WORD_SLOTS)
        self._fold_runs_max = 2 + (sock_slots + mark_words + self._mark_groups) // (fold_steps - 2)
        # which CPUs have marks: the others are not interrupted (waking an idle CPU costs ~150 us)
        self._marked_cpus = (
            None
            if self._fold_fd is None
            else bpf_loader.PercpuWords(b[b"fold_marks"], mark_words, self._mark_groups)
        )
        # default path: closes wait in per-CPU copies of their flows until flushed before each read
        self._flush_fd = (
            None
            if self._fold_fd is None
            else bpf_loader.load_raw_tracepoint_program(b, "flowmon_flush_closes")
        )
        self._closing_cpus = (
            None if self._fold_fd is None else bpf_loader.PercpuWords(b[b"close_flags"], 0, 1)
        )
        self._flows, self._stats = b[b"flows"], b[b"stats"]
        self._cfg, self._local_ips, self._ports = b[b"cfg"], b[b"local_ips"], b[b"ignored_ports"]
        self._pending, self._adopt, self._nat = b[b"rst_pending"], b[b"adopt"], b[b"nat_peers"]
        self._flows_reader = bpf_loader.MapReader(self._flows)
        self._pending_reader = bpf_loader.MapReader(self._pending, chunk=256)
        self._conn_ttl_s = connection_key_ttl_s
        self._conn_seen: dict[FlowKey, tuple[float, FlowCounters]] = {}  # per-connection keys: last change
        self._forgotten = 0  # kernel entries user space deleted (not evictions)
        self._adopt_dropped = 0
        self._reset_grace_ns = int(reset_grace_s * 1e9)
        self._incarnations: dict[FlowKey, _Incarnations] = {}
        self._extra: dict[FlowKey, FlowCounters] = {}  # resets received from untraced senders
        self._reported: dict[FlowKey, FlowCounters] = {}
        self._evicted = 0
        self._adopt_until = 0.0
        self._adopt_recheck_s, self._adopt_checked_at = adopt_recheck_s, 0.0
        self._closed = False
        self._lock = threading.RLock()  # poll() may run in a worker thread while the loop reconfigures
        self._rtt_wanted = True
        # srtt sampling: a socket takes one periodic sample per epoch; the epoch is a counter advanced from
        # user space (the kernel compares integers instead of reading the clock on every received segment),
        # and tcp_probe is attached only for a window at the start of each epoch (docs/kernel.md, "Samples")
        self._rtt_epoch = 0
        self._in_rtt_window = True
        self._probe_attached = True
        self._rtt_clock = WindowClock(
            rtt_interval_ms / 1000,
            rtt_window_ms / 1000,
            self._open_rtt_window,
            self._close_rtt_window,
            name="flowmon-rtt-window",
        )
        try:
            if local_ips is not None:
                self.set_local_ip_filter(local_ips)
            self.set_ignored_ports(ignored_ports)
            self._set_cfg(CFG_TRACING, 1)  # before discovery: a connection opened in between is not missed
            if adopt_existing:
                self.adopt(existing.discover(), window_s=adopt_window_s)
        except BaseException:
            self.close()
            raise
        self._rtt_clock.start()

    # --- configuration (through maps only) -----------------------------------------------------------
    def _set_cfg(self, index: int, value: int) -> None:
        self._cfg[ctypes.c_int(index)] = ctypes.c_uint64(value)

    @staticmethod
    def _sync_ips(table, ips: Iterable[IPAddress]) -> int:
        wanted = {kernel_maps.encode_ip_key(ip) for ip in ips}
        for raw in wanted:  # add before removing, so a kept address is never briefly missing
            table[table.Key.from_buffer_copy(raw)] = ctypes.c_uint8(1)
        for key in list(table.keys()):
            if bytes(key) not in wanted:
                del table[key]
        return len(wanted)

    @_locked
    def set_local_ip_filter(self, ips: Iterable[IPAddress] | None) -> None:
        """Trace only sockets whose local address is in ips (None: trace all). Applies to new sockets."""
        if ips is None:
            self._set_cfg(CFG_FILTER, 0)
            self._local_ips.clear()
            return
        self._sync_ips(self._local_ips, ips)
        self._set_cfg(CFG_FILTER, 1)

    @_locked
    def set_nat_peers(self, ips: Iterable[IPAddress]) -> None:
        """Server IPs behind NAT (Service IPs): connections to them are reported one by one
        (FlowKey.client_port set) so user space can resolve each through conntrack. New sockets only."""
        n = self._sync_ips(self._nat, ips)
        self._set_cfg(CFG_NAT, int(n > 0))

    @_locked
    def set_ignored_ports(self, ports: Iterable[int]) -> None:
        """Server ports whose connections are not traced (applies to new sockets)."""
        wanted = {int(p) for p in ports}
        if any(not 0 < p < 65536 for p in wanted):
            raise ValueError(f"ports must be 1-65535: {sorted(wanted)}")
        for port in wanted:
            self._ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        for key in list(self._ports.keys()):
            if key.value not in wanted:
                del self._ports[key]
        self._set_cfg(CFG_PORTS, int(bool(wanted)))

    @_locked
    def adopt(self, conns: Iterable[existing.ExistingConnection], *, window_s: float = 300.0) -> int:
        """Measure already-open connections from their next received segment on (for window_s)."""
        n = 0
        for c in conns:
            raw = _adopt_key(c)
            role = ROLE_SERVER if c.role == "server" else ROLE_CLIENT
            try:
                self._adopt[self._adopt.Key.from_buffer_copy(raw)] = ctypes.c_uint8(role)
            except Exception:  # map full: this one stays unmeasured
                self._adopt_dropped += 1
                continue
            n += 1
        if n:
            self._adopt_checked_at = time.monotonic()
            self._adopt_until = self._adopt_checked_at + window_s
            self._set_cfg(CFG_ADOPT, 1)
        return n

    @property
    def adopting(self) -> bool:
        """Whether pre-existing connections are still waiting for their first received segment."""
        return bool(self._adopt_until)

    # --- reading ---------------------------------------------------------------------------------------
    def _stat(self, index: int) -> int:
        return int(self._stats.sum(ctypes.c_int(index)).value)

    def _drain_resets(self, known: Container[FlowKey]) -> None:
        """RSTs received from a peer that no traced socket claimed within the grace period."""
        now_ns = time.monotonic_ns()
        for k, v in self._pending_reader.items():
            p = kernel_maps.decode_pending_reset(v)
            if now_ns - p.ts_ns < self._reset_grace_ns:
                continue
            try:
                del self._pending[self._pending.Key.from_buffer_copy(k)]
            except KeyError:
                continue  # the sender claimed it meanwhile
            extra = self._extra.setdefault(kernel_maps.reset_owner(p.key, p.to_client, known), FlowCounters())
            if p.to_client:
                extra.resets_s2c += 1
            else:
                extra.resets_c2s += 1

    def _forget_closed_adoptions(self) -> None:
        """Connections that closed before a received segment adopted them would keep tcp_probe attached
        for the whole adoption window: their entries go once /proc no longer lists them."""
        alive = {_adopt_key(c) for c in existing.discover()}
        for key in list(self._adopt.keys()):
            if bytes(key) not in alive:
                with contextlib.suppress(KeyError):  # adopted meanwhile
                    del self._adopt[key]

    def _expire_adoption(self) -> None:
        if not self._adopt_until:
            return
        now = time.monotonic()
        if now - self._adopt_checked_at >= self._adopt_recheck_s:
            self._adopt_checked_at = now
            self._forget_closed_adoptions()
        if now > self._adopt_until or len(self._adopt) == 0:
            self._set_cfg(CFG_ADOPT, 0)
            self._adopt.clear()
            self._adopt_until = 0.0
            self._update_probe()

    @_locked
    def set_rtt_sampling(self, enabled: bool) -> None:
        """RTT samples need tcp:tcp_probe, the costliest hook (every received segment). When no one wants
        RTT it is detached (default path; it stays while pre-existing connections are being adopted)."""
        self._rtt_wanted = bool(enabled)
        self._update_probe()

    @property
    def rtt_sampling(self) -> bool:
        """Whether srtt samples are taken (tcp:tcp_probe attached, for a window of each epoch or always)."""
        return self._rtt_wanted or self._probe_always_needed()

    @property
    def rtt_probe_attached(self) -> bool:
        """Whether tcp:tcp_probe is attached right now."""
        return self._probe_attached

    def _probe_always_needed(self) -> bool:
        """Adoption starts measuring at a received segment; the compat path counts bytes there."""
        return bool(self._adopt_until) or self.kernel_path == "compat"

    @_locked
    def _open_rtt_window(self) -> None:
        if self._closed:
            return
        self._rtt_epoch += 1  # before the attach: each socket's first segment in the window is due a sample
        self._set_cfg(CFG_RTT_EPOCH, self._rtt_epoch)
        self._in_rtt_window = True
        self._update_probe()

    @_locked
    def _close_rtt_window(self) -> None:
        if self._closed:
            return
        self._in_rtt_window = False
        self._update_probe()

    def _update_probe(self) -> None:
        in_window = self._in_rtt_window or self._rtt_clock.always_open
        needed = (self._rtt_wanted and in_window) or self._probe_always_needed()
        if needed == self._probe_attached:
            return
        tp = b"tcp:tcp_probe"
        if needed:
            self._bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__tcp__tcp_probe")
        else:
            self._bpf.detach_tracepoint(tp)
        self._probe_attached = needed

    @_locked
    def poll(self) -> FlowSnapshot:
        if self._closed:
            raise RuntimeError("FlowTracer is closed")
        self._fold()
        created = self._stat(ST_FLOWS_CREATED)  # before the map read: evictions are never overestimated
        flows = self._flows_reader.items()
        for k, v in flows:
            key, kf = kernel_maps.decode_flow_key(k), kernel_maps.decode_flow_value(v)
            inc = self._incarnations.get(key)
            if inc is None:
                self._incarnations[key] = _Incarnations(kf.created_ns, kf.counters)
            else:
                inc.observe(kf.created_ns, kf.counters)
        self._drain_resets(self._incarnations)
        self._expire_adoption()
        self._evicted = max(self._evicted, created - len(flows) - self._forgotten)

        out: dict[FlowKey, FlowCounters] = {}
        for key in self._incarnations.keys() | self._extra.keys():
            inc = self._incarnations.get(key)
            total = inc.total() if inc else FlowCounters()
            extra = self._extra.get(key)
            if extra is not None:
                add_counters(total, extra)
            total.active = max(total.active, 0)  # opens lost with an evicted entry must not make it negative
            total = clamp_monotonic(self._reported.get(key), total)
            self._reported[key] = total
            out[key] = copy_counters(total)
        self._forget_idle_connections(out)
        dropped = {
            "socket_table_full": self._stat(ST_SOCK_FULL),
            "flow_table_evicted": self._evicted,
            "flow_insert_failed": self._stat(ST_FLOW_FAILED),
            "reset_table_full": self._stat(ST_RST_FULL),
            "adopt_table_full": self._adopt_dropped,
        }
        return FlowSnapshot(out, dropped, self.kernel_path, time.monotonic())

    def _fold(self) -> None:
        """Move live sockets' pending bytes and opens into their flows: on each CPU that marked slots
        since the last fold, the kernel visits them (a run per ~30 marked slots, words or groups). Then
        closed connections' counters, which wait in per-CPU copies of their flows, on each CPU that has
        some. A mark set after the check waits for the next fold; an offline CPU keeps its marks (and
        copies) until it is back."""
        if self._fold_fd is None or self._marked_cpus is None:  # compat path: no fold (and no marks)
            return
        for cpu in _cpus_to_visit(self._marked_cpus):
            group = 0
            with _unless_offline():
                for _ in range(self._fold_runs_max):
                    group = bpf_loader.run_raw_tracepoint_program(self._fold_fd, (group,), cpu=cpu)
                    if group >= self._mark_groups:
                        break
        if self._flush_fd is None or self._closing_cpus is None:
            return
        for cpu in _cpus_to_visit(self._closing_cpus):
            with _unless_offline():
                for _ in range(self._flush_runs_max):  # a flow that cannot be stored waits for the next poll
                    if not bpf_loader.run_raw_tracepoint_program(self._flush_fd, (), cpu=cpu):
                        break

    def _forget_idle_connections(self, out: dict[FlowKey, FlowCounters]) -> None:
        """Per-connection keys (NAT peers) are dropped, here and in the kernel, once closed and unchanged
        for connection_key_ttl_s: one snapshot after another reports their final totals until then."""
        now = time.monotonic()
        for key, c in out.items():
            if not key.client_port:
                continue
            seen = self._conn_seen.get(key)
            if seen is None or seen[1] != c:
                self._conn_seen[key] = (now, c)
            elif c.active == 0 and now - seen[0] >= self._conn_ttl_s:
                for state in (self._conn_seen, self._incarnations, self._extra, self._reported):
                    state.pop(key, None)
                try:
                    del self._flows[self._flows.Key.from_buffer_copy(kernel_maps.encode_flow_key(key))]
                    self._forgotten += 1
                except KeyError:
                    pass  # already evicted

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._rtt_clock.stop()  # outside the lock: its callbacks take it
        with self._lock:
            if not self._closed:
                self._closed = True
                self._bpf.cleanup()

    def __enter__(self) -> FlowTracer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def format_flow(key: FlowKey, c: FlowCounters) -> str:
    rtt = f"{c.rtt.sum_us / c.rtt.count / 1000:.2f}ms" if c.rtt.count else "-"
    return (
        f"{key.client_ip} -> {key.server_ip}:{key.server_port} [{key.reporter}] "
        f"c2s={c.sent_bytes}B s2c={c.received_bytes}B opened={c.opened} closed={c.closed} "
        f"active={c.active} refused={c.failed_refused} timeout={c.failed_timeout} "
        f"retrans={c.retransmits_c2s}/{c.retransmits_s2c} rst={c.resets_c2s}/{c.resets_s2c} rtt={rtt}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m flowmon_agent.kernel.tracer`: trace this host and print its flows every second."""
    parser = argparse.ArgumentParser(prog="python -m flowmon_agent.kernel.tracer", description=main.__doc__)
    parser.add_argument("--compat", action="store_true", help="force the compat kernel path")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    args = parser.parse_args(argv)
    try:
        tracer = FlowTracer(force_compat=args.compat)
    except kernel_paths.BPFUnavailableError as exc:
        print(f"flowmon: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.seconds if args.seconds else float("inf")
    with tracer:
        print(f"kernel path: {tracer.kernel_path}", flush=True)
        try:
            while time.monotonic() < deadline:
                time.sleep(1)
                snap = tracer.poll()
                print(f"--- {len(snap.flows)} flows, dropped {snap.dropped}")
                for key, counters in sorted(snap.flows.items(), key=lambda kv: str(kv[0])):
                    print(format_flow(key, counters))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
