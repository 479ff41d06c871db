"""What Python mirrors of bpf/flowmon.c and bpf/udp.c, checked against the C source itself: the constants
(cfg and stats indexes, map sizes, run bounds), the counter table (struct flow_val's fields, then struct
udp_val's, in order) and the byte layout of every map entry Python decodes or encodes. A change on one
side only fails here."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import pytest

from flowmon_agent.kernel import maps, udp_flows
from flowmon_agent.kernel.counters import (
    COUNTERS,
    HISTOGRAM_SLOTS,
    TCP_COUNTERS,
    TCP_WIDTH,
    UDP_COUNTERS,
    WIDTH,
    Kind,
)
from flowmon_agent.kernel.loader import BPF_DIR

HEADERS = "".join((BPF_DIR / name).read_text() for name in ("flow_key.h", "peer_fold.h"))  # both include
C_SOURCE = (BPF_DIR / "flowmon.c").read_text() + HEADERS
UDP_SOURCE = (BPF_DIR / "udp.c").read_text() + HEADERS
C_TYPES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "s32": 4}


def c_defines(source: str) -> dict[str, str]:
    """Every `#define NAME value` (the first one: an #ifndef default comes before any other)."""
    found: dict[str, str] = {}
    for name, value in re.findall(r"^\s*#define\s+(\w+)\s+(.+?)\s*(?://.*)?$", source, re.M):
        found.setdefault(name, value)
    return found


DEFINES = c_defines(C_SOURCE)


def c_int(name: str) -> int:
    return int(DEFINES[name].rstrip("ULul"), 0)


@dataclass(frozen=True)
class CField:
    name: str
    offset: int
    size: int
    align: int
    count: int  # array length (1 for a scalar)
    ctype: str


def c_struct(name: str, source: str = C_SOURCE) -> list[CField]:
    """The fields of `struct name` with their offsets, by C's natural alignment."""
    body = re.search(rf"^struct {name} \{{(.*?)^\}};", source, re.M | re.S)
    assert body, f"struct {name} not found"
    fields: list[CField] = []
    offset = 0
    for line in body.group(1).splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(struct \w+|\w+) (\w+)(?:\[(\w+)\])?;", line)
        assert m, f"unparsed line in struct {name}: {line}"
        ctype, field, length = m.groups()
        if ctype.startswith("struct "):
            inner = c_struct(ctype.split()[1], source)
            align = max(f.align for f in inner)
            size = -(-(inner[-1].offset + inner[-1].size * inner[-1].count) // align) * align
        else:
            size = align = C_TYPES[ctype]
        count = 1 if length is None else (int(length) if length.isdigit() else c_int(length))
        offset = -(-offset // align) * align
        fields.append(CField(field, offset, size, align, count, ctype))
        offset += size * count
    return fields


def c_size(fields: list[CField]) -> int:
    align = max(f.align for f in fields)
    end = fields[-1].offset + fields[-1].size * fields[-1].count
    return -(-end // align) * align


def c_items(fields: list[CField]) -> list[tuple[int, int]]:
    """(offset, size) of every value Python unpacks: byte arrays whole, other arrays word by word; pads
    left out."""
    items = []
    for f in fields:
        if f.name.startswith("pad"):
            continue
        if f.count > 1 and f.ctype != "u8":
            items += [(f.offset + i * f.size, f.size) for i in range(f.count)]
        else:
            items.append((f.offset, f.size * f.count))
    return items


def python_items(layout: struct.Struct) -> list[tuple[int, int]]:
    assert layout.format.startswith("<"), "map layouts are packed little-endian with explicit pads"
    items, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format[1:]):
        n = int(count or 1)
        if code == "x":
            offset += n
        elif code == "s":
            items.append((offset, n))
            offset += n
        else:
            size = struct.calcsize(f"<{code}")
            items += [(offset + i * size, size) for i in range(n)]
            offset += n * size
    return items


@pytest.mark.parametrize(
    ("c_name", "layout"),
    [
        ("flow_key", maps.FLOW_KEY),
        ("flow_val", maps.FLOW_VAL),
        ("rst_pending_val", maps.RST_PENDING),
        ("tuple_key", maps.TUPLE_KEY),
        ("ip_key", maps.IP_KEY),
        ("peer_net_key", maps.PEER_NET_KEY),
        ("peer_net_val", maps.PEER_NET_VAL),
    ],
)
def test_map_layouts_match_the_c_structs(c_name: str, layout: struct.Struct) -> None:
    fields = c_struct(c_name)
    assert layout.size == c_size(fields)
    assert python_items(layout) == c_items(fields)


def test_the_counter_table_is_struct_flow_val_after_created_ns_then_struct_udp_val() -> None:
    created, *counters = c_struct("flow_val")
    assert (created.name, created.ctype) == ("created_ns", "u64")
    assert [(f.name, f.count) for f in counters] == [(c.c_name, c.width) for c in TCP_COUNTERS]
    assert all(f.ctype == "u64" for f in counters)
    assert [c.width > 1 for c in COUNTERS] == [c.kind is Kind.HISTOGRAM_SLOTS for c in COUNTERS]
    histograms = sum(c.kind is Kind.HISTOGRAM_SLOTS for c in TCP_COUNTERS)
    assert (
        sum(c.width for c in TCP_COUNTERS)
        == TCP_WIDTH
        == len(counters) - histograms + histograms * HISTOGRAM_SLOTS
    )
    assert maps.FLOW_VAL.size == 8 * (1 + TCP_WIDTH)
    created, *udp = c_struct("udp_val", UDP_SOURCE)
    assert (created.name, created.ctype) == ("created_ns", "u64")
    assert [(f.name, f.count, f.ctype) for f in udp] == [(c.c_name, 1, "u64") for c in UDP_COUNTERS]
    assert [c.index for c in UDP_COUNTERS] == list(range(TCP_WIDTH, WIDTH))
    assert udp_flows.UDP_VAL.size == 8 * (1 + WIDTH - TCP_WIDTH)


@pytest.mark.parametrize(
    ("c_name", "layout"),
    [
        ("flow_key", maps.FLOW_KEY),  # the same key as TCP's: one decoder
        ("udp_val", udp_flows.UDP_VAL),
        ("udp_role", udp_flows.UDP_ROLE),
        ("ip_key", maps.IP_KEY),  # written by the same ConfigMaps
    ],
)
def test_udp_map_layouts_match_the_c_structs(c_name: str, layout: struct.Struct) -> None:
    fields = c_struct(c_name, UDP_SOURCE)
    assert layout.size == c_size(fields)
    assert python_items(layout) == c_items(fields)


def test_udp_constants_match_the_c_source() -> None:
    defines = c_defines(UDP_SOURCE)
    assert {name: int(defines[name]) for name in udp_flows.DEFAULT_UDP_SIZES} == udp_flows.DEFAULT_UDP_SIZES
    stats = re.findall(r"^\s+(UST_\w+) = (\d+),", UDP_SOURCE, re.M)
    mirrored = {name: value for name, value in vars(udp_flows).items() if name.startswith("UST_")}
    assert mirrored == {name: int(value) for name, value in stats if name != "UST_MAX"}
    assert (int(defines["FM_ROLE_CLIENT"]), int(defines["FM_AF_INET6"])) == (maps.ROLE_CLIENT, maps.AF_INET6)
    cfg = re.search(r"BPF_ARRAY\(cfg, u64, (\d+)\)", UDP_SOURCE)
    assert cfg and int(cfg.group(1)) == len(python_constants("CFG_"))
    assert "cfg[0] local-IP filter on, cfg[1] ignored ports on" in UDP_SOURCE
    assert (maps.CFG_FILTER, maps.CFG_PORTS) == (0, 1)


def python_constants(prefix: str) -> dict[str, int]:
    return {name: value for name, value in vars(maps).items() if name.startswith(prefix)}


@pytest.mark.parametrize(("prefix", "not_mirrored"), [("CFG_", set()), ("ST_", {"ST_MAX"})])
def test_array_indexes_match_the_c_defines(prefix: str, not_mirrored: set[str]) -> None:
    in_c = {name: c_int(name) for name in DEFINES if name.startswith(prefix)}
    for name in not_mirrored:
        in_c.pop(name)
    assert python_constants(prefix) == in_c


def test_array_sizes_hold_the_indexes() -> None:
    cfg_size = re.search(r"BPF_ARRAY\(cfg, u64, (\d+)\)", C_SOURCE)
    assert cfg_size and int(cfg_size.group(1)) == len(python_constants("CFG_"))
    assert max(python_constants("ST_").values()) < c_int("ST_MAX")


def test_sizes_and_bounds_match_the_c_defaults() -> None:
    assert {name: c_int(name) for name in maps.DEFAULT_SIZES} == maps.DEFAULT_SIZES
    assert set(maps.DEFAULT_SIZES) | {"CLOSE_SLOTS"} == {
        name for name in re.findall(r"^#ifndef (\w+_MAX|CLOSE_SLOTS)$", C_SOURCE, re.M)
    }
    for name in ("FOLD_STEPS", "CLOSE_SLOTS", "FLUSH_PER_RUN"):
        assert getattr(maps, name) == c_int(name), name
    assert (
        c_int("FM_SLOTS"),
        c_int("FM_ROLE_CLIENT"),
        c_int("FM_ROLE_SERVER"),
    ) == (HISTOGRAM_SLOTS, maps.ROLE_CLIENT, maps.ROLE_SERVER)
    assert (c_int("FM_AF_INET"), c_int("FM_AF_INET6")) == (maps.AF_INET, maps.AF_INET6)
    words = re.fullmatch(r"\(\(SOCK_MAX \+ (\d+)\) / (\d+)\)", DEFINES["MARK_WORDS"])
    assert words and int(words.group(2)) == maps.MARK_WORD_SLOTS == int(words.group(1)) + 1
