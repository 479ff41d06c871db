"""Names of DNS query types and response codes, as labels: a small fixed set, everything else `other`."""

from __future__ import annotations

# Query types worth a label of their own (IANA "Resource Record (RR) TYPEs"); the rest is `other`, so
# a client asking for type 4242 cannot add a series.
QTYPE_NAMES: dict[int, str] = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    43: "DS",
    46: "RRSIG",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
    257: "CAA",
}

# Response codes of the 4-bit header field (IANA "DNS RCODEs"); 12-15 are unassigned.
RCODE_NAMES: dict[int, str] = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
    11: "DSOTYPENI",
}

OTHER = "other"
TIMEOUT = "timeout"  # the rcode label of a query that no answer matched before its deadline

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1


def qtype_name(qtype: int | None) -> str:
    return QTYPE_NAMES.get(qtype, OTHER) if qtype is not None else OTHER


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, OTHER)
