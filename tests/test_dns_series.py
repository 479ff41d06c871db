"""DNS requests per monitor (pure): the tracker fed packets as the kernel would hand them over, through
`DnsAggregator` into families; count-once, tenancy, selection, groupBy, maxSeries, seriesTTL and the
opt-in qname_suffix label; `server_dns_name` on flows to external peers through the flow Aggregator."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.aggregation.dns_series import DnsAggregator, DnsTotals, with_dns
from flowmon_agent.dns.codes import QTYPE_NAMES, RCODE_NAMES
from flowmon_agent.dns.tracker import DnsTracker, Packet
from flowmon_agent.kernel.counters import SENT, WIDTH, FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, Reporter
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_contract.metrics import DNS_QTYPE_VALUES, DNS_RCODE_VALUES, OVERFLOW_VALUE
from flowmon_contract.policy import compile_policy
from tests.dns_samples import answer, query
from tests.k8s_objects import namespace, node, owner, pod, rs, service
from tests.server_rig import monitor

WEB, API, DNS_POD, OTHER, KUBE_DNS = "10.0.0.1", "10.0.0.3", "10.0.0.2", "10.0.0.4", "10.96.0.10"
EXTERNAL_PEER = "203.0.113.5"
DNS_METRICS = ["dns_requests", "dns_latency"]
PAIR = ["client_namespace", "client_workload", "server_namespace", "server_workload"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store() -> MetadataStore:
    store = MetadataStore()
    for obj in (
        namespace("shop"),
        namespace("kube-system"),
        namespace("other"),
        node("n1", "192.0.2.1"),
        node("n2", "192.0.2.2"),
        rs("shop", "web-1", "web"),
        pod("shop", "web-1-a", WEB, "n1", [owner("ReplicaSet", "web-1")], labels={"app": "web"}),
        pod("shop", "api-1", API, "n2", labels={"app": "api"}),
        pod("kube-system", "dns-1", DNS_POD, "n1", labels={"app": "dns"}),
        pod("other", "x-1", OTHER, "n1"),
        service("kube-system", "kube-dns", [KUBE_DNS], ports=(53,)),
    ):
        store.apply("ADDED", obj)
    return store


class Node:
    """One agent's DNS pipeline on node n1 (n2 has no agent): tracker → DnsAggregator → families."""

    def __init__(self, *monitors) -> None:
        self.clock = Clock()
        self.tracker = DnsTracker(clock=self.clock, timeout_s=5.0)
        self.store = make_store()
        self.resolver = Resolver(self.store)
        self.policy = compile_policy(list(monitors))
        self.tracker.set_qname_suffixes(self.policy.qname_suffixes)
        self.dns = DnsAggregator()
        self.port = 40000

    def transaction(
        self,
        client: str,
        server: str,
        name: str = "db.shop.svc",
        qtype: str = "A",
        rcode: str = "NOERROR",
        *,
        seen_at: tuple[str, ...] = ("client",),
        latency: float = 0.002,
        answered: bool = True,
        addresses: tuple[str, ...] = (),
        ttl: int = 30,
    ) -> None:
        """A query and its answer as seen at the client's socket and/or the server's."""
        self.port += 1
        ident = self.port % 65536
        t = self.clock.now
        ask, reply = (
            query(name, qtype, ident),
            answer(name, qtype, ident, rcode=rcode, addresses=addresses, ttl=ttl),
        )
        for vantage in seen_at:
            at_client = vantage == "client"
            self.tracker.observe(Packet(client, self.port, server, 53, at_client, t, ask))
            if answered:
                self.tracker.observe(Packet(server, 53, client, self.port, not at_client, t + latency, reply))

    def families(self, monitor_key: str) -> dict[str, dict]:
        """{metric name: {label dict as a sorted tuple: value or (count, sum)}} of one monitor."""
        self.tracker.expire()
        totals = DnsTotals(self.tracker.requests(), self.tracker.latency())
        views = self.dns.build(
            totals, self.policy, self.resolver, self.clock.now, local={"n1"}, agent_nodes={"n1"}
        )
        out: dict[str, dict] = {}
        for family in views[monitor_key].families:
            rows = family.samples or {k: (v.count, v.sum_seconds) for k, v in family.histograms.items()}
            out[family.info.name] = {
                tuple(zip(family.label_names, k, strict=True)): v for k, v in rows.items()
            }
        return out


def row(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(labels.items())


def requests_of(node: Node, key: str) -> dict:
    return node.families(key).get("flowmon_dns_requests", {})


def test_counts_per_rcode_and_qtype_per_client_workload_and_resolver_service() -> None:
    mon = monitor("flowmon-system", "all", metrics=DNS_METRICS, aggregation={"groupBy": [*PAIR, "service"]})
    n = Node(mon)
    for _ in range(3):
        n.transaction(WEB, KUBE_DNS)
    n.transaction(WEB, KUBE_DNS, "nope.shop.svc", rcode="NXDOMAIN")
    n.transaction(WEB, KUBE_DNS, "_http._tcp.db", "SRV", rcode="SERVFAIL")
    n.transaction(WEB, KUBE_DNS, "db.shop.svc", "AAAA", answered=False)
    n.clock.now += 6  # past the tracker's 5 s deadline: the unanswered one counts as timeout
    pair = {"client_namespace": "shop", "client_workload": "web", "server_namespace": "kube-system"}
    pair |= {"server_workload": "kube-dns", "service": "kube-dns"}
    assert requests_of(n, mon.key) == {
        row(**pair, rcode="NOERROR", qtype="A"): 3.0,
        row(**pair, rcode="NXDOMAIN", qtype="A"): 1.0,
        row(**pair, rcode="SERVFAIL", qtype="SRV"): 1.0,
        row(**pair, rcode="timeout", qtype="AAAA"): 1.0,
    }
    latency = n.families(mon.key)["flowmon_dns_latency_seconds"]
    ((labels, (count, total)),) = latency.items()
    assert dict(labels) == pair and count == 5 and total == pytest.approx(5 * 0.002)
    # counters grow by what happened since: a poll with nothing new changes nothing
    n.transaction(WEB, KUBE_DNS)
    assert requests_of(n, mon.key)[row(**pair, rcode="NOERROR", qtype="A")] == 4.0


def test_each_request_counts_once_whichever_sockets_saw_it() -> None:
    """Both ends on this node: the client's view. A client on a node without an agent (n2): only the
    resolver's socket saw it, and the server's view counts it."""
    mon = monitor("flowmon-system", "all", metrics=["dns_requests"], aggregation={"groupBy": PAIR})
    n = Node(mon)
    n.transaction(WEB, DNS_POD, seen_at=("client", "server"))
    n.transaction(API, DNS_POD, seen_at=("server",))
    resolver = {"server_namespace": "kube-system", "server_workload": "dns-1"}
    assert requests_of(n, mon.key) == {
        row(client_namespace="shop", client_workload="web", **resolver, rcode="NOERROR", qtype="A"): 1.0,
        row(client_namespace="shop", client_workload="api-1", **resolver, rcode="NOERROR", qtype="A"): 1.0,
    }


def test_tenancy_and_selection_as_for_flows() -> None:
    shop = monitor("shop", "mine", metrics=["dns_requests"], aggregation={"groupBy": ["client_workload"]})
    other = monitor("other", "theirs", metrics=["dns_requests"], aggregation={"groupBy": ["client_workload"]})
    api_only = monitor(
        "flowmon-system",
        "api",
        metrics=["dns_requests"],
        selection={"podSelector": {"matchLabels": {"app": "api"}}},
        aggregation={"groupBy": ["client_workload"]},
    )
    n = Node(shop, other, api_only)
    n.transaction(WEB, KUBE_DNS)
    n.transaction(OTHER, KUBE_DNS, rcode="NXDOMAIN")
    assert requests_of(n, shop.key) == {row(client_workload="web", rcode="NOERROR", qtype="A"): 1.0}
    assert requests_of(n, other.key) == {row(client_workload="x-1", rcode="NXDOMAIN", qtype="A"): 1.0}
    assert requests_of(n, api_only.key) == {}  # neither end is an api pod


def test_max_series_folds_new_label_sets_into_overflow_keeping_rcode_and_qtype() -> None:
    mon = monitor(
        "flowmon-system", "capped", metrics=["dns_requests"], aggregation={"groupBy": PAIR, "maxSeries": 1}
    )
    n = Node(mon)
    n.transaction(WEB, KUBE_DNS)
    n.transaction(OTHER, KUBE_DNS)
    n.transaction(OTHER, KUBE_DNS, rcode="REFUSED")
    rows = requests_of(n, mon.key)
    over = dict.fromkeys(PAIR, OVERFLOW_VALUE)
    assert rows[row(**over, rcode="NOERROR", qtype="A")] == 1.0
    assert rows[row(**over, rcode="REFUSED", qtype="A")] == 1.0
    assert len(rows) == 3  # the first pair, and the overflow rows per rcode


def test_qname_suffix_label_is_opt_in_and_bounded_by_the_monitor_list() -> None:
    labelled = monitor(
        "flowmon-system",
        "suffixes",
        metrics=["dns_requests"],
        aggregation={"groupBy": ["client_workload"]},
        dns={"qnameSuffixes": ["payment-provider.example", "svc.cluster.local"]},
    )
    narrower = monitor(
        "flowmon-system",
        "narrow",
        metrics=["dns_requests"],
        aggregation={"groupBy": ["client_workload"]},
        dns={"qnameSuffixes": ["example"]},
    )
    plain = monitor(
        "flowmon-system", "plain", metrics=["dns_requests"], aggregation={"groupBy": ["client_workload"]}
    )
    n = Node(labelled, narrower, plain)
    n.transaction(WEB, KUBE_DNS, "api.payment-provider.example")
    n.transaction(WEB, KUBE_DNS, "db.shop.svc.cluster.local")
    n.transaction(WEB, KUBE_DNS, "notpayment-provider.example")  # not at a label boundary
    assert requests_of(n, labelled.key) == {
        row(client_workload="web", rcode="NOERROR", qtype="A", qname_suffix="payment-provider.example"): 1.0,
        row(client_workload="web", rcode="NOERROR", qtype="A", qname_suffix="svc.cluster.local"): 1.0,
        row(client_workload="web", rcode="NOERROR", qtype="A", qname_suffix="other"): 1.0,
    }
    assert requests_of(n, narrower.key) == {
        row(client_workload="web", rcode="NOERROR", qtype="A", qname_suffix="example"): 2.0,
        row(client_workload="web", rcode="NOERROR", qtype="A", qname_suffix="other"): 1.0,
    }
    assert requests_of(n, plain.key) == {row(client_workload="web", rcode="NOERROR", qtype="A"): 3.0}
    with pytest.raises(ValueError, match="twice"):
        monitor("shop", "x", dns={"qnameSuffixes": ["a.example", "a.example"]})
    with pytest.raises(ValueError):
        monitor("shop", "x", dns={"qnameSuffixes": [f"s{i}.example" for i in range(17)]})


def test_idle_series_expire_after_the_series_ttl() -> None:
    mon = monitor(
        "flowmon-system", "ttl", metrics=DNS_METRICS, aggregation={"groupBy": PAIR, "seriesTTL": "10s"}
    )
    n = Node(mon)
    n.transaction(WEB, KUBE_DNS)
    assert len(requests_of(n, mon.key)) == 1
    n.clock.now += 11
    assert n.families(mon.key) == {"flowmon_dns_requests": {}, "flowmon_dns_latency_seconds": {}}


def test_dns_families_join_the_monitor_view_and_tcp_only_monitors_get_none() -> None:
    dns = monitor("flowmon-system", "dns", metrics=["dns_requests"])
    tcp = monitor("flowmon-system", "tcp")
    n = Node(dns, tcp)
    n.transaction(WEB, KUBE_DNS)
    flows = Aggregator("n1", ["n1"]).build_view(
        FlowSnapshot({}, {}, "fake", 0.0), n.policy, n.resolver, n.clock.now
    )
    totals = DnsTotals(n.tracker.requests(), n.tracker.latency())
    views = n.dns.build(totals, n.policy, n.resolver, n.clock.now, local={"n1"}, agent_nodes={"n1"})
    joined = with_dns(flows, views)
    assert [f.info.name for f in joined.monitors[dns.key].families] == ["flowmon_dns_requests"]
    assert joined.monitors[dns.key].series == 1
    assert all("dns" not in f.info.name for f in joined.monitors[tcp.key].families)


def test_label_value_counts_match_the_codes() -> None:
    """The operator's series prediction counts on these (it cannot import the agent)."""
    assert len(RCODE_NAMES) + 2 == DNS_RCODE_VALUES  # + other, timeout
    assert len(QTYPE_NAMES) + 1 == DNS_QTYPE_VALUES  # + other


# --- server_dns_name on flows to external peers ----------------------------------------------------


def test_server_dns_name_names_an_external_peer_from_the_answer_until_its_ttl() -> None:
    named = monitor(
        "flowmon-system", "named", aggregation={"groupBy": ["client_workload", "server_dns_name"]}
    )
    n = Node(named)
    flows = Aggregator("n1", ["n1"], peer_names=n.tracker.names)
    key = FlowKey(ip_address(WEB), ip_address(EXTERNAL_PEER), 443, Reporter.CLIENT)
    inside = FlowKey(ip_address(WEB), ip_address(API), 8080, Reporter.CLIENT)
    sent = [0]

    def poll_sent() -> dict[tuple[str, ...], float]:
        sent[0] += 100
        vector = [0] * WIDTH
        vector[SENT] = sent[0]
        snapshot = FlowSnapshot({key: FlowCounters(vector), inside: FlowCounters(vector)}, {}, "fake", 0.0)
        view = flows.build_view(snapshot, n.policy, n.resolver, n.clock.now)
        family = next(f for f in view.monitors[named.key].families if f.info.name == "flowmon_tcp_sent_bytes")
        return family.samples

    assert poll_sent() == {("web", "external"): 100.0, ("web", ""): 100.0}  # no answer yet
    n.transaction(WEB, KUBE_DNS, "api.payment-provider.example", addresses=(EXTERNAL_PEER,), ttl=30)
    assert poll_sent()[("web", "api.payment-provider.example")] == 100.0
    n.clock.now += 31  # the record's TTL ran out
    n.tracker.expire()
    samples = poll_sent()
    assert samples[("web", "external")] == 200.0 and samples[("web", "api.payment-provider.example")] == 100.0
    assert samples[("web", "")] == 300.0  # a peer in the cluster never gets a DNS name
