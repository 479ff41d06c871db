"""The DNS tracker and its IP→name table: matching, latency, timeouts, names, and every bound."""

from __future__ import annotations

import pytest

from flowmon_agent.dns.kernel_counts import KernelHistogram, KernelTotals, SeriesKey
from flowmon_agent.dns.names import FORGOTTEN_MAX, NameTable
from flowmon_agent.dns.tracker import (
    DnsTracker,
    KernelEvents,
    MalformedKey,
    Packet,
    PairKey,
    RequestKey,
    Vantage,
)
from tests.dns_samples import MALFORMED, answer, header, query

CLIENT, SERVER, OTHER_CLIENT = "10.0.0.1", "10.0.0.53", "10.0.0.2"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sent(payload: bytes, t: float, *, client: str = CLIENT, port: int = 40000, egress: bool = True) -> Packet:
    """A query from client:port to the server, seen leaving the client (or arriving at the server)."""
    return Packet(client, port, SERVER, 53, egress, t, payload)


def replied(payload: bytes, t: float, *, client: str = CLIENT, port: int = 40000, egress: bool = False):
    """The server's answer to client:port, seen arriving at the client (or leaving the server)."""
    return Packet(SERVER, 53, client, port, egress, t, payload)


def req(rcode: str, qtype: str, vantage=Vantage.CLIENT, client: str = CLIENT) -> RequestKey:
    return RequestKey(vantage, client, SERVER, rcode, qtype)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> DnsTracker:
    return DnsTracker(clock=clock, timeout_s=5.0)


def test_an_answer_completes_its_query_with_rcode_qtype_and_latency(tracker: DnsTracker) -> None:
    tracker.observe(sent(query("a.example", "A", 1), 1000.0))
    tracker.observe(replied(answer("a.example", "A", 1, addresses=("192.0.2.1",)), 1000.003))
    tracker.observe(sent(query("b.example", "AAAA", 2), 1000.0))
    tracker.observe(replied(answer("b.example", "AAAA", 2, rcode="NXDOMAIN"), 1000.2))
    assert tracker.requests() == {req("NOERROR", "A"): 1, req("NXDOMAIN", "AAAA"): 1}
    hist = tracker.latency()[PairKey(Vantage.CLIENT, CLIENT, SERVER)]
    assert hist.count == 2 and hist.sum == pytest.approx(0.203)
    assert dict(zip(hist.bounds, hist.cumulative, strict=True))[0.005] == 1
    assert dict(zip(hist.bounds, hist.cumulative, strict=True))[0.25] == 2
    assert tracker.stats().pending == 0


def test_rcode_and_qtype_names_with_other() -> None:
    tracker = DnsTracker(clock=FakeClock())
    cases = [("SRV", "SERVFAIL"), ("PTR", "REFUSED"), ("TYPE999", "NOERROR"), ("TXT", "NOTIMP")]
    for ident, (qtype, rcode) in enumerate(cases):
        tracker.observe(sent(query("x.example", qtype, ident), 1.0))
        tracker.observe(replied(answer("x.example", qtype, ident, rcode=rcode), 1.1))
    unassigned = bytearray(answer("x.example", "A", 99))
    unassigned[3] = (unassigned[3] & 0xF0) | 12  # rcode 12 has no name
    tracker.observe(sent(query("x.example", "A", 99), 1.0))
    tracker.observe(replied(bytes(unassigned), 1.1))
    assert tracker.requests() == {
        req("SERVFAIL", "SRV"): 1,
        req("REFUSED", "PTR"): 1,
        req("NOERROR", "other"): 1,
        req("NOTIMP", "TXT"): 1,
        req("other", "A"): 1,
    }


def test_both_ends_on_the_node_count_once_per_vantage(tracker: DnsTracker) -> None:
    q, a = query("a.example", "A", 7), answer("a.example", "A", 7, addresses=("192.0.2.1",))
    tracker.observe(sent(q, 1.0))  # leaves the client
    tracker.observe(sent(q, 1.001, egress=False))  # arrives at the server
    tracker.observe(replied(a, 1.002, egress=True))  # leaves the server
    tracker.observe(replied(a, 1.003))  # arrives at the client
    assert tracker.requests() == {req("NOERROR", "A"): 1, req("NOERROR", "A", Vantage.SERVER): 1}
    assert tracker.latency()[PairKey(Vantage.SERVER, CLIENT, SERVER)].sum == pytest.approx(0.001)
    assert tracker.latency()[PairKey(Vantage.CLIENT, CLIENT, SERVER)].sum == pytest.approx(0.003)


def test_unanswered_query_times_out_by_the_clock_and_a_late_answer_is_unmatched(tracker, clock) -> None:
    tracker.observe(sent(query("slow.example", "AAAA", 3), clock.now))
    clock.now += 4.9
    assert tracker.expire() == 0 and tracker.stats().pending == 1
    clock.now += 0.2
    assert tracker.expire() == 1
    assert tracker.requests() == {req("timeout", "AAAA"): 1}
    tracker.observe(replied(answer("slow.example", "AAAA", 3), clock.now))
    assert tracker.stats().unmatched_responses == 1 and tracker.requests() == {req("timeout", "AAAA"): 1}


def test_a_retransmitted_query_is_counted_once_with_latency_from_the_first(tracker: DnsTracker) -> None:
    tracker.observe(sent(query("a.example", "A", 5), 10.0))
    tracker.observe(sent(query("a.example", "A", 5), 11.0))
    tracker.observe(replied(answer("a.example", "A", 5), 11.5))
    assert tracker.requests() == {req("NOERROR", "A"): 1} and tracker.stats().retransmitted == 1
    assert tracker.latency()[PairKey(Vantage.CLIENT, CLIENT, SERVER)].sum == pytest.approx(1.5)


def test_the_pending_table_is_bounded_and_counts_what_it_refused(clock: FakeClock) -> None:
    tracker = DnsTracker(clock=clock, max_pending=2)
    for port in (1, 2, 3):
        tracker.observe(sent(query("a.example", "A", 1), 1.0, port=port))
    assert tracker.stats().pending == 2 and tracker.stats().pending_full == 1
    tracker.observe(replied(answer("a.example", "A", 1), 1.1, port=3))
    assert tracker.stats().unmatched_responses == 1


def test_series_past_the_cap_fold_into_overflow(clock: FakeClock) -> None:
    tracker = DnsTracker(clock=clock, max_series=2)
    for i in range(4):
        client = f"10.0.1.{i}"
        tracker.observe(sent(query("a.example", "A", i), 1.0, client=client))
        tracker.observe(replied(answer("a.example", "A", i), 1.1, client=client))
    assert tracker.requests() == {
        req("NOERROR", "A", client="10.0.1.0"): 1,
        req("NOERROR", "A", client="10.0.1.1"): 1,
        RequestKey(Vantage.CLIENT, "overflow", "overflow", "NOERROR", "A"): 2,
    }
    assert tracker.stats().series_overflow == 2
    assert sum(h.count for h in tracker.latency().values()) == 4


def test_malformed_packets_are_counted_by_reason_and_change_nothing_else(tracker: DnsTracker) -> None:
    for _, payload, _ in MALFORMED:
        tracker.observe(sent(payload, 1.0))
    expected: dict[MalformedKey, int] = {}
    for _, _, reason in MALFORMED:
        key = MalformedKey(CLIENT, SERVER, reason)
        expected[key] = expected.get(key, 0) + 1
    assert tracker.malformed() == expected
    assert tracker.requests() == {} and tracker.stats().pending == 0


def test_other_opcodes_are_not_requests(tracker: DnsTracker) -> None:
    notify = header(flags=4 << 11) + b"\x00\x00\x06\x00\x01"  # opcode NOTIFY, question ". SOA"
    tracker.observe(sent(notify, 1.0))
    assert tracker.stats().other_opcodes == 1 and tracker.stats().pending == 0


def test_answers_teach_the_client_names_until_their_ttl(tracker: DnsTracker, clock: FakeClock) -> None:
    tracker.observe(sent(query("api.pay.example", "A", 9), clock.now))
    reply = answer("api.pay.example", "A", 9, addresses=("198.51.100.7",), ttl=30, cname="edge.cdn.example")
    tracker.observe(replied(reply, clock.now))
    assert tracker.names.name_of("198.51.100.7", CLIENT) == "api.pay.example"  # the name asked for
    assert tracker.names.name_of("198.51.100.7") == "api.pay.example"  # node-wide: nobody disagrees
    clock.now += 29.9
    assert tracker.names.name_of("198.51.100.7", CLIENT) == "api.pay.example"
    clock.now += 0.2
    assert tracker.names.name_of("198.51.100.7", CLIENT) is None
    assert tracker.expire() == 0 and tracker.names.stats().entries == 0


def test_only_answers_received_by_a_client_on_the_node_teach_names(tracker: DnsTracker) -> None:
    q, a = query("a.example", "A", 1), answer("a.example", "A", 1, addresses=("192.0.2.9",))
    tracker.observe(sent(q, 1.0, egress=False))  # a remote client's query arriving at a local server
    tracker.observe(replied(a, 1.1, egress=True))
    assert tracker.names.name_of("192.0.2.9") is None
    tracker.observe(replied(answer("b.example", "A", 2, addresses=("192.0.2.10",)), 1.2))  # never asked
    assert tracker.names.name_of("192.0.2.10") is None


def test_names_differ_per_client_and_node_wide_only_when_all_agree(clock: FakeClock) -> None:
    names = NameTable(clock=clock)
    names.learn(CLIENT, "203.0.113.5", "shop.example", 60)
    names.learn(OTHER_CLIENT, "203.0.113.5", "blog.example", 60)
    assert names.name_of("203.0.113.5", CLIENT) == "shop.example"
    assert names.name_of("203.0.113.5", OTHER_CLIENT) == "blog.example"
    assert names.name_of("203.0.113.5", "10.9.9.9") is None  # ambiguous: better unnamed than wrong
    names.learn(OTHER_CLIENT, "203.0.113.5", "shop.example", 60)
    assert names.name_of("203.0.113.5", "10.9.9.9") == "shop.example"


def test_the_name_table_is_bounded_evicting_the_oldest(clock: FakeClock) -> None:
    names = NameTable(clock=clock, max_entries=3, max_ttl_s=100)
    for i in range(5):
        names.learn(CLIENT, f"192.0.2.{i}", f"n{i}.example", 10_000)
    assert names.stats().entries == 3 and names.stats().evicted == 2
    assert names.name_of("192.0.2.0") is None and names.name_of("192.0.2.4") == "n4.example"
    clock.now += 100  # TTLs were capped at max_ttl_s
    assert names.expire() == 3 and names.name_of("192.0.2.4") is None
    for _ in range(20):  # refreshing one entry does not grow the deadline heap without bound
        names.learn(CLIENT, "192.0.2.1", "n1.example", 5)
    assert names.stats().entries == 1


def test_generation_moves_when_a_name_appears_changes_or_goes_not_on_refresh(clock: FakeClock) -> None:
    """What the flow aggregator re-labels external peers on (server_dns_name)."""
    names = NameTable(clock=clock)
    start = names.generation
    names.learn(CLIENT, "203.0.113.5", "shop.example", 10)
    assert names.generation == start + 1
    names.learn(CLIENT, "203.0.113.5", "shop.example", 10)  # a refresh
    assert names.generation == start + 1
    names.learn(CLIENT, "203.0.113.5", "blog.example", 10)
    assert names.generation == start + 2
    clock.now += 11
    assert names.expire() == 1 and names.generation == start + 3
    assert names.expire() == 0 and names.generation == start + 3


def test_named_addresses_most_recent_first_live_only_and_bounded(clock: FakeClock) -> None:
    names = NameTable(clock=clock)
    names.learn(CLIENT, "203.0.113.1", "a.example", 5)
    names.learn(CLIENT, "203.0.113.2", "b.example", 60)
    names.learn(OTHER_CLIENT, "203.0.113.2", "b.example", 60)
    names.learn(CLIENT, "2001:db8::3", "c.example", 60)
    assert names.addresses(10) == ["2001:db8::3", "203.0.113.2", "203.0.113.1"]
    assert names.addresses(2) == ["2001:db8::3", "203.0.113.2"]
    clock.now += 6  # a.example's TTL ran out, even before expire() drops it
    assert names.addresses(10) == ["2001:db8::3", "203.0.113.2"]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        DnsTracker(max_pending=0)
    with pytest.raises(ValueError):
        NameTable(max_entries=0)


def kernel_totals(tracker: DnsTracker, answered: int, seconds: float) -> KernelTotals:
    """What a capture's maps hold: `answered` NOERROR A answers of one pair, each `seconds` late."""
    pair = SeriesKey("client", CLIENT, SERVER)
    buckets = [0] * len(tracker.latency_bounds)
    buckets[next(i for i, b in enumerate(tracker.latency_bounds) if b >= seconds)] = answered
    return KernelTotals(
        requests={SeriesKey("client", CLIENT, SERVER, "NOERROR", "A"): answered},
        latency={pair: KernelHistogram(buckets, answered, answered * seconds)},
        pending=2,
    )


def test_a_closed_captures_kernel_counts_stay_when_the_next_one_starts_from_empty_maps(
    tracker: DnsTracker,
) -> None:
    """The DNS capture is closed when no monitor wants DNS and attached again later, with new maps:
    the exported counters carry on from where they were, never backwards."""
    tracker.observe(sent(query("a.example", "A", 1), 1000.0))
    tracker.observe(replied(answer("a.example", "A", 1), 1000.001))  # one the tracker counted itself
    tracker.absorb_kernel(kernel_totals(tracker, 3, 0.002), KernelEvents(retransmitted=4))
    before = (tracker.requests(), tracker.latency(), tracker.stats())
    assert before[0] == {req("NOERROR", "A"): 4} and before[2].pending == 2
    tracker.retire_kernel()  # the capture closed
    after = (tracker.requests(), tracker.latency(), tracker.stats())
    assert after[:2] == before[:2] and after[2].retransmitted == 4 and after[2].pending == 0
    tracker.absorb_kernel(kernel_totals(tracker, 2, 0.002), KernelEvents(retransmitted=1))  # a new one
    assert tracker.requests() == {req("NOERROR", "A"): 6}
    hist = tracker.latency()[PairKey(Vantage.CLIENT, CLIENT, SERVER)]
    assert hist.count == 6 and hist.sum == pytest.approx(0.001 + 5 * 0.002)
    assert tracker.stats().retransmitted == 5


# --- sources: the kernel's keys of the answers that taught an entry (bpf/dns.c dns_answers) -------------
def test_an_entry_gives_its_answers_back_when_it_expires_or_is_evicted(clock: FakeClock) -> None:
    names = NameTable(clock=clock, max_entries=2)
    names.learn(CLIENT, "203.0.113.1", "a.example", 10, source=b"k1")
    names.learn(CLIENT, "203.0.113.2", "a.example", 60, source=b"k1")  # one answer, two addresses
    names.learn(CLIENT, "203.0.113.1", "a.example", 10, source=b"k1")  # the same answer again
    assert names.take_forgotten().sources == []
    clock.now += 11
    assert names.expire() == 1
    assert names.take_forgotten().sources == [b"k1"]  # the table no longer holds all it taught
    assert names.take_forgotten().sources == []  # taken once
    names.learn(CLIENT, "203.0.113.3", "c.example", 60, source=b"k3")
    names.learn(CLIENT, "203.0.113.4", "d.example", 60, source=b"k4")  # full: 203.0.113.2 evicted
    assert names.take_forgotten().sources == [b"k1"] and names.stats().evicted == 1


def test_a_renamed_entry_gives_back_what_taught_the_old_name_sources_bounded(clock: FakeClock) -> None:
    names = NameTable(clock=clock)
    names.learn(CLIENT, "203.0.113.5", "shop.example", 60, source=b"old")
    names.learn(CLIENT, "203.0.113.5", "blog.example", 60, source=b"new")
    assert names.take_forgotten().sources == [b"old"]
    for i in range(6):  # round-robin answers sharing the address: the oldest beyond four go back
        names.learn(CLIENT, "203.0.113.5", "blog.example", 60, source=f"rr{i}".encode())
    assert names.take_forgotten().sources == [b"new", b"rr0", b"rr1"]
    names.learn(OTHER_CLIENT, "203.0.113.5", "blog.example", 60)  # no key: nothing to give back
    clock.now += 61
    names.expire()
    assert sorted(names.take_forgotten().sources) == [b"rr2", b"rr3", b"rr4", b"rr5"]


def test_the_forgotten_queue_is_bounded(clock: FakeClock) -> None:
    names = NameTable(clock=clock)
    names.release(*range(FORGOTTEN_MAX + 1))
    forgotten = names.take_forgotten()
    assert forgotten.everything and forgotten.sources == []
    assert not names.take_forgotten().everything


def test_an_answer_that_does_not_parse_gives_its_key_back(tracker: DnsTracker) -> None:
    bad = next(payload for _, payload, reason in MALFORMED if reason == "bad_rdata")
    tracker.learn_names(replied(bad, 1.0), source=b"key")
    assert tracker.names.take_forgotten().sources == [b"key"]
    good = answer("a.example", "A", 1, addresses=("192.0.2.9",), ttl=30)
    tracker.learn_names(replied(good, 1.1), source=b"good")
    assert tracker.names.take_forgotten().sources == [] and tracker.names.name_of("192.0.2.9") == "a.example"
