"""Metadata: parsing, the store's events and indexes, the inventory file, IP resolution."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest
import yaml

from flowmon_agent.metadata import (
    InventoryError,
    MetadataStore,
    Resolver,
    load_inventory,
    parse_inventory,
    parse_object,
)
from flowmon_agent.metadata.records import NodeRecord, PodRecord, ServiceRecord
from flowmon_contract.spec import NamedNetwork
from tests.k8s_objects import job, namespace, node, owner, pod, rs, service

CLUSTER = [
    namespace("shop", env="prod"),
    node("n1", "192.0.2.1", "zone-a"),
    node("n2", "192.0.2.2", "zone-b"),
    rs("shop", "web-7d9f", "web"),
    job("shop", "report-2890", "report"),
    pod("shop", "web-7d9f-a", "10.244.0.2", "n1", [owner("ReplicaSet", "web-7d9f")], {"app": "web"}),
    pod("shop", "db-0", "10.244.0.3", "n2", [owner("StatefulSet", "db")]),
    pod("shop", "fluent-x", "10.244.0.4", "n1", [owner("DaemonSet", "fluent")]),
    pod("shop", "report-2890-q", "10.244.0.5", "n2", [owner("Job", "report-2890")]),
    pod("shop", "lonely", "10.244.0.6", "n2"),
    pod(
        "shop",
        "orphan-5c4b-z",
        "10.244.0.7",
        "n1",
        [owner("ReplicaSet", "orphan-5c4b")],
        {"pod-template-hash": "5c4b"},
    ),
    pod("shop", "batch-q", "10.244.0.8", "n1", [owner("Job", "batch")]),
    rs("shop", "bare-rs", None),
    pod("shop", "bare-rs-x", "10.244.0.9", "n1", [owner("ReplicaSet", "bare-rs")]),
    service("shop", "web", ["10.96.0.10"], ports=(80, 443)),
]


def cluster_store(**kwargs) -> MetadataStore:
    store = MetadataStore(**kwargs)
    for obj in CLUSTER:
        store.apply("ADDED", obj)
    return store


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.244.0.2", ("shop", "web", "deployment", "web-7d9f-a", "n1", "zone-a")),
        ("10.244.0.3", ("shop", "db", "statefulset", "db-0", "n2", "zone-b")),
        ("10.244.0.4", ("shop", "fluent", "daemonset", "fluent-x", "n1", "zone-a")),
        ("10.244.0.5", ("shop", "report", "cronjob", "report-2890-q", "n2", "zone-b")),
        ("10.244.0.6", ("shop", "lonely", "pod", "lonely", "n2", "zone-b")),
        # ReplicaSet not (yet) known: the pod-template-hash suffix names the Deployment.
        ("10.244.0.7", ("shop", "orphan", "deployment", "orphan-5c4b-z", "n1", "zone-a")),
        ("10.244.0.8", ("shop", "batch", "job", "batch-q", "n1", "zone-a")),
        ("10.244.0.9", ("shop", "bare-rs", "replicaset", "bare-rs-x", "n1", "zone-a")),
        ("192.0.2.2", ("", "n2", "node", "", "n2", "zone-b")),
        ("10.96.0.10", ("shop", "web", "service", "", "", "")),
        ("203.0.113.9", ("", "external", "external", "", "", "")),
    ],
)
def test_resolve_owner_chain_nodes_services_external(ip: str, expected: tuple) -> None:
    ep = Resolver(cluster_store()).endpoint(ip_address(ip))
    assert (ep.namespace, ep.workload, ep.kind, ep.pod, ep.node, ep.zone) == expected


@pytest.mark.parametrize(
    ("ip", "workload"),
    [
        ("203.0.113.9", "partner"),
        ("203.0.113.200", "partner-edge"),
        ("198.51.100.1", "external"),
        ("2001:db8::1", "v6net"),
    ],
)
def test_named_networks_most_specific_wins(ip: str, workload: str) -> None:
    networks = [
        NamedNetwork(name="partner", cidr="203.0.113.0/24"),
        NamedNetwork(name="partner-edge", cidr="203.0.113.128/25"),
        NamedNetwork(name="v6net", cidr="2001:db8::/32"),
    ]
    ep = Resolver(cluster_store()).endpoint(ip_address(ip), networks)
    assert (ep.workload, ep.kind) == (workload, "external")


def test_parse_keeps_only_needed_fields_and_skips_host_network_and_finished_pods() -> None:
    record = parse_object(pod("a", "p", "10.0.0.1", labels={"app": "x"}, owners=[owner("ReplicaSet", "r")]))
    assert isinstance(record, PodRecord)
    assert (record.namespace, record.node, dict(record.labels), record.ips) == (
        "a",
        "n1",
        {"app": "x"},
        (ip_address("10.0.0.1"),),
    )
    assert parse_object(pod("a", "h", "192.0.2.1", hostNetwork=True)).ips == ()
    assert parse_object(pod("a", "done", "10.0.0.2", phase="Succeeded")).ips == ()
    dual = pod("a", "d", "10.0.0.3")
    dual["status"]["podIPs"].append({"ip": "fd00::3"})
    assert parse_object(dual).ips == (ip_address("10.0.0.3"), ip_address("fd00::3"))
    headless = parse_object(service("a", "h", []))
    assert isinstance(headless, ServiceRecord) and headless.cluster_ips == ()
    # List items from the API server carry no kind: the caller passes it.
    bare = pod("a", "p", "10.0.0.1")
    del bare["kind"]
    assert parse_object(bare) is None and isinstance(parse_object(bare, "Pod"), PodRecord)
    assert parse_object({"kind": "ConfigMap", "metadata": {"name": "x"}}) is None
    zoned = parse_object(node("n", "192.0.2.1", "z"))
    assert (
        isinstance(zoned, NodeRecord) and zoned.zone == "z" and zoned.addresses == (ip_address("192.0.2.1"),)
    )


def test_labels_are_shared_between_pods_of_one_template() -> None:
    one = parse_object(pod("a", "p1", "10.0.0.1", labels={"app": "x", "tier": "web"}))
    two = parse_object(pod("a", "p2", "10.0.0.2", labels={"tier": "web", "app": "x"}))
    assert one.labels is two.labels


def test_events_modify_reindex_and_delete_with_grace() -> None:
    now = [100.0]
    store = cluster_store(deleted_pod_grace_seconds=30, clock=lambda: now[0])
    resolver = Resolver(store)
    ip = ip_address("10.244.0.6")
    assert resolver.endpoint(ip).pod == "lonely"
    # The pod moves to a new IP: the old one no longer names it, the new one does.
    store.apply("MODIFIED", pod("shop", "lonely", "10.244.0.60", "n2"))
    assert resolver.endpoint(ip).kind == "external"
    assert resolver.endpoint(ip_address("10.244.0.60")).pod == "lonely"
    # Deleted: still resolves during the grace period, then not.
    store.apply("DELETED", pod("shop", "lonely", "10.244.0.60", "n2"))
    assert resolver.endpoint(ip_address("10.244.0.60")).pod == "lonely"
    now[0] += 29
    assert resolver.endpoint(ip_address("10.244.0.60")).pod == "lonely"
    now[0] += 2
    assert resolver.endpoint(ip_address("10.244.0.60")).kind == "external"
    # A new pod reusing a deleted pod's IP wins at once.
    store.apply("DELETED", pod("shop", "db-0", "10.244.0.3", "n2"))
    store.apply("ADDED", pod("shop", "newcomer", "10.244.0.3", "n1"))
    assert resolver.endpoint(ip_address("10.244.0.3")).pod == "newcomer"


def test_owner_arriving_later_changes_the_workload() -> None:
    store = MetadataStore()
    store.apply("ADDED", pod("a", "api-1", "10.0.0.1", owners=[owner("ReplicaSet", "api-rs")]))
    resolver = Resolver(store)
    assert resolver.endpoint(ip_address("10.0.0.1")).kind == "replicaset"
    store.apply("ADDED", rs("a", "api-rs", "api"))
    assert (
        resolver.endpoint(ip_address("10.0.0.1")).workload,
        resolver.endpoint(ip_address("10.0.0.1")).kind,
    ) == (
        "api",
        "deployment",
    )


def test_replace_is_a_relist() -> None:
    store = cluster_store()
    keep = parse_object(pod("shop", "lonely", "10.244.0.6", "n2"))
    store.replace("Pod", [keep])
    assert [p.name for p in store.pods()] == ["lonely"]
    assert store.pod_by_ip(ip_address("10.244.0.2")) is not None  # deleted, within grace
    assert store.service_by_ip(ip_address("10.96.0.10")) is not None  # other kinds untouched


def test_service_lookup_by_ip_and_port() -> None:
    resolver = Resolver(cluster_store())
    svc = ip_address("10.96.0.10")
    assert resolver.service(svc, 80).name == "web"
    assert resolver.service(svc, 443).name == "web"
    assert resolver.service(svc, 8080) is None
    assert resolver.service(ip_address("10.244.0.2"), 80) is None
    assert resolver.store.service_ips() == {svc}


def test_inventory_yaml_multidoc_json_and_kind_list(tmp_path) -> None:
    pods = [o for o in CLUSTER if o["kind"] == "Pod"]
    others = [o for o in CLUSTER if o["kind"] != "Pod"]
    as_list = {"apiVersion": "v1", "kind": "List", "items": others[:-1]}
    # Items of a typed list as the API server returns them: without kind.
    typed_list = {
        "apiVersion": "v1",
        "kind": "PodList",
        "items": [{k: v for k, v in p.items() if k != "kind"} for p in pods],
    }
    documents = [as_list, typed_list, others[-1]]
    yaml_file = tmp_path / "inv.yaml"
    yaml_file.write_text(yaml.safe_dump_all(documents))
    json_file = tmp_path / "inv.json"
    json_file.write_text(json.dumps({"kind": "List", "items": CLUSTER}))
    for path in (yaml_file, json_file):
        resolver = Resolver(load_inventory(path))
        ep = resolver.endpoint(ip_address("10.244.0.5"))
        assert (ep.workload, ep.kind, ep.zone) == ("report", "cronjob", "zone-b")
        assert resolver.service(ip_address("10.96.0.10"), 80).name == "web"
        assert len(resolver.store.pods()) == len(pods)


def test_inventory_rejects_garbage() -> None:
    with pytest.raises(InventoryError):
        parse_inventory("- just\n- a list\n")
    with pytest.raises(InventoryError):
        parse_inventory("{unclosed")


def test_minicluster_inventory_resolves(tmp_path) -> None:
    """The lab's inventory (what standalone mode and the end-to-end test load) parses as expected."""
    from flowmon_lab import cluster_objects, cluster_plan

    spec = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("shop", {"env": "prod"})],
        nodes=[cluster_plan.NodeSpec("node-a", "zone-a"), cluster_plan.NodeSpec("node-b", "zone-b")],
        deployments=[cluster_plan.DeploymentSpec("shop", "api", 2)],
        services=[cluster_plan.ServiceSpec("shop", "api", {"app": "api"}, 80, 8080)],
    )
    plan = cluster_plan.plan_cluster(spec, "fmdt")
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump_all(cluster_objects.inventory_objects(plan)))
    resolver = Resolver(load_inventory(path))
    for p in plan.pods:
        ep = resolver.endpoint(ip_address(p.ip))
        assert (ep.namespace, ep.workload, ep.kind, ep.pod) == ("shop", "api", "deployment", p.name)
    assert resolver.service(ip_address(plan.services[0].cluster_ip), 80).name == "api"
