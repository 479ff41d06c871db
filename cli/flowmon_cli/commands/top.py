"""`flowmon top [URL...]`: a live terminal view of workload pairs from agent endpoints.

Each URL is one monitor's path on one agent (e.g. https://127.0.0.1:9400/metrics/shop/shop-flows), or an
agent's address alone (its first monitor, cluster-wide ones first; reading its /metrics needs the admin
token when auth is on). Several URLs of the same monitor on different agents are summed, as each
connection is counted by one agent. `--violations URL...` adds isolation violations counted by another
monitor. The arithmetic is `flowmon_cli.topview`; this module fetches and draws (rich).
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowmon_cli import topview
from flowmon_cli.main import Handler, subcommand

DEFAULT_URL = "http://127.0.0.1:9400/metrics/flowmon-system/host"  # what `flowmon agent` serves bare


@subcommand("top", "live terminal view of an agent's workload flows")
def build(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument(
        "urls", nargs="*", metavar="URL", default=[DEFAULT_URL], help=f"default {DEFAULT_URL}"
    )
    parser.add_argument("--violations", nargs="+", default=[], metavar="URL", help="isolation monitor paths")
    parser.add_argument("--token", type=Path, metavar="FILE", help="bearer token file")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate that signed the agent's")
    tls.add_argument("--insecure", action="store_true", help="do not verify the agent's certificate")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period")
    parser.add_argument("--once", action="store_true", help="print totals once and exit (no live view)")
    return run


@dataclass(frozen=True)
class Endpoints:
    """Where and how to fetch: the monitor paths, the violation paths, credentials."""

    urls: Sequence[str]
    violations: Sequence[str] = ()
    token: str | None = None
    context: ssl.SSLContext | None = None

    def fetch(self, url: str, timeout: float = 5.0) -> str:
        request = urllib.request.Request(url)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
            return response.read().decode()

    def snapshot(self) -> topview.Snapshot:
        """Sum of the monitor paths, plus the violations of the isolation paths."""
        base = topview.combine(topview.parse_exposition(self.fetch(u)) for u in self.urls)
        if not self.violations:
            return base
        isolation = topview.combine(topview.parse_exposition(self.fetch(u)) for u in self.violations)
        return topview.attach_violations(base, isolation)


def monitors_served(agent_metrics: str) -> list[str]:
    """Pure: the monitor keys an agent serves, from its own /metrics (flowmon_agent_series{monitor=})."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = {
        sample.labels["monitor"]
        for family in text_string_to_metric_families(agent_metrics)
        if family.name == "flowmon_agent_series"
        for sample in family.samples
        if "monitor" in sample.labels
    }
    # Cluster-wide monitors first: they see the most.
    return sorted(keys, key=lambda key: (not key.startswith("flowmon-system/"), key))


def expand_agent_urls(urls: Sequence[str], fetch: Callable[[str], str]) -> tuple[list[str], list[str]]:
    """A URL without a path stands for the agent: its first monitor (see monitors_served). Returns the
    monitor URLs and notes for the user about what was chosen."""
    result, notes = [], []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.path.strip("/"):
            result.append(url)
            continue
        base = f"{parts.scheme}://{parts.netloc}"
        served = monitors_served(fetch(f"{base}/metrics"))
        if not served:
            raise OSError(f"{base} serves no monitor")
        result.append(f"{base}/metrics/{served[0]}")
        if len(served) > 1:
            notes.append(f"{base}: showing {served[0]}; it also serves {', '.join(served[1:])}")
    return result, notes


def ssl_context(ca: Path | None, insecure: bool) -> ssl.SSLContext:
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(ca) if ca else None)


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
    token = args.token.read_text().strip() if args.token else None
    endpoints = Endpoints(args.urls, args.violations, token, ssl_context(args.ca, args.insecure))
    console = wide_console()
    try:
        urls, notes = expand_agent_urls(args.urls, endpoints.fetch)
        endpoints = Endpoints(urls, args.violations, token, endpoints.context)
        for note in notes:
            print(f"flowmon top: {note}", file=sys.stderr)
        if args.once:
            rows = topview.rows(endpoints.snapshot())
            console.print(table(rows, per_second=False, title="flowmon: totals since the agents started"))
            return 0
        watch(
            endpoints,
            interval=args.interval,
            title=f"flowmon top — {', '.join(urls)}",
            until=lambda: False,
        )
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"flowmon top: {exc}", file=sys.stderr)
        return 1
    return 0
