"""Wall time to draw the service map of a large scrape: 200 workloads, 600 pairs, the default 150 edges.

    .venv/bin/python -m bench.map_draw [--workloads 200] [--namespaces 12] [--fanout 3] [--runs 5]

Times `model.build` plus the Graphviz layout to SVG (what `flowmon map` and each refresh of the live page
do), median and worst of the runs. Target: within 5 s (docs/map.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from flowmon_cli import topview
from flowmon_cli.map import dot, graphviz, model
from flowmon_cli.sources import Sample


def synthetic_exposition(workloads: int, namespaces: int, fanout: int) -> str:
    """`fanout` servers per client workload, spread over the namespaces; bytes differ per pair."""
    lines = ["# TYPE flowmon_tcp_sent_bytes_total counter"]
    for i in range(workloads):
        for j in range(1, fanout + 1):
            k = (i * 7 + j * 13) % workloads
            labels = (
                f'client_namespace="ns{i % namespaces}",client_workload="w{i}",'
                f'server_namespace="ns{k % namespaces}",server_workload="w{k}"'
            )
            lines.append(f"flowmon_tcp_sent_bytes_total{{{labels}}} {1000 * (i + 1) * j}")
    return "\n".join(lines) + "\n"


def draw_seconds(exposition: str) -> float:
    snapshot = topview.parse_exposition(exposition)
    started = time.perf_counter()
    graphviz.layout(dot.render(model.build(Sample(snapshot, 2.0, snapshot))), "svg")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=200)
    parser.add_argument("--namespaces", type=int, default=12)
    parser.add_argument("--fanout", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    exposition = synthetic_exposition(args.workloads, args.namespaces, args.fanout)
    times = [draw_seconds(exposition) for _ in range(args.runs)]
    print(json.dumps({"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
