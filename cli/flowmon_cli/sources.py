"""Where the views read flows from: agent monitor paths (HTTP(S), a bearer token, a CA), shared by
`flowmon top` and `flowmon map`, and what one reading gives (`Sample`). The PromQL source is
`flowmon_cli.prometheus_source`; the arithmetic is `flowmon_cli.topview`.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flowmon_cli import topview


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


def add_agent_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    """The agent source's flags, the same for every view."""
    parser.add_argument(
        "urls", nargs="*", metavar="URL", default=[default_url], help=f"default: {default_url}"
    )
    parser.add_argument("--violations", nargs="+", default=[], metavar="URL", help="isolation monitor paths")
    parser.add_argument("--token", type=Path, metavar="FILE", help="bearer token file")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate that signed the agent's")
    tls.add_argument("--insecure", action="store_true", help="do not verify the agent's certificate")


DEFAULT_MONITOR = "flowmon-system/service-map"


def add_prometheus_arguments(parser: argparse.ArgumentParser) -> None:
    """The PromQL source's flags (`flowmon_cli.prometheus_source`), the same for every view."""
    parser.add_argument("--prometheus", metavar="URL", help="read the monitor's series from this Prometheus")
    parser.add_argument(
        "--monitor",
        default=DEFAULT_MONITOR,
        help=f"with --prometheus: its flowmon_monitor (default {DEFAULT_MONITOR})",
    )
    parser.add_argument(
        "--range", default="5m", metavar="RANGE", help="with --prometheus: PromQL range of the rates"
    )


def source_from_arguments(args: argparse.Namespace, command: str) -> Source:
    """Prometheus with --prometheus, else the agents (an agent's address stands for its first monitor;
    what was chosen is said on stderr)."""
    from flowmon_cli import prometheus_source

    endpoints = endpoints_from_arguments(args)
    if args.prometheus:
        prometheus_source.range_seconds(args.range)  # refuse a bad range before any request
        return prometheus_source.PrometheusSource(args.prometheus, args.monitor, args.range, endpoints.fetch)
    endpoints, notes = expanded(endpoints)
    for note in notes:
        print(f"flowmon {command}: {note}", file=sys.stderr)
    return AgentSource(endpoints)


def endpoints_from_arguments(args: argparse.Namespace) -> Endpoints:
    token = args.token.read_text().strip() if args.token else None
    return Endpoints(args.urls, args.violations, token, ssl_context(args.ca, args.insecure))


def expanded(endpoints: Endpoints) -> tuple[Endpoints, list[str]]:
    """The endpoints with agent addresses replaced by their first monitor (see expand_agent_urls)."""
    urls, notes = expand_agent_urls(endpoints.urls, endpoints.fetch)
    return Endpoints(urls, endpoints.violations, endpoints.token, endpoints.context), notes


# --- one reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """What the flows did over `seconds` (`delta`; totals since the agents started when seconds is None),
    and the cumulative counters (`totals`), of which the views keep violations: a rare event must not
    blink away after one refresh."""

    delta: topview.Snapshot
    seconds: float | None
    totals: topview.Snapshot = field(default_factory=dict)


class Source(Protocol):
    def sample(self) -> Sample: ...

    def describe(self) -> str: ...


class AgentSource:
    """Agent monitor paths: each reading is the difference to the previous one (the first: totals)."""

    def __init__(self, endpoints: Endpoints, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = endpoints
        self.clock = clock
        self.previous: tuple[topview.Snapshot, float] | None = None

    def sample(self) -> Sample:
        current, now = self.endpoints.snapshot(), self.clock()
        if self.previous is None:
            self.previous = current, now
            return Sample(current, None, current)
        before, at = self.previous
        self.previous = current, now
        return Sample(topview.diff(before, current), max(now - at, 1e-9), current)

    def describe(self) -> str:
        return ", ".join(self.endpoints.urls)
