"""Bounded by construction, on the real kernel: peers outside the cluster's networks are folded in the
kernel key (one flow per local endpoint, server port and direction, bytes exact), cluster peers and
Service IPs stay exact, full configuration maps are counted and never raise, and the tracer's per-flow
bookkeeping returns to its baseline once flows are gone. Root (pytest.mark.root: fails, never skips).

Distinct source addresses without thousands of `ip addr`: the client pod routes a whole range to its
loopback (`ip route add local RANGE dev lo`, AnyIP), binds each socket to another address of it, and the
server pod routes the range back to it.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, ip_address, ip_network

import pytest

from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, KernelConfig, Reporter
from flowmon_agent.kernel.tracer import FlowTracer
from flowmon_lab.network import Lab, Pod

pytestmark = pytest.mark.root

EXTERNAL_RANGE = ip_network("198.18.0.0/24")  # the client's AnyIP range: never the cluster's
NAMED_RANGE = ip_network("198.18.1.0/24")  # a monitor's named network inside the client's range
ANY4 = IPv4Address(0)
_ports = itertools.count(24000)


@pytest.fixture(scope="module", autouse=True)
def bounded_sockets() -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    yield
    socket.setdefaulttimeout(previous)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab("pf", ["a", "b"]) as lab:
        a, b = lab.pod("a"), lab.pod("b")
        lab.run(a, ["ip", "route", "add", "local", "198.18.0.0/23", "dev", "lo"])
        lab.run(b, ["ip", "route", "add", "198.18.0.0/23", "via", str(a.ipv4)])
        lab.run(b, ["ip", "route", "add", "local", "203.0.113.0/24", "dev", "lo"])  # servers for a
        lab.run(a, ["ip", "route", "add", "203.0.113.0/24", "via", str(b.ipv4)])
        yield lab


def cluster_of(lab: Lab) -> frozenset:
    return frozenset(pod.ipv4 for pod in lab.pods)


def exchange(
    lab: Lab, client: Pod, server: Pod, port: int, sources: list[str], up: int, bind_to: str = ""
) -> None:
    """One connection per source address from `client` to `server`:port (or to `bind_to`, an address of
    the server's AnyIP range), `up` bytes each, then closed after the server has read them all."""
    srv = lab.socket(server)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port) if bind_to else (str(server.ipv4), port))
    srv.listen(len(sources) + 8)
    try:
        for source in sources:
            c = lab.socket(client)
            if source:
                c.bind((source, 0))
            c.connect((bind_to or str(server.ipv4), port))
            conn, _ = srv.accept()
            c.sendall(b"x" * up)
            got = 0
            while got < up:
                got += len(conn.recv(up - got))
            c.close()
            conn.close()
    finally:
        srv.close()


def wait_closed(tracer: FlowTracer, keys: list[FlowKey], closed: int, timeout: float = 10.0) -> FlowSnapshot:
    """Poll until each key reports `closed` closes (the kernel closes a socket after its last ACK); the
    caller asserts exact values on the snapshot."""
    deadline = time.monotonic() + timeout
    snap = tracer.poll()
    while not all(k in snap.flows and snap.flows[k].closed >= closed for k in keys):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        snap = tracer.poll()
    return snap


def flows_on(snap: FlowSnapshot, port: int) -> dict[FlowKey, FlowCounters]:
    return {k: c for k, c in snap.flows.items() if k.server_port == port}


def served_bytes(snap: FlowSnapshot, port: int) -> list[int]:
    return [
        c.sent_bytes
        for k, c in snap.flows.items()
        if k.server_port == port and k.reporter is Reporter.SERVER and c.closed
    ]


def test_distinct_external_clients_fold_into_one_flow_with_exact_bytes(lab: Lab) -> None:
    a, b = lab.pod("a"), lab.pod("b")
    port, n, up = next(_ports), 40, 1000
    sources = [str(EXTERNAL_RANGE.network_address + i + 1) for i in range(n)]
    config = KernelConfig(local_ips=[b.ipv4], cluster_networks=cluster_of(lab))
    with FlowTracer(config, adopt_existing=False) as t:
        exchange(lab, a, b, port, sources, up)
        folded = FlowKey(ANY4, b.ipv4, port, Reporter.SERVER, peer_prefix=0)
        snap = wait_closed(t, [folded], n)
        assert list(flows_on(snap, port)) == [folded]
        c = snap.flows[folded]
        assert (c.sent_bytes, c.opened, c.closed, c.active) == (n * up, n, n, 0)
        assert folded.peer_network == ip_network("0.0.0.0/0")


def test_cluster_peers_and_named_networks(lab: Lab) -> None:
    """A peer in the cluster stays exact; one in a monitor's named network folds to that network."""
    a, b = lab.pod("a"), lab.pod("b")
    port = next(_ports)
    named = [str(NAMED_RANGE.network_address + i + 1) for i in range(5)]
    config = KernelConfig(local_ips=[b.ipv4], cluster_networks=cluster_of(lab), fold_networks=[NAMED_RANGE])
    with FlowTracer(config, adopt_existing=False) as t:
        exchange(lab, a, b, port, ["", "", *named], 100)  # "": a's own cluster address
        exact = FlowKey(a.ipv4, b.ipv4, port, Reporter.SERVER)
        to_named = FlowKey(NAMED_RANGE.network_address, b.ipv4, port, Reporter.SERVER, peer_prefix=24)
        snap = wait_closed(t, [exact, to_named], 2)
        assert set(flows_on(snap, port)) == {exact, to_named}
        assert (snap.flows[exact].closed, snap.flows[exact].sent_bytes) == (2, 200)
        assert (snap.flows[to_named].closed, snap.flows[to_named].sent_bytes) == (5, 500)
        assert to_named.peer_network == NAMED_RANGE


def test_external_servers_fold_on_the_client_side(lab: Lab) -> None:
    a, b = lab.pod("a"), lab.pod("b")
    port, n = next(_ports), 6
    config = KernelConfig(local_ips=[a.ipv4], cluster_networks=cluster_of(lab))
    with FlowTracer(config, adopt_existing=False) as t:
        for i in range(n):
            exchange(lab, a, b, port, [""], 10, bind_to=f"203.0.113.{i + 1}")
        folded = FlowKey(a.ipv4, ANY4, port, Reporter.CLIENT, peer_prefix=0)
        snap = wait_closed(t, [folded], n)
        assert list(flows_on(snap, port)) == [folded]
        assert (snap.flows[folded].sent_bytes, snap.flows[folded].opened) == (10 * n, n)


def test_nothing_is_folded_before_the_cluster_is_known_and_nat_peers_stay_per_connection(lab: Lab) -> None:
    a, b = lab.pod("a"), lab.pod("b")
    port, nat_port = next(_ports), next(_ports)
    sources = [str(EXTERNAL_RANGE.network_address + 100 + i) for i in range(3)]
    with FlowTracer(KernelConfig(local_ips=[a.ipv4, b.ipv4]), adopt_existing=False) as t:
        exchange(lab, a, b, port, sources, 10)
        exact = [FlowKey(ip_address(s), b.ipv4, port, Reporter.SERVER) for s in sources]
        snap = wait_closed(t, exact, 1)
        assert all(snap.flows[k].sent_bytes == 10 for k in exact)
        # a Service IP (here b's address) outside every cluster network: still exact, per connection
        t.configure(replace(t.config, nat_peers=[b.ipv4], cluster_networks=frozenset()))
        exchange(lab, a, b, nat_port, [""], 10)
        snap = wait_closed(t, [FlowKey(ANY4, b.ipv4, nat_port, Reporter.SERVER, peer_prefix=0)], 1)
        clients = [k for k in flows_on(snap, nat_port) if k.reporter is Reporter.CLIENT]
        assert len(clients) == 1 and clients[0].client_port and clients[0].peer_prefix is None
        assert (clients[0].server_ip, snap.flows[clients[0]].sent_bytes) == (b.ipv4, 10)


def test_full_configuration_maps_are_counted_not_raised(lab: Lab) -> None:
    a, b = lab.pod("a"), lab.pod("b")
    port = next(_ports)
    many = [IPv4Address("10.250.0.0") + i for i in range(10)]
    config = KernelConfig(
        local_ips=[b.ipv4, *many], nat_peers=many, cluster_networks=frozenset([a.ipv4, *many])
    )
    sizes = {"LOCAL_IPS_MAX": 4, "NAT_MAX": 4, "PEER_NETS_MAX": 4}
    with FlowTracer(config, adopt_existing=False, sizes=sizes) as t:  # over capacity at start: no raise
        dropped = t.poll().dropped
        # 11 local IPs in 4; 10 NAT peers in 4; 11 cluster networks + 2 loopback in 4
        assert (dropped["local_ips_full"], dropped["nat_peers_full"], dropped["peer_nets_full"]) == (7, 6, 9)
        # an incomplete local-IP filter traces every socket: b's flows are measured all the same
        exchange(lab, a, b, port, [""], 10)
        deadline = time.monotonic() + 10
        while not (served := served_bytes(t.poll(), port)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served == [10]  # a's address may be among the refused cluster networks: folded or not
        # removes go before adds: a new set that fits replaces the old one without refusals
        t.configure(
            KernelConfig(local_ips=[b.ipv4], nat_peers=many[:4], cluster_networks=frozenset([a.ipv4]))
        )
        again = t.poll().dropped
        assert (again["local_ips_full"], again["nat_peers_full"], again["peer_nets_full"]) == (7, 6, 9)


def test_bookkeeping_returns_to_baseline_once_flows_are_gone(lab: Lab) -> None:
    a, b = lab.pod("a"), lab.pod("b")
    ports = [next(_ports) for _ in range(20)]
    now = [0.0]
    config = KernelConfig(local_ips=[a.ipv4, b.ipv4], cluster_networks=cluster_of(lab))
    with FlowTracer(config, adopt_existing=False, idle_flow_ttl_s=60.0, clock=lambda: now[0]) as t:
        t.poll()
        baseline = t.tracked()
        for port in ports:
            exchange(lab, a, b, port, [""], 10)
        keys = [FlowKey(a.ipv4, b.ipv4, p, r) for p in ports for r in Reporter]
        snap = wait_closed(t, keys, 1)
        assert all(snap.flows[k].closed == 1 for k in keys)
        assert t.tracked()["flows"] == baseline["flows"] + len(keys)
        forgotten = snap.dropped["flows_forgotten_idle"]
        now[0] += 59.0
        reported = len(t.poll().flows)
        assert t.tracked()["flows"] == reported >= len(keys)  # not yet idle for the TTL
        now[0] += 1.0
        snap = t.poll()
        assert not [k for k in snap.flows if k.server_port in ports]
        assert t.tracked() == baseline
        assert snap.dropped["flows_forgotten_idle"] == forgotten + len(keys)
        assert snap.dropped["flow_table_evicted"] == 0
        assert not [k for k in t.poll().flows if k.server_port in ports]  # deleted in the kernel too


def test_named_peers_stay_exact(lab: Lab) -> None:
    """An external address with a live DNS name (KernelConfig.named_peers, from the name table) keeps its
    own key, so its flows can carry the name; an unnamed one folds."""
    a, b = lab.pod("a"), lab.pod("b")
    port = next(_ports)
    named, other = (str(EXTERNAL_RANGE.network_address + 200 + i) for i in range(2))
    cluster = cluster_of(lab)
    config = KernelConfig(local_ips=[b.ipv4], cluster_networks=cluster, named_peers=[ip_address(named)])
    with FlowTracer(config, adopt_existing=False) as t:
        exchange(lab, a, b, port, [named, other], 10)
        exact = FlowKey(ip_address(named), b.ipv4, port, Reporter.SERVER)
        folded = FlowKey(ANY4, b.ipv4, port, Reporter.SERVER, peer_prefix=0)
        snap = wait_closed(t, [exact, folded], 1)
        assert {k: c.sent_bytes for k, c in flows_on(snap, port).items()} == {exact: 10, folded: 10}
