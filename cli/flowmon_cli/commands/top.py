"""`flowmon top [URL...]`: a live terminal view of workload pairs from agent endpoints.

Each URL is one monitor's path on one agent (e.g. https://127.0.0.1:9400/metrics/shop/shop-flows), or an
agent's address alone (its first monitor, cluster-wide ones first; reading its /metrics needs the admin
token when auth is on). Several URLs of the same monitor on different agents are summed, as each
connection is counted by one agent. `--violations URL...` adds isolation violations counted by another
monitor. The arithmetic is `flowmon_cli.topview`, the fetching `flowmon_cli.sources`; this module
draws (rich).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from flowmon_cli import sources, topview
from flowmon_cli.main import Handler, subcommand
from flowmon_cli.sources import Endpoints, expand_agent_urls, monitors_served, ssl_context

__all__ = ["Endpoints", "expand_agent_urls", "monitors_served", "run", "ssl_context", "table", "watch"]

DEFAULT_URL = "http://127.0.0.1:9400/metrics/flowmon-system/host"  # what `flowmon agent` serves bare


@subcommand("top", "live terminal view of an agent's workload flows")
def build(parser: argparse.ArgumentParser) -> Handler:
    sources.add_agent_arguments(parser, DEFAULT_URL)
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period")
    parser.add_argument("--once", action="store_true", help="print totals once and exit (no live view)")
    return run


def table(rows: Sequence[topview.Row], *, per_second: bool, title: str, caption: str = ""):
    from rich.table import Table

    grid = Table(title=title, caption=caption, expand=False, header_style="bold")
    for i, name in enumerate(topview.columns(per_second)):
        grid.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        style = "bold red" if row.violations else ("yellow" if row.failures or row.retransmits else None)
        grid.add_row(*topview.row_cells(row, per_second), style=style)
    if not rows:
        grid.add_row("(no flows yet)", *[""] * (len(topview.columns(per_second)) - 1))
    return grid


def watch(
    endpoints: Endpoints,
    *,
    interval: float,
    title: str,
    until: Callable[[], bool],
    caption: Callable[[], str] = lambda: "",
    console=None,
) -> topview.Snapshot | None:
    """Redraw every `interval` seconds until `until()` or Ctrl-C; returns the last snapshot."""
    from rich.live import Live

    previous: topview.Snapshot | None = None
    at = time.monotonic()
    error = ""
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while not until():
            try:
                current, now = endpoints.snapshot(), time.monotonic()
                rows = topview.live_rows(previous, current, now - at)
                previous, at, error = current, now, ""
            except OSError as exc:
                rows, error = [], f"fetch failed: {exc}"
            live.update(table(rows, per_second=True, title=title, caption=error or caption()))
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not until():
                time.sleep(0.1)
    return previous


def wide_console():
    """A terminal's own width; piped output (CI logs, tests) is not cut at 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def run(args: argparse.Namespace) -> int:
    console = wide_console()
    try:
        endpoints, notes = sources.expanded(sources.endpoints_from_arguments(args))
        for note in notes:
            print(f"flowmon top: {note}", file=sys.stderr)
        if args.once:
            rows = topview.rows(endpoints.snapshot())
            console.print(table(rows, per_second=False, title="flowmon: totals since the agents started"))
            return 0
        watch(
            endpoints,
            interval=args.interval,
            title=f"flowmon top — {', '.join(endpoints.urls)}",
            until=lambda: False,
        )
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"flowmon top: {exc}", file=sys.stderr)
        return 1
    return 0
