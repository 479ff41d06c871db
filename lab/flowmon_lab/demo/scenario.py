"""What the demo builds and runs, as data: the mini-cluster, the traffic, the queries to try. Pure.

Two namespaces of a shop in production (`shop`, `payments`), one in staging (`shop-staging`), on two
nodes in two zones, one agent per node (as the DaemonSet would run them). The traffic mix:

- steady calls: frontend → cart and frontend → payments/api, through ClusterIPs (kube-proxy DNAT);
- bursts: frontend → catalog, 30 connections with 64 KiB answers every 10 s;
- a failing dependency: cart → recommendations, whose pod listens on nothing (refused connects);
- a lossy link: settlement → ledger, with 3% of the ledger's incoming segments dropped (retransmits);
- one forbidden call: shop-staging/frontend → payments/api (staging must never reach prod).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flowmon_lab.cluster_plan import ClusterSpec, DeploymentSpec, NamespaceSpec, NodeSpec, ServiceSpec

PREFIX = "fmdemo"  # fixed, so that `flowmon demo --cleanup` finds what a killed demo left
HTTP_PORT = 8080
LEDGER_PORT = 5432
LOSS_PROBABILITY = 0.03

CLUSTER = ClusterSpec(
    namespaces=[
        NamespaceSpec("shop", {"env": "prod", "team": "shop"}),
        NamespaceSpec("payments", {"env": "prod", "team": "payments"}),
        NamespaceSpec("shop-staging", {"env": "staging", "team": "shop"}),
    ],
    deployments=[
        DeploymentSpec("shop", "frontend", 2),
        DeploymentSpec("shop", "cart", 2),
        DeploymentSpec("shop", "catalog", 2),
        DeploymentSpec("shop", "recommendations", 1),
        DeploymentSpec("payments", "api", 3),
        DeploymentSpec("payments", "ledger", 1),
        DeploymentSpec("payments", "settlement", 1),
        DeploymentSpec("shop-staging", "frontend", 1),
    ],
    services=[
        ServiceSpec("shop", "cart", {"app": "cart"}, 80, HTTP_PORT, "http"),
        ServiceSpec("shop", "catalog", {"app": "catalog"}, 80, HTTP_PORT, "http"),
        ServiceSpec("shop", "recommendations", {"app": "recommendations"}, 80, HTTP_PORT, "http"),
        ServiceSpec("payments", "api", {"app": "api"}, 80, HTTP_PORT, "http"),
        ServiceSpec("payments", "ledger", {"app": "ledger"}, LEDGER_PORT, LEDGER_PORT, "postgres"),
    ],
    nodes=[NodeSpec("node-a", "zone-a"), NodeSpec("node-b", "zone-b")],
)

# Servers: (namespace, deployment, port). recommendations has none: its connects are refused.
SERVERS = (
    ("shop", "cart", HTTP_PORT),
    ("shop", "catalog", HTTP_PORT),
    ("payments", "api", HTTP_PORT),
    ("payments", "ledger", LEDGER_PORT),
)


@dataclass(frozen=True)
class Call:
    """A client loop in every pod of namespace/deployment, towards a Service (namespace/name)."""

    client: str
    service: str
    options: str  # trafficgen `call` options
    what: str

    @property
    def client_ref(self) -> tuple[str, str]:
        namespace, _, deployment = self.client.partition("/")
        return namespace, deployment

    @property
    def service_ref(self) -> tuple[str, str]:
        namespace, _, name = self.service.partition("/")
        return namespace, name


CALLS = (
    Call("shop/frontend", "shop/cart", "--rate 4 --request 400 --response 3000", "steady"),
    Call("shop/frontend", "payments/api", "--rate 3 --request 800 --response 1200", "steady"),
    Call("shop/frontend", "shop/catalog", "--burst 30 --every 10 --request 200 --response 65536", "bursts"),
    Call("shop/cart", "shop/recommendations", "--rate 1 --timeout 1", "failing dependency"),
    Call(
        "payments/settlement",
        "payments/ledger",
        "--rate 2 --request 65536 --response 512 --timeout 5",
        "lossy",
    ),
    Call("shop-staging/frontend", "payments/api", "--count 1 --delay 3", "forbidden"),
)

# The ledger drops a few of its incoming segments: the settlement's data is retransmitted.
LOSSY = ("payments", "ledger", LEDGER_PORT, LOSS_PROBABILITY)


def trafficgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowmon_lab.demo.trafficgen", *args]


def server_argv(port: int, seconds: float) -> list[str]:
    return trafficgen("serve", "--port", str(port), "--seconds", f"{seconds:.0f}")


def call_argv(call: Call, target: str, seconds: float) -> list[str]:
    return trafficgen("call", target, *call.options.split(), "--seconds", f"{seconds:.0f}")


def loss_rule(port: int, probability: float) -> list[str]:
    return ["-A", "INPUT", "-p", "tcp", "--dport", str(port), "-m", "statistic",
            "--mode", "random", "--probability", f"{probability}", "-j", "DROP"]  # fmt: skip


SERVICE_MAP = '{flowmon_monitor="flowmon-system/service-map"}'
COST = '{flowmon_monitor="flowmon-system/cost-by-zone"}'
PAIR = "client_namespace, client_workload, server_namespace, server_workload"

# (what it shows, PromQL): printed for the user, and what the demo's test asks Prometheus.
QUERIES = (
    (
        "bytes/s per workload pair (service map)",
        f"sum by ({PAIR}) (rate(flowmon_tcp_sent_bytes_total{SERVICE_MAP}[1m]))",
    ),
    (
        "failed connects (the broken dependency)",
        f"sum by ({PAIR}, reason) (increase(flowmon_tcp_connect_failures_total{SERVICE_MAP}[5m])) > 0",
    ),
    (
        "retransmitted segments (the lossy link)",
        f"sum by ({PAIR}) (increase(flowmon_tcp_retransmits_total{SERVICE_MAP}[5m])) > 0",
    ),
    (
        "RTT p99 per pair",
        "histogram_quantile(0.99, "
        f"sum by (le, {PAIR}) (rate(flowmon_tcp_rtt_seconds_bucket{SERVICE_MAP}[1m])))",
    ),
    (
        "bytes/s between zones (cost)",
        f"sum by (client_zone, server_zone) (rate(flowmon_tcp_sent_bytes_total{COST}[1m]))",
    ),
    (
        "staging → prod connections (isolation)",
        f"sum by (from_env, to_env, {PAIR}) (flowmon_isolation_violations_total)",
    ),
)
