"""Wall time of one `FlowTracer.poll()` (fold, flush, read, decode) with N flow entries in the kernel map,
a share of them changing between polls. Needs root (loads BPF); run under `flock /work/netns.lock`.

    sudo .venv/bin/python -m bench.tracer_poll [--flows 5000] [--changing 0] [--polls 9] [--open 0]

Each flow is one refused connection to its own loopback port (one entry per port); a changing flow gets
one more refused connection before the next poll (outside the timing). `--open N` holds N idle loopback
connections (one flow) open through the polls: the kernel adds them to their flow entry, so a poll should
cost what it costs without them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import time
from ipaddress import ip_address

from flowmon_agent.kernel.flows import KernelConfig
from flowmon_agent.kernel.tracer import FlowTracer

FIRST_PORT = 20000
LOOPBACK = ip_address("127.0.0.1")  # only these sockets: other traffic on the host stays out


def refused(ports: range) -> None:
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(2)
            with contextlib.suppress(OSError):  # refused: nothing listens there
                sock.connect((str(LOOPBACK), port))


@contextlib.contextmanager
def held_open(count: int):
    """`count` idle connections to one loopback listener, each having exchanged a few bytes."""
    sockets: list[socket.socket] = []
    with socket.create_server((str(LOOPBACK), 0)) as server:
        try:
            for _ in range(count):
                client = socket.create_connection(server.getsockname()[:2], timeout=5)
                sockets += [client, server.accept()[0]]
                client.sendall(b"abc")
                sockets[-1].recv(3)
            yield
        finally:
            for sock in sockets:
                sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=5000)
    parser.add_argument("--changing", type=float, default=0.0, help="share of flows that grow between polls")
    parser.add_argument("--polls", type=int, default=9)
    parser.add_argument("--open", type=int, default=0, help="idle connections held open through the polls")
    args = parser.parse_args(argv)
    with (
        FlowTracer(KernelConfig(local_ips=[LOOPBACK]), adopt_existing=False) as tracer,
        held_open(args.open),
    ):
        refused(range(FIRST_PORT, FIRST_PORT + args.flows))
        tracer.poll()  # every entry decoded once
        changing = range(FIRST_PORT, FIRST_PORT + int(args.flows * args.changing))
        timings, flows = [], 0
        for _ in range(args.polls):
            refused(changing)
            started = time.perf_counter()
            flows = len(tracer.poll().flows)
            timings.append((time.perf_counter() - started) * 1000)
    result = {
        "flows": flows,
        "changing_per_poll": len(changing),
        "open_connections": args.open,
        "median_ms_per_poll": round(statistics.median(timings), 2),
        "min_ms_per_poll": round(min(timings), 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
