"""`flowmon map [URL...]`: the service map, from the same agents as `flowmon top` or from Prometheus.

Writes `-o map.svg` (or .png, .dot) from one reading: two scrapes `--interval` apart give rates
(`--totals`: one scrape, totals since the agents started), `--prometheus URL` gives the rates over
`--range`. `--serve HOST:PORT` serves a live page instead (flowmon_cli.map.server).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flowmon_cli import sources
from flowmon_cli.main import Handler, subcommand
from flowmon_cli.map import model

DEFAULT_URL = "http://127.0.0.1:9400/metrics/flowmon-system/host"  # what `flowmon agent` serves bare


@subcommand("map", "the service map: workloads and who talks to whom (SVG, PNG, DOT or a live page)")
def build(parser: argparse.ArgumentParser) -> Handler:
    sources.add_agent_arguments(parser, DEFAULT_URL)
    sources.add_prometheus_arguments(parser)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("map.svg"), help="map.svg, map.png or map.dot"
    )
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="between two scrapes")
    parser.add_argument("--totals", action="store_true", help="totals since the agents started (one scrape)")
    parser.add_argument("--by-zone", action="store_true", help="group namespaces by zone (needs zone labels)")
    parser.add_argument(
        "--max-edges", type=int, default=model.DEFAULT_MAX_EDGES, metavar="N", help="heaviest N"
    )
    parser.add_argument("--title", default="flowmon service map")
    parser.add_argument("--serve", metavar="HOST:PORT", help="serve a live page instead of writing a file")
    return run


def write_map(args: argparse.Namespace, source: sources.Source) -> str:
    from flowmon_cli.map import dot, graphviz

    fmt = graphviz.format_for(args.output)
    sample = source.sample()
    if sample.seconds is None and not args.totals:
        time.sleep(args.interval)
        sample = source.sample()
    service_map = model.build(sample, by_zone=args.by_zone, max_edges=args.max_edges)
    args.output.write_bytes(graphviz.layout(dot.render(service_map, args.title), fmt))
    note = service_map.note()
    return f"wrote {args.output}: {len(service_map.nodes)} workloads, {len(service_map.edges)} edges" + (
        f"; {note}" if note else ""
    )


def run(args: argparse.Namespace) -> int:
    from flowmon_cli.map import graphviz, server

    try:
        listen = server.parse_listen(args.serve) if args.serve else None
        source = sources.source_from_arguments(args, "map")
        if listen is not None:
            options = server.PageOptions(
                interval=args.interval, by_zone=args.by_zone, max_edges=args.max_edges, title=args.title
            )
            server.serve(server.LiveMap(source, options), *listen)
            return 0
        print(f"flowmon map: {write_map(args, source)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError, graphviz.GraphvizError) as exc:
        print(f"flowmon map: {exc}", file=sys.stderr)
        return 1
    return 0
