"""Churn with the tracers switched on and off inside one continuous workload: gaps to the floor in minutes.

    .venv/bin/python -m bench.churn_interleaved [--chunks 8] [--cycles 4] [--slice 2]
        [--modes floor,flowmon,agent-steady]
    .venv/bin/python -m bench.churn_interleaved --pool RUN.log [RUN.log ...]
        # the verdicts over the rounds of several saved runs (their standard output)

kernel_overhead restarts wrk for every measurement, and every start adds noise of its own: there, 3 s
measurements of churn vary by 6-10% (CV) on a noisy host, where 3 s slices of one continuous churn run vary
by 3%. Here wrk runs for a chunk (~30 s) and the persistent modes (loaded once, switched on and off in
milliseconds, frozen while off) take turns inside it, in slices: none, mode, none, mode, ..., none, each
slice after a settle that follows the switch. A cycle gives every mode one slice, in a shuffled order; a
mode's ratio is its slice's rate of accepted connections (the server namespace's PassiveOpens: one per
request) over the mean of the no-tracer slices on either side. Cycles are the rounds of kernel_overhead's
report and verdicts (median ratio, the gap to the floor and its 90% interval over cycles).

Churn only: every connection lives milliseconds, so each slice sees the tracers' steady state. Keep-alive
and bulk connections would outlive a switch, and a tracer attached to connections it did not see open
takes cheaper paths than it does in steady state; kernel_overhead measures those.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.kernel_overhead import (
    CHURN_THREADS,
    PERSISTENT_MODES,
    PORT_HTTP,
    Result,
    Tracer,
    Workbench,
    bench_lab,
    measure,
    median_iqr,
    process_tree_cpu,
    report,
    verdicts,
)

SETTLE_S = 0.25  # after a switch: the hooks' first events and the thawed process's catch-up poll


def passive_opens(snmp_text: str) -> int:
    """Pure: PassiveOpens out of /proc/PID/net/snmp (the connections that process's netns accepted)."""
    header, values = (line.split() for line in snmp_text.splitlines() if line.startswith("Tcp:"))
    return int(dict(zip(header, values, strict=True))["PassiveOpens"])


def bracketed_ratios(rates: list[float]) -> list[float]:
    """Pure: slices alternate none, mode, none, ..., none; each mode slice's rate over the mean of the
    no-tracer slices before and after it."""
    if len(rates) % 2 == 0:
        raise ValueError("slices must start and end with a no-tracer slice")
    return [rates[i] / ((rates[i - 1] + rates[i + 1]) / 2) for i in range(1, len(rates), 2)]


class Slicer:
    """Reads the workload's progress: accepted connections and its processes' CPU."""

    def __init__(self, bench: Workbench, wrk_pid: int) -> None:
        self.snmp = Path(f"/proc/{bench.servers[0]}/net/snmp")
        self.pids = [*bench.servers, wrk_pid]

    def reading(self) -> tuple[float, int, float]:
        """(monotonic time, connections accepted so far, workload CPU seconds so far)."""
        return time.monotonic(), passive_opens(self.snmp.read_text()), process_tree_cpu(self.pids)

    def slice(self, seconds: float) -> tuple[float, float]:
        """(connections per second, workload CPU seconds per connection) over the next `seconds`."""
        t0, n0, c0 = self.reading()
        time.sleep(seconds)
        t1, n1, c1 = self.reading()
        return (n1 - n0) / (t1 - t0), (c1 - c0) / max(n1 - n0, 1)


def run_chunk(
    bench: Workbench, tracers: dict[str, Tracer], order: list[str], slice_s: float, res: Result
) -> list[str]:
    """One wrk run with the modes' slices in `order`, each between no-tracer slices; per-mode lines."""
    n_slices = 2 * len(order) + 1
    seconds = round(1 + n_slices * (SETTLE_S + slice_s + 0.2) + 3)  # warm-up, slices, switches, spare
    server = bench.lab.pod("server")
    argv = ["wrk", "-H", "Connection: close", f"-t{CHURN_THREADS}", f"-c{32 * CHURN_THREADS}",
            f"-d{seconds}s", f"http://{server.ipv4}:{PORT_HTTP}/"]  # fmt: skip
    wrk = bench.lab.popen(bench.lab.pod("client"), argv, stdout=subprocess.DEVNULL)
    try:
        slicer = Slicer(bench, wrk.pid)
        time.sleep(1.0)  # connections ramp up
        rates, costs, cpu = [], [], []
        for mode in ["none", *(m for pair in zip(order, ["none"] * len(order), strict=True) for m in pair)]:
            tracer = tracers.get(mode)
            if tracer is not None:
                tracer.switch_on()
            time.sleep(SETTLE_S)
            cpu0, t0 = (tracer.cpu_seconds(), time.monotonic()) if tracer else (0.0, 0.0)
            rate, cost = slicer.slice(slice_s)
            if tracer is not None:
                cpu.append((tracer.cpu_seconds() - cpu0, time.monotonic() - t0))
                tracer.switch_off()
            rates.append(rate)
            costs.append(cost)
        if wrk.poll() is not None:
            raise RuntimeError("wrk ended before the chunk's last slice: the slices are not all churn")
    finally:
        wrk.send_signal(signal.SIGINT)
        wrk.wait(timeout=30)
    lines = []
    for i, (mode, ratio, cost, used) in enumerate(
        zip(order, bracketed_ratios(rates), bracketed_ratios(costs), cpu, strict=True)
    ):
        res.throughput.setdefault("none", []).append(rates[2 * i])
        res.throughput.setdefault(mode, []).append(rates[2 * i + 1])
        res.ratio.setdefault(mode, []).append(ratio)
        res.cost.setdefault(mode, []).append(cost)
        res.cpu.setdefault(mode, []).append(used)
        lines.append(f"{mode}={ratio:.3f}")
    return lines


def run(chunks: int, cycles: int, slice_s: float, modes: tuple[str, ...], seed: int) -> None:
    rng = random.Random(seed)
    res = Result()
    with bench_lab() as bench:
        tracers = {m: Tracer(m, bench.tmp) for m in modes}
        try:
            measure(bench, "churn", 1)  # warm-up, not recorded
            started = time.monotonic()
            for c in range(chunks):
                order = []
                for _ in range(cycles):
                    cycle = list(modes)
                    rng.shuffle(cycle)
                    order += cycle
                lines = run_chunk(bench, tracers, order, slice_s, res)
                print(f"chunk {c + 1}/{chunks} churn " + "  ".join(lines), flush=True)
            elapsed = time.monotonic() - started
        finally:
            for tracer in tracers.values():
                tracer.close()
    print(f"\nInterleaved in continuous churn: {chunks} wrk runs of {cycles} cycles; a cycle is a round.")
    report({"churn": res}, ("none", *modes), chunks * cycles, slice_s, elapsed)


def rounds_from_log(text: str) -> list[dict[str, float]]:
    """Pure: the rounds of a saved run, out of its chunk lines (each lists its mode slices' ratios in
    order, and a cycle gives every mode one slice)."""
    rounds = []
    for line in text.splitlines():
        if not line.startswith("chunk "):
            continue
        slices = [(mode, float(ratio)) for mode, ratio in re.findall(r"(\S+)=([\d.]+)", line)]
        k = len({mode for mode, _ in slices})
        for i in range(0, len(slices), k):
            cycle = dict(slices[i : i + k])
            if len(cycle) != k:
                raise ValueError(f"a cycle without every mode once: {line[:60]}...")
            rounds.append(cycle)
    return rounds


def pooled_verdicts(runs: list[str]) -> list[str]:
    """Pure: every mode's median ratio and, against the floor, the targets' verdicts over the rounds of
    saved runs pooled; a mode is paired with the floor in the rounds that have both."""
    rounds = [r for text in runs for r in rounds_from_log(text)]
    modes = sorted({m for r in rounds for m in r})
    lines = [f"Pooled: {len(rounds)} rounds from {len(runs)} runs."]
    for mode in modes:
        ratios = [r[mode] for r in rounds if mode in r]
        lines.append(f"- {mode}: {len(ratios)} rounds, {median_iqr(ratios)} of no tracer")
    for mode in (m for m in modes if m != "floor"):
        paired = [r for r in rounds if "floor" in r and mode in r]
        res = Result(ratio={"floor": [r["floor"] for r in paired], mode: [r[mode] for r in paired]})
        lines += verdicts({"churn": res})[1:]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=8, help="wrk runs")
    parser.add_argument("--cycles", type=int, default=4, help="cycles (every mode once) per wrk run")
    parser.add_argument("--slice", type=float, default=2.0, help="seconds per slice (whole: srtt epochs)")
    parser.add_argument(
        "--modes", default="floor,flowmon,agent-steady", help=f"any of {','.join(PERSISTENT_MODES)}"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pool", nargs="+", type=Path, metavar="LOG", help="saved runs' output: no run")
    args = parser.parse_args(argv)
    if args.pool:
        print("\n".join(pooled_verdicts([log.read_text() for log in args.pool])))
        return 0
    modes = tuple(m for m in args.modes.split(",") if m)
    if bad := [m for m in modes if m not in PERSISTENT_MODES]:
        parser.error(f"modes switched inside a workload must be persistent ones, not {bad}")
    run(args.chunks, args.cycles, args.slice, modes, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
