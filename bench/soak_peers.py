"""Soak: the agent's memory and poll time under connections from many distinct external addresses.

A real FlowTracer, aggregation and a 20,000-pod metadata store (bench/metadata_memory.py's objects) run
in this process, polled every --interval seconds as the agent's loop does (read the kernel, configure it
for the policy, build the view). Client processes in a netns open one short connection per source
address (the whole range is routed to their loopback: `ip route add local RANGE dev lo`, so any address
of it can be bound), each sending --bytes to a server pod traced here. Reports the RSS curve, poll time
percentiles, the flows the tracer holds and whether the external bytes add up exactly.

    .venv/bin/python -m bench.soak_peers [--peers 100000] [--pods 20000] [--no-fold]

--no-fold runs the same load with folding off (as before peers were folded), to show the per-peer cost
that folding removes. Bounded: the clients stop after --peers connections or --seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from ipaddress import IPv4Network

from bench.metadata_memory import collections
from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.aggregation.tracing_scope import kernel_config
from flowmon_agent.kernel.flows import Reporter
from flowmon_agent.kernel.tracer import FlowTracer
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.spec import DEFAULT_GROUP_BY, HistogramBuckets, Metric, Selection
from flowmon_lab.network import Lab, parse_snmp

SOURCES = IPv4Network("100.64.0.0/10")  # the clients' AnyIP range: 4M addresses, never the cluster's
PORT = 8080
KINDS = {
    "/api/v1/pods": "Pod",
    "/apis/apps/v1/replicasets": "ReplicaSet",
    "/api/v1/services": "Service",
    "/api/v1/nodes": "Node",
    "/api/v1/namespaces": "Namespace",
}

SERVER = """
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(4096)
def drain(c):
    while c.recv(65536): pass
    c.close()
while True:
    c, _ = srv.accept(); drain(c)
"""
# One connection per source address: first + k * step for k in range(count), `size` bytes each.
CLIENT = """
import socket, sys, time
from ipaddress import IPv4Address
server, port, first, step, count, size, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
rate = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0  # connections per second; 0: as fast as it can
payload, done, start = b"x" * size, 0, time.time()
for k in range(count):
    if time.time() > deadline: break
    if rate: time.sleep(max(0.0, start + k / rate - time.time()))
    s = socket.socket(); s.bind((str(IPv4Address(first + k * step)), 0)); s.connect((server, port))
    s.sendall(payload); s.close(); done += 1
print(done, flush=True)
"""


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def build_store(pods: int, server_ip: str) -> MetadataStore:
    store = MetadataStore()
    for path, (count, make) in collections(pods).items():
        if make is not None:
            for i in range(count):
                store.apply("ADDED", make(i), KINDS[path])
    server = {
        "metadata": {"name": "soak-server", "namespace": "team-0", "labels": {"app": "soak"}},
        "spec": {"nodeName": "node-0"},
        "status": {"phase": "Running", "podIP": server_ip},
    }
    store.apply("ADDED", server, "Pod")
    return store


def policy() -> AgentPolicy:
    everything = MonitorPolicy(
        namespace="flowmon-system",
        name="all",
        selection=Selection(),
        metrics=list(Metric),
        group_by=list(DEFAULT_GROUP_BY),
        max_series=10_000,
        series_ttl_seconds=300,
        histogram_buckets=HistogramBuckets(),
    )
    return AgentPolicy(monitors=[everything])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict:
    result: dict = {"peers_wanted": args.peers, "pods": args.pods, "fold": not args.no_fold}
    with Lab("soak", ["cli", "srv"]) as lab:
        cli, srv = lab.pod("cli"), lab.pod("srv")
        lab.run(cli, ["ip", "route", "add", "local", str(SOURCES), "dev", "lo"])
        lab.run(srv, ["ip", "route", "add", str(SOURCES), "via", str(cli.ipv4)])
        lab.sysctl(cli, "net.ipv4.tcp_tw_reuse", 1)
        result["rss_mb_start"] = round(rss_mb(), 1)
        store = build_store(args.pods, str(srv.ipv4))
        resolver, pol, aggregator = Resolver(store), policy(), Aggregator("node-0", ["node-0"])
        result["rss_mb_inventory"] = round(rss_mb(), 1)
        # the agent's tracer, as the runner makes it; this bench's own sockets (none traced) aside
        with FlowTracer(adopt_existing=False, idle_flow_ttl_s=args.idle_ttl) as tracer:
            result["rss_mb_loaded"] = round(rss_mb(), 1)

            def configure() -> None:
                config = kernel_config(pol, store, "node-0")
                config = replace(config, local_ips=frozenset([srv.ipv4]))  # the node's one traced pod
                tracer.configure(replace(config, cluster_networks=None) if args.no_fold else config)

            configure()
            lab.popen(srv, [sys.executable, "-c", SERVER, str(srv.ipv4), str(PORT)])
            time.sleep(0.5)  # the server binds: a first refused connection would only be one failed flow
            deadline = time.time() + args.seconds
            first = int(SOURCES.network_address) + 1
            clients = []
            for j in range(args.clients):  # client j: addresses first + j, + clients, + 2 clients, ...
                count = args.peers // args.clients + (1 if j < args.peers % args.clients else 0)
                argv = [str(srv.ipv4), PORT, first + j, args.clients, count, args.bytes, deadline]
                command = [sys.executable, "-c", CLIENT, *map(str, argv)]
                clients.append(lab.popen(cli, command, stdout=subprocess.PIPE, text=True))
            polls: list[float] = []
            curve: list[tuple[float, float, int]] = []
            started = time.monotonic()
            next_sample = started
            while any(c.poll() is None for c in clients) or len(polls) < 4:
                t0 = time.perf_counter()
                snap = tracer.poll()
                configure()
                aggregator.build_view(snap, pol, resolver, time.monotonic())
                polls.append(time.perf_counter() - t0)
                if time.monotonic() >= next_sample:
                    curve.append((round(time.monotonic() - started, 1), round(rss_mb(), 1), len(snap.flows)))
                    next_sample += args.sample
                time.sleep(max(0.0, args.interval - (time.perf_counter() - t0)))
            done = sum(int(c.stdout.read().strip() or 0) for c in clients)
            elapsed = time.monotonic() - started
            # the last closes: poll until every connection the clients made is counted (bounded)
            settle = time.monotonic() + 30
            while True:
                snap = tracer.poll()
                served = [
                    c
                    for k, c in snap.flows.items()
                    if k.server_port == PORT and k.reporter is Reporter.SERVER
                ]
                if sum(c.closed for c in served) >= done or time.monotonic() > settle:
                    break
                time.sleep(0.2)
            curve.append((round(time.monotonic() - started, 1), round(rss_mb(), 1), len(snap.flows)))
            with lab.inside(srv), open("/proc/thread-self/net/netstat") as f:
                tcp_ext = parse_snmp(f.read(), "TcpExt")  # a full accept queue delays connections
            result.update(
                opened=sum(c.opened for c in served),
                bytes_missing=done * args.bytes - sum(c.sent_bytes for c in served),
                listen_overflows=tcp_ext.get("ListenOverflows", 0),
                syncookies_sent=tcp_ext.get("SyncookiesSent", 0),
                peers_made=done,
                seconds=round(elapsed, 1),
                peers_per_hour=round(done / elapsed * 3600),
                server_flows=len(served),
                bytes_exact=sum(c.sent_bytes for c in served) == done * args.bytes,
                closed=sum(c.closed for c in served),
                tracked=tracer.tracked(),
                dropped={k: v for k, v in snap.dropped.items() if v},
                poll_ms_p50=round(statistics.median(polls) * 1000, 1),
                poll_ms_p99=round(percentile(polls, 0.99) * 1000, 1),
                poll_ms_max=round(max(polls) * 1000, 1),
                rss_mb_max=max(r for _, r, _ in curve),
                rss_mb_end=curve[-1][1],
                curve=curve,
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000, help="distinct source addresses (connections)")
    parser.add_argument("--pods", type=int, default=20_000)
    parser.add_argument("--bytes", type=int, default=100, help="sent per connection")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--seconds", type=float, default=900.0, help="stop the clients after this long")
    parser.add_argument("--interval", type=float, default=0.5, help="poll period")
    parser.add_argument("--sample", type=float, default=5.0, help="RSS sample period")
    parser.add_argument("--idle-ttl", type=float, default=600.0)
    parser.add_argument("--no-fold", action="store_true", help="folding off: the per-peer cost it removes")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
