"""Scrape time of one monitor path with 10,000 series, over the agent's real HTTPS server.

    .venv/bin/python -m bench.scrape_time [--series 10000] [--scrapes 40]

Builds a synthetic view (aggregation's output shape), serves it with the real AgentServer (TLS, bearer
token) in a thread of this process, and times complete scrapes the way Prometheus does them (keep-alive,
gzip) and without gzip, plus the render step alone. Target: ≤ 100 ms per scrape of 10,000 series.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from flowmon_agent.aggregation.view import AgentView, Family, HistogramValue, MonitorView
from flowmon_agent.export.collectors import AgentStatus, Exporter
from flowmon_agent.export.policy_store import PolicyStore
from flowmon_agent.export.server import AgentServer, ServerConfig
from flowmon_contract.metrics import METRICS
from flowmon_contract.policy import compile_policy, token_sha256
from flowmon_contract.spec import DEFAULT_GROUP_BY, FlowMonitor, Metric
from flowmon_operator.pki import generate_ca, issue_serving_cert

TOKEN = "bench-token"
LABELS = tuple(str(d) for d in DEFAULT_GROUP_BY)
# Per flow label set with every metric: 5 plain + 3x2 with reason/direction + 2 histograms x (10 + 2).
SERIES_PER_FLOW = 35


def flow_labels(i: int) -> tuple[str, ...]:
    """Realistic label values: namespaces, workloads, ports and services of plausible length."""
    return (
        f"team-{i % 40}",
        f"frontend-{i}",
        f"team-{(i * 7) % 40}",
        f"backend-{i % 997}",
        "8080",
        f"svc-{i % 500}",
    )


def counters_view(series: int) -> MonitorView:
    """`series` flow label sets of one counter: exactly `series` time series."""
    fam = Family(METRICS[Metric.SENT_BYTES], LABELS, {flow_labels(i): float(i * 1500) for i in range(series)})
    return MonitorView("bench/m", (fam,), series, 0)


def full_view(flows: int) -> MonitorView:
    """`flows` label sets with every metric (counters, gauge, reasons, directions, two histograms)."""
    families = []
    for info in METRICS.values():
        names = LABELS + ((info.extra_label,) if info.extra_label else ())
        if info.type == "histogram":
            bounds = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
            hists = {
                flow_labels(i): HistogramValue(tuple(range(1, len(bounds) + 2)), 0.5) for i in range(flows)
            }
            families.append(Family(info, names, histograms=hists, bucket_bounds=bounds))
            continue
        extras = {"reason": ("refused", "timeout"), "direction": ("client_to_server", "server_to_client")}
        values = extras.get(info.extra_label or "", (None,))
        samples = {flow_labels(i) + ((v,) if v else ()): float(i) for i in range(flows) for v in values}
        families.append(Family(info, names, samples))
    return MonitorView("bench/m", tuple(families), flows, 0)


def write_serving_files(tmp: Path, admin_token: str = "unused-admin-token") -> None:
    """A CA (ca.crt), a serving pair for localhost and 127.0.0.1 (tls.crt, tls.key), an admin token file."""
    ca = generate_ca("bench-ca")
    pair = issue_serving_cert((ca.cert_pem, ca.key_pem), ["localhost"], ["127.0.0.1"])
    for name, text in (("ca.crt", ca.cert_pem), ("tls.crt", pair.cert_pem), ("tls.key", pair.key_pem)):
        (tmp / name).write_text(text)
    (tmp / "admin").write_text(admin_token + "\n")


class Served:
    """The real server on 127.0.0.1 in its own event loop thread."""

    def __init__(self, view: MonitorView, tmp: Path) -> None:
        write_serving_files(tmp)
        monitor = FlowMonitor.model_validate({"metadata": {"namespace": "bench", "name": "m"}})
        policy = PolicyStore()
        policy.apply(
            compile_policy([monitor], token_hashes={"bench/m": [token_sha256(TOKEN)]}), source="bench"
        )
        self.exporter = Exporter()
        self.exporter.swap(AgentStatus(view=AgentView(policy_hash="x", monitors={"bench/m": view})))
        config = ServerConfig(
            port=0,
            tls_cert_file=tmp / "tls.crt",
            tls_key_file=tmp / "tls.key",
            admin_token_file=tmp / "admin",
        )
        self.server = AgentServer(config, exporter=self.exporter, policy=policy, readiness=lambda: None)
        self.client_ssl = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def timed_scrapes(served: Served, scrapes: int, *, gzip: bool) -> tuple[list[float], int, int]:
    conn = http.client.HTTPSConnection("localhost", served.server.port, context=served.client_ssl, timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept-Encoding": "gzip" if gzip else "identity"}
    times, size, lines = [], 0, 0
    for _ in range(scrapes + 2):
        start = time.perf_counter()
        conn.request("GET", "/metrics/bench/m", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - start)
        assert resp.status == 200, body[:200]
        size = len(body)
        if not gzip:
            lines = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    conn.close()
    return times[2:], size, lines  # the first two warm up the connection and caches


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 1),
        "max_ms": round(ms[-1], 1),
    }


def run_case(name: str, view: MonitorView, scrapes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Served(view, Path(tmp)) as served:
        render = []
        for _ in range(scrapes):
            start = time.perf_counter()
            served.exporter.monitor_text("bench/m")
            render.append(time.perf_counter() - start)
        plain, plain_size, series = timed_scrapes(served, scrapes, gzip=False)
        gz, gz_size, _ = timed_scrapes(served, scrapes, gzip=True)
    return {
        "case": name,
        "series": series - 2,  # minus the collector's own success and duration samples
        "render": summary(render),
        "https_gzip": summary(gz) | {"bytes": gz_size},
        "https_identity": summary(plain) | {"bytes": plain_size},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=40)
    args = parser.parse_args()
    cases = [
        (f"{args.series} counter series", counters_view(args.series)),
        (
            f"{-(-args.series // SERIES_PER_FLOW)} flows x every metric",
            full_view(-(-args.series // SERIES_PER_FLOW)),
        ),
    ]
    for name, view in cases:
        print(json.dumps(run_case(name, view, args.scrapes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
