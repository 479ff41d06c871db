"""Kernel-side overhead: throughput with no tracer, a count-only BPF floor, BCC's tcplife, and flowmon.

    .venv/bin/python -m bench.kernel_overhead [--rounds 5] [--seconds 3]

Two network namespaces (client, server) on a bridge; workloads: wrk against nginx with
`Connection: close` (churn: one connection per request), wrk keep-alive (tiny requests on open
connections: the send/recv hooks dominate), iperf3 bulk. Every round runs every mode once, in a shuffled
order, so slow drift of the shared machine hits all modes alike. Reported per mode: the median over
rounds of (throughput / the same round's no-tracer throughput) and the tracer process's CPU in cores.
Also compares raw and classic tracepoints for sock_{send,recv}_length (floor and flowmon).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowmon_agent.lab import Lab

ROOT = Path(__file__).resolve().parents[1]
TCPLIFE = "/usr/sbin/tcplife-bpfcc"
MODES = ("none", "floor", "floor-classic", "tcplife", "flowmon", "flowmon-classic")
WORKLOADS = ("churn", "keepalive", "bulk")
PORT_HTTP, PORT_IPERF = 8080, 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the tracer side: one process per mode, started and stopped every round ---------------------------
def run_mode(mode: str) -> int:
    """Child process: attach the mode's BPF programs, say `ready`, keep working until stdin closes."""
    import threading

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    if mode.startswith("floor"):
        from bcc import BPF

        cflags = [f"-DFLOOR_RAW={0 if mode.endswith('classic') else 1}"]
        bpf = BPF(src_file=str(ROOT / "bench" / "count_floor.c").encode(), cflags=cflags)
        print("ready", flush=True)
        stop.wait()
        bpf.cleanup()
        return 0
    from flowmon_agent.tracer import FlowTracer

    with FlowTracer(raw=not mode.endswith("classic")) as tracer:
        print("ready", flush=True)
        while not stop.wait(1.0):
            tracer.poll()  # the agent's real once-a-second work
    return 0


@dataclass
class Tracer:
    proc: subprocess.Popen | None = None
    out: Path | None = None

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def start_tracer(mode: str, tmp: Path) -> Tracer:
    if mode == "none":
        return Tracer()
    if mode == "tcplife":
        out = tmp / "tcplife.out"
        out.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(out, "w") as f:
            proc = subprocess.Popen([TCPLIFE], stdout=f, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
            if proc.poll() is not None:
                raise RuntimeError("tcplife exited early")
            time.sleep(0.1)
        return Tracer(proc, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.kernel_overhead", "--run-mode", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"mode {mode} did not start: {line!r}")
    return Tracer(proc)


def stop_tracer(t: Tracer) -> None:
    if t.proc is None:
        return
    if t.proc.stdin:
        t.proc.stdin.close()
    else:
        t.proc.send_signal(signal.SIGINT)
    try:
        t.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        t.proc.kill()
        t.proc.wait()
    if t.out:
        t.out.unlink(missing_ok=True)


# --- workloads -----------------------------------------------------------------------------------------
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {dir}/body;
  server {{
    listen {ip}:{port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


def wrk(lab: Lab, url: str, seconds: float, close: bool) -> float:
    argv = ["wrk", "-t1", "-c32", f"-d{round(seconds)}s", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = lab.run(lab.pod("client"), argv, timeout=seconds + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"wrk output not understood: {out}")
    return float(match.group(1))


def iperf(lab: Lab, ip: str, seconds: float) -> float:
    argv = ["iperf3", "-c", ip, "-p", str(PORT_IPERF), "-t", str(round(seconds)), "-J"]
    out = json.loads(lab.run(lab.pod("client"), argv, timeout=seconds + 30).stdout)
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


@dataclass
class Result:
    throughput: dict[str, list[float]] = field(default_factory=dict)
    ratio: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def measure(lab: Lab, workload: str, seconds: float) -> float:
    server = lab.pod("server")
    if workload == "bulk":
        return iperf(lab, str(server.ipv4), seconds)
    return wrk(lab, f"http://{server.ipv4}:{PORT_HTTP}/", seconds, close=workload == "churn")


def run(rounds: int, seconds: float, modes: tuple[str, ...], workloads: tuple[str, ...], seed: int) -> None:
    rng = random.Random(seed)
    results = {w: Result() for w in workloads}
    with tempfile.TemporaryDirectory(prefix="fkb-") as tmpdir, Lab("fkb", ["client", "server"]) as lab:
        tmp = Path(tmpdir)
        client, server = lab.pod("client"), lab.pod("server")
        lab.sysctl(client, "net.ipv4.ip_local_port_range", "1024 65000")
        lab.sysctl(client, "net.ipv4.tcp_tw_reuse", 1)
        lab.sysctl(server, "net.core.somaxconn", 4096)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, ip=server.ipv4, port=PORT_HTTP))
        lab.popen(server, ["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
        lab.popen(server, ["iperf3", "-s", "-B", str(server.ipv4), "-p", str(PORT_IPERF)])
        time.sleep(1.0)
        for w in workloads:  # warm-up, not recorded
            measure(lab, w, 1)
        started = time.monotonic()
        for r in range(rounds):
            for w in workloads:
                order = list(modes)
                rng.shuffle(order)
                base = None
                got: dict[str, tuple[float, float]] = {}
                for mode in order:
                    tracer = start_tracer(mode, tmp)
                    try:
                        cpu0, t0 = tracer.cpu_seconds(), time.monotonic()
                        value = measure(lab, w, seconds)
                        cores = (tracer.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    finally:
                        stop_tracer(tracer)
                    got[mode] = (value, cores)
                base = got["none"][0]
                res = results[w]
                for mode, (value, cores) in got.items():
                    res.throughput.setdefault(mode, []).append(value)
                    res.ratio.setdefault(mode, []).append(value / base)
                    res.cpu.setdefault(mode, []).append(cores)
                line = "  ".join(f"{m}={got[m][0] / base:.3f}" for m in modes)
                print(f"round {r + 1}/{rounds} {w:9s} none={base:.1f}  {line}", flush=True)
        elapsed = time.monotonic() - started
    report(results, modes, rounds, seconds, elapsed)


def report(
    results: dict[str, Result], modes: tuple[str, ...], rounds: int, seconds: float, elapsed: float
) -> None:
    units = {"churn": "req/s", "keepalive": "req/s", "bulk": "Gbit/s"}
    print(f"\n{rounds} interleaved rounds of {seconds:g} s per mode and workload, {elapsed:.0f} s in all")
    for w, res in results.items():
        print(f"\n### {w} ({units[w]}, median of {rounds})\n")
        print("| mode | throughput | ratio to no tracer | tracer process CPU (cores) |")
        print("| --- | --- | --- | --- |")
        for mode in modes:
            if mode not in res.ratio:
                continue
            tp = statistics.median(res.throughput[mode])
            ratio = statistics.median(res.ratio[mode])
            spread = f"{min(res.ratio[mode]):.3f}-{max(res.ratio[mode]):.3f}"
            cpu = statistics.median(res.cpu[mode])
            print(f"| {mode} | {tp:,.1f} | {ratio:.3f} ({spread}) | {cpu:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="length of one measurement")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_mode:
        return run_mode(args.run_mode)
    modes = tuple(m for m in args.modes.split(",") if m)
    if "none" not in modes:
        modes = ("none", *modes)
    bad = [m for m in modes if m not in MODES] + [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if bad:
        parser.error(f"unknown modes/workloads: {bad}")
    run(args.rounds, args.seconds, modes, tuple(args.workloads.split(",")), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
