"""DNS through the whole agent on the real kernel: a client pod asks a real resolver (dnsmasq) in a
"kube-system" pod; the agent's runner polls the capture, and the monitor's exported text must show
exactly the requests made, per rcode, qtype and qname suffix, latency rising behind `tc tbf`, a dropped
query as `timeout`, malformed packets counted in the agent's own metrics, and `server_dns_name` on a TCP
flow to a peer whose address came from an answer, gone after the TTL. The tracker's clock is injected:
timeouts and TTLs pass without sleeping.

Every poll is the runner's own `poll_once()`, called by the test: the kernel's hooks ran by the time a
socket call returns, so one poll sees what the test just did. Failing to attach is tested without root.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowmon_agent.dns.tracker import DnsTracker
from flowmon_agent.kernel.flows import KernelConfig
from flowmon_agent.kernel.loader import BPFUnavailableError
from flowmon_agent.metadata import MetadataStore
from flowmon_agent.runner import Agent, AgentSettings, default_tracer
from flowmon_contract.policy import compile_policy
from flowmon_lab.network import Lab, Pod
from flowmon_lab.resolver import ResolverConfig, start_resolver
from tests.dns_samples import MALFORMED
from tests.fake_tracer import FakeTracer
from tests.k8s_objects import namespace, node, pod
from tests.server_rig import monitor

TTL_S = 30
PEER_NAME = "api.pay.lab.test"
BIG_TXT = ["x" * 250] * 4  # ~1 KB answers: the token bucket passes about one per 80 ms
MONITOR_SETTINGS = {
    "metrics": ["sent_bytes", "dns_requests", "dns_latency"],
    "aggregation": {"groupBy": ["client_workload", "server_workload", "server_dns_name"]},
}
# With suffixes, queries go to user space for their names; without, transactions stay in the kernel.
MONITOR = monitor("flowmon-system", "dns", **MONITOR_SETTINGS, dns={"qnameSuffixes": ["pay.lab.test"]})
KERNEL_MONITOR = monitor("flowmon-system", "dns", **MONITOR_SETTINGS)
REQUESTS, LATENCY = "flowmon_dns_requests_total", "flowmon_dns_latency_seconds"
Labels = tuple[tuple[str, str], ...]


class OffsetClock:
    """CLOCK_MONOTONIC (the kernel's timestamps) plus an offset the tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def pod_with_both_families(ns: str, name: str, p: Pod) -> dict:
    obj = pod(ns, name, str(p.ipv4), "node-a")
    obj["status"]["podIPs"].append({"ip": str(p.ipv6)})
    return obj


@dataclass
class AgentLab:
    lab: Lab
    web: Pod
    resolver: Pod
    peer: Pod
    agent: Agent
    clock: OffsetClock
    suffixes: bool

    def exported(self, name: str) -> dict[Labels, float]:
        """Samples of one name on the monitor's path, as a scrape would read them."""
        text = self.agent.exporter.monitor_text(MONITOR.key).decode()
        return {
            tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        }

    def agent_metric(self, name: str) -> dict[Labels, float]:
        text = self.agent.exporter.agent_text().decode()
        return {
            tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        }

    def expected(self, rows: dict[Labels, int]) -> dict[Labels, int]:
        """Request counts as the monitor exports them: without suffixes there is no qname_suffix."""
        if self.suffixes:
            return rows
        merged: dict[Labels, int] = {}
        for key, count in rows.items():
            key = tuple(kv for kv in key if kv[0] != "qname_suffix")
            merged[key] = merged.get(key, 0) + count
        return merged

    def dns_events(self) -> dict[str, float]:
        return {dict(k)["event"]: v for k, v in self.agent_metric("flowmon_agent_dns_events_total").items()}

    def ask(self, name: str, qtype: str, family: int = socket.AF_INET) -> str:
        query = dns.message.make_query(name, qtype, use_edns=0, payload=4096)
        with self.lab.inside(self.web):
            return dns.rcode.to_text(dns.query.udp(query, self.resolver.ip(family), timeout=5).rcode())

    def poll_until(self, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Runner polls until `done` (TCP counters reach the maps as segments are processed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.agent.poll_once()
            if done():
                return
        raise AssertionError(f"not reached within {timeout_s} s")


def grown(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def labels(**values: str) -> Labels:
    return tuple(sorted(values.items()))


@pytest.fixture(scope="module", params=["suffixes", "kernel"])
def agent_lab(request, require_root) -> Iterator[AgentLab]:
    suffixes = request.param == "suffixes"
    with Lab("fda", ["web", "dns", "peer"]) as lab:
        web, resolver, peer = lab.pod("web"), lab.pod("dns"), lab.pod("peer")
        config = ResolverConfig(
            local_zone="lab.test",
            hosts={PEER_NAME: [str(peer.ipv4)], "db.lab.test": ["10.99.0.9", "fd00:99::9"]},
            txt={"big.lab.test": BIG_TXT},
            ttl_s=TTL_S,
        )
        start_resolver(lab, resolver, config)
        store = MetadataStore()
        for obj in (
            namespace("shop"),
            namespace("kube-system"),
            node("node-a", "192.0.2.10"),
            pod_with_both_families("shop", "web", web),
            pod_with_both_families("kube-system", "dns", resolver),
        ):
            store.apply("ADDED", obj)
        clock = OffsetClock()
        settings = AgentSettings(listen_port=0, node_name="node-a", no_auth=True, poll_interval_seconds=60)
        agent = Agent(settings, store=store, dns_tracker=DnsTracker(clock=clock, timeout_s=30.0))
        agent.policy.apply(compile_policy([MONITOR if suffixes else KERNEL_MONITOR]), source="api")
        # one program pair for UDP and DNS, as start() makes it
        agent.tracer = default_tracer(settings, KernelConfig(), skb_hooks=agent.skb_hooks.get)
        try:
            agent.poll_once()  # the monitor asks for DNS: this poll attaches the capture
            assert agent.dns.capture is not None
            yield AgentLab(lab, web, resolver, peer, agent, clock, suffixes)
        finally:
            agent.tracer.close()
            agent.dns.close()
            agent.skb_hooks.close()


def test_requests_per_rcode_qtype_and_suffix_equal_the_queries_made(agent_lab: AgentLab) -> None:
    before, latency_before = agent_lab.exported(REQUESTS), agent_lab.exported(LATENCY + "_count")
    kept_before = agent_lab.dns_events().get("kept", 0)
    made = [
        ("db.lab.test", "A", socket.AF_INET, "NOERROR"),
        ("db.lab.test", "AAAA", socket.AF_INET, "NOERROR"),
        ("db.lab.test", "AAAA", socket.AF_INET6, "NOERROR"),
        ("nope.lab.test", "A", socket.AF_INET, "NXDOMAIN"),
        ("nope.lab.test", "SRV", socket.AF_INET6, "NXDOMAIN"),
        ("missing.pay.lab.test", "A", socket.AF_INET, "NXDOMAIN"),
        ("elsewhere.example", "A", socket.AF_INET, "REFUSED"),  # no upstream: refused
    ]
    for name, qtype, family, rcode in made:
        assert agent_lab.ask(name, qtype, family) == rcode, name
    agent_lab.agent.poll_once()
    pair = {"client_workload": "web", "server_workload": "dns", "server_dns_name": ""}
    assert grown(before, agent_lab.exported(REQUESTS)) == agent_lab.expected({
        labels(**pair, rcode="NOERROR", qtype="A", qname_suffix="other"): 1,
        labels(**pair, rcode="NOERROR", qtype="AAAA", qname_suffix="other"): 2,
        labels(**pair, rcode="NXDOMAIN", qtype="A", qname_suffix="other"): 1,
        labels(**pair, rcode="NXDOMAIN", qtype="SRV", qname_suffix="other"): 1,
        labels(**pair, rcode="NXDOMAIN", qtype="A", qname_suffix="pay.lab.test"): 1,
        labels(**pair, rcode="REFUSED", qtype="A", qname_suffix="other"): 1,
    })  # fmt: skip
    assert grown(latency_before, agent_lab.exported(LATENCY + "_count")) == {labels(**pair): len(made)}
    # the 4 answers without addresses: their query and answer stay in the kernel (4 datagrams each)
    # unless a suffix is wanted; the 3 with addresses reach user space at the client for their names
    kept = agent_lab.dns_events().get("kept", 0) - kept_before
    assert kept == (0 if agent_lab.suffixes else 4 * 4 + 3 * 3)
    assert agent_lab.agent_metric("flowmon_agent_dns_capture_up") == {(): 1.0}


def burst_latency(agent_lab: AgentLab, count: int) -> tuple[float, float]:
    """`count` TXT queries for the big record at once; the exported latency (count, sum) they added."""
    key = labels(client_workload="web", server_workload="dns", server_dns_name="")
    counts, sums = agent_lab.exported(LATENCY + "_count"), agent_lab.exported(LATENCY + "_sum")
    with agent_lab.lab.socket(agent_lab.web, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        for ident in range(count):
            query = dns.message.make_query("big.lab.test", "TXT", use_edns=0, payload=4096, id=ident + 1)
            sock.sendto(query.to_wire(), (agent_lab.resolver.ip(socket.AF_INET), 53))
        for _ in range(count):
            sock.recv(4096)
    agent_lab.agent.poll_once()
    return (
        agent_lab.exported(LATENCY + "_count")[key] - counts.get(key, 0),
        agent_lab.exported(LATENCY + "_sum")[key] - sums.get(key, 0.0),
    )


def test_exported_latency_is_plausible_and_rises_behind_a_token_bucket(agent_lab: AgentLab) -> None:
    burst = 8
    count, plain = burst_latency(agent_lab, burst)
    assert count == burst and 0 < plain / burst < 0.25
    agent_lab.lab.tc(agent_lab.resolver, "qdisc", "add", "dev", "eth0", "root", "tbf",
                     "rate", "100kbit", "burst", "1600", "latency", "5s")  # fmt: skip
    try:
        count, shaped = burst_latency(agent_lab, burst)
    finally:
        agent_lab.lab.tc(agent_lab.resolver, "qdisc", "del", "dev", "eth0", "root")
    # the bucket delivers at most 2 answers in the first 0.1 s: the rest waited, the last ~0.5 s
    assert count == burst and shaped / burst > 0.15 and shaped > 3 * plain


def test_a_dropped_query_is_exported_as_timeout(agent_lab: AgentLab) -> None:
    before = agent_lab.exported(REQUESTS)
    lab, resolver = agent_lab.lab, agent_lab.resolver
    lab.iptables(resolver, "-I", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
    try:
        with lab.socket(agent_lab.web, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            query = dns.message.make_query("db.lab.test", "AAAA", use_edns=False)
            sock.sendto(query.to_wire(), (resolver.ip(socket.AF_INET), 53))  # the hook ran in sendto
        agent_lab.agent.poll_once()
    finally:
        lab.iptables(resolver, "-D", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
    assert grown(before, agent_lab.exported(REQUESTS)) == {}
    agent_lab.clock.offset += 31.0  # past the tracker's 30 s deadline
    agent_lab.agent.poll_once()
    pair = {"client_workload": "web", "server_workload": "dns", "server_dns_name": ""}
    assert grown(before, agent_lab.exported(REQUESTS)) == agent_lab.expected(
        {labels(**pair, rcode="timeout", qtype="AAAA", qname_suffix="other"): 1}
    )


def test_malformed_and_random_packets_are_counted_and_the_agent_goes_on(agent_lab: AgentLab) -> None:
    """Sent to a plain socket on port 53 in the peer pod (nothing answers: every count is the test's);
    the receiving side's hook runs when the datagram is delivered, so polls go on until it is."""
    malformed = "flowmon_agent_dns_malformed_total"
    before = agent_lab.agent_metric(malformed)
    lab, peer = agent_lab.lab, agent_lab.peer
    sink = lab.socket(peer, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((str(peer.ipv4), 53))
    with sink, lab.socket(agent_lab.web, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, payload, _ in MALFORMED:
            sock.sendto(payload, (str(peer.ipv4), 53))
        expected: dict[Labels, int] = {}
        for _, _, reason in MALFORMED:  # each seen leaving the client and arriving at the sink
            expected[labels(reason=reason)] = expected.get(labels(reason=reason), 0) + 2
        agent_lab.poll_until(lambda: grown(before, agent_lab.agent_metric(malformed)) == expected)
        # fuzz: 300 random datagrams; the agent counts what does not parse and goes on
        polls, rng = agent_lab.agent.polls, random.Random(24)
        for _ in range(300):
            sock.sendto(rng.randbytes(rng.randrange(12, 700)), (str(peer.ipv4), 53))

        def settled() -> bool:
            events = agent_lab.dns_events()
            return (
                events["seen"] == events["handed"] + events["ring_full"] + events["kept"]
                and events["read"] == events["handed"]
            )

        agent_lab.poll_until(settled)
    assert sum(grown(before, agent_lab.agent_metric(malformed)).values()) > sum(expected.values())
    requests = agent_lab.exported(REQUESTS)
    assert agent_lab.ask("db.lab.test", "A") == "NOERROR"
    agent_lab.agent.poll_once()
    pair = {"client_workload": "web", "server_workload": "dns", "server_dns_name": ""}
    assert grown(requests, agent_lab.exported(REQUESTS)) == agent_lab.expected(
        {labels(**pair, rcode="NOERROR", qtype="A", qname_suffix="other"): 1}
    )
    assert agent_lab.agent.polls > polls and agent_lab.agent.last_error is None


def send_to_peer(agent_lab: AgentLab, payload: int) -> None:
    """One TCP connection from the web pod to the peer pod's port 8443, `payload` bytes sent and read."""
    lab, peer = agent_lab.lab, agent_lab.peer
    with lab.socket(peer, socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((str(peer.ipv4), 8443))
        listener.listen(1)
        with lab.socket(agent_lab.web, socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect((str(peer.ipv4), 8443))
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"x" * payload)
                received = 0
                conn.settimeout(5)
                while received < payload:
                    received += len(conn.recv(65536))


def test_server_dns_name_on_a_flow_to_a_peer_named_by_an_answer_until_its_ttl(agent_lab: AgentLab) -> None:
    sent = "flowmon_tcp_sent_bytes_total"
    named = labels(client_workload="web", server_workload="external", server_dns_name=PEER_NAME)
    unnamed = labels(client_workload="web", server_workload="external", server_dns_name="external")
    assert agent_lab.ask(PEER_NAME, "A") == "NOERROR"
    agent_lab.agent.poll_once()
    send_to_peer(agent_lab, 3000)
    agent_lab.poll_until(lambda: agent_lab.exported(sent).get(named) == 3000)
    assert unnamed not in agent_lab.exported(sent)
    agent_lab.clock.offset += TTL_S + 1  # the answer's TTL has run out
    send_to_peer(agent_lab, 500)
    agent_lab.poll_until(lambda: agent_lab.exported(sent).get(unnamed) == 500)
    assert agent_lab.exported(sent)[named] == 3000


# --- without root ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_capture_that_cannot_attach_is_counted_and_the_agent_keeps_working(tmp_path) -> None:
    def refuse(_tracker: DnsTracker):
        raise BPFUnavailableError("no cgroup v2 file system is mounted")

    settings = AgentSettings(listen_port=0, node_name="node-a", poll_interval_seconds=60, no_auth=True)
    agent = Agent(settings, tracer_factory=FakeTracer, dns_capture_factory=refuse)
    agent.policy.apply(compile_policy([MONITOR]), source="api")
    await agent.start()
    try:
        assert agent.dns.capture is None and agent.not_ready_reason() is None
        text = agent.exporter.agent_text().decode()
        assert "flowmon_agent_dns_attach_failures_total 1.0" in text
        assert "flowmon_agent_dns_capture_up 0.0" in text
        assert agent.exporter.has_monitor(MONITOR.key)
    finally:
        await agent.stop()
