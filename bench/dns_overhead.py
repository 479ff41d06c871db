"""DNS capture overhead: copy the payload to user space, or keep the transactions in the kernel?

    .venv/bin/python -m bench.dns_overhead [--rounds 3] [--seconds 3] [--qname web.lab.test]

A client pod floods a dnsmasq pod with A queries (32 in flight, one UDP socket; a child process so that
it shares no interpreter lock with the capture). Modes, on the same cgroup-skb hook of bpf/dns.c: `none`
(nothing attached), `floor` (DNS_MODE=0: match the port and count), `copy` (DNS_MODE=1, the product
until 2026-12-06: copy up to 512 payload bytes to the ring; this process reads every record, parses it
and feeds the tracker), `kparse` (DNS_MODE=2: walk the question in the kernel and hand over a 60-byte
record; this process only counts the records), `kernel` (DNS_MODE=3, the product: the real DnsCapture,
transactions counted in kernel maps, only answers with addresses copied, for names, each once per TTL;
its poll reads the maps and sweeps timeouts), `kernel-every` (the same, every answer with addresses
copied: the product before answers were handed over once per TTL). Each round measures `none` right
before every mode, in a shuffled order. Reported per mode: queries/s as a ratio to the `none` beside it
(median over rounds), kernel ns per program run and per query (kernel bpf_stats), this process's CPU per
record read and per query answered (the bench's own loop, ~the same in every mode, included), and what
that makes at a busy node's 2,000 queries/s. `--qname nope.lab.test` floods with NXDOMAIN answers (no
addresses); `--rate 2000` sends at that rate instead of as fast as answers come (then the user CPU per
second is the share of a core itself). Then the pure parts in isolation: parse_message and
DnsTracker.observe per packet, and the user-space cost of the hybrid measured before (`hybrid_costs`):
queries and answers without addresses arrive as a kernel-parsed record (id, flags, qtype: struct
dns_parsed of DNS_MODE 2), only answers with records as payload, against every packet as payload
(DNS_MODE 1).
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

from flowmon_agent.dns.capture import EVENT_HEADER, DnsCapture, cgroup2_root, decode_event
from flowmon_agent.dns.parse import Message, parse_message
from flowmon_agent.dns.tracker import DnsTracker, Packet
from flowmon_agent.kernel.cgroup_skb import attach_cgroup_skb
from flowmon_agent.kernel.loader import load_program
from flowmon_lab.network import Lab
from flowmon_lab.resolver import ResolverConfig, start_resolver

MODES = ("floor", "copy", "kparse", "kernel", "kernel-every")  # index = DNS_MODE (kernel-every: 3 too)
NODE_QPS = 2_000  # a busy node's DNS: what the per-query costs are scaled to
# The resolver's zone (bench/kernel_overhead.py's DNS workloads query it too): A answers by default
LAB_RESOLVER = ResolverConfig(local_zone="lab.test", hosts={"web.lab.test": ["10.99.0.7"]})
QNAME = "web.lab.test"
FLOOD = r"""
import socket, sys, time, struct
server, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[4])
question = b"".join(bytes([len(l)]) + l.encode() for l in sys.argv[3].split(".")) + b"\x00\x00\x01\x00\x01"
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(0.5)
sent = answered = 0
start = time.monotonic()
end = start + seconds
while time.monotonic() < end:
    if rate > 0:
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
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
    what DnsCapture did before the kernel kept transactions: decode the record, feed the tracker.
    `kernel` is the product's DnsCapture itself, attached for the measurement only."""

    def __init__(self, name: str, cgroup_fd: int) -> None:
        self.name, self.cgroup_fd, self.records = name, cgroup_fd, 0
        self.tracker = DnsTracker()
        self.capture: DnsCapture | None = None
        self.links: list[int] = []
        if name.startswith("kernel"):
            return
        self.bpf = load_program("dns.c", {"DNS_MODE": MODES.index(name)})
        ring = {"copy": b"dns_events", "kparse": b"dns_parsed_events"}.get(name)
        if ring:
            self.bpf[ring].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx, data, size) -> int:
        self.records += 1
        if self.name == "copy":
            packet = decode_event(ctypes.string_at(data, size))
            if packet is not None:
                self.tracker.observe(packet)
        return 0

    def attach(self) -> None:
        if self.name.startswith("kernel"):
            self.capture = DnsCapture(self.tracker, answers_once=self.name == "kernel")
            self.bpf = self.capture.bpf
            return
        self.links = attach_cgroup_skb(self.bpf, self.cgroup_fd, b"dns_ingress", b"dns_egress")

    def detach(self) -> None:
        if self.capture is not None:
            self.records += self.capture.stats().read
            self.capture.close()
            self.capture = None
        for fd in self.links:
            os.close(fd)
        self.links = []

    def read_records(self) -> int:
        return self.records + (self.capture.stats().read if self.capture is not None else 0)

    def drain(self, timeout_ms: int) -> None:
        if self.capture is not None:
            self.capture.poll(timeout_ms)
            return
        if self.name == "floor":
            time.sleep(timeout_ms / 1000)
            return
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        self.tracker.expire()

    def stats(self) -> tuple[int, int]:
        return program_stats(self.bpf)


def flood_argv(server_ip: str, seconds: float, qname: str = QNAME, rate: float = 0.0) -> list[str]:
    """The flood client's command line (run it in the client pod); it prints answers per second."""
    return [sys.executable, "-c", FLOOD, server_ip, str(seconds), qname, str(rate)]


def flood(
    lab: Lab, client, server, seconds: float, mode: Mode | None, qname: str, rate: float = 0.0
) -> tuple[float, float, int, int, int]:
    """qps, this process's CPU seconds, kernel ns, program runs, records read during one flood."""
    proc = lab.popen(client, flood_argv(str(server.ipv4), seconds, qname, rate), stdout=subprocess.PIPE)
    cpu0, records0 = time.process_time(), mode.read_records() if mode else 0
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
    records = mode.read_records() - records0 if mode else 0
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
    parser.add_argument("--qname", default=QNAME, help="web.lab.test: A answers; nope.lab.test: NXDOMAIN")
    parser.add_argument("--rate", type=float, default=0.0, help="queries/s (0: as fast as answered)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="a comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument(
        "--pure-only", action="store_true", help="only the user-space costs (no netns, no BPF)"
    )
    args = parser.parse_args()
    if args.pure_only:
        report_pure()
        return
    names = [m for m in args.modes.split(",") if m]
    if not set(names) <= set(MODES):
        parser.error(f"modes: {', '.join(MODES)}")
    cgroup_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    keys = ("ratio", "ns", "ns_query", "cpu_us", "cpu_query")
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in names}
    modes = {m: Mode(m, cgroup_fd) for m in names}
    with Lab("bdns", ["cl", "dns"]) as lab, bpf_stats_enabled():
        client, server = lab.pod("cl"), lab.pod("dns")
        start_resolver(lab, server, LAB_RESOLVER)
        flood(lab, client, server, 1.0, None, args.qname)  # warm-up
        for r in range(args.rounds):
            order = list(names)
            random.Random(r).shuffle(order)
            for name in order:
                base_qps, base_cpu, *_ = flood(lab, client, server, args.seconds, None, args.qname, args.rate)
                mode = modes[name]
                mode.attach()
                try:
                    qps, cpu, ns, runs, records = flood(
                        lab, client, server, args.seconds, mode, args.qname, args.rate
                    )
                finally:
                    mode.detach()
                queries = qps * args.seconds
                res = results[name]
                res["ratio"].append(qps / base_qps)
                res["ns"].append(ns / max(runs, 1))
                res["ns_query"].append(ns / max(queries, 1))
                res["cpu_us"].append(cpu / max(records, 1) * 1e6)
                res["cpu_query"].append(cpu / max(queries, 1) * 1e6)
                base_us = base_cpu / max(base_qps * args.seconds, 1) * 1e6
                print(f"round {r} {name:7s} none {base_qps:8.0f} q/s ({base_us:4.1f} µs CPU/q)  "
                      f"{name} {qps:8.0f} q/s  {res['ns'][-1]:6.0f} ns/run  {runs} runs  "
                      f"{records} records  {res['cpu_us'][-1]:6.1f} µs CPU/record  "
                      f"{res['cpu_query'][-1]:5.2f} µs CPU/query", flush=True)  # fmt: skip
    os.close(cgroup_fd)
    print(f"\nmode     q/s vs none  kernel ns/run  kernel ns/query  user µs/record  user µs/query  "
          f"% of a core at {NODE_QPS} q/s (user + kernel)")  # fmt: skip
    for name in names:
        med = {k: statistics.median(v) for k, v in results[name].items()}
        share = (med["cpu_query"] * 1e3 + med["ns_query"]) * NODE_QPS / 1e9 * 100
        print(f"{name:8s} {med['ratio']:11.3f}  {med['ns']:13.0f}  {med['ns_query']:15.0f}  "
              f"{med['cpu_us']:14.1f}  {med['cpu_query']:13.2f}  {share:.2f}%")  # fmt: skip
    report_pure()


def report_pure() -> None:
    parse_us, observe_us = pure_costs()
    print(f"pure: parse_message {parse_us:.2f} µs/answer; DnsTracker.observe {observe_us:.2f} µs/packet")
    for mix, (copy_us, hybrid_us) in hybrid_costs().items():
        print(f"user space per packet, {mix}: payload always {copy_us:.2f} µs, hybrid {hybrid_us:.2f} µs "
              f"({hybrid_us / copy_us:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
