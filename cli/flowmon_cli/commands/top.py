"""`flowmon top [URL...]`: a live terminal view of workload pairs from agent endpoints.

Each URL is one monitor's path on one agent (e.g. https://127.0.0.1:9400/metrics/shop/shop-flows), or an
agent's address alone (its first monitor, cluster-wide ones first; reading its /metrics needs the admin
token when auth is on). Several URLs of the same monitor on different agents are summed, as each
connection is counted by one agent. `--violations URL...` adds isolation violations counted by another
monitor. `--prometheus URL` reads a monitor's series from Prometheus instead (rates over `--range`).
One row per pair and protocol (TCP, UDP), and a DNS table per client and DNS server when the monitor
exports DNS. The arithmetic is `flowmon_cli.topview` and `flowmon_cli.dnsview`, the fetching
`flowmon_cli.sources`; this module draws (rich).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from flowmon_cli import dnsview, sources, topview
from flowmon_cli.main import Handler, subcommand
from flowmon_cli.sources import Endpoints, Sample, Source, expand_agent_urls, monitors_served, ssl_context

__all__ = [
    "Endpoints", "expand_agent_urls", "monitors_served", "run", "ssl_context", "table", "view", "watch"
]  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:9400/metrics/flowmon-system/host"  # what `flowmon agent` serves bare


@subcommand("top", "live terminal view of an agent's workload flows")
def build(parser: argparse.ArgumentParser) -> Handler:
    sources.add_agent_arguments(parser, DEFAULT_URL)
    sources.add_prometheus_arguments(parser)
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print once and exit (no live view): totals from agents, rates over --range from Prometheus",
    )
    return run


def table(rows: Sequence[topview.Row], *, per_second: bool, title: str, caption: str = ""):
    from rich.table import Table

    grid = Table(title=title, caption=caption, expand=False, header_style="bold")
    for i, name in enumerate(topview.columns(per_second)):
        grid.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        style = "bold red" if row.violations else ("yellow" if row.failures or row.retransmits else None)
        grid.add_row(*topview.row_cells(row, per_second), style=style)
    if not rows:
        grid.add_row("(no flows yet)", *[""] * (len(topview.columns(per_second)) - 1))
    return grid


def dns_table(rows: Sequence[dnsview.DnsRow], *, per_second: bool):
    from rich.table import Table

    grid = Table(title="DNS per client and server", expand=False, header_style="bold")
    for i, name in enumerate(dnsview.dns_columns(per_second)):
        grid.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        grid.add_row(*dnsview.dns_cells(row), style="yellow" if row.failed else None)
    return grid


def view(sample: Sample, *, title: str, caption: str = ""):
    """The flow table, and the DNS table below it when the monitor exports DNS."""
    from rich.console import Group

    per_second = sample.seconds is not None
    flows = topview.rows_with_violations(sample.delta, sample.seconds, sample.totals)
    dns = dnsview.dns_rows(sample.delta, sample.seconds)
    grid = table(flows, per_second=per_second, title=title, caption=caption)
    return Group(grid, dns_table(dns, per_second=per_second)) if dns else grid


def watch(
    source: Source,
    *,
    interval: float,
    title: str,
    until: Callable[[], bool],
    caption: Callable[[], str] = lambda: "",
    console=None,
) -> Sample | None:
    """Redraw every `interval` seconds until `until()` or Ctrl-C; returns the last reading."""
    from rich.live import Live

    sample: Sample | None = None
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while not until():
            try:
                sample = source.sample()
                live.update(view(sample, title=title, caption=caption()))
            except OSError as exc:
                live.update(table([], per_second=True, title=title, caption=f"fetch failed: {exc}"))
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not until():
                time.sleep(0.1)
    return sample


def wide_console():
    """A terminal's own width; piped output (CI logs, tests) is not cut at 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def run(args: argparse.Namespace) -> int:
    console = wide_console()
    try:
        source = sources.source_from_arguments(args, "top")
        if args.once:
            sample = source.sample()
            what = f"per second over {args.range}" if sample.seconds else "totals since the agents started"
            console.print(view(sample, title=f"flowmon: {what} — {source.describe()}"))
            return 0
        watch(source, interval=args.interval, title=f"flowmon top — {source.describe()}", until=lambda: False)
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        print(f"flowmon top: {exc}", file=sys.stderr)
        return 1
    return 0
