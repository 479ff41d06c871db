"""The demo's Prometheus config: it scrapes the agents over TLS with a bearer token, as the operator's
ServiceMonitors would, and evaluates the rendered rules (the process: flowmon_lab.prometheus)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowmon_lab.prometheus import https_scrape_job

PREFERRED_PORT = 9090


@dataclass(frozen=True)
class Target:
    address: str  # host:port of one agent
    node: str


def scrape_job(
    monitor_key: str, path: str, targets: Sequence[Target], *, ca_file: Path, token_file: Path, interval: str
) -> dict:
    """Pure: one monitor's scrape job over every agent, labelled like the ServiceMonitor's relabelings
    (flowmon_monitor, node), so that the rendered alert rules work unchanged."""
    return https_scrape_job(
        f"flowmon-{monitor_key.replace('/', '-')}",
        path,
        {t.address: {"flowmon_monitor": monitor_key, "node": t.node} for t in targets},
        ca_file=ca_file,
        token_file=token_file,
        interval=interval,
    )


def rules_file(prometheus_rules: Iterable[dict]) -> dict:
    """PrometheusRule objects (as the operator renders them) → one Prometheus rules file."""
    return {"groups": [g for rule in prometheus_rules for g in rule["spec"]["groups"]]}
