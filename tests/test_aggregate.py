"""Aggregation: table-driven tests over synthetic snapshots (selection, tenancy, groupBy, overflow, TTL,
count-once, NAT re-keying, histogram mapping, the kernel filter)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address

import pytest

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.aggregation.count_once import Share, flow_share, resolve_flow
from flowmon_agent.aggregation.series import log2_to_buckets
from flowmon_agent.aggregation.tracing_scope import TraceSet, kernel_config, local_ip_filter
from flowmon_agent.aggregation.view import AgentView, Family
from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, KernelConfig, Reporter, Transport
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_contract.alerting import IsolationAlerting
from flowmon_contract.metrics import OVERFLOW_VALUE
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.spec import HistogramBuckets, Metric, Selection
from tests.k8s_objects import namespace, node, owner, pod, rs, service

C, S = Reporter.CLIENT, Reporter.SERVER


def deployment_pod(ns: str, dep: str, index: int, ip: str, node_name: str, **labels: str) -> list[dict]:
    return [
        rs(ns, f"{dep}-5f6d", dep),
        pod(
            ns,
            f"{dep}-5f6d-{index}",
            ip,
            node_name,
            [owner("ReplicaSet", f"{dep}-5f6d")],
            {"app": dep, **labels},
        ),
    ]


OBJECTS = [
    namespace("shop", env="prod"),
    namespace("pay", env="prod"),
    namespace("dev", env="staging"),
    node("n1", "192.0.2.1", "zone-a"),
    node("n2", "192.0.2.2", "zone-b"),
    *deployment_pod("shop", "web", 1, "10.0.0.1", "n1", tier="front"),
    *deployment_pod("shop", "web", 2, "10.0.0.2", "n2", tier="front"),
    *deployment_pod("pay", "api", 1, "10.0.1.1", "n1"),
    *deployment_pod("pay", "api", 2, "10.0.1.2", "n2"),
    *deployment_pod("dev", "tool", 1, "10.0.2.1", "n1"),
    service("pay", "api", ["10.96.0.20"], ports=(80,)),
]
WEB1, WEB2, API1, API2, TOOL, SVC = "10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.2", "10.0.2.1", "10.96.0.20"
NODE1, EXT = "192.0.2.1", "203.0.113.7"


@pytest.fixture
def resolver() -> Resolver:
    store = MetadataStore()
    for obj in OBJECTS:
        store.apply("ADDED", obj)
    return Resolver(store)


def monitor(
    name: str = "m",
    ns: str = "flowmon-system",
    *,
    tenant: str | None = None,
    group_by=("client_workload", "server_workload"),
    metrics=tuple(Metric),
    max_series: int = 100,
    ttl: int = 60,
    **selection,
) -> MonitorPolicy:
    return MonitorPolicy(
        namespace=ns,
        name=name,
        tenant_namespace=tenant,
        selection=Selection.model_validate(selection),
        metrics=list(metrics),
        group_by=list(group_by),
        max_series=max_series,
        series_ttl_seconds=ttl,
        histogram_buckets=HistogramBuckets(),
    )


def policy(*monitors: MonitorPolicy) -> AgentPolicy:
    return AgentPolicy(monitors=sorted(monitors, key=lambda m: m.key))


def key(client: str, server: str, port: int = 8080, reporter: Reporter = C, client_port: int = 0) -> FlowKey:
    return FlowKey(ip_address(client), ip_address(server), port, reporter, client_port)


def counters(sent: int = 0, received: int = 0, opened: int = 0, **kw) -> FlowCounters:
    return FlowCounters.of(sent_bytes=sent, received_bytes=received, opened=opened, **kw)


def snap(flows: dict[FlowKey, FlowCounters], t: float = 0.0) -> FlowSnapshot:
    return FlowSnapshot(flows=flows, dropped={}, kernel_path="default", monotonic_time=t)


def family(view: AgentView, metric: str, mon: str = "flowmon-system/m") -> Family:
    return next(f for f in view.monitors[mon].families if f.info.name == metric)


def sent(view: AgentView, mon: str = "flowmon-system/m") -> dict[tuple[str, ...], float]:
    return family(view, "flowmon_tcp_sent_bytes", mon).samples


def summed(views: list[AgentView], mon: str = "flowmon-system/m") -> dict[str, dict[tuple, float]]:
    """Every family's samples added up over several agents' views."""
    totals: dict[str, dict[tuple, float]] = {}
    for view in views:
        for fam in view.monitors[mon].families:
            into = totals.setdefault(fam.info.name, {})
            for labels, value in fam.samples.items():
                into[labels] = into.get(labels, 0) + value
    return totals


def run(resolver, pol, flows, *, node="n1", agent_nodes=None, now=0.0, backends=None) -> AgentView:
    return Aggregator(node, agent_nodes).build_view(snap(flows), pol, resolver, now, backends)


# --- selection and tenancy ------------------------------------------------------------------------

FLOWS = {
    key(WEB1, API1): counters(100),  # shop/web → pay/api
    key(TOOL, API1): counters(20),  # dev/tool → pay/api
    key(TOOL, WEB1): counters(3),  # dev/tool → shop/web
    key(WEB1, EXT, 443): counters(4000),  # shop/web → external
    key(NODE1, WEB1, reporter=S): counters(5),  # node → shop/web (kubelet probe), server side
}


@pytest.mark.parametrize(
    ("mon", "expected"),
    [
        (
            monitor(),
            {
                ("web", "api"): 100,
                ("tool", "api"): 20,
                ("tool", "web"): 3,
                ("web", "external"): 4000,
                ("n1", "web"): 5,
            },
        ),
        (monitor(namespaces={"include": ["dev"]}), {("tool", "api"): 20, ("tool", "web"): 3}),
        (
            monitor(namespaces={"exclude": ["shop"]}),
            {("tool", "api"): 20, ("tool", "web"): 3, ("web", "api"): 100},
        ),
        (
            monitor(namespaceSelector={"matchLabels": {"env": "staging"}}),
            {("tool", "api"): 20, ("tool", "web"): 3},
        ),
        (
            monitor(podSelector={"matchLabels": {"tier": "front"}}),
            {("web", "api"): 100, ("tool", "web"): 3, ("web", "external"): 4000, ("n1", "web"): 5},
        ),
        (
            monitor(
                namespaces={"include": ["shop", "pay"]},
                podSelector={"matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]},
            ),
            {("web", "api"): 100, ("tool", "api"): 20},
        ),
        # Tenancy: a team's monitor sees only flows touching its namespace, whatever it selects.
        (monitor(ns="dev", tenant="dev"), {("tool", "api"): 20, ("tool", "web"): 3}),
        (monitor(ns="pay", tenant="pay", namespaces={"include": ["shop"]}), {("web", "api"): 100}),
        (monitor(ns="pay", tenant="pay", namespaces={"include": ["dev"]}), {("tool", "api"): 20}),
        # Named networks replace `external` for this monitor only.
        (
            monitor(
                namespaces={"include": ["shop"]}, networks=[{"name": "partner", "cidr": "203.0.113.0/24"}]
            ),
            {("web", "api"): 100, ("tool", "web"): 3, ("web", "partner"): 4000, ("n1", "web"): 5},
        ),
    ],
)
def test_selection_and_tenancy(resolver: Resolver, mon: MonitorPolicy, expected: dict) -> None:
    view = run(resolver, policy(mon), FLOWS)
    assert sent(view, mon.key) == expected


# --- groupBy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        (["server_workload"], {("api",): 150}),
        (["client_pod", "server_pod"], {("web-5f6d-1", "api-5f6d-1"): 100, ("web-5f6d-2", "api-5f6d-2"): 50}),
        (
            ["client_zone", "server_zone", "server_port"],
            {("zone-a", "zone-a", "8080"): 100, ("zone-b", "zone-b", "8080"): 50},
        ),
        (
            ["client_namespace", "client_kind", "server_namespace", "server_node"],
            {("shop", "deployment", "pay", "n1"): 100, ("shop", "deployment", "pay", "n2"): 50},
        ),
    ],
)
def test_group_by(resolver: Resolver, group_by: list[str], expected: dict) -> None:
    flows = {key(WEB1, API1): counters(100), key(WEB2, API2): counters(50)}
    # Each client pod's node's agent reports its flow: the two nodes' views add up.
    views = [run(resolver, policy(monitor(group_by=group_by)), flows, node=n) for n in ("n1", "n2")]
    assert summed(views)["flowmon_tcp_sent_bytes"] == expected
    view = views[0]
    assert family(view, "flowmon_tcp_sent_bytes").label_names == tuple(group_by)
    assert family(view, "flowmon_tcp_retransmits").label_names == (*group_by, "direction")


def test_metrics_allow_list_and_extra_labels(resolver: Resolver) -> None:
    mon = monitor(metrics=["connect_failures", "resets", "connections_active"])
    # To an external server: this agent reports everything, resets received included.
    flows = {
        key(WEB1, EXT, 443): counters(failed_refused=2, failed_timeout=1, resets_s2c=4, opened=3, closed=1)
    }
    view = run(resolver, policy(mon), flows)
    names = [f.info.name for f in view.monitors[mon.key].families]
    assert names == ["flowmon_tcp_connect_failures", "flowmon_tcp_resets", "flowmon_tcp_connections_active"]
    assert family(view, "flowmon_tcp_connect_failures").samples == {
        ("web", "external", "refused"): 2,
        ("web", "external", "timeout"): 1,
    }
    assert family(view, "flowmon_tcp_resets").samples == {
        ("web", "external", "client_to_server"): 0,
        ("web", "external", "server_to_client"): 4,
    }
    assert family(view, "flowmon_tcp_connections_active").samples == {("web", "external"): 2}


# --- overflow, TTL, monotonic counters ------------------------------------------------------------


def test_overflow_folds_extra_series_and_counts_them_once(resolver: Resolver) -> None:
    mon = monitor(group_by=["client_pod", "server_pod", "server_port"], max_series=2)
    agg = Aggregator("n1", ["n1", "n2"])
    pol = policy(mon)
    flows = {key(WEB1, API1, p): counters(10 * p) for p in (1, 2, 3, 4)}
    view = agg.build_view(snap(flows), pol, resolver, 0.0)
    samples = sent(view)
    overflow = (OVERFLOW_VALUE,) * 3
    assert len(samples) == 3 and samples[overflow] == 30 + 40
    assert view.monitors[mon.key].overflowed_total == 2 and view.monitors[mon.key].series == 3
    # Growth keeps going to the same places; members are not counted again.
    flows = {k: counters(c.sent_bytes + 1) for k, c in flows.items()}
    view = agg.build_view(snap(flows), pol, resolver, 1.0)
    assert sent(view)[overflow] == 72 and view.monitors[mon.key].overflowed_total == 2
    assert sorted(v for k, v in sent(view).items() if k != overflow) == [11, 21]


def test_ttl_expires_idle_series_and_a_return_starts_afresh(resolver: Resolver) -> None:
    mon = monitor(ttl=30)
    pol = policy(mon)
    agg = Aggregator("n1", ["n1", "n2"])
    busy, idle = key(WEB1, API1), key(TOOL, API1)
    assert sent(agg.build_view(snap({busy: counters(10), idle: counters(5)}), pol, resolver, 0.0)) == {
        ("web", "api"): 10,
        ("tool", "api"): 5,
    }
    assert sent(agg.build_view(snap({busy: counters(20), idle: counters(5)}), pol, resolver, 29.0)) == {
        ("web", "api"): 20,
        ("tool", "api"): 5,
    }
    assert sent(agg.build_view(snap({busy: counters(30), idle: counters(5)}), pol, resolver, 31.0)) == {
        ("web", "api"): 30
    }
    # The idle flow wakes up: its series comes back holding only what is new.
    assert sent(agg.build_view(snap({busy: counters(30), idle: counters(7)}), pol, resolver, 32.0)) == {
        ("web", "api"): 30,
        ("tool", "api"): 2,
    }


def test_open_connections_keep_a_series_alive(resolver: Resolver) -> None:
    pol = policy(monitor(ttl=10))
    agg = Aggregator("n1", ["n1"])
    flows = {key(WEB1, API1): counters(10, opened=1)}
    for t in (0.0, 50.0, 100.0):
        view = agg.build_view(snap(flows), pol, resolver, t)
    assert sent(view) == {("web", "api"): 10}


def test_a_poll_looks_only_at_new_changed_and_open_flows(resolver: Resolver) -> None:
    """Quiet flows (unchanged, no open connection) cost no work in a poll however many there are; a
    flow with open connections is looked at each poll (its gauge is counted afresh); the totals are the
    same as if every flow had been looked at."""
    pol = policy(monitor())
    agg = Aggregator("n1", ["n1"])
    quiet = {key(WEB1, API1, client_port=40000 + i): counters(10, opened=1, closed=1) for i in range(500)}
    live = key(TOOL, API1)
    flows = {**quiet, live: counters(7, opened=2)}
    agg.build_view(snap(flows), pol, resolver, 0.0)
    assert agg.visited == 501
    view = agg.build_view(snap(dict(flows)), pol, resolver, 1.0)
    assert agg.visited == 1  # the open one
    assert sent(view) == {("web", "api"): 5000, ("tool", "api"): 7}
    grown = key(WEB1, API1, client_port=40007)
    flows[grown] = counters(25, opened=2, closed=2)  # a new object for a changed flow
    flows[key(WEB1, API1, client_port=41000)] = counters(1, opened=1, closed=1)  # a new flow
    view = agg.build_view(snap(dict(flows)), pol, resolver, 2.0)
    assert agg.visited == 3
    assert sent(view) == {("web", "api"): 5016, ("tool", "api"): 7}
    assert family(view, "flowmon_tcp_connections_active").samples == {("web", "api"): 0, ("tool", "api"): 2}
    del flows[grown]  # gone from the tracer, then back from zero (a restart): all growth
    agg.build_view(snap(dict(flows)), pol, resolver, 3.0)
    view = agg.build_view(snap({**flows, grown: counters(4, opened=1, closed=1)}), pol, resolver, 4.0)
    assert agg.visited == 2 and sent(view)[("web", "api")] == 5020


def test_counters_stay_monotonic_when_entries_vanish_and_flows_rekey(resolver: Resolver) -> None:
    pol = policy(monitor())
    agg = Aggregator("n1", ["n1", "n2"])
    a, b = key(WEB1, API1, client_port=40001), key(WEB1, API1, client_port=40002)
    seen = []
    for t, flows in enumerate(
        [
            {a: counters(100)},
            {a: counters(150), b: counters(10)},
            {b: counters(30)},  # a closed and the kernel dropped its entry
            {b: counters(5)},  # b's entry was evicted and restarted
            {a: counters(1)},  # a's key reused by a new connection
        ]
    ):
        seen.append(sent(agg.build_view(snap(flows), pol, resolver, float(t)))[("web", "api")])
    assert seen == [100, 160, 180, 185, 186]
    # Metadata changes under a live flow: the new labels get only the growth from then on.
    resolver.store.apply(
        "MODIFIED", pod("shop", "web-5f6d-1", WEB1, "n1", [owner("ReplicaSet", "canary")], {})
    )
    view = agg.build_view(snap({a: counters(11)}), pol, resolver, 6.0)
    assert sent(view) == {("web", "api"): 186, ("canary", "api"): 10}


def test_policy_change_of_group_by_starts_the_monitor_afresh(resolver: Resolver) -> None:
    agg = Aggregator("n1", ["n1"])
    flows = {key(WEB1, API1): counters(10)}
    agg.build_view(snap(flows), policy(monitor()), resolver, 0.0)
    view = agg.build_view(
        snap({key(WEB1, API1): counters(15)}), policy(monitor(group_by=["server_port"])), resolver, 1.0
    )
    assert sent(view) == {("8080",): 5}
    assert view.policy_hash == policy(monitor(group_by=["server_port"])).hash


# --- count-once -----------------------------------------------------------------------------------

EVERYTHING = TraceSet(None)


@pytest.mark.parametrize(
    ("reporter", "client", "server", "node", "agent_nodes", "traced", "share"),
    [
        # The client socket's agent reports pod clients; other agents never do. What the server sent is
        # left to the server's agent when it traces the server.
        (C, WEB1, API2, "n1", {"n1", "n2"}, EVERYTHING, Share.ALL_BUT_SERVER_SENT),
        (C, WEB1, API2, "n1", {"n1"}, EVERYTHING, Share.FULL),
        (C, WEB1, API2, "n1", {"n1", "n2"}, TraceSet(frozenset({ip_address(WEB1)})), Share.FULL),
        (C, WEB1, EXT, "n1", {"n1", "n2"}, EVERYTHING, Share.FULL),
        (C, WEB1, API2, "n2", {"n1", "n2"}, EVERYTHING, Share.NONE),
        # The server's agent: only what the server sent when the client's agent reports the rest.
        (S, WEB1, API2, "n2", {"n1", "n2"}, EVERYTHING, Share.SERVER_SENT),
        (S, WEB1, API2, "n1", {"n1", "n2"}, EVERYTHING, Share.NONE),
        # ... fully when no agent runs on the client's node, or the client's agent does not trace it.
        (S, WEB1, API2, "n2", {"n2"}, EVERYTHING, Share.FULL),
        (S, WEB1, API2, "n2", {"n1", "n2"}, TraceSet(frozenset({ip_address(API2)})), Share.FULL),
        # Clients that are not pods (node, external): the server's agent reports them.
        (S, NODE1, API2, "n2", {"n1", "n2"}, EVERYTHING, Share.FULL),
        (S, EXT, API2, "n2", {"n1", "n2"}, EVERYTHING, Share.FULL),
        (C, NODE1, API2, "n1", {"n1", "n2"}, EVERYTHING, Share.NONE),
        (C, NODE1, EXT, "n1", {"n1", "n2"}, EVERYTHING, Share.FULL),
        (C, NODE1, API2, "n1", {"n1"}, EVERYTHING, Share.FULL),
    ],
)
def test_flow_share(resolver, reporter, client, server, node, agent_nodes, traced, share) -> None:
    flow = resolve_flow(key(client, server, reporter=reporter), resolver, {})
    assert flow_share(reporter, flow, node=node, agent_nodes=agent_nodes, traced=traced) == share


def test_one_agent_standing_for_several_nodes_reports_every_connection_once(resolver: Resolver) -> None:
    """Standalone mode: one kernel holds the sockets of every node in the inventory."""
    mon = monitor(group_by=["client_pod", "server_pod"])
    flows = {
        key(WEB1, API2, reporter=C): counters(100, opened=1),
        key(WEB1, API2, reporter=S): counters(100, opened=1),
        key(WEB2, API1, reporter=C): counters(200, opened=1),
        key(WEB2, API1, reporter=S): counters(200, opened=1),
    }
    view = Aggregator({"n1", "n2"}).build_view(snap(flows), policy(mon), resolver, 0.0)
    assert sent(view) == {("web-5f6d-1", "api-5f6d-2"): 100, ("web-5f6d-2", "api-5f6d-1"): 200}
    assert local_ip_filter(
        policy(monitor(namespaces={"include": ["pay"]})), resolver.store, {"n1", "n2"}
    ) == {
        ip_address(API1),
        ip_address(API2),
    }
    # Named after the host only, it would own none of them.
    assert sent(Aggregator("host").build_view(snap(flows), policy(mon), resolver, 0.0)) == {}


def test_two_agents_count_every_connection_once(resolver: Resolver) -> None:
    """Both sockets of every pod-to-pod connection are on 'this kernel'; two agents split them."""
    mon = monitor(group_by=["client_pod", "server_pod"])
    pairs = [(WEB1, API2, 100), (WEB2, API1, 200), (API1, API2, 300), (TOOL, WEB2, 400), (EXT, WEB1, 500)]
    flows: dict[FlowKey, FlowCounters] = {}
    for client, server, size in pairs:
        # Each socket sees the bytes both ways and counts its own retransmits and resets; on two nodes,
        # the client also counts the server's RST as received (its kernel has no traced sender).
        if client != EXT:
            flows[key(client, server, reporter=C)] = counters(
                size, size // 10, opened=1, retransmits_c2s=1, resets_s2c=1
            )
        flows[key(client, server, reporter=S)] = counters(
            size, size // 10, opened=1, retransmits_s2c=2, resets_s2c=1
        )
    views = [run(resolver, policy(mon), flows, node=n, agent_nodes=["n1", "n2"]) for n in ("n1", "n2")]
    totals = summed(views)
    pod_of = {
        WEB1: "web-5f6d-1",
        WEB2: "web-5f6d-2",
        API1: "api-5f6d-1",
        API2: "api-5f6d-2",
        TOOL: "tool-5f6d-1",
        EXT: "",
    }
    for client, server, size in pairs:
        labels = (pod_of[client], pod_of[server])
        assert totals["flowmon_tcp_sent_bytes"][labels] == size
        assert totals["flowmon_tcp_received_bytes"][labels] == size // 10
        assert totals["flowmon_tcp_connections_opened"][labels] == 1
        assert totals["flowmon_tcp_retransmits"][(*labels, "client_to_server")] == (client != EXT)
        assert totals["flowmon_tcp_retransmits"][(*labels, "server_to_client")] == 2
        assert totals["flowmon_tcp_resets"][(*labels, "server_to_client")] == 1


@pytest.mark.parametrize(
    ("policy_nodes", "configured", "expected_sent"),
    [
        # The client's node n1 runs no (ready) agent: the server's agent reports the whole connection.
        (["n2"], None, 100),
        (["n2"], ["n1", "n2"], 100),  # the operator's list wins over the agent's own setting
        # n1 has an agent: it reports the client's side, n2 only what the server sent.
        (["n1", "n2"], None, 0),
        (None, None, 0),  # no list anywhere: every known node is assumed to run an agent
        (None, ["n2"], 100),  # standalone setting, used when the policy says nothing
    ],
)
def test_agent_nodes_from_the_policy_decide_who_reports_a_connection(
    resolver: Resolver, policy_nodes, configured, expected_sent
) -> None:
    mon = monitor(group_by=["client_pod", "server_pod"])
    pol = AgentPolicy(monitors=[mon], agent_nodes=policy_nodes)
    # Only the server's socket is on n2's kernel; n1's kernel (no agent) is not read at all.
    flows = {key(WEB1, API2, reporter=S): counters(100, 10, opened=1, retransmits_s2c=2)}
    view = Aggregator("n2", configured).build_view(snap(flows), pol, resolver, 0.0)
    labels = ("web-5f6d-1", "api-5f6d-2")
    assert sent(view).get(labels, 0) == expected_sent
    assert family(view, "flowmon_tcp_retransmits").samples[(*labels, "server_to_client")] == 2


def test_policy_agent_nodes_are_sorted_unique_and_change_the_hash() -> None:
    mon = monitor()
    assert AgentPolicy(monitors=[mon]).hash != AgentPolicy(monitors=[mon], agent_nodes=["n1"]).hash
    assert AgentPolicy(monitors=[mon], agent_nodes=[]).hash != AgentPolicy(monitors=[mon]).hash
    with pytest.raises(ValueError, match="sorted and unique"):
        AgentPolicy(monitors=[mon], agent_nodes=["n2", "n1"])


# --- Service NAT ----------------------------------------------------------------------------------


def test_service_connections_rekey_to_their_backends(resolver: Resolver) -> None:
    mon = monitor(group_by=["client_workload", "server_pod", "server_port", "service"])
    one, two, lost = (key(WEB1, SVC, 80, client_port=p) for p in (40001, 40002, 40003))
    flows = {one: counters(10), two: counters(20), lost: counters(7), key(WEB1, API1): counters(1)}
    backends = {one: (ip_address(API1), 8080), two: (ip_address(API2), 8080)}
    view = run(resolver, policy(mon), flows, backends=backends, agent_nodes=["n1", "n2"])
    assert sent(view) == {
        ("web", "api-5f6d-1", "8080", "api"): 10,
        ("web", "api-5f6d-2", "8080", "api"): 20,
        # No conntrack answer: the Service stands in for the backend.
        ("web", "", "80", "api"): 7,
        ("web", "api-5f6d-1", "8080", ""): 1,
    }
    lost_flow = resolve_flow(lost, resolver, {})
    assert (lost_flow.server.kind, lost_flow.server.namespace, lost_flow.server.workload) == (
        "service",
        "pay",
        "api",
    )


# --- histograms -----------------------------------------------------------------------------------


def slots(**by_slot: int) -> list[int]:
    out = [0] * 32
    for name, count in by_slot.items():
        out[int(name[1:])] = count
    return out


@pytest.mark.parametrize(
    ("slot_counts", "bounds", "expected"),
    [
        # Bounds on slot edges are exact: slot 10 holds 512..1023 µs, all <= 1023 µs.
        (slots(s10=4, s11=2), [0.001023, 0.002047], (4, 6, 6)),
        # A bound cutting a slot counts the part below it (uniform within the slot), floored.
        (slots(s10=4), [0.000767], (2, 4)),
        (slots(s10=3), [0.0007], (1, 3)),
        # Values of 0 µs (slot 0) are below every bound; values above the last bound only in +Inf.
        (slots(s0=2, s19=5), [0.0001, 1.0], (2, 7, 7)),
        (slots(s25=1), [0.0001, 1.0, 5.0], (0, 0, 0, 1)),
        # Default RTT buckets over one value per slot: cumulative and never decreasing.
        (
            [1] * 32,
            [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
            (7, 9, 10, 13, 14, 16, 17, 19, 20, 32),
        ),
    ],
)
def test_log2_histogram_mapping(slot_counts: list[int], bounds: list[float], expected: tuple) -> None:
    value = log2_to_buckets(slot_counts, 1_500_000, bounds)
    assert value.cumulative_counts == expected
    assert value.sum_seconds == 1.5
    assert list(value.cumulative_counts) == sorted(value.cumulative_counts)


def test_histogram_families_use_the_monitors_buckets(resolver: Resolver) -> None:
    mon = monitor(metrics=["rtt", "connect_duration"])
    flows = {
        key(WEB1, API1): counters(
            opened=1,
            rtt_slots=slots(s10=2),
            rtt_sum_us=1500,
            connect_latency_slots=slots(s5=1),
            connect_latency_sum_us=20,
        )
    }
    view = run(resolver, policy(mon), flows)
    fam = family(view, "flowmon_tcp_rtt_seconds")
    assert fam.bucket_bounds == tuple(HistogramBuckets().rtt)
    value = fam.histograms[("web", "api")]
    assert value.count == 2 and value.sum_seconds == 0.0015
    assert family(view, "flowmon_tcp_connect_duration_seconds").histograms[("web", "api")].count == 1


# --- the kernel filter ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("monitors", "node_name", "expected"),
    [
        ([monitor()], "n1", None),  # cluster-wide, unrestricted: trace every socket
        ([monitor(namespaces={"include": ["pay"]})], "n1", {API1}),
        ([monitor(namespaces={"include": ["pay"]})], "n2", {API2}),
        ([monitor(namespaces={"exclude": ["pay"]})], "n1", {WEB1, TOOL}),
        ([monitor(podSelector={"matchLabels": {"tier": "front"}})], "n2", {WEB2}),
        # A team monitor selecting only its own pods traces them.
        ([monitor(ns="pay", tenant="pay", namespaces={"include": ["pay"]})], "n1", {API1}),
        # ... selecting pods elsewhere: every flow it may see has an end in its namespace.
        ([monitor(ns="pay", tenant="pay")], "n1", {API1}),
        ([monitor(ns="dev", tenant="dev", namespaces={"include": ["shop"]})], "n1", {TOOL}),
        (
            [monitor("a", namespaces={"include": ["dev"]}), monitor("b", namespaces={"include": ["shop"]})],
            "n1",
            {TOOL, WEB1},
        ),
    ],
)
def test_local_ip_filter(resolver: Resolver, monitors, node_name, expected) -> None:
    got = local_ip_filter(policy(*monitors), resolver.store, node_name)
    assert got == (None if expected is None else {ip_address(ip) for ip in expected})


def test_kernel_config_carries_the_filter_service_ips_ports_and_whether_rtt_and_udp_are_wanted(
    resolver,
) -> None:
    only_pay = monitor(namespaces={"include": ["pay"]}, metrics=["sent_bytes"])
    got = kernel_config(policy(only_pay), resolver.store, "n1", ignored_ports=[9400])
    cluster = {ip_address(ip) for ip in (WEB1, WEB2, API1, API2, TOOL, SVC, NODE1, "192.0.2.2")}
    assert got == KernelConfig(
        local_ips={ip_address(API1)},
        nat_peers={ip_address(SVC)},
        ignored_ports={9400},
        rtt=False,
        cluster_networks=frozenset(cluster),
        udp=False,
    )
    everything = kernel_config(policy(monitor()), resolver.store, ["n1", "n2"])
    assert (everything.local_ips, everything.rtt, everything.udp, everything.ignored_ports) == (
        None,
        True,
        True,
        frozenset(),
    )
    udp_only = kernel_config(policy(monitor(metrics=["udp_received_datagrams"])), resolver.store, "n1")
    assert (udp_only.rtt, udp_only.udp) == (False, True)
    named = kernel_config(policy(only_pay), resolver.store, "n1", named_peers=["192.0.2.9", "2001:db8::9"])
    assert named.named_peers == {ip_address("192.0.2.9"), ip_address("2001:db8::9")}


def test_kernel_config_refuses_ports_out_of_range() -> None:
    with pytest.raises(ValueError, match="ports must be 1-65535"):
        KernelConfig(ignored_ports=[70000])


# --- environment isolation, counted in the poll ------------------------------------------------------


def test_forbidden_environment_pairs_are_counted_in_the_monitors_view(resolver: Resolver) -> None:
    isolation = IsolationAlerting.model_validate(
        {
            "environments": [
                {"name": "staging", "namespaceSelector": {"matchLabels": {"env": "staging"}}},
                {"name": "prod", "namespaceSelector": {"matchLabels": {"env": "prod"}}},
            ],
            "forbidden": [{"from": "staging", "to": "prod"}],
        }
    )
    mon = monitor().model_copy(update={"isolation": isolation})
    agg = Aggregator("n1")
    flows = {
        key(TOOL, API1): counters(20, 5, opened=1),  # dev (staging) → pay (prod): forbidden
        key(WEB1, API1): counters(100, 7, opened=1),  # prod → prod: allowed
        key(TOOL, EXT): counters(3, opened=0, failed_refused=2),  # staging → outside any env
    }
    view = agg.build_view(snap(flows), policy(mon), resolver, 0.0)
    pair = ("staging", "prod", "dev", "tool", "pay", "api")
    assert family(view, "flowmon_isolation_violations").samples == {pair: 1.0}
    assert family(view, "flowmon_isolation_violation_bytes").samples == {pair: 25.0}
    flows[key(TOOL, API1)] = counters(20, 5, opened=1, failed_refused=3)  # three refused retries
    view = agg.build_view(snap(flows), policy(mon), resolver, 1.0)
    assert family(view, "flowmon_isolation_violations").samples == {pair: 4.0}
    without = agg.build_view(snap(flows), policy(monitor()), resolver, 2.0)
    assert all(f.info.name != "flowmon_isolation_violations" for f in without.monitors[mon.key].families)


def test_udp_and_tcp_pairs_show_only_their_own_protocols_families(resolver: Resolver) -> None:
    """A UDP flow key carries the vector's UDP words; a pair that only talks UDP has no flowmon_tcp_*
    series at 0, and the reverse; count-once drops the server's report of a UDP pair its client's agent
    reports (both ends traced on n1)."""
    udp = FlowCounters.of(
        udp_sent_bytes=120, udp_received_bytes=40, udp_sent_datagrams=3, udp_received_datagrams=1
    )
    udp_key = replace(key(WEB1, API1, 8125), protocol=Transport.UDP)
    flows = {
        udp_key: udp,
        replace(udp_key, reporter=S): udp,
        key(TOOL, API1): counters(sent=10, opened=1),
    }
    view = run(resolver, policy(monitor()), flows, node="n1")
    families = {f.info.name: f.samples for f in view.monitors["flowmon-system/m"].families}
    assert families["flowmon_udp_sent_bytes"] == {("web", "api"): 120}
    assert families["flowmon_udp_received_datagrams"] == {("web", "api"): 1}
    assert families["flowmon_tcp_sent_bytes"] == {("tool", "api"): 10}
