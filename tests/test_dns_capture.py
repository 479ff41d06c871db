"""DNS capture on the real kernel: a client pod querying a real resolver (dnsmasq) in another pod.

The resolver `dns` answers the zone lab.test itself (A/AAAA records, NXDOMAIN for unknown names, a big
TXT record), forwards everything else to `up` and validates it with DNSSEC: `up` answers fail.test
without signatures (so `dns` answers SERVFAIL, as a validating resolver does) and refuses the rest
(passed on as REFUSED). Counts are taken from the client pod's vantage and compared as differences, so
the tests share one lab, resolver and capture.
"""

from __future__ import annotations

import ctypes
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest

from flowmon_agent.dns.capture import EVENT_HEADER, DnsCapture, cgroup2_mounts, cgroup2_root, decode_event
from flowmon_agent.dns.tracker import DnsTracker, MalformedKey, Packet, PairKey, Vantage
from flowmon_lab.network import Lab, Pod
from flowmon_lab.resolver import ResolverConfig, start_resolver
from tests.dns_samples import MALFORMED
from tests.waiting import WAIT

pytestmark = [pytest.mark.root, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
WEB_V4, WEB_V6 = "10.99.0.7", "fd00:99::7"
TTL_S = 30
BIG_TXT = ["x" * 250] * 4  # an answer of ~1 KB: the token bucket below passes about one per 80 ms


class OffsetClock:
    """CLOCK_MONOTONIC (the kernel's timestamps) plus an offset the tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class CountingTracker(DnsTracker):
    """A DnsTracker that counts the answers handed over for their names, per client address."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.names_handed: dict[str, int] = {}

    def learn_names(self, packet: Packet, source=None) -> None:
        self.names_handed[packet.dst] = self.names_handed.get(packet.dst, 0) + 1
        super().learn_names(packet, source)


@dataclass
class DnsLab:
    lab: Lab
    client: Pod
    resolver: Pod
    tracker: CountingTracker
    capture: DnsCapture
    clock: OffsetClock

    def pump_until(self, done: Callable[[], bool], timeout_s: float = WAIT, seen=None) -> None:
        """Poll until done(); `seen`: what to show when it never is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.capture.poll(timeout_ms=50)
            if done():
                return
        shown = f"; {seen()}" if seen else ""
        raise AssertionError(f"not reached within {timeout_s} s; capture {self.capture.stats()}{shown}")

    def ask(self, name: str, qtype: str, family: int = socket.AF_INET) -> dns.message.Message:
        query = dns.message.make_query(name, qtype, use_edns=0, payload=4096)
        with self.lab.inside(self.client):
            return dns.query.udp(query, self.resolver.ip(family), timeout=5)

    def client_counts(self, vantage: Vantage = Vantage.CLIENT) -> dict[tuple[str, str, str], int]:
        """(client address, rcode, qtype) -> count, for the client pod's queries to the resolver."""
        mine = {self.client.ip(f): self.resolver.ip(f) for f in (socket.AF_INET, socket.AF_INET6)}
        return {
            (k.client, k.rcode, k.qtype): n
            for k, n in self.tracker.requests().items()
            if k.vantage is vantage and mine.get(k.client) == k.server
        }


def grown(before: dict, after: dict) -> dict:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


@pytest.fixture(scope="module")
def dns_lab(require_root) -> Iterator[DnsLab]:
    with Lab("fdn", ["cl", "dns", "up"]) as lab:
        client, resolver, upstream = lab.pod("cl"), lab.pod("dns"), lab.pod("up")
        start_resolver(lab, upstream, ResolverConfig(hosts={"x.fail.test": ["10.99.0.9"]}))
        config = ResolverConfig(
            local_zone="lab.test",
            hosts={"web.lab.test": [WEB_V4, WEB_V6]},
            txt={"big.lab.test": BIG_TXT},
            ttl_s=TTL_S,
            upstream=str(upstream.ipv4),
            dnssec=True,
        )
        start_resolver(lab, resolver, config)
        clock = OffsetClock()
        tracker = CountingTracker(clock=clock, timeout_s=30.0)  # real queries never take that long
        with DnsCapture(tracker) as capture:
            yield DnsLab(lab, client, resolver, tracker, capture, clock)


def test_counts_per_rcode_and_qtype_equal_the_queries_made(dns_lab: DnsLab) -> None:
    v4, v6 = dns_lab.client.ip(socket.AF_INET), dns_lab.client.ip(socket.AF_INET6)
    before, before_server = dns_lab.client_counts(), dns_lab.client_counts(Vantage.SERVER)
    made = [
        ("web.lab.test", "A", socket.AF_INET, "NOERROR"),
        ("web.lab.test", "AAAA", socket.AF_INET, "NOERROR"),
        ("web.lab.test", "AAAA", socket.AF_INET6, "NOERROR"),
        ("nope.lab.test", "A", socket.AF_INET, "NXDOMAIN"),
        ("nope.lab.test", "SRV", socket.AF_INET6, "NXDOMAIN"),
        ("x.fail.test", "A", socket.AF_INET, "SERVFAIL"),
        ("elsewhere.example", "A", socket.AF_INET, "REFUSED"),
        ("7.0.99.10.in-addr.arpa", "PTR", socket.AF_INET, "NOERROR"),  # its host record, reversed
    ]
    for name, qtype, family, rcode in made:
        assert dns.rcode.to_text(dns_lab.ask(name, qtype, family).rcode()) == rcode, name
    expected = {
        (v4, "NOERROR", "A"): 1,
        (v4, "NOERROR", "AAAA"): 1,
        (v6, "NOERROR", "AAAA"): 1,
        (v4, "NXDOMAIN", "A"): 1,
        (v6, "NXDOMAIN", "SRV"): 1,
        (v4, "SERVFAIL", "A"): 1,
        (v4, "REFUSED", "A"): 1,
        (v4, "NOERROR", "PTR"): 1,
    }
    dns_lab.pump_until(lambda: grown(before, dns_lab.client_counts()) == expected)
    # the resolver's socket saw the same transactions (both ends are on this node)
    dns_lab.pump_until(lambda: grown(before_server, dns_lab.client_counts(Vantage.SERVER)) == expected)
    assert dns_lab.capture.stats().ring_full == 0


def test_transactions_stay_in_the_kernel_unless_query_names_are_wanted(dns_lab: DnsLab) -> None:
    v4 = dns_lab.client.ip(socket.AF_INET)
    # NXDOMAIN: no addresses, so none of the 4 packets (query and answer, at both sockets) is handed over
    stats, counts = dns_lab.capture.stats(), dns_lab.client_counts()
    for _ in range(5):
        assert dns.rcode.to_text(dns_lab.ask("gone.lab.test", "A").rcode()) == "NXDOMAIN"
    dns_lab.pump_until(lambda: grown(counts, dns_lab.client_counts()) == {(v4, "NXDOMAIN", "A"): 5})
    after = dns_lab.capture.stats()
    assert after.kept - stats.kept >= 20  # other DNS on the host may add to the node-wide counters
    assert dns_lab.tracker.stats().pending == 0
    # a monitor wants query-name suffixes: queries and their answers go to user space, counted there
    dns_lab.tracker.set_qname_suffixes(["lab.test"])
    try:
        dns_lab.capture.poll()  # the kernel learns it at the next poll
        handed = dns_lab.capture.stats().handed
        before = {k: n for k, n in dns_lab.tracker.requests().items() if k.qname_suffix == "lab.test"}
        for _ in range(3):
            dns_lab.ask("gone.lab.test", "A")
        wanted = {(Vantage.CLIENT, v4, "NXDOMAIN", "A"): 3, (Vantage.SERVER, v4, "NXDOMAIN", "A"): 3}

        def suffixed() -> dict:
            now = {k: n for k, n in dns_lab.tracker.requests().items() if k.qname_suffix == "lab.test"}
            return {(k.vantage, k.client, k.rcode, k.qtype): n for k, n in grown(before, now).items()}

        dns_lab.pump_until(lambda: suffixed() == wanted)
        assert dns_lab.capture.stats().handed - handed >= 12
    finally:
        dns_lab.tracker.set_qname_suffixes([])
    dns_lab.capture.poll()
    counts = dns_lab.client_counts()
    dns_lab.ask("gone.lab.test", "A")
    dns_lab.pump_until(lambda: grown(counts, dns_lab.client_counts()) == {(v4, "NXDOMAIN", "A"): 1})


def burst_latency_sum(dns_lab: DnsLab, count: int) -> float:
    """Send `count` TXT queries for the big record at once; the sum of their latencies (the tracker's)."""
    pair = PairKey(Vantage.CLIENT, dns_lab.client.ip(socket.AF_INET), dns_lab.resolver.ip(socket.AF_INET))
    before = dns_lab.tracker.latency().get(pair)
    sums_before = (before.count, before.sum) if before else (0, 0.0)
    with dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        for ident in range(count):
            query = dns.message.make_query("big.lab.test", "TXT", use_edns=0, payload=4096, id=ident + 1)
            sock.sendto(query.to_wire(), (dns_lab.resolver.ip(socket.AF_INET), 53))
        for _ in range(count):
            sock.recv(4096)
    dns_lab.pump_until(lambda: dns_lab.tracker.latency()[pair].count == sums_before[0] + count)
    return dns_lab.tracker.latency()[pair].sum - sums_before[1]


def test_latency_is_plausible_and_rises_behind_a_token_bucket(dns_lab: DnsLab) -> None:
    burst = 8
    plain_sum = burst_latency_sum(dns_lab, burst)
    assert 0 < plain_sum / burst < 0.25  # a local resolver: well under a quarter second
    # ~1 KB answers through 100 kbit/s: after the 1600-byte burst, one answer per ~85 ms at best
    dns_lab.lab.tc(dns_lab.resolver, "qdisc", "add", "dev", "eth0", "root", "tbf",
                   "rate", "100kbit", "burst", "1600", "latency", "5s")  # fmt: skip
    try:
        shaped_sum = burst_latency_sum(dns_lab, burst)
    finally:
        dns_lab.lab.tc(dns_lab.resolver, "qdisc", "del", "dev", "eth0", "root")
    # the bucket cannot deliver more than 2 answers in the first 0.1 s: at least 6 waited longer, the
    # last about 0.5 s; so the mean rises well past the unshaped one
    assert shaped_sum / burst > 0.15 and shaped_sum > 3 * plain_sum
    assert shaped_sum / burst < 5.0


def test_a_dropped_query_counts_as_timeout(dns_lab: DnsLab) -> None:
    v4 = dns_lab.client.ip(socket.AF_INET)
    before = dns_lab.client_counts()
    dns_lab.lab.iptables(dns_lab.resolver, "-I", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
    try:
        with dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            query = dns.message.make_query("web.lab.test", "AAAA", use_edns=False)
            sock.sendto(query.to_wire(), (dns_lab.resolver.ip(socket.AF_INET), 53))  # hook ran in sendto
            dns_lab.capture.poll()
    finally:
        dns_lab.lab.iptables(dns_lab.resolver, "-D", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
    assert grown(before, dns_lab.client_counts()) == {}
    dns_lab.clock.offset += 31.0  # past the tracker's 30 s deadline
    dns_lab.capture.poll()
    assert grown(before, dns_lab.client_counts()) == {(v4, "timeout", "AAAA"): 1}


def test_malformed_packets_are_counted_and_nothing_breaks(dns_lab: DnsLab) -> None:
    client, server = dns_lab.client.ip(socket.AF_INET), dns_lab.resolver.ip(socket.AF_INET)

    def mine() -> dict[str, int]:
        return {
            k.reason: n
            for k, n in dns_lab.tracker.malformed().items()
            if (k.source, k.destination) == (client, server)
        }

    before = mine()
    with dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, payload, _ in MALFORMED:
            sock.sendto(payload, (server, 53))
    expected: dict[str, int] = {}
    for _, _, reason in MALFORMED:  # each seen leaving the client and arriving at the resolver
        expected[reason] = expected.get(reason, 0) + 2
    dns_lab.pump_until(lambda: grown(before, mine()) == expected)
    # 300 random datagrams without reading: 600 records of 450-570 bytes overflow the 256 KiB ring; the
    # rest are counted as lost, not silently dropped, and the capture and the resolver go on
    rng = random.Random(24)
    with dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(300):
            sock.sendto(rng.randbytes(rng.randrange(400, 700)), (server, 53))
    while dns_lab.capture.poll():
        pass
    stats = dns_lab.capture.stats()
    assert stats.ring_full > 0 and stats.read == stats.handed
    assert stats.seen == stats.handed + stats.ring_full + stats.kept  # kept: counted in the kernel
    counts = dns_lab.client_counts()
    assert dns.rcode.to_text(dns_lab.ask("web.lab.test", "A").rcode()) == "NOERROR"
    dns_lab.pump_until(lambda: grown(counts, dns_lab.client_counts()) == {(client, "NOERROR", "A"): 1})


def test_answers_name_addresses_until_the_ttl(dns_lab: DnsLab) -> None:
    v4, v6 = dns_lab.client.ip(socket.AF_INET), dns_lab.client.ip(socket.AF_INET6)
    names = dns_lab.tracker.names
    dns_lab.clock.offset += TTL_S + 1  # whatever earlier tests learned has expired
    dns_lab.capture.poll()
    assert names.name_of(WEB_V4, v4) is None and names.name_of(WEB_V6, v6) is None
    dns_lab.ask("web.lab.test", "A")
    dns_lab.ask("web.lab.test", "AAAA", socket.AF_INET6)
    dns_lab.pump_until(lambda: names.name_of(WEB_V6, v6) == "web.lab.test")
    assert names.name_of(WEB_V4, v4) == "web.lab.test"
    assert names.name_of(WEB_V4) == "web.lab.test"  # no other client on the node disagrees
    dns_lab.clock.offset += TTL_S - 5
    assert names.name_of(WEB_V4, v4) == "web.lab.test"
    dns_lab.clock.offset += 6  # the record's TTL has run out
    assert names.name_of(WEB_V4, v4) is None and names.name_of(WEB_V6, v6) is None
    dns_lab.capture.poll()
    assert names.name_of(WEB_V4) is None


def test_a_late_answer_after_a_kernel_timeout_is_unmatched(dns_lab: DnsLab) -> None:
    """The sweep took the query; its answer, sent after the deadline, is handed over as unmatched. The
    server is a socket of the test on port 53 of the client pod itself, so it answers when told to."""
    v4 = dns_lab.client.ip(socket.AF_INET)
    unmatched = dns_lab.tracker.stats().unmatched_responses

    def timeouts() -> dict:
        mine = {k: n for k, n in dns_lab.tracker.requests().items() if (k.client, k.server) == (v4, v4)}
        return {(k.vantage, k.rcode, k.qtype): n for k, n in mine.items()}

    before = timeouts()
    with (
        dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as server,
        dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((v4, 53))
        server.settimeout(10)
        query = dns.message.make_query("web.lab.test", "A", id=777)
        client.sendto(query.to_wire(), (v4, 53))
        _, asker = server.recvfrom(512)
        dns_lab.capture.poll()
        dns_lab.clock.offset += 31.0  # past the 30 s deadline, unanswered
        dns_lab.capture.poll()
        late = {(Vantage.CLIENT, "timeout", "A"): 1, (Vantage.SERVER, "timeout", "A"): 1}
        assert grown(before, timeouts()) == late
        server.sendto(dns.message.make_response(query).to_wire(), asker)
    dns_lab.pump_until(lambda: dns_lab.tracker.stats().unmatched_responses - unmatched == 2)
    assert grown(before, timeouts()) == late


# --- answers with addresses, handed over once per TTL -----------------------------------------------------
EXT = "api.ext.test"


def serve_answer(dns_lab: DnsLab, addresses: list[str], ttl: int, *, edit=None) -> None:
    """The client pod asks EXT once; a server socket of the test on port 53 of the same pod answers with
    these A records (`edit`: a change to the answer's bytes). A new query id and client port each time."""
    v4 = dns_lab.client.ip(socket.AF_INET)
    with (
        dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as server,
        dns_lab.lab.socket(dns_lab.client, socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((v4, 53))
        server.settimeout(10)
        client.settimeout(10)
        client.sendto(dns.message.make_query(EXT, "A").to_wire(), (v4, 53))
        wire, asker = server.recvfrom(512)
        response = dns.message.make_response(dns.message.from_wire(wire))
        for address in addresses:  # one RRset each: in one, dnspython does not keep the order
            response.answer.append(dns.rrset.from_text(EXT + ".", ttl, "IN", "A", address))
        reply = response.to_wire()
        server.sendto(edit(reply) if edit else reply, asker)
        client.recv(4096)


class AnswerCounts:
    """What the test's answers (client = server = the client pod's IPv4) did, from a starting point."""

    def __init__(self, dns_lab: DnsLab) -> None:
        self.dns_lab, self.v4 = dns_lab, dns_lab.client.ip(socket.AF_INET)
        self.handed0 = dns_lab.tracker.names_handed.get(self.v4, 0)
        self.stats0 = dns_lab.capture.stats()
        self.answered0 = self.answered()

    def answered(self) -> int:
        key = (Vantage.CLIENT, self.v4, self.v4)
        return sum(
            n for k, n in self.dns_lab.tracker.requests().items() if (k.vantage, k.client, k.server) == key
        )

    def wait(self, answered: int, handed: int) -> None:
        """Until the kernel counted `answered` answers at the client and `handed` reached user space."""

        def now() -> tuple[int, int]:
            return self.answered() - self.answered0, self.handed()

        self.dns_lab.pump_until(
            lambda: now() == (answered, handed), seen=lambda: f"(answered, handed) {now()}"
        )

    def handed(self) -> int:
        return self.dns_lab.tracker.names_handed.get(self.v4, 0) - self.handed0

    def deduplicated(self) -> int:  # node-wide: other answers on the host may add to it, never take from it
        return self.dns_lab.capture.stats().answers_deduplicated - self.stats0.answers_deduplicated


def test_the_same_answer_is_handed_over_once_within_its_ttl(dns_lab: DnsLab) -> None:
    v4, names = dns_lab.client.ip(socket.AF_INET), dns_lab.tracker.names
    counts = AnswerCounts(dns_lab)
    for _ in range(6):  # other ids, other client ports, the same answer
        serve_answer(dns_lab, ["203.0.113.10", "203.0.113.11"], 3600)
    counts.wait(answered=6, handed=1)  # every answer counted in the kernel, one copy to user space
    assert counts.deduplicated() >= 5
    assert names.name_of("203.0.113.10", v4) == EXT and names.name_of("203.0.113.11", v4) == EXT
    # another answer (round robin: another address) is handed over; then both are known and kept
    serve_answer(dns_lab, ["203.0.113.12", "203.0.113.11"], 3600)
    counts.wait(answered=7, handed=2)
    assert names.name_of("203.0.113.12", v4) == EXT
    serve_answer(dns_lab, ["203.0.113.10", "203.0.113.11"], 3600)
    serve_answer(dns_lab, ["203.0.113.12", "203.0.113.11"], 3600)
    counts.wait(answered=9, handed=2)
    assert counts.deduplicated() >= 7


def test_an_answer_is_handed_over_again_after_its_ttl(dns_lab: DnsLab) -> None:
    v4, names, ttl = dns_lab.client.ip(socket.AF_INET), dns_lab.tracker.names, 2
    counts = AnswerCounts(dns_lab)
    serve_answer(dns_lab, ["203.0.113.20"], ttl)
    handed_at = time.monotonic()  # after the kernel's timestamp of the answer: its expiry is before +ttl
    serve_answer(dns_lab, ["203.0.113.20"], ttl)
    counts.wait(answered=2, handed=1)
    assert names.name_of("203.0.113.20", v4) == EXT
    time.sleep(max(0.0, handed_at + ttl + 0.1 - time.monotonic()))  # the record's TTL, in real time
    serve_answer(dns_lab, ["203.0.113.20"], ttl)
    counts.wait(answered=3, handed=2)
    assert names.name_of("203.0.113.20", v4) == EXT  # still named: the resolver keeps answering


def test_an_answer_is_handed_over_again_when_the_name_table_forgets_it(dns_lab: DnsLab) -> None:
    """The table's own clock (here injected) expires the name long before the kernel's TTL would."""
    v4, names = dns_lab.client.ip(socket.AF_INET), dns_lab.tracker.names
    counts = AnswerCounts(dns_lab)
    serve_answer(dns_lab, ["203.0.113.30"], 600)
    counts.wait(answered=1, handed=1)
    dns_lab.clock.offset += 601
    dns_lab.capture.poll()  # the name expires; its answer's key is deleted in the kernel
    assert names.name_of("203.0.113.30", v4) is None
    serve_answer(dns_lab, ["203.0.113.30"], 600)
    counts.wait(answered=2, handed=2)
    assert names.name_of("203.0.113.30", v4) == EXT


def test_answers_the_kernel_cannot_vouch_for_are_handed_over_every_time(dns_lab: DnsLab) -> None:
    client = dns_lab.client.ip(socket.AF_INET)
    counts = AnswerCounts(dns_lab)
    # more records than the kernel walks: no key, every copy handed over
    many = [f"203.0.113.{40 + i}" for i in range(9)]
    serve_answer(dns_lab, many, 3600)
    serve_answer(dns_lab, many, 3600)
    counts.wait(answered=2, handed=2)
    assert dns_lab.capture.stats().answers_unwalked - counts.stats0.answers_unwalked >= 2

    # a second owner name spelled out, not a pointer: the walk stops there, and the copy handed over still
    # carries the TTL of the first record (the walk zeroes TTLs while it hashes, and puts them back)
    def second_owner_spelled_out(reply: bytes) -> bytes:
        second = reply.index(b"\xc0\x0c", reply.index(b"\xc0\x0c") + 2)
        name = b"".join(bytes([len(label)]) + label.encode() for label in EXT.split(".")) + b"\x00"
        return reply[:second] + name + reply[second + 2 :]

    serve_answer(dns_lab, ["203.0.113.60", "203.0.113.61"], 3600, edit=second_owner_spelled_out)
    counts.wait(answered=3, handed=3)
    assert dns_lab.capture.stats().answers_unwalked - counts.stats0.answers_unwalked >= 3
    dns_lab.clock.offset += 60
    assert dns_lab.tracker.names.name_of("203.0.113.60", client) == EXT  # learned with its TTL, not 0

    # A data of 5 bytes: walked and keyed by the kernel, malformed for the parser, which gives the key back
    def bad_rdata(reply: bytes) -> bytes:
        return reply[:-6] + b"\x00\x05" + reply[-4:] + b"\x00"

    def malformed() -> int:
        return dns_lab.tracker.malformed().get(MalformedKey(client, client, "bad_rdata"), 0)

    before = malformed()
    serve_answer(dns_lab, ["203.0.113.50"], 3600, edit=bad_rdata)
    counts.wait(answered=4, handed=4)
    dns_lab.capture.poll()  # the key goes back to the kernel's map: deleted
    serve_answer(dns_lab, ["203.0.113.50"], 3600, edit=bad_rdata)
    counts.wait(answered=5, handed=5)
    assert malformed() - before == 2  # each copy counted


# --- attachment --------------------------------------------------------------------------------------
_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)


def attached_programs(cgroup: Path, attach_type: int) -> int:
    """How many programs are attached directly to this cgroup for this attach type (BPF_PROG_QUERY)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids, count, flags = (ctypes.c_uint32 * 256)(), ctypes.c_uint32(256), ctypes.c_uint32(0)
        res = _libbpf.bpf_prog_query(fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count))
        assert res == 0, os.strerror(ctypes.get_errno())
        return count.value
    finally:
        os.close(fd)


def test_close_detaches_and_a_killed_agent_leaves_nothing_attached(dns_lab: DnsLab) -> None:
    root = cgroup2_root()
    attached = (attached_programs(root, 0), attached_programs(root, 1))  # ingress, egress (ours included)
    script = (
        "from flowmon_agent.dns.capture import DnsCapture\n"
        "from flowmon_agent.dns.tracker import DnsTracker\n"
        "cap = DnsCapture(DnsTracker())\nprint('attached', flush=True)\nimport time; time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
        assert (attached_programs(root, 0), attached_programs(root, 1)) == (attached[0] + 1, attached[1] + 1)
    finally:
        proc.kill()  # SIGKILL: no close(), no cleanup code runs
        proc.wait(timeout=10)
    assert (attached_programs(root, 0), attached_programs(root, 1)) == attached
    with DnsCapture(DnsTracker()) as extra:
        assert attached_programs(root, 1) == attached[1] + 1
        extra.close()
        assert attached_programs(root, 1) == attached[1]


# --- pure helpers --------------------------------------------------------------------------------------
def test_cgroup2_mounts_find_hybrid_and_pure_layouts() -> None:
    hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"
    assert cgroup2_mounts(hybrid) == [Path("/sys/fs/cgroup/unified")]
    assert cgroup2_mounts(pure) == [Path("/sys/fs/cgroup")]
    assert cgroup2_mounts("proc /proc proc rw 0 0\n") == []


def test_ring_records_are_not_trusted() -> None:
    assert decode_event(b"\x00" * 10) is None  # shorter than the header
    header = bytes(8) + bytes(32) + (53).to_bytes(2, "little") * 2 + (3).to_bytes(2, "little") * 2
    pad = bytes(EVENT_HEADER.size - len(header) - 2)  # kind, padding, the kernel's answer key fields
    assert decode_event(header + bytes([7, 1]) + pad + b"abc") is None  # not IPv4 or IPv6
    packet = decode_event(header + bytes([4, 1]) + pad + b"abc")
    assert packet is not None and packet.payload == b"abc" and packet.complete and packet.src == "0.0.0.0"
    cut = decode_event(header + bytes([6, 0]) + pad + b"ab")  # says 3 captured, holds 2
    assert cut is not None and cut.payload == b"ab" and not cut.complete and cut.dst == "::"
