"""DNS messages for tests, built with dnspython (the reference), and hand-made malformed ones."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def query(name: str, qtype: str = "A", ident: int = 4242) -> bytes:
    msg = dns.message.make_query(name, qtype, use_edns=False)
    msg.id = ident
    return msg.to_wire()


def answer(
    name: str,
    qtype: str = "A",
    ident: int = 4242,
    *,
    rcode: str = "NOERROR",
    addresses: tuple[str, ...] = (),
    ttl: int = 300,
    cname: str | None = None,
) -> bytes:
    """The response to `query(name, qtype, ident)`: `addresses` as records of `qtype` (of `cname` when
    given, after a CNAME from `name` to it), compressed the way servers compress."""
    msg = dns.message.make_response(dns.message.from_wire(query(name, qtype, ident)))
    msg.set_rcode(dns.rcode.from_text(rcode))
    owner = name
    if cname:
        msg.answer.append(dns.rrset.from_text(f"{name}.", ttl, "IN", "CNAME", f"{cname}."))
        owner = cname
    if addresses:
        msg.answer.append(dns.rrset.from_text(f"{owner}.", ttl, "IN", qtype, *addresses))
    return msg.to_wire()


def header(ident: int = 1, flags: int = 0, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


# (what is wrong, the bytes, the reason the parser must give)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "short_header"),
    ("eleven bytes", b"\x00" * 11, "short_header"),
    ("question cut in its name", header() + b"\x07example", "truncated"),
    ("question without type and class", header() + b"\x07example\x03com\x00", "truncated"),
    ("counts beyond the payload", header(qd=1, an=60000) + b"\x00\x00\x01\x00\x01", "counts_exceed_payload"),
    ("pointer to itself", header() + b"\xc0\x0c\x00\x01\x00\x01", "bad_pointer"),
    ("pointer forwards", header() + b"\xc0\x20\x00\x01\x00\x01" + b"\x00" * 30, "bad_pointer"),
    # 12: "a" then a pointer back to 12: a loop through a label
    ("pointer loop through a label", header() + b"\x01a\xc0\x0c\x00\x01\x00\x01", "bad_pointer"),
    ("label type 0x40", header() + b"\x41" + b"x" * 70 + b"\x00\x00\x01\x00\x01", "bad_label_type"),
    (
        "name of 300 octets",
        header() + b"\x3f" + b"a" * 63 + (b"\x3f" + b"b" * 63) * 4 + b"\x00\x00\x01\x00\x01",
        "name_too_long",
    ),
    (
        "A record with 5 bytes of data",
        header(flags=0x8180, an=1)
        + b"\x01a\x00\x00\x01\x00\x01"
        + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c"
        + b"\x00\x05"
        + b"\x01\x02\x03\x04\x05",
        "bad_rdata",
    ),
    (
        "answer cut in its data",
        header(flags=0x8180, an=1)
        + b"\x01a\x00\x00\x01\x00\x01"
        + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c"
        + b"\x00\x04"
        + b"\x01\x02",
        "truncated",
    ),
]
