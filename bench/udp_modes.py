"""UDP in the interleaved overhead bench (bench/kernel_overhead.py): its workloads and its two modes.

Workloads (iperf3 -u from the client pod to the server pod's iperf3 -s):
  udp-rate   a fixed rate (UDP_RATE of UDP_LEN-byte datagrams): throughput stays put, so the cost shows in
             the workload's CPU per unit (the bench's second ratio);
  udp-flood  64-byte datagrams as fast as the client can send them: datagrams per second received.
Modes: `udp-floor`, bpf/udp.c in its count-only variant (UDP_MODE 0: the hook and the packet walk, then
a per-CPU counter), `udp`, the product alone (UdpFlows read once a second like the agent), and
`udp-ports` (not run by default), the product deciding roles by ports alone, without the per-5-tuple map
that remembers the first sender: what that memory costs. `flowmon`
(FlowTracer) has UDP attached too: the TCP targets are checked with it on.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections.abc import Callable

from flowmon_agent.kernel.flows import KernelConfig

UDP_WORKLOADS = ("udp-rate", "udp-flood")
UDP_MODES = ("udp-floor", "udp", "udp-ports")
UDP_RATE, UDP_LEN, FLOOD_LEN = "400M", 1400, 64
UNITS = {"udp-rate": "Gbit/s", "udp-flood": "datagrams/s"}


def iperf_udp(client: Callable[[list[str], float], str], ip: str, port: int, workload: str, seconds: float):
    """(throughput in UNITS[workload], payload bytes the server received)."""
    rate, length = (UDP_RATE, UDP_LEN) if workload == "udp-rate" else ("0", FLOOD_LEN)
    argv = ["iperf3", "-c", ip, "-p", str(port), "-u", "-b", rate, "-l", str(length)]
    out = json.loads(client([*argv, "-t", str(round(seconds)), "-J"], seconds + 30))
    received = out["end"]["sum_received"]
    got = int(received["bytes"])
    if workload == "udp-rate":
        return received["bits_per_second"] / 1e9, got
    return got / length / received["seconds"], got


def load_udp_mode(mode: str, loaded_mode):  # -> kernel_overhead.LoadedMode
    """udp-floor or udp, loaded detached; udp is read once a second, as the agent's poll does."""
    from flowmon_agent.kernel.udp_flows import MODE_COUNT_ONLY, MODE_PORTS_ONLY, MODE_PRODUCT, UdpFlows

    kernel_mode = {"udp-floor": MODE_COUNT_ONLY, "udp": MODE_PRODUCT, "udp-ports": MODE_PORTS_ONLY}[mode]
    flows = UdpFlows(mode=kernel_mode)
    lock, stop = threading.Lock(), threading.Event()

    def poll_every_second() -> None:
        while not stop.wait(1.0):
            with lock:
                flows.read()

    def switch(on: bool) -> Callable[[], None]:
        def run() -> None:
            with lock:
                flows.configure(KernelConfig(udp=on))

        return run

    def close() -> None:
        stop.set()
        with lock:
            flows.close()

    loaded = loaded_mode(flows.bpf, switch(True), switch(False), close)
    loaded.off()
    if mode != "udp-floor":
        threading.Thread(target=poll_every_second, daemon=True).start()
    return loaded


def udp_verdicts(results) -> list[str]:
    """The UDP lines: each mode's median against no tracer, and udp's gap to its floor (the issue asks for
    both; the TCP targets are the other lines, with flowmon's UDP on)."""
    lines = []
    for w in UDP_WORKLOADS:
        res = results.get(w)
        if not res:
            continue
        for mode in ("udp-floor", "udp", "udp-ports", "flowmon"):
            if mode in res.ratio:
                tp, cost = statistics.median(res.ratio[mode]), statistics.median(res.cost[mode])  # ratios
                lines.append(
                    f"- {w}: {mode} throughput {tp:.3f}, workload CPU per unit {cost:.3f} of no tracer"
                )
        if "udp" in res.ratio and "udp-floor" in res.ratio:
            gap = 100 * (statistics.median(res.ratio["udp-floor"]) - statistics.median(res.ratio["udp"]))
            lines.append(f"- {w}: udp {gap:+.1f} points below its count-only floor")
    return lines
