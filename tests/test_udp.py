"""UDP per workload pair on real traffic between network namespaces: bpf/udp.c's exact bytes and datagrams
both ways (connected and unconnected sockets, IPv4 and IPv6), the client as the first datagram's sender,
roles decided afresh after the idle time, full tables counted, and the exported flowmon_udp_* series
through the agent's aggregation (count-once, tenancy). Every test needs root (fails, never skips)."""

from __future__ import annotations

import itertools
import socket
import time
from ipaddress import ip_address

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.export.collectors import render_monitor, text_exposition
from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, KernelConfig, Reporter, Transport
from flowmon_agent.kernel.udp_flows import UdpFlows
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_lab.network import Lab, Pod
from tests.k8s_objects import namespace, node, owner, pod, rs
from tests.test_aggregate import monitor, policy

pytestmark = pytest.mark.root

V4, V6 = socket.AF_INET, socket.AF_INET6
_ports = itertools.count(31000)
C, S = Reporter.CLIENT, Reporter.SERVER


@pytest.fixture(scope="module")
def lab():
    with Lab("fudp", ["a", "b"]) as lab:
        yield lab


def only(lab: Lab, **config) -> KernelConfig:
    """Only the lab's sockets: other UDP traffic on the host stays out of a test's counts."""
    return KernelConfig(local_ips=[ip for p in lab.pods for ip in (p.ipv4, p.ipv6)], **config)


@pytest.fixture(scope="module")
def udp(lab):
    with UdpFlows() as flows:
        flows.configure(only(lab))
        assert flows.attached
        yield flows


def key(client: Pod, server: Pod, family: int, port: int, reporter: Reporter) -> FlowKey:
    return FlowKey(
        ip_address(client.ip(family)), ip_address(server.ip(family)), port, reporter, protocol=Transport.UDP
    )


def udp_words(c: FlowCounters) -> tuple[int, int, int, int]:
    return (c.udp_sent_bytes, c.udp_received_bytes, c.udp_sent_datagrams, c.udp_received_datagrams)


def exchange(lab: Lab, family: int, port: int, up: list[int], down: list[int], *, connected: bool) -> None:
    """a sends `up` datagrams (sizes) to b:port, then b answers `down` datagrams to the sender's address
    with sendto (an unconnected server); a reads them with recv (connected) or recvfrom."""
    a, b = lab.pod("a"), lab.pod("b")
    with lab.socket(b, family, socket.SOCK_DGRAM) as srv, lab.socket(a, family, socket.SOCK_DGRAM) as cli:
        srv.settimeout(10)
        cli.settimeout(10)
        srv.bind((b.ip(family), port))
        target = (b.ip(family), port)
        if connected:
            cli.connect(target)
        for size in up:
            cli.send(b"u" * size) if connected else cli.sendto(b"u" * size, target)
        peer = None
        for size in up:
            data, peer = srv.recvfrom(65536)
            assert len(data) == size
        for size in down:
            srv.sendto(b"d" * size, peer)
        for size in down:
            data = cli.recv(65536) if connected else cli.recvfrom(65536)[0]
            assert len(data) == size


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
def test_bytes_and_datagrams_exact_both_ways(udp, lab, family, connected) -> None:
    port = next(_ports)
    up, down = [1, 100, 1400, 9000, 0], [7, 65000, 3]  # an empty datagram counts, bytes 0
    exchange(lab, family, port, up, down, connected=connected)
    a, b = lab.pod("a"), lab.pod("b")
    flows = udp.read()
    expected = (sum(up), sum(down), len(up), len(down))
    # Both ends' sockets are on this host: each reports the pair, from its side (count-once picks one).
    assert udp_words(flows[key(a, b, family, port, C)]) == expected
    assert udp_words(flows[key(a, b, family, port, S)]) == expected
    assert not [k for k in flows if k.server_port == port and k.client_ip != ip_address(a.ip(family))]
    assert udp.drops().flow_insert_failed == 0


def test_the_client_is_the_first_sender_whatever_the_ports(udp, lab) -> None:
    """b:high sends first to a:low; a's answers keep it the server (a port heuristic would say a)."""
    a, b = lab.pod("a"), lab.pod("b")
    low, high = next(_ports), next(_ports) + 20000
    with lab.socket(a, V4, socket.SOCK_DGRAM) as sa, lab.socket(b, V4, socket.SOCK_DGRAM) as sb:
        sa.settimeout(10)
        sb.settimeout(10)
        sa.bind((a.ip(V4), low))
        sb.bind((b.ip(V4), high))
        sb.sendto(b"x" * 10, (a.ip(V4), low))
        sa.recvfrom(100)
        for _ in range(3):
            sa.sendto(b"y" * 20, (b.ip(V4), high))
            sb.recvfrom(100)
    flows = udp.read()
    assert udp_words(flows[key(b, a, V4, low, C)]) == (10, 60, 1, 3)
    assert udp_words(flows[key(b, a, V4, low, S)]) == (10, 60, 1, 3)
    assert key(a, b, V4, high, C) not in flows and key(a, b, V4, high, S) not in flows


def test_an_idle_tuple_is_decided_afresh_and_swept(lab) -> None:
    """After UDP_IDLE_S without a datagram, whoever sends next is the client; the sweep deletes the tuples
    idle that long (the kernel's clock: waiting longer than the idle time is the event itself)."""
    a, b = lab.pod("a"), lab.pod("b")
    pa, pb = next(_ports), next(_ports)
    with UdpFlows(sizes={"UDP_IDLE_S": 1}) as flows:
        flows.configure(only(lab))
        with lab.socket(a, V4, socket.SOCK_DGRAM) as sa, lab.socket(b, V4, socket.SOCK_DGRAM) as sb:
            sb.settimeout(10)
            sa.settimeout(10)
            sa.bind((a.ip(V4), pa))
            sb.bind((b.ip(V4), pb))
            sa.sendto(b"1" * 5, (b.ip(V4), pb))  # a first: a is the client of b:pb
            sb.recvfrom(100)
            time.sleep(1.2)
            assert flows.sweep_idle_tuples() == 2  # a's tuple and b's
            sb.sendto(b"2" * 9, (a.ip(V4), pa))  # b first now: b is the client of a:pa
            sa.recvfrom(100)
        got = flows.read()
    assert udp_words(got[key(a, b, V4, pb, C)]) == udp_words(got[key(a, b, V4, pb, S)]) == (5, 0, 1, 0)
    assert udp_words(got[key(b, a, V4, pa, C)]) == udp_words(got[key(b, a, V4, pa, S)]) == (9, 0, 1, 0)


def test_full_tables_are_counted(lab) -> None:
    """16 pairs, each remembered by both ends: 32 tuples into 8 slots, 32 flow keys into an LRU of 4.
    Tuples that find no room are decided by ports (the clients' ephemeral ports are the higher)."""
    a, b = lab.pod("a"), lab.pod("b")
    ports = [next(_ports) for _ in range(16)]
    with UdpFlows(sizes={"UDP_TUPLE_MAX": 8, "UDP_FLOW_MAX": 4}) as flows:
        flows.configure(only(lab))
        for port in ports:
            with lab.socket(b, V4, socket.SOCK_DGRAM) as srv, lab.socket(a, V4, socket.SOCK_DGRAM) as cli:
                srv.settimeout(10)
                srv.bind((b.ip(V4), port))
                cli.sendto(b"z" * 33, (b.ip(V4), port))
                assert srv.recvfrom(100)[0] == b"z" * 33
        got = flows.read()
        drops = flows.drops()
    assert drops.tuple_table_full == 32 - 8
    assert drops.flow_table_evicted + len(got) == 32 - drops.flow_insert_failed
    assert drops.flow_table_evicted >= 32 - 4 - drops.flow_insert_failed > 0
    for k, c in got.items():  # what is left is right: client a, 33 bytes up
        assert (k.client_ip, udp_words(c)) == (ip_address(a.ip(V4)), (33, 0, 1, 0))


def test_keys_idle_for_the_ttl_are_forgotten_here_and_in_the_kernel(lab) -> None:
    """A pair unchanged for idle_flow_ttl_s (the injected clock) is forgotten and its kernel entry deleted:
    when it comes back it starts from zero."""
    a, b = lab.pod("a"), lab.pod("b")
    port, now = next(_ports), [0.0]
    with UdpFlows(idle_flow_ttl_s=60.0, clock=lambda: now[0]) as flows:
        flows.configure(only(lab))
        exchange(lab, V4, port, [10], [4], connected=True)
        pair = [key(a, b, V4, port, C), key(a, b, V4, port, S)]
        assert [udp_words(flows.read()[k]) for k in pair] == [(10, 4, 1, 1)] * 2
        assert flows.tracked() == 2
        now[0] += 59.0
        assert set(pair) <= flows.read().keys()  # not yet idle for the TTL
        now[0] += 1.0
        assert not set(pair) & flows.read().keys()
        assert (flows.tracked(), flows.drops().flows_forgotten_idle) == (0, 2)
        exchange(lab, V4, port, [7], [], connected=True)  # the same 5-tuple's pair again
        assert [udp_words(flows.read()[k]) for k in pair] == [(7, 0, 1, 0)] * 2  # from zero: deleted
        assert flows.drops().flow_table_evicted == 0  # deletions are not evictions


def test_keys_the_kernel_evicted_are_forgotten(lab) -> None:
    """Pairs pass through an LRU of 4 entries, read after each: what user space holds stays within the
    kernel's map, the rest is counted as gone."""
    seen: set[FlowKey] = set()
    with UdpFlows(sizes={"UDP_FLOW_MAX": 4}) as flows:
        flows.configure(only(lab))
        for _ in range(8):
            exchange(lab, V4, next(_ports), [33], [], connected=False)
            seen |= flows.read().keys()
            assert flows.tracked() <= 4
        gone = flows.drops().flows_forgotten_gone
    assert len(seen) > 4 and gone == len(seen) - flows.tracked() > 0


def lab_store(lab: Lab) -> MetadataStore:
    """a: shop/web, b: pay/statsd (both addresses of each), on node n1."""
    store = MetadataStore()
    objects = [namespace("shop"), namespace("pay"), node("n1", "192.0.2.1", "zone-a")]
    for p, ns, dep in ((lab.pod("a"), "shop", "web"), (lab.pod("b"), "pay", "statsd")):
        obj = pod(ns, f"{dep}-1", str(p.ipv4), "n1", [owner("ReplicaSet", f"{dep}-5f")], {"app": dep})
        obj["status"]["podIPs"] = [{"ip": str(p.ipv4)}, {"ip": str(p.ipv6)}]
        objects += [rs(ns, f"{dep}-5f", dep), obj]
    for obj in objects:
        store.apply("ADDED", obj)
    return store


def exported(view, monitor_key: str) -> dict[tuple[str, tuple], float]:
    text = text_exposition(render_monitor(view.monitors[monitor_key])).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("flowmon_udp_")
    }


def test_exported_once_per_pair_through_the_agents_aggregation(udp, lab) -> None:
    port = next(_ports)
    exchange(lab, V4, port, [300, 200], [50], connected=False)
    exchange(lab, V6, port, [1000], [10, 10, 10], connected=True)
    flows = {k: c for k, c in udp.read().items() if k.server_port == port}
    assert len(flows) == 4  # two families, two reporters
    everyone = monitor("all", group_by=("client_workload", "server_workload", "server_port"))
    tenant = monitor("team", ns="pay", tenant="pay", group_by=("client_workload", "server_workload"))
    stranger = monitor("other", ns="dev", tenant="dev", group_by=("client_workload",))
    pol = policy(everyone, tenant, stranger)
    view = Aggregator("n1").build_view(
        FlowSnapshot(flows, {}, "default", 0.0), pol, Resolver(lab_store(lab)), 0.0
    )
    pair = (("client_workload", "web"), ("server_port", str(port)), ("server_workload", "statsd"))
    assert exported(view, "flowmon-system/all") == {
        ("flowmon_udp_sent_bytes_total", pair): 1500.0,  # counted once: the client's socket reports
        ("flowmon_udp_received_bytes_total", pair): 80.0,
        ("flowmon_udp_sent_datagrams_total", pair): 3.0,
        ("flowmon_udp_received_datagrams_total", pair): 4.0,
    }
    assert exported(view, "pay/team")[("flowmon_udp_sent_bytes_total", pair[::2])] == 1500.0
    assert exported(view, "dev/other") == {}  # tenancy: neither end is in dev
    tcp = [f for f in view.monitors["flowmon-system/all"].families if f.info.name.startswith("flowmon_tcp_")]
    assert all(not f.samples and not f.histograms for f in tcp)  # a UDP-only pair has no TCP series


def test_distinct_external_peers_fold_into_one_flow(lab) -> None:
    """Clients outside the cluster's networks (AnyIP addresses routed to a) share one folded key on b's
    side (bpf/peer_fold.h, as TCP's), holding every datagram's bytes."""
    a, b = lab.pod("a"), lab.pod("b")
    lab.run(a, ["ip", "route", "add", "local", "198.18.0.0/24", "dev", "lo"])
    lab.run(b, ["ip", "route", "add", "198.18.0.0/24", "via", str(a.ipv4)])
    port, n = next(_ports), 20
    cluster = frozenset(ip for p in lab.pods for ip in (p.ipv4, p.ipv6))
    with UdpFlows() as flows:
        flows.configure(KernelConfig(local_ips=[b.ipv4], cluster_networks=cluster))
        with lab.socket(b, V4, socket.SOCK_DGRAM) as srv:
            srv.settimeout(10)
            srv.bind((b.ip(V4), port))
            for i in range(n):
                with lab.socket(a, V4, socket.SOCK_DGRAM) as cli:
                    cli.bind((f"198.18.0.{i + 1}", 0))
                    cli.sendto(b"e" * (10 + i), (b.ip(V4), port))
                    assert len(srv.recvfrom(100)[0]) == 10 + i
        got = {k: c for k, c in flows.read().items() if k.server_port == port}
    server = ip_address(b.ip(V4))
    folded = FlowKey(ip_address("0.0.0.0"), server, port, S, peer_prefix=0, protocol=Transport.UDP)
    assert list(got) == [folded]
    assert udp_words(got[folded]) == (sum(10 + i for i in range(n)), 0, n, 0)
