"""The mini-cluster: pure planning, kube-proxy rules, inventory; and the real thing built from netns."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowmon_lab import cluster_objects, cluster_plan
from flowmon_lab import minicluster as mc
from tests.waiting import wait_for

SPEC = cluster_plan.ClusterSpec(
    namespaces=[
        cluster_plan.NamespaceSpec("shop", {"env": "prod"}),
        cluster_plan.NamespaceSpec("payments", {"env": "prod"}),
    ],
    deployments=[
        cluster_plan.DeploymentSpec("shop", "frontend", replicas=1),
        cluster_plan.DeploymentSpec("payments", "api", replicas=2),
    ],
    services=[cluster_plan.ServiceSpec("payments", "api", {"app": "api"}, port=80, target_port=8080)],
    nodes=[cluster_plan.NodeSpec("node-a", "zone-a"), cluster_plan.NodeSpec("node-b", "zone-b")],
    pod_cidr="10.244.0.0/24",
    service_cidr="10.96.0.0/24",
)


# --- pure --------------------------------------------------------------------------------------------


def test_plan_assigns_addresses_names_nodes_and_endpoints() -> None:
    plan = cluster_plan.plan_cluster(SPEC, "fmt1")
    assert plan.gateway == "10.244.0.254" and plan.node_netns == "fmt1-sw"
    assert [p.ip for p in plan.pods] == ["10.244.0.1", "10.244.0.2", "10.244.0.3"]
    assert [p.node for p in plan.pods] == ["node-a", "node-b", "node-a"]
    assert [p.netns for p in plan.pods] == [
        "fmt1-shop-frontend-0",
        "fmt1-payments-api-0",
        "fmt1-payments-api-1",
    ]
    api = plan.pods[1]
    assert api.name.startswith(api.replicaset + "-") and api.replicaset.startswith("api-")
    assert api.labels["app"] == "api" and "pod-template-hash" in api.labels
    (svc,) = plan.services
    assert svc.cluster_ip == "10.96.0.10"
    assert [p.ip for p in svc.endpoints] == ["10.244.0.2", "10.244.0.3"]
    # Deterministic: same spec and prefix, same plan.
    assert cluster_plan.plan_cluster(SPEC, "fmt1") == plan


def test_default_addresses_depend_on_the_prefix() -> None:
    spec = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")], deployments=[cluster_plan.DeploymentSpec("a", "x", 1)]
    )
    one, two = cluster_plan.plan_cluster(spec, "fmone"), cluster_plan.plan_cluster(spec, "fmtwo")
    assert (one.pod_cidr, one.service_cidr) != (two.pod_cidr, two.service_cidr)
    assert ipaddress.ip_address(one.pods[0].ip) in ipaddress.ip_network(one.pod_cidr)
    assert ipaddress.ip_address(one.pods[0].ip6) in ipaddress.ip_network(one.pod_cidr6)


def test_plan_rejects_undeclared_namespaces_small_cidrs_and_too_many_pods() -> None:
    bad = cluster_plan.ClusterSpec(namespaces=[], deployments=[cluster_plan.DeploymentSpec("nope", "x")])
    with pytest.raises(ValueError, match="namespace 'nope' is not declared"):
        cluster_plan.plan_cluster(bad, "p")
    tiny = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")],
        deployments=[cluster_plan.DeploymentSpec("a", "x", 3)],
        pod_cidr="10.0.0.0/25",
    )
    with pytest.raises(ValueError, match="must be a /24 or larger"):
        cluster_plan.plan_cluster(tiny, "p")
    crowded = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")], deployments=[cluster_plan.DeploymentSpec("a", "x", 201)]
    )
    with pytest.raises(ValueError, match="at most 200 pods"):
        cluster_plan.plan_cluster(crowded, "p")


@pytest.mark.parametrize(
    ("endpoints", "probabilities"),
    [(1, []), (2, ["0.50000000000"]), (3, ["0.33333333333", "0.50000000000"])],
)
def test_kube_proxy_rules_spread_evenly(endpoints: int, probabilities: list[str]) -> None:
    spec = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")],
        deployments=[cluster_plan.DeploymentSpec("a", "web", endpoints)],
        services=[cluster_plan.ServiceSpec("a", "web", {"app": "web"}, 80, 8080)],
        pod_cidr="10.244.0.0/24",
        service_cidr="10.96.0.0/24",
    )
    rules = cluster_objects.kube_proxy_rules(cluster_plan.plan_cluster(spec, "p").services)
    lines = rules.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    jump = [line for line in lines if line.startswith("-A KUBE-SERVICES ")]
    assert len(jump) == 1 and "-d 10.96.0.10/32 -p tcp" in jump[0] and "--dport 80 -j KUBE-SVC-" in jump[0]
    svc_chain = jump[0].rsplit(" ", 1)[1]
    to_sep = [line for line in lines if line.startswith(f"-A {svc_chain} ")]
    assert len(to_sep) == endpoints
    assert [
        line.split("--probability ")[1].split()[0] for line in to_sep if "--probability" in line
    ] == probabilities
    dnat = [line for line in lines if "-j DNAT" in line]
    assert [line.rsplit(" ", 1)[1] for line in dnat] == [f"10.244.0.{i + 1}:8080" for i in range(endpoints)]
    # Chain names are kube-proxy's: KUBE-SVC-/KUBE-SEP- + 16 base32 characters.
    assert len(svc_chain) == len("KUBE-SVC-") + 16


def test_inventory_is_ordinary_kubernetes_objects_with_owner_chain() -> None:
    plan = cluster_plan.plan_cluster(SPEC, "fmt1")
    objects = cluster_objects.inventory_objects(plan)
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    assert sorted(by_kind) == [
        "Deployment",
        "EndpointSlice",
        "Namespace",
        "Node",
        "Pod",
        "ReplicaSet",
        "Service",
    ]
    shop = next(o for o in by_kind["Namespace"] if o["metadata"]["name"] == "shop")
    assert shop["metadata"]["labels"] == {"kubernetes.io/metadata.name": "shop", "env": "prod"}
    assert {n["metadata"]["labels"][cluster_plan.ZONE_LABEL] for n in by_kind["Node"]} == {"zone-a", "zone-b"}
    uids = {(o["kind"], o["metadata"]["name"]): o["metadata"]["uid"] for o in objects}
    pod = next(p for p in by_kind["Pod"] if p["metadata"]["namespace"] == "payments")
    assert pod["status"]["podIP"] == "10.244.0.2" and pod["spec"]["nodeName"] == "node-b"
    assert [a["ip"] for a in pod["status"]["podIPs"]] == ["10.244.0.2", plan.pods[1].ip6]
    (rs_ref,) = pod["metadata"]["ownerReferences"]
    assert rs_ref["kind"] == "ReplicaSet" and rs_ref["uid"] == uids[("ReplicaSet", rs_ref["name"])]
    rs = next(r for r in by_kind["ReplicaSet"] if r["metadata"]["name"] == rs_ref["name"])
    (dep_ref,) = rs["metadata"]["ownerReferences"]
    assert (dep_ref["kind"], dep_ref["name"]) == ("Deployment", "api")
    assert dep_ref["uid"] == uids[("Deployment", "api")]
    (svc,) = by_kind["Service"]
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and svc["spec"]["selector"] == {"app": "api"}
    (eps,) = by_kind["EndpointSlice"]
    assert [e["addresses"] for e in eps["endpoints"]] == [["10.244.0.2"], ["10.244.0.3"]]


# --- the real thing ----------------------------------------------------------------------------------

# Answers every connection with its own address, so the client learns which backend it reached.
SERVER = textwrap.dedent(
    """
    import socket, sys
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080)); srv.listen(64); srv.settimeout(60)
    for _ in range(500):
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.getsockname()[0].encode())
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    target, count, target_port, backends = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    deadline = time.monotonic() + 20
    for backend in backends:  # every backend listening: the DNAT may pick any of them
        while time.monotonic() < deadline:
            try:
                socket.create_connection((backend, target_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    for _ in range(count):
        with socket.create_connection((target, 80), timeout=2) as s:
            print(s.recv(64).decode())
    """
)


def _leftovers(prefix: str) -> list[str]:
    return mc.list_netns(prefix)


@pytest.mark.root
def test_built_cluster_routes_clusterip_to_every_backend_and_teardown_leaves_nothing() -> None:
    cluster = mc.MiniCluster(SPEC)
    prefix = cluster.prefix
    try:
        with cluster:
            assert sorted(mc.list_netns(prefix)) == sorted(cluster.netns_names)
            for pod in cluster.pods_of("payments", "api"):
                cluster.spawn(pod, [sys.executable, "-c", SERVER])
            client = cluster.pods_of("shop", "frontend")[0]
            svc = cluster.service("payments", "api")
            backends = {p.ip for p in svc.endpoints}
            argv = [sys.executable, "-c", CLIENT, svc.cluster_ip, "40", "8080", *sorted(backends)]
            out = cluster.exec(client, argv, timeout=40)
            answers = out.stdout.split()
            assert len(answers) == 40
            # Both backends answered, and only backends: the DNAT is kube-proxy's random spread.
            assert set(answers) == backends, answers
            # Connects to the ClusterIP worked, so conntrack un-DNATed the replies bridged between pods.
            rules = cluster.exec(cluster.node_netns, ["iptables-save", "-t", "nat"]).stdout
            assert "-m statistic --mode random --probability 0.50000000000" in rules
            assert (
                cluster.exec(
                    cluster.node_netns, ["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"]
                ).stdout.strip()
                == "1"
            )
            # Pods have the declared addresses and a default route via the bridge.
            addr = cluster.exec(client, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"{client.ip}/24" in addr
            spawned = [p for ns in cluster.netns_names for p in mc.netns_pids(ns)]
            assert len(spawned) == 2
        assert _leftovers(prefix) == []
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in spawned))  # killed, then reaped
    finally:
        mc.cleanup(prefix)


@pytest.mark.root
def test_failed_build_removes_what_was_created() -> None:
    # The node and the first pod get built; `ip netns add` refuses the second pod's name (a slash).
    spec = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")],
        deployments=[
            cluster_plan.DeploymentSpec("a", "ok", 1),
            cluster_plan.DeploymentSpec("a", "bad/name", 1),
        ],
    )
    cluster = mc.MiniCluster(spec)
    with pytest.raises(mc.MiniClusterError, match="netns add"):
        cluster.build()
    assert _leftovers(cluster.prefix) == []


@pytest.mark.root
def test_cleanup_after_a_crash_kills_processes_and_removes_netns() -> None:
    prefix = mc.new_prefix()
    # A separate process builds a cluster, starts a sleeper in a pod, then is SIGKILLed: no teardown ran.
    script = textwrap.dedent(
        f"""
        import sys, time
        from flowmon_lab import cluster_plan, minicluster as mc
        ns, dep = [cluster_plan.NamespaceSpec("a")], [cluster_plan.DeploymentSpec("a", "x", 2)]
        spec = cluster_plan.ClusterSpec(namespaces=ns, deployments=dep)
        c = mc.MiniCluster(spec, prefix={prefix!r}); c.build()
        # setsid: a grandchild that would survive its parent (no parent-death signal), like a daemon.
        import subprocess
        subprocess.Popen(["ip", "netns", "exec", c.pods[0].netns, "setsid", "sleep", "120"])
        print("ready", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait(timeout=5)
        names = mc.list_netns(prefix)
        assert len(names) == 3
        sleepers = wait_for(lambda: mc.netns_pids(f"{prefix}-a-x-0"))  # still running inside the pod
        assert sorted(mc.cleanup(prefix)) == sorted(names)
        assert mc.list_netns(prefix) == []
        assert all(not Path(f"/proc/{pid}").exists() for pid in sleepers)
    finally:
        proc.kill()
        mc.cleanup(prefix)
