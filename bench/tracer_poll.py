"""Wall time of one `FlowTracer.poll()` (fold, flush, read, decode) with N flow entries in the kernel map,
a share of them changing between polls. Needs root (loads BPF); run under `flock /work/netns.lock`.

    sudo .venv/bin/python -m bench.tracer_poll [--flows 5000] [--changing 0] [--polls 9]

Each flow is one refused connection to its own loopback port (one entry per port); a changing flow gets
one more refused connection before the next poll (outside the timing).
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=5000)
    parser.add_argument("--changing", type=float, default=0.0, help="share of flows that grow between polls")
    parser.add_argument("--polls", type=int, default=9)
    args = parser.parse_args(argv)
    with FlowTracer(KernelConfig(local_ips=[LOOPBACK]), adopt_existing=False) as tracer:
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
        "median_ms_per_poll": round(statistics.median(timings), 2),
        "min_ms_per_poll": round(min(timings), 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
