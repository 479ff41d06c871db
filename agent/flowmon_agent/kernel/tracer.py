"""FlowTracer: the kernel side of the agent behind one small object (the `Tracer` the runner drives).

poll() (call it about once a second) returns every flow seen since start; configure() applies a
`KernelConfig`. The parts: program.py (loading, the tcp_probe hook), config_maps.py (filters through
maps), adoption.py (connections open before the start), rtt_sampler.py (when tcp_probe is attached),
flow_reader.py (fold, flush, read, decode, incarnations), udp_flows.py (UDP pairs, bpf/udp.c), counted
while the config asks for UDP.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flowmon_agent.kernel import adoption as existing
from flowmon_agent.kernel import paths as kernel_paths
from flowmon_agent.kernel.config_maps import ConfigMaps
from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flow_reader import FlowReader
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, KernelConfig, Transport
from flowmon_agent.kernel.maps import CFG_ADOPT, CFG_RTT_EPOCH
from flowmon_agent.kernel.program import KernelProgram, Sizes
from flowmon_agent.kernel.rtt_sampler import RttSampler
from flowmon_agent.kernel.skb_hooks import SkbHooks
from flowmon_agent.kernel.udp_flows import UdpFlows

log = logging.getLogger(__name__)


class FlowTracer:
    """Exact TCP and UDP flow accounting on this host. Use as a context manager, or call close()."""

    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        force_compat: bool = False,
        raw: bool | None = None,
        sizes: Mapping[str, int] | None = None,
        rtt_interval_ms: int = 1000,
        rtt_window_ms: int = 100,
        rtt_window_clock: bool = True,
        adopt_existing: bool = True,
        adopt_window_s: float = 300.0,
        adopt_recheck_s: float = 10.0,
        reset_grace_s: float = 0.5,
        connection_key_ttl_s: float = 300.0,
        idle_flow_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        sockops: bool = True,
        cgroup_root: Path | None = None,
        udp: bool = True,
        udp_sizes: Mapping[str, int] | None = None,
        udp_hooks: Callable[[], SkbHooks] | None = None,
    ) -> None:
        """`config` applies from the first socket: BCC attaches the programs as it loads them, and until the
        tracer has been configured the kernel takes no socket in. `rtt_window_clock=False`: the caller
        opens and closes the srtt sampling windows (`rtt_sampler`). `sockops=False`: no sock_ops
        program, close samples only from the windows (`rtt_at_close` says which applies). `cgroup_root`:
        where the node's cgroup v2 root is looked for (cgroup.cgroup2_root's `under`), by sock_ops and UDP
        alike. `udp=False`: bpf/udp.c is not even loaded (a config's `udp` then changes nothing). A node
        where it cannot load or attach (no cgroup v2) keeps TCP: the reason is logged once and kept in
        `udp_unavailable`. `udp_hooks`: gives the cgroup-skb program pair UDP shares with the DNS capture
        (kernel/skb_hooks.py SharedSkbHooks.get; `udp_sizes` were its to apply); default one of UDP's own."""
        for name, value in (("rtt_interval_ms", rtt_interval_ms), ("rtt_window_ms", rtt_window_ms)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        self.program = KernelProgram(
            force_compat=force_compat,
            raw=raw,
            sizes=Sizes.of(sizes),
            sockops=sockops,
            cgroup_root=cgroup_root,
        )
        self.kernel_path = self.program.kernel_path
        self.rtt_at_close = self.program.rtt_at_close
        self.raw_tracepoints = self.program.raw_tracepoints
        # held by poll(), configure() and the sampling windows: poll() may run in a worker thread while the
        # loop reconfigures; benches hold it to attach and detach hooks of `program` themselves
        self.lock = threading.RLock()
        self._closed = False
        self._udp: UdpFlows | None = None
        self.udp_unavailable = ""
        try:
            if udp:
                self._udp = self._load_udp(udp_sizes, cgroup_root, idle_flow_ttl_s, clock, udp_hooks)
            self._maps = ConfigMaps(self.program)
            self._adoptions = existing.Adoptions(
                self.program.table("adopt"),
                lambda on: self._maps.set_flag(CFG_ADOPT, int(on)),
                recheck_s=adopt_recheck_s,
            )
            self.rtt_sampler = RttSampler(
                self.program,
                lambda epoch: self._maps.set_flag(CFG_RTT_EPOCH, epoch),
                self._probe_always_needed,
                self.lock,
                interval_ms=rtt_interval_ms,
                window_ms=rtt_window_ms,
                window_clock=rtt_window_clock,
            )
            self._reader = FlowReader(
                self.program,
                reset_grace_s=reset_grace_s,
                connection_key_ttl_s=connection_key_ttl_s,
                idle_flow_ttl_s=idle_flow_ttl_s,
                clock=clock,
            )
            self.configure(config or KernelConfig())
            self._maps.start_tracing()  # before discovery: a connection opened in between is not missed
            if adopt_existing:
                self.adopt(existing.discover(), window_s=adopt_window_s)
        except BaseException:
            self._closed = True
            self.program.close()
            if self._udp is not None:
                self._udp.close()
            raise
        self.rtt_sampler.start()

    def _load_udp(
        self,
        sizes: Mapping[str, int] | None,
        cgroup_root: Path | None,
        idle_flow_ttl_s: float,
        clock: Callable[[], float],
        hooks: Callable[[], SkbHooks] | None,
    ) -> UdpFlows | None:
        try:
            shared = hooks() if hooks is not None else None
            ttl = idle_flow_ttl_s
            return UdpFlows(shared, sizes=sizes, cgroup=cgroup_root, idle_flow_ttl_s=ttl, clock=clock)
        except (kernel_paths.BPFUnavailableError, OSError) as exc:
            self._without_udp(exc)
            return None

    def _configure_udp(self, config: KernelConfig) -> None:
        assert self._udp is not None
        try:
            self._udp.configure(config)
        except kernel_paths.BPFUnavailableError as exc:  # the cgroup links could not be made
            self._udp.close()
            self._udp = None
            self._without_udp(exc)

    def _without_udp(self, exc: Exception) -> None:
        self.udp_unavailable = str(exc)
        log.warning("UDP is not counted on this node, TCP is: %s", exc)

    # --- configuration (through maps only) -----------------------------------------------------------
    @property
    def config(self) -> KernelConfig:
        """The configuration the kernel holds."""
        assert self._maps.applied is not None
        return self._maps.applied

    def configure(self, config: KernelConfig) -> None:
        """Apply what changed (to sockets created from now on); cheap when nothing did."""
        with self.lock:
            self._maps.apply(config)
            if config.rtt != self.rtt_sampler.wanted:
                self.rtt_sampler.set_wanted(config.rtt)
            if self._udp is not None:
                self._configure_udp(config)

    def adopt(self, conns: Iterable[existing.ExistingConnection], *, window_s: float = 300.0) -> int:
        """Measure already-open connections from their next received segment on (for window_s)."""
        with self.lock:
            return self._adoptions.adopt(conns, window_s=window_s)

    @property
    def adopting(self) -> bool:
        """Whether pre-existing connections are still waiting for their first received segment."""
        return self._adoptions.adopting

    @property
    def rtt_sampling(self) -> bool:
        """Whether srtt samples are taken (tcp:tcp_probe attached, for a window of each epoch or always)."""
        return self.rtt_sampler.sampling

    @property
    def udp_attached(self) -> bool:
        """Whether UDP is counted right now (bpf/udp.c's job runs, its program pair is linked)."""
        return self._udp is not None and self._udp.attached

    @property
    def udp_cgroup(self) -> Path | None:
        """The cgroup v2 root bpf/udp.c links to (None without UDP)."""
        return self._udp.cgroup if self._udp is not None else None

    @property
    def rtt_probe_attached(self) -> bool:
        """Whether tcp:tcp_probe is attached right now."""
        return self.program.probe_attached

    def _probe_always_needed(self) -> bool:
        """Adoption starts measuring at a received segment; the compat path counts bytes there."""
        return self._adoptions.adopting or self.kernel_path == "compat"

    # --- reading ---------------------------------------------------------------------------------------
    def poll(self) -> FlowSnapshot:
        with self.lock:
            if self._closed:
                raise RuntimeError("FlowTracer is closed")
            flows, dropped = self._reader.read()
            if self._adoptions.expire():
                self.rtt_sampler.update()
            dropped["adopt_table_full"] = self._adoptions.dropped
            dropped.update(self._maps.refused())
            dropped["flows_forgotten_idle"] = self._reader.forgotten_idle
            dropped["flows_forgotten_gone"] = self._reader.forgotten_gone
            if self._udp is not None:
                flows.update(self._udp.read())  # keys differ by protocol: no overlap
                dropped.update(self._udp.drops().as_dropped())
                dropped.update(self._udp.refused())
            return FlowSnapshot(flows, dropped, self.kernel_path, time.monotonic(), self.rtt_at_close)

    def tracked(self) -> dict[str, int]:
        """Keys user space holds per table (bounded by the kernel's flow map)."""
        with self.lock:
            tracked = self._reader.tracked()
            if self._udp is not None:
                tracked["udp_flows"] = self._udp.tracked()
            return tracked

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.rtt_sampler.stop()  # outside the lock: its callbacks take it
        with self.lock:
            if not self._closed:
                self._closed = True
                self.program.close()
                if self._udp is not None:
                    self._udp.close()

    def __enter__(self) -> FlowTracer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def format_flow(key: FlowKey, c: FlowCounters) -> str:
    if key.protocol is Transport.UDP:
        return (
            f"udp {key.client_ip} -> {key.server_ip}:{key.server_port} [{key.reporter}] "
            f"c2s={c.udp_sent_bytes}B/{c.udp_sent_datagrams}dg "
            f"s2c={c.udp_received_bytes}B/{c.udp_received_datagrams}dg"
        )
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
        print(f"kernel path: {tracer.kernel_path}, srtt at close: {tracer.rtt_at_close}", flush=True)
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
