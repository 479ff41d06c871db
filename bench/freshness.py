"""Freshness: how soon a closed connection's bytes are at the agent's endpoint (target p99 ≤ 1 s).

    sudo .venv/bin/python -m bench.freshness [--connections 220] [--poll-interval 0.5]

Builds a netns mini-cluster (shop/web → shop/db), runs the real agent (kernel tracer, aggregation,
exporter, server) as a subprocess configured through FLOWMON_AGENT_* variables, then, one connection at a
time: the web pod sends a distinct number of bytes, waits for the server's FIN, closes and reports the
wall-clock time of the close; this process scrapes /metrics/shop/web every 5 ms until the cumulative
sent_bytes of web→db includes the new bytes. Freshness = first scrape showing them - close time.
A random pause between connections spreads closes uniformly over the agent's poll phase.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.waiting import wait_ready
from flowmon_agent.export.policy_store import dump_policy_json
from flowmon_contract.policy import compile_policy
from flowmon_contract.spec import FlowMonitor
from flowmon_lab.cluster_plan import ClusterSpec, DeploymentSpec, NamespaceSpec
from flowmon_lab.minicluster import MiniCluster, cleanup, new_prefix
from flowmon_lab.prometheus import free_port

SERVER = """
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 5432)); srv.listen(64)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    while conn.recv(65536):
        pass
    conn.close()
"""
CLIENT = """
import socket, sys, time
for line in sys.stdin:
    sock = socket.create_connection((sys.argv[1], 5432), timeout=10)
    sock.sendall(b"x" * int(line))
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):  # the server's FIN: the connection is over on both sides
        pass
    sock.close()
    print(repr(time.time()), flush=True)
"""
FLOW = ('client_workload="web"', 'server_workload="db"')
SCRAPE_EVERY = 0.005


def sent_bytes(conn: http.client.HTTPConnection) -> float:
    conn.request("GET", "/metrics/shop/web", headers={"Accept-Encoding": "identity"})
    body = conn.getresponse().read().decode()
    for line in body.splitlines():
        if line.startswith("flowmon_tcp_sent_bytes_total{") and all(f in line for f in FLOW):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(connections: int, poll_interval: float, tmp: Path) -> dict:
    spec = ClusterSpec(
        namespaces=[NamespaceSpec("shop")],
        deployments=[DeploymentSpec("shop", "web", replicas=1), DeploymentSpec("shop", "db", replicas=1)],
    )
    prefix = new_prefix("fb")
    monitor = FlowMonitor.model_validate({"metadata": {"namespace": "shop", "name": "web"}})
    (tmp / "policy.json").write_text(dump_policy_json(compile_policy([monitor])))
    port = free_port()
    try:
        with MiniCluster(spec, prefix=prefix) as cluster:
            (tmp / "inventory.yaml").write_text(yaml.safe_dump_all(cluster.inventory()))
            env = os.environ | {
                "FLOWMON_AGENT_LISTEN_PORT": str(port),
                "FLOWMON_AGENT_NODE_NAME": cluster.pods[0].node,
                "FLOWMON_AGENT_POLICY_FILE": str(tmp / "policy.json"),
                "FLOWMON_AGENT_INVENTORY_FILE": str(tmp / "inventory.yaml"),
                "FLOWMON_AGENT_POLL_INTERVAL_SECONDS": str(poll_interval),
                "FLOWMON_AGENT_NO_AUTH": "true",  # this process scrapes without a token, on loopback
            }
            code = "import asyncio; from flowmon_agent.runner import AgentSettings, run_agent; "
            code += "asyncio.run(run_agent(AgentSettings()))"
            agent = subprocess.Popen([sys.executable, "-c", code], env=env)
            try:
                wait_ready(port, agent)
                return measure(cluster, port, connections, poll_interval)
            finally:
                agent.terminate()
                agent.wait(timeout=20)
    finally:
        cleanup(prefix)


def measure(cluster: MiniCluster, port: int, connections: int, poll_interval: float) -> dict:
    web, db = cluster.pods_of("shop", "web")[0], cluster.pods_of("shop", "db")[0]
    server = cluster.spawn(db, ["python3", "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    client = cluster.spawn(
        web, ["python3", "-c", CLIENT, db.ip], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    rng = random.Random(7)
    expected, delays = sent_bytes(scrape), []
    for i in range(connections):
        size = 1000 + rng.randrange(100_000)
        expected += size
        client.stdin.write(f"{size}\n")
        client.stdin.flush()
        closed_at = float(client.stdout.readline())
        deadline = time.monotonic() + 10
        while sent_bytes(scrape) < expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"connection {i}: bytes not exported within 10 s")
            time.sleep(SCRAPE_EVERY)
        delays.append(time.time() - closed_at)
        time.sleep(rng.uniform(0, poll_interval))
    final = sent_bytes(scrape)
    client.stdin.close()
    return {
        "connections": connections,
        "poll_interval_s": poll_interval,
        "p50_s": round(percentile(delays, 0.50), 3),
        "p90_s": round(percentile(delays, 0.90), 3),
        "p99_s": round(percentile(delays, 0.99), 3),
        "max_s": round(max(delays), 3),
        "exact_bytes": final == expected,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=220)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.connections, args.poll_interval, Path(tmp))
    print(json.dumps(result))
    return 0 if result["p99_s"] <= 1.0 and result["exact_bytes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
