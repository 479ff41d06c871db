"""UDP accounting and the DNS capture in one cgroup-skb program per direction (bpf/skb.c,
kernel/skb_hooks.py), on real traffic between network namespaces: one program pair on the cgroup whatever
runs, each job switched on and off without disturbing the other's counts, and no counter going backwards
across an off and on. Every test needs root (fails, never skips)."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address

import dns.message
import pytest

from flowmon_agent.dns.capture import DnsCapture, cgroup2_root, dns_cflags
from flowmon_agent.dns.lifecycle import DnsLifecycle
from flowmon_agent.dns.tracker import DnsTracker, Vantage
from flowmon_agent.kernel.flows import FlowKey, KernelConfig, Reporter, Transport
from flowmon_agent.kernel.skb_hooks import Job, SharedSkbHooks, SkbHooks
from flowmon_agent.kernel.udp_flows import UdpFlows, udp_cflags
from flowmon_agent.runner import Agent, AgentSettings, default_tracer
from flowmon_lab.network import Lab
from tests.test_dns_capture import attached_programs

pytestmark = pytest.mark.root

V4 = socket.AF_INET
INGRESS, EGRESS = 0, 1  # BPF_CGROUP_INET_INGRESS, _EGRESS
_ports = itertools.count(33000)
_ids = itertools.count(100)


@dataclass
class Node:
    lab: Lab
    hooks: SkbHooks
    udp: UdpFlows
    dns: DnsLifecycle
    tracker: DnsTracker

    def only(self, udp: bool) -> KernelConfig:
        """Only the lab's sockets: other UDP traffic on the host stays out of the counts."""
        return KernelConfig(local_ips=[p.ipv4 for p in self.lab.pods], udp=udp)

    def exchange(self, port: int, sizes: list[int]) -> None:
        """a sends datagrams of `sizes` to b:port; b reads them all."""
        a, b = self.lab.pod("a"), self.lab.pod("b")
        lab = self.lab
        with lab.socket(b, V4, socket.SOCK_DGRAM) as srv, lab.socket(a, V4, socket.SOCK_DGRAM) as cli:
            srv.settimeout(10)
            srv.bind((b.ip(V4), port))
            for size in sizes:
                cli.sendto(b"u" * size, (b.ip(V4), port))
            for size in sizes:
                assert len(srv.recvfrom(65536)[0]) == size

    def ask(self, queries: int) -> None:
        """a asks b:53 `queries` times; b answers each (NOERROR, no records: counted in the kernel)."""
        a, b = self.lab.pod("a"), self.lab.pod("b")
        lab = self.lab
        with lab.socket(b, V4, socket.SOCK_DGRAM) as srv, lab.socket(a, V4, socket.SOCK_DGRAM) as cli:
            srv.settimeout(10)
            cli.settimeout(10)
            srv.bind((b.ip(V4), 53))
            for _ in range(queries):
                query = dns.message.make_query("web.skb.test", "A", id=next(_ids))
                cli.sendto(query.to_wire(), (b.ip(V4), 53))
                wire, asker = srv.recvfrom(512)
                srv.sendto(dns.message.make_response(dns.message.from_wire(wire)).to_wire(), asker)
                cli.recvfrom(512)

    def udp_sent(self, port: int) -> tuple[int, int]:
        """(bytes, datagrams) client → server of a→b:port, from the client's side."""
        a, b = (ip_address(self.lab.pod(name).ip(V4)) for name in "ab")
        key = FlowKey(a, b, port, Reporter.CLIENT, protocol=Transport.UDP)
        c = self.udp.read().get(key)
        return (c.udp_sent_bytes, c.udp_sent_datagrams) if c is not None else (0, 0)

    def dns_asked(self) -> int:
        """a's queries to b counted at a (the client's vantage), after a poll of the capture."""
        if self.dns.capture is not None:
            self.dns.capture.poll()
        pair = (self.lab.pod("a").ip(V4), self.lab.pod("b").ip(V4), "NOERROR")
        return sum(
            n
            for k, n in self.tracker.requests().items()
            if k.vantage is Vantage.CLIENT and (k.client, k.server, k.rcode) == pair
        )


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with Lab("fskb", ["a", "b"]) as lab:
        tracker = DnsTracker()
        hooks = SkbHooks(udp_cflags() | dns_cflags(tracker.latency_bounds))
        try:
            udp = UdpFlows(hooks)
            dns_jobs = DnsLifecycle(tracker, lambda t: DnsCapture(t, hooks=hooks))
            yield Node(lab, hooks, udp, dns_jobs, tracker)
            dns_jobs.close()
            udp.close()
        finally:
            hooks.close()


def pairs() -> tuple[int, int]:
    root = cgroup2_root()
    return attached_programs(root, INGRESS), attached_programs(root, EGRESS)


def test_udp_and_dns_on_is_one_program_per_direction_and_each_job_switches_alone(node: Node) -> None:
    """Both jobs on: one program per direction more on the cgroup. DNS off: UDP counts every datagram
    exactly and DNS counts nothing; UDP off: the reverse; both off: the pair is unlinked."""
    node.udp.configure(node.only(udp=False))
    assert not node.hooks.attached
    before = pairs()

    node.udp.configure(node.only(udp=True))
    assert node.dns.attach()
    assert pairs() == (before[0] + 1, before[1] + 1)
    assert node.hooks.running(Job.UDP) and node.hooks.running(Job.DNS)
    both, asked = next(_ports), node.dns_asked()
    node.exchange(both, [10, 200, 0])
    node.ask(3)
    assert node.udp_sent(both) == (210, 3)
    assert node.dns_asked() - asked == 3

    node.dns.detach()  # the policy stops asking for DNS
    assert node.udp.attached and pairs() == (before[0] + 1, before[1] + 1)
    udp_only, asked = next(_ports), node.dns_asked()
    node.exchange(udp_only, [5, 7])
    node.ask(2)
    assert node.udp_sent(udp_only) == (12, 2)
    assert node.dns_asked() == asked
    assert node.udp_sent(both) == (210, 3)

    node.udp.configure(node.only(udp=False))
    assert node.dns.attach()
    assert not node.udp.attached and pairs() == (before[0] + 1, before[1] + 1)
    dns_only = next(_ports)
    node.exchange(dns_only, [9])
    node.ask(4)
    assert node.dns_asked() == asked + 4
    assert node.udp_sent(dns_only) == (0, 0)
    assert (node.udp_sent(both), node.udp_sent(udp_only)) == ((210, 3), (12, 2))

    node.dns.detach()
    assert not node.hooks.attached and pairs() == before


def test_counters_never_go_backwards_across_off_and_on(node: Node) -> None:
    """Each job off and on again (the maps stay loaded, the DNS maps emptied at its close): what was
    counted stays, and what comes after adds to it exactly."""
    port = next(_ports)
    node.udp.configure(node.only(udp=True))
    assert node.dns.attach()
    node.exchange(port, [100])
    node.ask(2)
    udp_before, dns_before = node.udp_sent(port), node.dns_asked()
    assert udp_before == (100, 1)
    for _ in range(2):
        node.udp.configure(node.only(udp=False))
        node.dns.detach()
        assert not node.hooks.attached
        assert (node.udp_sent(port), node.dns_asked()) == (udp_before, dns_before)
        node.udp.configure(node.only(udp=True))
        assert node.dns.attach()
        assert (node.udp_sent(port), node.dns_asked()) == (udp_before, dns_before)
    node.exchange(port, [1, 2])
    node.ask(1)
    assert (node.udp_sent(port), node.dns_asked()) == ((103, 3), dns_before + 1)
    node.dns.detach()
    node.udp.configure(node.only(udp=False))


def test_the_agent_links_one_pair_for_udp_and_dns(node: Node) -> None:
    """The agent's default tracer and DNS capture share its SkbHooks: one program per direction."""
    assert not node.hooks.attached
    before = pairs()
    agent = Agent(AgentSettings(listen_port=0, node_name="node-a", no_auth=True))
    assert isinstance(agent.skb_hooks, SharedSkbHooks)
    tracer = default_tracer(agent.settings, KernelConfig(udp=True), skb_hooks=agent.skb_hooks.get)
    try:
        assert agent.dns.attach()
        assert tracer.udp_attached
        assert pairs() == (before[0] + 1, before[1] + 1)
    finally:
        tracer.close()
        agent.dns.close()
        agent.skb_hooks.close()
    assert pairs() == before
