"""Pure parts of the kernel agent on synthetic input: map decoding, the counter vector, incarnations of a
flow's entries, the flow book's reads, path choice, /proc/net/tcp parsing. No BPF needed."""

from __future__ import annotations

import platform
from ipaddress import IPv4Address, IPv6Address

import pytest

from flowmon_agent.kernel import adoption as existing
from flowmon_agent.kernel import maps as kernel_maps
from flowmon_agent.kernel import paths as kernel_paths
from flowmon_agent.kernel.counters import (
    COUNTERS,
    HISTOGRAM_SLOTS,
    TCP_WIDTH,
    WIDTH,
    FlowCounters,
    Log2Histogram,
)
from flowmon_agent.kernel.flow_reader import FlowBook, Incarnations
from flowmon_agent.kernel.flows import FlowKey, Reporter
from flowmon_agent.kernel.maps import FLOW_KEY, FLOW_VAL

V4A, V4B = IPv4Address("10.1.2.3"), IPv4Address("10.1.2.4")
V6A, V6B = IPv6Address("fd00::1"), IPv6Address("fd00::2")


def test_struct_sizes_match_the_c_structs() -> None:
    assert (FLOW_KEY.size, FLOW_VAL.size) == (40, 888)
    assert (kernel_maps.RST_PENDING.size, kernel_maps.TUPLE_KEY.size, kernel_maps.IP_KEY.size) == (56, 40, 20)


@pytest.mark.parametrize(
    "key",
    [
        FlowKey(V4A, V4B, 80, Reporter.CLIENT),
        FlowKey(V6A, V6B, 443, Reporter.SERVER),
        FlowKey(V4A, V4B, 8080, Reporter.CLIENT, client_port=40001),
    ],
)
def test_flow_key_round_trip(key: FlowKey) -> None:
    raw = kernel_maps.encode_flow_key(key)
    assert len(raw) == 40
    assert kernel_maps.decode_flow_key(raw) == key


def test_ipv4_mapped_addresses_are_stored_as_ipv4() -> None:
    mapped = IPv6Address("::ffff:10.1.2.3")
    assert kernel_maps.encode_addr(mapped) == kernel_maps.encode_addr(V4A) == (2, V4A.packed + bytes(12))


def test_flow_value_decodes_every_field() -> None:
    lat = [0] * HISTOGRAM_SLOTS
    rtt = [0] * HISTOGRAM_SLOTS
    min_rtt = [0] * HISTOGRAM_SLOTS
    lat[5], rtt[10], rtt[31], min_rtt[9] = 2, 3, 1, 4
    raw = FLOW_VAL.pack(123, 1000, 2000, 5, 4, 1, 2, 3, 0, 1, 0, 50, 9000, *lat, *rtt, 2, 1200, *min_rtt)
    created_ns, c = kernel_maps.decode_flow_value(raw)
    assert created_ns == 123
    assert c[:TCP_WIDTH] == FLOW_VAL.unpack(raw)[1:]  # the vector is the struct's words, in its order
    assert c[TCP_WIDTH:] == (0,) * (WIDTH - TCP_WIDTH)  # then UDP's, zero
    assert (c.sent_bytes, c.received_bytes, c.opened, c.closed, c.active) == (1000, 2000, 5, 4, 1)
    assert (c.failed_refused, c.failed_timeout, c.retransmits_c2s, c.retransmits_s2c) == (1, 2, 3, 0)
    assert (c.resets_c2s, c.resets_s2c) == (1, 0)
    assert c.connect_latency == Log2Histogram(tuple(lat), 50) and c.rtt == Log2Histogram(tuple(rtt), 9000)
    assert c.syn_retransmits == 2 and c.min_rtt == Log2Histogram(tuple(min_rtt), 1200)


def test_counters_by_name_fill_their_words_of_the_vector() -> None:
    c = FlowCounters.of(opened=3, closed=1, rtt_slots=[1] * HISTOGRAM_SLOTS, resets_s2c=2)
    assert len(c) == WIDTH == sum(counter.width for counter in COUNTERS)
    assert (c.opened, c.closed, c.active, c.resets_s2c, c.rtt.count) == (3, 1, 2, 2, HISTOGRAM_SLOTS)
    assert sum(c) == 3 + 1 + 2 + HISTOGRAM_SLOTS
    assert c.named()["rtt_slots"] == (1,) * HISTOGRAM_SLOTS
    assert FlowCounters.of(opened=1, closed=3).active == 0  # opens lost with an evicted entry
    with pytest.raises(ValueError, match="slots"):
        FlowCounters.of(rtt_slots=[1, 2])


@pytest.mark.parametrize(
    ("value", "slot"), [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (1023, 10), (1 << 40, 31)]
)
def test_log2_slot_matches_the_kernel(value: int, slot: int) -> None:
    assert kernel_maps.log2_slot(value) == slot


def test_evicted_flow_keeps_its_totals_when_recreated() -> None:
    inc = Incarnations(1, FlowCounters.of(sent_bytes=10, closed=1, opened=1))
    inc.observe(1, FlowCounters.of(sent_bytes=15, closed=2, opened=2))  # same entry, grew
    inc.observe(7, FlowCounters.of(sent_bytes=4, closed=1, opened=1))  # evicted, re-created from zero
    assert (inc.total.sent_bytes, inc.total.closed, inc.total.opened) == (19, 3, 3)


def test_totals_never_decrease_across_evictions_and_re_creations() -> None:
    """Entries that grow, get evicted (a new created_ns) and start again from zero, many times: every
    word of the total only grows, and ends as the sum of what each entry had last."""
    entries = [
        [
            FlowCounters.of(sent_bytes=s, opened=o, closed=o, rtt_slots=[o] * HISTOGRAM_SLOTS)
            for s, o in ((1, 0), (50, 1), (80, 2))
        ]
        for _ in range(5)
    ]
    inc, previous = None, None
    for created_ns, entry in enumerate(entries, start=1):
        for counters in entry:
            if inc is None:
                inc = Incarnations(created_ns, counters)
            else:
                inc.observe(created_ns, counters)
            if previous is not None:
                assert all(now >= before for now, before in zip(inc.total, previous, strict=True))
            previous = inc.total
    assert inc is not None and inc.total == FlowCounters.of(
        sent_bytes=5 * 80, opened=10, closed=10, rtt_slots=[10] * HISTOGRAM_SLOTS
    )


def flow_entry(i: int, sent: int, created_ns: int = 1) -> tuple[bytes, bytes]:
    """A flow map entry's (key, value) bytes: client 100.64.x.y → V4B:9090, `sent` bytes."""
    key = FlowKey(IPv4Address(0x64400000 + i), V4B, 9090, Reporter.CLIENT)
    value = FlowCounters.of(sent_bytes=sent, opened=1, closed=1)[:TCP_WIDTH]
    return kernel_maps.encode_flow_key(key), FLOW_VAL.pack(created_ns, *value)


def read_into(book: FlowBook, entries: list[tuple[bytes, bytes]], now: float) -> list[bytes]:
    return book.update([k for k, _ in entries], [v for _, v in entries], now)


def test_a_read_decodes_only_new_keys_and_changed_values() -> None:
    """Over a map read again and again, an unchanged entry costs no decoding however many there are;
    totals follow changes, evictions and re-creations as Incarnations say."""
    book = FlowBook()
    entries = [flow_entry(i, 100) for i in range(1000)]
    assert read_into(book, entries, 0.0) == []
    assert (book.decoded_keys, book.decoded_values, len(book.totals)) == (1000, 1000, 1000)
    assert read_into(book, list(reversed(entries)), 1.0) == []  # the same bytes, in another order
    assert (book.decoded_keys, book.decoded_values) == (1000, 1000)
    entries[5] = flow_entry(5, 150)  # grew
    entries[6] = flow_entry(6, 30, created_ns=2)  # evicted and re-created: 100 + 30
    entries.append(flow_entry(1000, 1))  # new
    gone_key, _ = entries.pop(0)  # evicted
    assert read_into(book, entries, 2.0) == [gone_key]
    assert (book.decoded_keys, book.decoded_values) == (1001, 1003)
    assert book.forget(gone_key) not in book.totals and len(book) == len(book.totals) == 1000
    totals = {kernel_maps.encode_flow_key(k): c.sent_bytes for k, c in book.totals.items()}
    assert totals == {k: 150 if i == 5 else 130 if i == 6 else 1 if i == 1000 else 100
                      for k, i in ((flow_entry(i, 0)[0], i) for i in range(1, 1001))}  # fmt: skip
    # idle ones lead the order: the oldest change first, and none younger than asked
    idle = [kernel_maps.decode_flow_key(k).client_ip for k, _ in book.unchanged_for(2.0, 1.5)]
    assert len(idle) == 997 and IPv4Address(0x64400000 + 5) not in idle
    assert [k for k, _ in book.unchanged_for(2.0, 0.0)][-3:] == [entries[4][0], entries[5][0], entries[-1][0]]
    forgotten = flow_entry(7, 100)[0]
    book.forget(forgotten)  # deleted here and in the kernel; the same bytes coming back are a new entry
    read_into(book, entries, 3.0)
    assert book.decoded_keys == 1002 and kernel_maps.decode_flow_key(forgotten) in book.totals


# --- kernel path choice -----------------------------------------------------------------------------------
def exists_except(*gone: str):
    return lambda cat, ev: f"{cat}:{ev}" not in gone


def test_default_path_when_every_tracepoint_exists() -> None:
    paths, reasons = kernel_paths.candidate_paths(exists=exists_except(), raw_supported=lambda: True)
    assert [p.name for p in paths] == ["default", "compat"] and reasons == []
    assert paths[0].cflags == {"FLOWMON_COMPAT": 0, "FLOWMON_RAW": 1, "FLOWMON_RAW_RESET": 1}


def test_compat_path_without_send_length() -> None:
    paths, reasons = kernel_paths.candidate_paths(
        exists=exists_except("sock:sock_send_length"), raw_supported=lambda: False
    )
    assert [p.name for p in paths] == ["compat"]
    assert paths[0].cflags["FLOWMON_RAW_RESET"] == 0
    assert reasons == ["default: missing tracepoints sock:sock_send_length"]


def test_compat_can_be_forced_and_raw_turned_off() -> None:
    paths, _ = kernel_paths.candidate_paths(
        force_compat=True, exists=exists_except(), raw_supported=lambda: True
    )
    assert [p.name for p in paths] == ["compat"]
    paths, _ = kernel_paths.candidate_paths(raw=False, exists=exists_except(), raw_supported=lambda: True)
    assert paths[0].cflags["FLOWMON_RAW"] == 0


@pytest.mark.root
def test_no_path_names_missing_tracepoints_and_kernel(monkeypatch) -> None:
    monkeypatch.setattr(kernel_paths.bpf_loader, "check_host", lambda: None)
    monkeypatch.setattr(kernel_paths.bpf_loader, "tracepoint_exists", exists_except("tcp:tcp_probe"))
    with pytest.raises(kernel_paths.KernelPathError) as err:
        kernel_paths.load()
    assert "tcp:tcp_probe" in str(err.value) and platform.release() in str(err.value)


# --- connections that existed before the agent -----------------------------------------------------------
PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:9C41 0200000A:0050 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 0000000000000000FFFF00000302010A:C350 0000000000000000FFFF00000402010A:01BB 01 00000000:00000000
   1: 000000FD000000000000000001000000:4E20 000000FD000000000000000002000000:9000 01 00000000:00000000
"""


def test_proc_tcp_connections_are_classified() -> None:
    got = existing.classify([PROC_TCP, PROC_TCP6])
    lo = IPv4Address("127.0.0.1")
    assert got == [
        existing.ExistingConnection(lo, 8080, lo, 40000, Reporter.SERVER),  # has a listener
        existing.ExistingConnection(lo, 40000, lo, 8080, Reporter.CLIENT),
        existing.ExistingConnection(V4A, 50000, V4B, 443, Reporter.CLIENT),  # IPv4-mapped
        existing.ExistingConnection(V6A, 20000, V6B, 36864, Reporter.SERVER),  # no listener: by port
    ]


def test_unclaimed_reset_goes_to_the_sending_ends_key_when_that_end_is_traced() -> None:
    client_key = FlowKey(V4A, V4B, 80, Reporter.CLIENT)
    server_key = FlowKey(V4A, V4B, 80, Reporter.SERVER)
    assert kernel_maps.reset_owner(client_key, True, {client_key, server_key}) == server_key
    assert kernel_maps.reset_owner(client_key, True, {client_key}) == client_key  # server not traced here
    assert kernel_maps.reset_owner(server_key, False, {client_key, server_key}) == client_key


def test_udp_value_decodes_into_the_udp_words_and_idle_tuples_are_found() -> None:
    from flowmon_agent.kernel.udp_flows import UDP_ROLE, UDP_VAL, decode_udp_value, idle_tuples

    created_ns, c = decode_udp_value(UDP_VAL.pack(7, 300, 21, 3, 2))
    assert created_ns == 7 and c[:TCP_WIDTH] == (0,) * TCP_WIDTH
    assert (c.udp_sent_bytes, c.udp_received_bytes, c.udp_sent_datagrams, c.udp_received_datagrams) == (
        300,
        21,
        3,
        2,
    )
    assert (c.sent_bytes, c.opened, c.active) == (0, 0, 0)
    entries = [(b"old", UDP_ROLE.pack(1_000, 1)), (b"new", UDP_ROLE.pack(9_000, 0))]
    assert idle_tuples(entries, now_ns=10_000, idle_ns=5_000) == [b"old"]
