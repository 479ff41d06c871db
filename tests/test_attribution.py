"""End to end: a netns mini-cluster, real traffic, the real tracer, metadata from a static inventory file
or from a Kubernetes API (the emulator, through the watcher), conntrack for the Service: bytes exact and
attributed to the right pods, workloads and Service, each connection counted once by two agents."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import ip_address

import pytest
import yaml

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.aggregation.tracing_scope import kernel_config, local_ip_filter
from flowmon_agent.aggregation.view import AgentView
from flowmon_agent.kernel.flows import FlowSnapshot
from flowmon_agent.kernel.tracer import FlowTracer
from flowmon_agent.metadata import MetadataStore, Resolver, load_inventory
from flowmon_agent.metadata.conntrack import ConntrackNat
from flowmon_agent.metadata.watcher import KubeWatcher
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.spec import HistogramBuckets, Selection
from flowmon_lab import cluster_plan
from flowmon_lab import minicluster as mc
from tests.test_aggregate import summed

pytestmark = pytest.mark.root

NODES = ("node-a", "node-b")
SPEC = cluster_plan.ClusterSpec(
    namespaces=[
        cluster_plan.NamespaceSpec("shop", {"env": "prod"}),
        cluster_plan.NamespaceSpec("pay", {"env": "prod"}),
    ],
    nodes=[cluster_plan.NodeSpec("node-a", "zone-a"), cluster_plan.NodeSpec("node-b", "zone-b")],
    deployments=[cluster_plan.DeploymentSpec("shop", "web", 2), cluster_plan.DeploymentSpec("pay", "api", 2)],
    services=[cluster_plan.ServiceSpec("pay", "api", {"app": "api"}, 80, 8080)],
)
HEADER, ANSWER = 8, 16  # request header (bytes to receive, bytes to send back); the backend's address

# Per connection: reads the header and that many bytes, answers its own address and the bytes asked.
SERVER = textwrap.dedent(
    """
    import socket, struct
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080)); srv.listen(64); srv.settimeout(120)
    print("listening", flush=True)
    for _ in range(1000):
        conn, _ = srv.accept()
        with conn:
            head = b""
            while len(head) < 8:
                head += conn.recv(8 - len(head))
            want, reply = struct.unpack("!II", head)
            while want:
                want -= len(conn.recv(min(want, 65536)))
            conn.sendall(conn.getsockname()[0].encode().ljust(16) + b"r" * reply)
    """
)
# argv: JSON [[target, port, send, reply], ...]; prints JSON [[backend, received], ...].
CLIENT = textwrap.dedent(
    """
    import json, socket, struct, sys
    out = []
    for target, port, send, reply in json.loads(sys.argv[1]):
        with socket.create_connection((target, port), timeout=10) as s:
            s.sendall(struct.pack("!II", send, reply) + b"s" * send)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        out.append([got[:16].decode().strip(), len(got)])
    print(json.dumps(out))
    """
)


def monitor(name: str, ns: str = "flowmon-system", tenant: str | None = None, **selection) -> MonitorPolicy:
    return MonitorPolicy(
        namespace=ns,
        name=name,
        tenant_namespace=tenant,
        selection=Selection.model_validate(selection or {"namespaces": {"include": ["shop", "pay"]}}),
        metrics=["sent_bytes", "received_bytes", "connections_opened"],
        group_by=[
            "client_namespace",
            "client_workload",
            "client_pod",
            "server_workload",
            "server_pod",
            "server_port",
            "service",
        ],
        max_series=1000,
        series_ttl_seconds=600,
        histogram_buckets=HistogramBuckets(),
    )


POLICY = AgentPolicy(monitors=[monitor("all"), monitor("team", ns="pay", tenant="pay")])


def uid_rewritten(objects: list[dict]) -> Iterator[dict]:
    """Inventory objects in creation order, for an API that assigns its own uids to owners."""
    order = ["Namespace", "Node", "Deployment", "ReplicaSet", "Pod", "Service"]
    for kind in order:
        yield from (o for o in objects if o["kind"] == kind)


def api_store(kube_api, objects: list[dict]) -> tuple[MetadataStore, KubeWatcher]:
    uids: dict[str, str] = {}
    for obj in uid_rewritten(objects):
        obj = json.loads(json.dumps(obj))
        for ref in obj["metadata"].get("ownerReferences", []):
            ref["uid"] = uids[ref["uid"]]
        old = obj["metadata"].pop("uid", None)
        created = kube_api.create(obj)
        if old:
            uids[old] = created["metadata"]["uid"]
    store = MetadataStore()
    watcher = KubeWatcher(store, kube_api.url, token=kube_api.token).start()
    assert watcher.wait_synced(10)
    return store, watcher


@pytest.fixture(scope="module")
def cluster() -> Iterator[mc.MiniCluster]:
    with mc.MiniCluster(SPEC, prefix=mc.new_prefix("fmat")) as built:
        servers = [
            built.spawn(p, [sys.executable, "-c", SERVER], stdout=-1, text=True)
            for p in built.pods_of("pay", "api")
        ]
        for server in servers:
            assert server.stdout.readline().strip() == "listening"
        yield built


@pytest.fixture(scope="module")
def tracer() -> Iterator[FlowTracer]:
    with FlowTracer() as t:
        yield t


@pytest.fixture(params=["inventory", "kube_api"])
def metadata(request, cluster, tmp_path) -> Iterator[Resolver]:
    if request.param == "inventory":
        path = tmp_path / "inventory.yaml"
        path.write_text(yaml.safe_dump_all(cluster.inventory()))
        yield Resolver(load_inventory(path))
        return
    store, watcher = api_store(request.getfixturevalue("kube_api"), cluster.inventory())
    try:
        yield Resolver(store)
    finally:
        watcher.stop()


def run_clients(cluster: mc.MiniCluster, plan: dict[str, list[tuple[str, int, int, int]]]) -> dict[str, list]:
    """Each web pod runs its connections in order; returns the answers per client pod."""
    out = {}
    for pod in cluster.pods_of("shop", "web"):
        done = cluster.exec(pod, [sys.executable, "-c", CLIENT, json.dumps(plan[pod.name])], timeout=60)
        out[pod.name] = json.loads(done.stdout)
    return out


def poll_settled(tracer: FlowTracer) -> FlowSnapshot:
    time.sleep(0.7)  # the tracer's reset grace; closes are folded at once
    return tracer.poll()


def agents_views(snapshot: FlowSnapshot, resolver: Resolver, backends=None) -> list[AgentView]:
    return [
        Aggregator(node, NODES).build_view(snapshot, POLICY, resolver, time.monotonic(), backends)
        for node in NODES
    ]


def test_pod_to_pod_bytes_exact_and_counted_once_by_two_agents(cluster, tracer, metadata: Resolver) -> None:
    """Two agents on this one kernel, as node-a and node-b: each reports the connections whose client pod
    it owns; summed, every connection appears exactly once, with the right pods and workloads."""
    store = metadata.store
    wanted = set().union(*(local_ip_filter(POLICY, store, n) for n in NODES))
    assert wanted == {ip_address(a) for p in cluster.pods for a in (p.ip, p.ip6)}
    tracer.configure(kernel_config(POLICY, store, NODES))  # what both agents would trace here
    assert tracer.config.local_ips == wanted
    web, api = cluster.pods_of("shop", "web"), cluster.pods_of("pay", "api")
    # Distinct sizes per (client, server) pair; this run's own sizes, on top of what earlier runs sent.
    before = agents_views(tracer.poll(), metadata)
    plan = {
        c.name: [
            (s.ip, 8080, 10_000 * (i + 1) + 1000 * (j + 1) + k, 300 * (j + 1) + k)
            for j, s in enumerate(api)
            for k in range(3)
        ]
        for i, c in enumerate(web)
    }
    answers = run_clients(cluster, plan)
    after = agents_views(poll_settled(tracer), metadata)
    assert all(len(a) == 6 for a in answers.values())

    def delta(metric: str) -> dict[tuple, float]:
        new, old = (
            summed(after, "flowmon-system/all")[metric],
            summed(before, "flowmon-system/all").get(metric, {}),
        )
        return {k: v - old.get(k, 0) for k, v in new.items() if v - old.get(k, 0)}

    expected_sent, expected_received, expected_opened = {}, {}, {}
    for client in web:
        for (target, _, send, reply), (backend, got) in zip(
            plan[client.name], answers[client.name], strict=True
        ):
            server = next(p for p in api if p.ip == target)
            assert backend == server.ip and got == ANSWER + reply
            labels = ("shop", "web", client.name, "api", server.name, "8080", "")
            expected_sent[labels] = expected_sent.get(labels, 0) + HEADER + send
            expected_received[labels] = expected_received.get(labels, 0) + ANSWER + reply
            expected_opened[labels] = expected_opened.get(labels, 0) + 1
    assert delta("flowmon_tcp_sent_bytes") == expected_sent
    assert delta("flowmon_tcp_received_bytes") == expected_received
    assert delta("flowmon_tcp_connections_opened") == expected_opened
    # Each agent alone reports exactly its own client pods' connections.
    for view, node in zip(after, NODES, strict=True):
        mine = {p.name for p in web if p.node == node}
        assert {k[2] for k in view.monitors["flowmon-system/all"].families[0].samples} <= mine
    # The team monitor in pay sees the same connections (they all touch pay).
    assert summed(after, "pay/team")["flowmon_tcp_sent_bytes"].keys() >= expected_sent.keys()


def test_service_traffic_attributed_to_backend_pods_with_the_service_label(cluster, tracer, metadata) -> None:
    store = metadata.store
    svc = cluster.service("pay", "api")
    tracer.configure(kernel_config(POLICY, store, NODES))
    assert ip_address(svc.cluster_ip) in tracer.config.nat_peers
    web, api = cluster.pods_of("shop", "web"), cluster.pods_of("pay", "api")
    with ConntrackNat(cluster.node_netns) as nat:
        first = tracer.poll()
        before = agents_views(first, metadata, nat.backends(first.flows))
        plan = {
            c.name: [(svc.cluster_ip, 80, 5000 + 7 * k + i, 100 + k) for k in range(12)]
            for i, c in enumerate(web)
        }
        answers = run_clients(cluster, plan)
        snapshot = poll_settled(tracer)
        backends = nat.backends(snapshot.flows)
        after = agents_views(snapshot, metadata, backends)
    # The tracer kept each connection to the ClusterIP apart, and conntrack resolved every one of them.
    per_connection = [k for k in snapshot.flows if k.client_port and str(k.server_ip) == svc.cluster_ip]
    assert len(per_connection) >= 24 and set(per_connection) <= backends.keys()
    new, old = summed(after, "flowmon-system/all"), summed(before, "flowmon-system/all")
    expected: dict[tuple, list[int]] = {}
    for client in web:
        for (_, _, send, reply), (backend, _) in zip(plan[client.name], answers[client.name], strict=True):
            server = next(p for p in api if p.ip == backend)
            labels = ("shop", "web", client.name, "api", server.name, "8080", "api")
            sums = expected.setdefault(labels, [0, 0, 0])
            sums[0] += HEADER + send
            sums[1] += ANSWER + reply
            sums[2] += 1
    assert {b for a in answers.values() for b, _ in a} == {p.ip for p in api}  # both backends reached
    for labels, (sent, received, opened) in expected.items():
        assert (
            new["flowmon_tcp_sent_bytes"][labels] - old.get("flowmon_tcp_sent_bytes", {}).get(labels, 0)
            == sent
        )
        assert (
            new["flowmon_tcp_received_bytes"][labels]
            - old.get("flowmon_tcp_received_bytes", {}).get(labels, 0)
            == received
        )
        assert (
            new["flowmon_tcp_connections_opened"][labels]
            - old.get("flowmon_tcp_connections_opened", {}).get(labels, 0)
            == opened
        )
    # Nothing of it left on the Service itself (every connection was resolved through conntrack).
    assert not [k for k in new["flowmon_tcp_sent_bytes"] if k[3] == "api" and k[4] == "" and k[6] == "api"]
