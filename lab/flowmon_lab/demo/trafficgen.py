"""Traffic for the demo's pods: a small TCP server and a client with a request rate, bursts and limits.

Standard library only (it runs as one process per pod, started with `ip netns exec`). Every loop is
bounded in time and count. Protocol: the client sends `<response bytes> <request bytes>\\n` and that many
request bytes; the server reads them all, answers with the response bytes and closes.

    python -m flowmon_lab.demo.trafficgen serve --port 8080 --seconds 300
    python -m flowmon_lab.demo.trafficgen call 10.96.0.10:80 --rate 10 --request 300 --response 2048
    python -m flowmon_lab.demo.trafficgen call cart.shop.svc.cluster.local:80 --dns 10.96.0.20

With --dns the target's name is resolved (an A query over UDP, no cache) before every call, as a client
without a DNS cache does; a failed resolution is counted by its answer code and no connection is made.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter

MAX_RESPONSE = 4 * 1024 * 1024
MAX_CONNECTIONS = 100_000  # per client run, whatever the rate and duration


def serve(port: int, seconds: float, stop: threading.Event | None = None) -> int:
    """Answer calls for `seconds`, or until `stop` is set (a caller running it in a thread)."""
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 and IPv6
    srv.bind(("::", port))
    srv.listen(256)
    deadline = time.monotonic() + seconds
    srv.settimeout(1.0)
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_answer, args=(conn,), daemon=True).start()
    return 0


def _answer(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        try:
            head = b""
            while b"\n" not in head and len(head) < 64:
                chunk = conn.recv(64 - len(head))
                if not chunk:
                    return
                head += chunk
            line, _, rest = head.partition(b"\n")
            response, request = (min(int(v), MAX_RESPONSE) for v in line.split())
            # Drain the request first: closing with unread bytes would send a RST instead of a FIN.
            pending = max(0, request - len(rest))
            if receive(conn, pending) < pending:
                return
            conn.sendall(b"r" * response)
        except (OSError, ValueError):
            pass


def receive(sock: socket.socket, count: int) -> int:
    """Read `count` bytes (never more) or until the peer closes; how many came."""
    got = 0
    while got < count:
        chunk = sock.recv(min(count - got, 65536))
        if not chunk:
            break
        got += len(chunk)
    return got


def call_once(target: tuple[str, int], request: int, response: int, timeout: float) -> str:
    """One request; returns "ok" or the failure reason (refused, timeout, error)."""
    try:
        with socket.create_connection(target, timeout=timeout) as sock:
            sock.sendall(f"{response} {request}\n".encode() + b"q" * request)
            got = receive(sock, response)
        return "ok" if got >= response else "short"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "error"


RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def resolve(name: str, server: str, timeout: float, port: int = 53) -> tuple[str | None, str]:
    """(the first IPv4 address of an A answer or None, the answer code or `dns-timeout`)."""
    ident = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question, (server, port))
        try:
            reply = sock.recv(512)
        except TimeoutError:
            return None, "dns-timeout"
    if len(reply) < 12 or struct.unpack_from("!H", reply)[0] != ident:
        return None, "dns-error"
    rcode = RCODES.get(reply[3] & 0xF, "dns-error")
    # dnsmasq answers with the question, then A records: the address is the last 4 bytes of the first
    answers = struct.unpack_from("!H", reply, 6)[0]
    start = 12 + len(question)
    if rcode != "NOERROR" or not answers or len(reply) < start + 16:
        return None, rcode
    return socket.inet_ntoa(reply[start + 12 : start + 16]), rcode


def call(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    target = (host.strip("[]"), int(port))
    deadline = time.monotonic() + args.seconds
    limit = min(args.count or MAX_CONNECTIONS, MAX_CONNECTIONS)
    results: Counter[str] = Counter()
    next_at = time.monotonic() + args.delay
    n = 0
    while n < limit and time.monotonic() < deadline:
        time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
        if time.monotonic() >= deadline:
            break
        batch = args.burst if args.burst and args.every and n % args.burst == 0 else 1
        for _ in range(min(batch, limit - n)):
            address, answer = resolve(target[0], args.dns, args.timeout) if args.dns else (target[0], "")
            if address is None:
                results[answer] += 1
            else:
                results[call_once((address, target[1]), args.request, args.response, args.timeout)] += 1
            n += 1
        next_at += args.every if args.burst and args.every else 1.0 / args.rate
    print(f"{args.target}: {dict(results)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trafficgen", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=600)
    c = sub.add_parser("call")
    c.add_argument("target", help="IP:PORT, or NAME:PORT with --dns")
    c.add_argument("--dns", default="", help="resolve the target's name at this DNS server before each call")
    c.add_argument("--rate", type=float, default=1.0, help="requests per second")
    c.add_argument("--burst", type=int, default=0, help="requests per burst (with --every)")
    c.add_argument("--every", type=float, default=0.0, help="seconds between bursts")
    c.add_argument("--request", type=int, default=200, help="request bytes")
    c.add_argument("--response", type=int, default=1024, help="response bytes")
    c.add_argument("--seconds", type=float, default=60, help="stop after this long")
    c.add_argument("--count", type=int, default=0, help="stop after this many requests (0: no limit)")
    c.add_argument("--delay", type=float, default=0.0, help="seconds before the first request")
    c.add_argument("--timeout", type=float, default=2.0, help="connect and read timeout")
    args = parser.parse_args(argv)
    return serve(args.port, args.seconds) if args.mode == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
