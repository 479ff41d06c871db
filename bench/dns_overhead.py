"""DNS capture overhead: copy the payload to user space (the product) or parse in the kernel?

    .venv/bin/python -m bench.dns_overhead [--rounds 3] [--seconds 3]

A client pod floods a dnsmasq pod with A queries (32 in flight, one UDP socket; a child process so that
it shares no interpreter lock with the capture). Modes, on the same cgroup-skb hook of bpf/dns.c:
`none` (nothing attached), `floor` (DNS_MODE=0: match the port and count), `copy` (DNS_MODE=1, the
product: copy up to 512 payload bytes to the ring; this process reads every record, parses it and feeds
the tracker), `kparse` (DNS_MODE=2: walk the question in the kernel and hand over a 60-byte record; this
process only counts the records, so it is a lower bound of what parsing in the kernel would cost in user
space). Each round measures `none` right before every mode, in a shuffled order. Reported per mode:
queries/s as a ratio to the `none` beside it (median over rounds), kernel ns per program run (kernel
bpf_stats), and this process's CPU per record read. Then the pure parts in isolation: parse_message and
DnsTracker.observe per packet, and the user-space cost of the proposed hybrid (`hybrid_costs`): queries
and answers without addresses arrive as a kernel-parsed record (id, flags, qtype: struct dns_parsed of
DNS_MODE 2), only answers with records as payload, against every packet as payload (the product).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import ipaddress
import os
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowmon_agent.dns.capture import EVENT_HEADER, attach_cgroup_skb, cgroup2_root, decode_event
from flowmon_agent.dns.parse import Message, parse_message
from flowmon_agent.dns.tracker import DnsTracker, Packet
from flowmon_agent.kernel.loader import load_program
from flowmon_lab.network import Lab
from flowmon_lab.resolver import ResolverConfig, start_resolver

MODES = ("floor", "copy", "kparse")
FLOOD = r"""
import socket, sys, time, struct
server, seconds = sys.argv[1], float(sys.argv[2])
question = b"\x03web\x03lab\x04test\x00\x00\x01\x00\x01"
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(0.5)
sent = answered = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i in range(32):
        header = struct.pack("!HHHHHH", (sent + i) & 0xFFFF, 0x0100, 1, 0, 0, 0)
        sock.sendto(header + question, (server, 53))
    sent += 32
    for _ in range(32):
        try:
            sock.recv(512)
            answered += 1
        except TimeoutError:
            break
print(answered / seconds)
"""


def program_stats(bpf) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the loaded programs (kernel.bpf_stats_enabled=1)."""
    total_ns = total_runs = 0
    for fn in bpf.funcs.values():
        info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
        total_ns += int(fields.get("run_time_ns", 0))
        total_runs += int(fields.get("run_cnt", 0))
    return total_ns, total_runs


@contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = knob.read_text()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(previous)


class Mode:
    """One variant, loaded once, attached for its measurements only. `copy` does in its ring callback
    what DnsCapture does: decode the record, feed the tracker."""

    def __init__(self, name: str, cgroup_fd: int) -> None:
        self.name, self.cgroup_fd, self.records = name, cgroup_fd, 0
        self.tracker = DnsTracker()
        self.bpf = load_program("dns.c", {"DNS_MODE": MODES.index(name)})
        ring = {"copy": b"dns_events", "kparse": b"dns_parsed_events"}.get(name)
        if ring:
            self.bpf[ring].open_ring_buffer(self._on_record)
        self.links: list[int] = []

    def _on_record(self, _ctx, data, size) -> int:
        self.records += 1
        if self.name == "copy":
            packet = decode_event(ctypes.string_at(data, size))
            if packet is not None:
                self.tracker.observe(packet)
        return 0

    def attach(self) -> None:
        self.links = attach_cgroup_skb(self.bpf, self.cgroup_fd)

    def detach(self) -> None:
        for fd in self.links:
            os.close(fd)
        self.links = []

    def drain(self, timeout_ms: int) -> None:
        if self.name == "floor":
            time.sleep(timeout_ms / 1000)
            return
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        self.tracker.expire()

    def stats(self) -> tuple[int, int]:
        return program_stats(self.bpf)


def flood(lab: Lab, client, server, seconds: float, mode: Mode | None) -> tuple[float, float, int, int, int]:
    """qps, this process's CPU seconds, kernel ns, program runs, records read during one flood."""
    proc = lab.popen(
        client, [sys.executable, "-c", FLOOD, str(server.ipv4), str(seconds)], stdout=subprocess.PIPE
    )
    cpu0, records0 = time.process_time(), mode.records if mode else 0
    ns0, runs0 = mode.stats() if mode else (0, 0)
    ns1 = runs1 = 0
    while proc.poll() is None:
        if mode:
            ns1, runs1 = mode.stats()
            mode.drain(50)
        else:
            time.sleep(0.05)
    if mode:
        ns1, runs1 = mode.stats()
        mode.drain(0)
    qps = float(proc.stdout.read().decode())
    records = mode.records - records0 if mode else 0
    return qps, time.process_time() - cpu0, ns1 - ns0, runs1 - runs0, records


def pure_costs(samples: int = 20000) -> tuple[float, float]:
    """µs per parse_message and per DnsTracker.observe (query + answer pairs), on this CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.dns_samples import answer, query

    q, a = query("web.lab.test", "A", 1), answer("web.lab.test", "A", 1, addresses=("10.99.0.7",))
    t0 = time.process_time()
    for _ in range(samples):
        parse_message(a)
    parse_us = (time.process_time() - t0) / samples * 1e6
    tracker = DnsTracker()
    packets = [
        (Packet("10.0.0.1", 1000 + i % 5000, "10.0.0.53", 53, True, 1.0, q),
         Packet("10.0.0.53", 53, "10.0.0.1", 1000 + i % 5000, False, 1.001, a))
        for i in range(samples // 2)
    ]  # fmt: skip
    t0 = time.process_time()
    for qp, ap in packets:
        tracker.observe(qp)
        tracker.observe(ap)
    return parse_us, (time.process_time() - t0) / samples * 1e6


# struct dns_parsed in bpf/dns.c (DNS_MODE 2): ts, saddr, daddr, sport, dport, id, flags, qtype, family,
# egress (then padding)
PARSED = struct.Struct("=Q16s16sHHHHHBB")


@functools.lru_cache(maxsize=4096)
def _address(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw))


def decode_parsed(raw: bytes) -> tuple[Packet, Message]:
    """A kernel-parsed record as the tracker's input, without parsing any DNS bytes here."""
    ts_ns, saddr, daddr, sport, dport, ident, flags, qtype, family, egress = PARSED.unpack_from(raw)
    packet = Packet(
        _address(family, saddr), sport, _address(family, daddr), dport, bool(egress), ts_ns / 1e9, b""
    )
    opcode, rcode = (flags >> 11) & 0xF, flags & 0xF
    return packet, Message(
        ident, bool(flags & 0x8000), opcode, rcode, bool(flags & 0x200), "", qtype, (), True
    )


def hybrid_costs(transactions: int = 10000) -> dict[str, tuple[float, float]]:
    """µs of this process per packet, (every packet as payload, hybrid), for two mixes of transactions:
    every answer carries an address, and half are NXDOMAIN (the `ndots` search-path expansion)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.dns_samples import answer, query

    client, server = socket_bytes("10.0.0.1"), socket_bytes("10.0.0.53")

    def copy_record(src: bytes, dst: bytes, sport: int, dport: int, egress: int, payload: bytes) -> bytes:
        head = EVENT_HEADER.pack(1_000_000, src, dst, sport, dport, len(payload), len(payload), 4, egress)
        return head + payload

    def parsed_record(src: bytes, dst: bytes, sport: int, dport: int, egress: int, payload: bytes) -> bytes:
        ident, flags = struct.unpack_from("!HH", payload)
        return PARSED.pack(1_000_000, src, dst, sport, dport, ident, flags, 1, 4, egress) + bytes(4)

    out = {}
    for mix, nx_share in (("all answered with an address", 0.0), ("half NXDOMAIN", 0.5)):
        packets = []  # (query payload, answer payload, answer has records)
        for i in range(transactions):
            ident, port = i % 65536, 1024 + i % 50000
            nx = (i % 100) < nx_share * 100
            name = "nope.lab.test" if nx else "web.lab.test"
            reply = answer(name, "A", ident, rcode="NXDOMAIN" if nx else "NOERROR",
                           addresses=() if nx else ("10.99.0.7",))  # fmt: skip
            packets.append((port, query(name, "A", ident), reply, not nx))
        costs = []
        for hybrid in (False, True):
            records = []
            for port, ask, reply, has_records in packets:
                make_query = parsed_record if hybrid else copy_record
                make_answer = copy_record if (has_records or not hybrid) else parsed_record
                records.append((make_query is parsed_record, make_query(client, server, port, 53, 1, ask)))
                records.append(
                    (make_answer is parsed_record, make_answer(server, client, 53, port, 0, reply))
                )
            tracker = DnsTracker()
            t0 = time.process_time()
            for parsed, raw in records:
                if parsed:
                    tracker.observe_message(*decode_parsed(raw))
                else:
                    packet = decode_event(raw)
                    if packet is not None:
                        tracker.observe(packet)
            costs.append((time.process_time() - t0) / len(records) * 1e6)
            assert sum(tracker.requests().values()) == transactions
        out[mix] = (costs[0], costs[1])
    return out


def socket_bytes(address: str) -> bytes:
    return ipaddress.IPv4Address(address).packed + bytes(12)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--pure-only", action="store_true", help="only the user-space costs (no netns, no BPF)"
    )
    args = parser.parse_args()
    if args.pure_only:
        report_pure()
        return
    cgroup_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    results: dict[str, dict[str, list[float]]] = {m: {"ratio": [], "ns": [], "cpu_us": []} for m in MODES}
    modes = {m: Mode(m, cgroup_fd) for m in MODES}
    with Lab("bdns", ["cl", "dns"]) as lab, bpf_stats_enabled():
        client, server = lab.pod("cl"), lab.pod("dns")
        start_resolver(
            lab, server, ResolverConfig(local_zone="lab.test", hosts={"web.lab.test": ["10.99.0.7"]})
        )
        flood(lab, client, server, 1.0, None)  # warm-up
        for r in range(args.rounds):
            order = list(MODES)
            random.Random(r).shuffle(order)
            for name in order:
                base_qps, *_ = flood(lab, client, server, args.seconds, None)
                mode = modes[name]
                mode.attach()
                try:
                    qps, cpu, ns, runs, records = flood(lab, client, server, args.seconds, mode)
                finally:
                    mode.detach()
                results[name]["ratio"].append(qps / base_qps)
                results[name]["ns"].append(ns / max(runs, 1))
                results[name]["cpu_us"].append(cpu / max(records, 1) * 1e6)
                print(f"round {r} {name:7s} none {base_qps:8.0f} q/s  {name} {qps:8.0f} q/s  "
                      f"{ns / max(runs, 1):6.0f} ns/run  {runs} runs  {records} records  "
                      f"{cpu / max(records, 1) * 1e6:6.1f} µs CPU/record", flush=True)  # fmt: skip
    os.close(cgroup_fd)
    print("\nmode     q/s vs none (median)  kernel ns/run  user CPU µs/record")
    for name in MODES:
        res = results[name]
        print(f"{name:8s} {statistics.median(res['ratio']):20.3f}  {statistics.median(res['ns']):13.0f}  "
              f"{statistics.median(res['cpu_us']):18.1f}")  # fmt: skip
    report_pure()


def report_pure() -> None:
    parse_us, observe_us = pure_costs()
    print(f"pure: parse_message {parse_us:.2f} µs/answer; DnsTracker.observe {observe_us:.2f} µs/packet")
    for mix, (copy_us, hybrid_us) in hybrid_costs().items():
        print(f"user space per packet, {mix}: payload always {copy_us:.2f} µs, hybrid {hybrid_us:.2f} µs "
              f"({hybrid_us / copy_us:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
