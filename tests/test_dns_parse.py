"""The DNS parser: agrees with dnspython on well-formed messages, classifies hostile ones, never raises."""

from __future__ import annotations

import dns.exception
import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmon_agent.dns.parse import MAX_RECORDS, Malformed, Message, parse_message
from tests.dns_samples import MALFORMED, answer, header, query

# bounded and repeatable: the same examples on every run, no example database written
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=5).map(".".join)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)


@FUZZ
@given(name=names, ident=st.integers(0, 65535), qtype=st.sampled_from(["A", "AAAA", "SRV", "PTR", "TXT"]))
def test_a_query_reads_as_dnspython_wrote_it(name: str, ident: int, qtype: str) -> None:
    msg = parse_message(query(name, qtype, ident))
    ref = dns.message.from_wire(query(name, qtype, ident))
    assert isinstance(msg, Message)
    assert (msg.id, msg.is_response, msg.qname, msg.qtype) == (ident, False, name, ref.question[0].rdtype)
    assert msg.answers == () and msg.complete


@FUZZ
@given(
    name=names,
    family=st.sampled_from(["A", "AAAA"]),
    v4=st.lists(ipv4s, min_size=1, max_size=6, unique=True),
    v6=st.lists(ipv6s, min_size=1, max_size=6, unique=True),
    ttl=st.integers(0, 2**31 - 1),
    cname=st.none() | names,
)
def test_answers_read_as_dnspython_wrote_them(name, family, v4, v6, ttl, cname) -> None:
    addresses = tuple(v4 if family == "A" else v6)
    msg = parse_message(answer(name, family, addresses=addresses, ttl=ttl, cname=cname))
    assert isinstance(msg, Message) and msg.is_response and msg.rcode == 0 and msg.qname == name
    assert sorted(a.address for a in msg.answers) == sorted(addresses)  # an rdataset is a set
    assert {(a.name, a.ttl) for a in msg.answers} == {(cname or name, ttl)}


@pytest.mark.parametrize("rcode,number", [("NXDOMAIN", 3), ("SERVFAIL", 2), ("REFUSED", 5)])
def test_rcode_and_flags(rcode: str, number: int) -> None:
    msg = parse_message(answer("nope.example", "AAAA", rcode=rcode))
    assert isinstance(msg, Message) and msg.rcode == number and msg.qtype == 28 and msg.answers == ()


@pytest.mark.parametrize("what,payload,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_hostile_messages_are_classified(what: str, payload: bytes, reason: str) -> None:
    assert parse_message(payload) == Malformed(reason)


def test_a_capture_cut_keeps_the_answers_before_the_cut_and_is_not_malformed() -> None:
    wire = answer("web.example", "A", addresses=("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    whole = parse_message(wire)
    assert isinstance(whole, Message)
    seen = set()
    for cut in range(len(wire) - 30, len(wire)):  # inside the answer section
        part = parse_message(wire[:cut], complete=False)
        assert isinstance(part, Message) and not part.complete
        assert part.answers == whole.answers[: len(part.answers)]
        seen.add(len(part.answers))
        # the same bytes said to be the whole message are cut short: malformed
        assert isinstance(parse_message(wire[:cut]), Malformed)
    assert seen == {1, 2}


def test_answers_read_are_bounded() -> None:
    many = tuple(f"10.1.{i // 256}.{i % 256}" for i in range(MAX_RECORDS * 3))
    msg = parse_message(answer("big.example", "A", addresses=many))
    assert isinstance(msg, Message) and len(msg.answers) == MAX_RECORDS


def test_odd_label_octets_are_escaped_and_names_lowercased() -> None:
    wire = header() + b"\x03a.B\x02\x00\xff\x03COM\x00\x00\x01\x00\x01"
    msg = parse_message(wire)
    assert isinstance(msg, Message) and msg.qname == "a\\046b.\\000\\255.com"


def test_no_question_and_unknown_counts_in_other_sections() -> None:
    msg = parse_message(header(flags=0x8001, qd=0))  # a FORMERR answer often carries no question
    assert isinstance(msg, Message) and msg.qname == "" and msg.qtype is None and msg.rcode == 1


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 3), st.integers(0, 3))
def test_random_bytes_never_raise(payload: bytes, qd: int, an: int) -> None:
    # raw, and behind a plausible header so that the name and record readers see the random bytes
    for wire in (payload, header(flags=0x8180, qd=qd, an=an) + payload):
        for complete in (True, False):
            assert isinstance(parse_message(wire, complete=complete), Message | Malformed)


@FUZZ
@given(
    base=st.sampled_from(
        [
            answer("web.example", "A", addresses=("10.0.0.1", "10.0.0.2"), cname="edge.cdn.example"),
            answer("six.example", "AAAA", addresses=("fd00::1",)),
            query("q.example", "SRV"),
        ]
    ),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 200),
)
def test_mutated_messages_never_raise_and_agree_with_dnspython_when_both_accept(base, edits, cut) -> None:
    wire = bytearray(base)
    for pos, value in edits:
        if pos < len(wire):
            wire[pos] = value
    payload = bytes(wire[: max(len(wire) - cut, 0)])
    msg = parse_message(payload)
    assert isinstance(msg, Message | Malformed)
    try:
        ref = dns.message.from_wire(payload, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, IndexError):
        return
    if isinstance(msg, Message) and ref.question:
        assert msg.id == ref.id
        assert msg.qname == ref.question[0].name.to_text(omit_final_dot=True).lower() or "\\" in msg.qname
