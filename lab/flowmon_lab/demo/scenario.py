"""What the demo builds and runs, as data: the mini-cluster, the traffic, the queries to try. Pure.

Two namespaces of a shop in production (`shop`, `payments`), one in staging (`shop-staging`), on two
nodes in two zones, one agent per node (as the DaemonSet would run them). The traffic mix:

- steady calls: frontend → cart and frontend → payments/api, through ClusterIPs (kube-proxy DNAT);
- bursts: frontend → catalog, 30 connections with 64 KiB answers every 10 s;
- a failing dependency: cart → recommendations, whose pod listens on nothing (refused connects);
- a lossy link: settlement → ledger, with 3% of the ledger's incoming segments dropped (retransmits);
- one forbidden call: shop-staging/frontend → payments/api (staging must never reach prod);
- DNS: a resolver (Debian's dnsmasq) in a "kube-system" pod behind the kube-dns Service IP (UDP);
  frontend and settlement resolve their targets by name before each call, catalog keeps asking for
  a name that does not exist (NXDOMAIN), and settlement calls an "external" payment provider by name
  (a netns outside the inventory: `external` to flowmon, named by the answer: `server_dns_name`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flowmon_lab.cluster_plan import ClusterSpec, DeploymentSpec, NamespaceSpec, NodeSpec, ServiceSpec

PREFIX = "fmdemo"  # fixed, so that `flowmon demo --cleanup` finds what a killed demo left
HTTP_PORT = 8080
LEDGER_PORT = 5432
PROVIDER_PORT = 8443
LOSS_PROBABILITY = 0.03
CLUSTER_DOMAIN = "cluster.local"
PROVIDER_NAME = "api.payment-provider.example"
DNS_TTL = 30
# Namespaces built like the others but left out of the agents' inventory: outside the cluster.
OUTSIDE = frozenset({"internet"})

CLUSTER = ClusterSpec(
    namespaces=[
        NamespaceSpec("shop", {"env": "prod", "team": "shop"}),
        NamespaceSpec("payments", {"env": "prod", "team": "payments"}),
        NamespaceSpec("shop-staging", {"env": "staging", "team": "shop"}),
        NamespaceSpec("kube-system", {}),
        NamespaceSpec("internet", {}),
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
        DeploymentSpec("kube-system", "coredns", 1),
        DeploymentSpec("internet", "payment-provider", 1),
    ],
    services=[
        ServiceSpec("shop", "cart", {"app": "cart"}, 80, HTTP_PORT, "http"),
        ServiceSpec("shop", "catalog", {"app": "catalog"}, 80, HTTP_PORT, "http"),
        ServiceSpec("shop", "recommendations", {"app": "recommendations"}, 80, HTTP_PORT, "http"),
        ServiceSpec("payments", "api", {"app": "api"}, 80, HTTP_PORT, "http"),
        ServiceSpec("payments", "ledger", {"app": "ledger"}, LEDGER_PORT, LEDGER_PORT, "postgres"),
        ServiceSpec("kube-system", "kube-dns", {"app": "coredns"}, 53, 53, "dns", protocol="udp"),
    ],
    nodes=[NodeSpec("node-a", "zone-a"), NodeSpec("node-b", "zone-b")],
)

# Servers: (namespace, deployment, port). recommendations has none: its connects are refused.
SERVERS = (
    ("shop", "cart", HTTP_PORT),
    ("shop", "catalog", HTTP_PORT),
    ("payments", "api", HTTP_PORT),
    ("payments", "ledger", LEDGER_PORT),
    ("internet", "payment-provider", PROVIDER_PORT),
)
RESOLVER = ("kube-system", "coredns")
DNS_SERVICE = ("kube-system", "kube-dns")


@dataclass(frozen=True)
class Call:
    """A client loop in every pod of namespace/deployment, towards a Service (namespace/name)."""

    client: str
    service: str
    options: str  # trafficgen `call` options
    what: str
    name: str = ""  # resolved through kube-dns before each call, instead of the Service's ClusterIP
    port: int = 80  # with `name`

    @property
    def client_ref(self) -> tuple[str, str]:
        namespace, _, deployment = self.client.partition("/")
        return namespace, deployment

    @property
    def service_ref(self) -> tuple[str, str]:
        namespace, _, name = self.service.partition("/")
        return namespace, name


def service_name(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"


CALLS = (
    Call(
        "shop/frontend",
        "shop/cart",
        "--rate 4 --request 400 --response 3000",
        "steady, by name",
        name=service_name("shop", "cart"),
    ),
    Call(
        "shop/frontend",
        "payments/api",
        "--rate 3 --request 800 --response 1200",
        "steady, by name",
        name=service_name("payments", "api"),
    ),
    Call("shop/frontend", "shop/catalog", "--burst 30 --every 10 --request 200 --response 65536", "bursts"),
    Call("shop/cart", "shop/recommendations", "--rate 1 --timeout 1", "failing dependency"),
    Call(
        "payments/settlement",
        "payments/ledger",
        "--rate 2 --request 65536 --response 512 --timeout 5",
        "lossy",
    ),
    Call("shop-staging/frontend", "payments/api", "--count 1 --delay 3", "forbidden"),
    Call(
        "shop/catalog",
        "shop/reviews",
        "--rate 1",
        "a name that does not exist",
        name=service_name("shop", "reviews"),
    ),
    Call(
        "payments/settlement",
        "internet/payment-provider",
        "--rate 2 --request 2000 --response 300",
        "an external peer, by name",
        name=PROVIDER_NAME,
        port=PROVIDER_PORT,
    ),
)


def resolver_hosts(cluster_ips: dict[tuple[str, str], str], provider_ip: str) -> dict[str, list[str]]:
    """What the demo's resolver answers: every Service's name, and the payment provider's."""
    hosts = {service_name(ns, name): [ip] for (ns, name), ip in cluster_ips.items()}
    return {**hosts, PROVIDER_NAME: [provider_ip]}


def outside_the_cluster(obj: dict) -> bool:
    """An inventory object the agents must not know (the `internet` namespace and what is in it)."""
    meta = obj.get("metadata", {})
    return meta.get("namespace") in OUTSIDE or (
        obj.get("kind") == "Namespace" and meta.get("name") in OUTSIDE
    )


# The ledger drops a few of its incoming segments: the settlement's data is retransmitted.
LOSSY = ("payments", "ledger", LEDGER_PORT, LOSS_PROBABILITY)


def trafficgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowmon_lab.demo.trafficgen", *args]


def server_argv(port: int, seconds: float) -> list[str]:
    return trafficgen("serve", "--port", str(port), "--seconds", f"{seconds:.0f}")


def call_argv(call: Call, target: str, seconds: float, dns_server: str = "") -> list[str]:
    by_name = ["--dns", dns_server] if dns_server else []
    return trafficgen("call", target, *call.options.split(), *by_name, "--seconds", f"{seconds:.0f}")


def loss_rule(port: int, probability: float) -> list[str]:
    return ["-A", "INPUT", "-p", "tcp", "--dport", str(port), "-m", "statistic",
            "--mode", "random", "--probability", f"{probability}", "-j", "DROP"]  # fmt: skip


SERVICE_MAP = '{flowmon_monitor="flowmon-system/service-map"}'
COST = '{flowmon_monitor="flowmon-system/cost-by-zone"}'
COST_EXTERNAL = '{flowmon_monitor="flowmon-system/cost-by-zone", server_dns_name!=""}'
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
    (
        "DNS requests/s per client workload and answer code",
        "sum by (client_namespace, client_workload, rcode) "
        f"(rate(flowmon_dns_requests_total{SERVICE_MAP}[1m]))",
    ),
    (
        "DNS p99 latency per client workload",
        "histogram_quantile(0.99, sum by (le, client_namespace, client_workload) "
        f"(rate(flowmon_dns_latency_seconds_bucket{SERVICE_MAP}[1m])))",
    ),
    (
        "bytes/s to external services, by DNS name (cost)",
        f"sum by (client_namespace, server_dns_name) (rate(flowmon_tcp_sent_bytes_total{COST_EXTERNAL}[1m]))",
    ),
)
