"""Peer folding in user space (pure): which networks the kernel keeps exact (the cluster's, from metadata),
which it folds to a monitor's named network, how a folded key decodes, resolves and aggregates (the
external bytes add up exactly), and that a monitor names a folded network only when all of it is its own.
The kernel side is tests/test_peer_fold.py."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address, ip_network

from flowmon_agent.aggregation.count_once import resolve_flow
from flowmon_agent.aggregation.tracing_scope import cluster_networks, kernel_config, outside
from flowmon_agent.kernel.config_maps import peer_nets
from flowmon_agent.kernel.flows import FlowKey, Reporter
from flowmon_agent.kernel.maps import decode_flow_key, encode_flow_key, encode_peer_net
from flowmon_agent.metadata import EXTERNAL, MetadataStore, Resolver
from tests.k8s_objects import node
from tests.test_aggregate import OBJECTS, WEB1, counters, key, monitor, policy, run, sent

C, S = Reporter.CLIENT, Reporter.SERVER
ANY4 = IPv4Address(0)


def store_of(objects: list[dict]) -> MetadataStore:
    store = MetadataStore()
    for obj in objects:
        store.apply("ADDED", obj)
    return store


def test_nothing_is_folded_until_the_cluster_is_known() -> None:
    assert cluster_networks(MetadataStore()) is None
    assert kernel_config(policy(monitor()), MetadataStore(), "n1").cluster_networks is None


def test_cluster_networks_are_pod_cidrs_plus_every_address_outside_them() -> None:
    with_cidr = node("n1", "192.0.2.1")
    with_cidr["spec"] = {"podCIDRs": ["10.0.0.0/24"]}
    others = [o for o in OBJECTS if o["metadata"]["name"] != "n1"]  # n2 stays without a CIDR
    store = store_of([*others, with_cidr])
    nets = cluster_networks(store)
    assert nets is not None
    expected_ips = {"192.0.2.1", "192.0.2.2", "10.0.1.1", "10.0.1.2", "10.0.2.1", "10.96.0.20"}
    assert nets == {ip_network("10.0.0.0/24"), *map(ip_address, expected_ips)}  # 10.0.0.x are in the CIDR
    assert cluster_networks(store) is nets  # cached until the metadata changes


def test_outside_checks_each_prefix_length_once() -> None:
    ips = [ip_address(a) for a in ("10.0.0.1", "10.1.0.1", "2001:db8::1", "2001:db9::1")]
    nets = [ip_network("10.0.0.0/16"), ip_network("2001:db8::/32")]
    assert outside(ips, nets) == [ip_address("10.1.0.1"), ip_address("2001:db9::1")]


def test_monitors_named_networks_are_folded_to_themselves() -> None:
    store = store_of(OBJECTS)
    mon = monitor(networks=[{"name": "partner", "cidr": "203.0.113.0/24"}])
    assert kernel_config(policy(mon), store, "n1").fold_networks == {ip_network("203.0.113.0/24")}


def test_cluster_networks_win_over_a_named_network_with_the_same_prefix() -> None:
    net = ip_network("10.0.0.0/24")
    content = peer_nets([net], [net, ip_network("10.9.0.0/16")])
    assert content[encode_peer_net(net, fold=False)[0]] == encode_peer_net(net, fold=False)[1]
    assert len(content) == 2


def test_a_folded_key_round_trips_through_the_kernel_layout() -> None:
    for k in (
        FlowKey(ANY4, ip_address("10.0.0.1"), 443, S, peer_prefix=0),
        FlowKey(ip_address("10.0.0.1"), ip_address("198.51.100.0"), 443, C, peer_prefix=24),
        FlowKey(ip_address("10.0.0.1"), ip_address("10.0.0.2"), 443, C),
    ):
        assert decode_flow_key(encode_flow_key(k)) == k


def test_external_bytes_add_up_exactly_through_a_folded_flow() -> None:
    """N connections from N distinct internet addresses to a pod are one folded flow: the external row of
    the cost view carries their sum, exactly as N exact flows would."""
    resolver = Resolver(store_of(OBJECTS))
    folded = FlowKey(ANY4, ip_address(WEB1), 8080, S, peer_prefix=0)
    exact = {key(f"198.51.100.{i}", WEB1, reporter=S): counters(1000 + i) for i in range(1, 51)}
    view_folded = run(
        resolver, policy(monitor()), {folded: counters(sum(c.sent_bytes for c in exact.values()))}
    )
    view_exact = run(resolver, policy(monitor()), exact)
    assert sent(view_folded) == sent(view_exact) == {("external", "web"): 50 * 1000 + 1275}
    assert resolve_flow(folded, resolver, {}).client is EXTERNAL


def test_a_monitor_names_a_folded_network_only_when_all_of_it_is_its_own() -> None:
    """The kernel folds to the most specific network of all monitors; a monitor whose own networks are
    coarser still names the flow by the one holding all of it, and one whose network is finer does not."""
    resolver = Resolver(store_of(OBJECTS))
    corp = monitor("corp", networks=[{"name": "corp", "cidr": "172.16.0.0/12"}])
    lab = monitor("lab", networks=[{"name": "lab", "cidr": "172.16.0.0/24"}])
    to_corp = FlowKey(ip_address(WEB1), ip_address("172.16.0.0"), 443, C, peer_prefix=12)
    to_lab = FlowKey(ip_address(WEB1), ip_address("172.16.0.0"), 443, C, peer_prefix=24)
    view = run(resolver, policy(corp, lab), {to_corp: counters(10), to_lab: counters(1)})
    assert sent(view, corp.key) == {("web", "corp"): 11}
    assert sent(view, lab.key) == {("web", "external"): 10, ("web", "lab"): 1}
