"""One DNS message from untrusted bytes: header, first question, rcode, and the A/AAAA answers.

Never trusts the packet: a message that is cut short, has counts its bytes cannot hold, a name over
255 octets, a label type other than plain or pointer (a length byte over 63 is one), or a compression
pointer that does not point strictly backwards (the only way a loop could form) is returned as
`Malformed(reason)`. No exception leaves `parse_message`, and every loop consumes bytes, so the work is
bounded by the payload's length (and the answer section by `MAX_RECORDS`).

The kernel copies at most its capture size of each payload; `complete=False` says the bytes end where the
capture stopped, not where the message did: the answers up to that point are returned, the rest are not
known, and that is not malformed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import StrEnum

from flowmon_agent.dns.codes import CLASS_IN, TYPE_A, TYPE_AAAA

MAX_NAME_OCTETS = 255  # RFC 1035 3.1: length octets and labels together
MAX_RECORDS = 64  # answers read per message: enough for any real A/AAAA set, a bound for hostile ones
HEADER_SIZE = 12
MIN_QUESTION_SIZE = 5  # root name + type + class
MIN_RECORD_SIZE = 11  # root name + type + class + ttl + rdlength

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")
_ADDRESS_SIZES = {TYPE_A: 4, TYPE_AAAA: 16}
# label octets shown as themselves; any other octet is written \DDD (as in zone files), a dot as "\."
_PLAIN_OCTETS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*"


class MalformedReason(StrEnum):
    SHORT_HEADER = "short_header"
    TRUNCATED = "truncated"
    COUNTS_EXCEED_PAYLOAD = "counts_exceed_payload"
    BAD_LABEL_TYPE = "bad_label_type"
    NAME_TOO_LONG = "name_too_long"
    BAD_POINTER = "bad_pointer"
    BAD_RDATA = "bad_rdata"


@dataclass(frozen=True, slots=True)
class Answer:
    name: str  # the record's owner (after a CNAME chain, the chain's last name)
    address: str  # IPv4 or IPv6 text form
    ttl: int  # seconds


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    is_response: bool
    opcode: int
    rcode: int
    truncated: bool  # the TC bit: the server says the answer did not fit (the client retries over TCP)
    qname: str  # lower case, no trailing dot; "" when the message has no question
    qtype: int | None
    answers: tuple[Answer, ...]  # A and AAAA records of the answer section, in order
    complete: bool  # False: the capture cut the message; answers after the cut are missing


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: MalformedReason


class _Cut(Exception):
    """The bytes ended inside a field."""


class _Bad(Exception):
    def __init__(self, reason: MalformedReason) -> None:
        self.reason = reason


def parse_message(payload: bytes, *, complete: bool = True) -> Message | Malformed:
    if len(payload) < HEADER_SIZE:
        return Malformed(MalformedReason.SHORT_HEADER)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(payload)
    room = len(payload) - HEADER_SIZE
    if complete and qdcount * MIN_QUESTION_SIZE + (ancount + nscount + arcount) * MIN_RECORD_SIZE > room:
        return Malformed(MalformedReason.COUNTS_EXCEED_PAYLOAD)
    try:
        qname, qtype, offset = _read_questions(payload, qdcount)
    except _Cut:
        return Malformed(MalformedReason.TRUNCATED)
    except _Bad as bad:
        return Malformed(bad.reason)
    answers: list[Answer] = []
    cut = False
    try:
        _read_answers(payload, offset, min(ancount, MAX_RECORDS), answers)
    except _Cut:
        if complete:
            return Malformed(MalformedReason.TRUNCATED)
        cut = True
    except _Bad as bad:
        return Malformed(bad.reason)
    return Message(
        id=ident,
        is_response=bool(flags & 0x8000),
        opcode=(flags >> 11) & 0xF,
        rcode=flags & 0xF,
        truncated=bool(flags & 0x0200),
        qname=qname,
        qtype=qtype,
        answers=tuple(answers),
        complete=complete and not cut,
    )


def _read_questions(data: bytes, qdcount: int) -> tuple[str, int | None, int]:
    """The first question's name and type, and the offset after the last question."""
    offset, qname, qtype = HEADER_SIZE, "", None
    for index in range(qdcount):
        name, offset = _read_name(data, offset)
        if offset + _QUESTION_TAIL.size > len(data):
            raise _Cut
        if index == 0:
            qname, qtype = name, _QUESTION_TAIL.unpack_from(data, offset)[0]
        offset += _QUESTION_TAIL.size
    return qname, qtype, offset


def _read_answers(data: bytes, offset: int, count: int, out: list[Answer]) -> None:
    for _ in range(count):
        name, offset = _read_name(data, offset)
        if offset + _RECORD_TAIL.size > len(data):
            raise _Cut
        rtype, rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(data, offset)
        offset += _RECORD_TAIL.size
        if offset + rdlength > len(data):
            raise _Cut
        size = _ADDRESS_SIZES.get(rtype) if rclass == CLASS_IN else None
        if size is not None:
            if rdlength != size:
                raise _Bad(MalformedReason.BAD_RDATA)
            address = _address_text(data[offset : offset + size])
            out.append(Answer(name, address, ttl if ttl < 2**31 else 0))  # RFC 2181 8: top bit set = 0
        offset += rdlength


def _read_name(data: bytes, start: int) -> tuple[str, int]:
    """A (possibly compressed) name at `start`: its text and the offset after it in the message.

    Each pointer must point before the start of the piece of name that holds it, so the pieces read
    move strictly backwards and no loop can form; the name's octets are capped at 255 as on the wire."""
    labels: list[str] = []
    pos, piece_start, resume, octets = start, start, -1, 1
    end = len(data)
    while True:
        if pos >= end:
            raise _Cut
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= end:
                raise _Cut
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= piece_start:
                raise _Bad(MalformedReason.BAD_POINTER)
            if resume < 0:
                resume = pos + 2
            pos = piece_start = target
            continue
        if kind:
            raise _Bad(MalformedReason.BAD_LABEL_TYPE)  # 0x40 (extended) and 0x80 are not in use
        if length == 0:
            return ".".join(labels), resume if resume >= 0 else pos + 1
        octets += length + 1
        if octets > MAX_NAME_OCTETS:
            raise _Bad(MalformedReason.NAME_TOO_LONG)
        if pos + 1 + length > end:
            raise _Cut
        labels.append(_label_text(data[pos + 1 : pos + 1 + length]))
        pos += 1 + length


def _address_text(raw: bytes) -> str:
    """The text form `ipaddress` gives (flows key peers by it; inet_ntop writes mapped IPv6 otherwise)."""
    if len(raw) == 4:
        return socket.inet_ntoa(raw)
    return str(ipaddress.IPv6Address(raw))


def _label_text(raw: bytes) -> str:
    if not raw.translate(None, _PLAIN_OCTETS):
        return raw.decode("ascii").lower()
    return "".join(chr(b).lower() if b in _PLAIN_OCTETS else f"\\{b:03d}" for b in raw)
