"""A real Prometheus scrapes the agent over TLS (a test CA) with bearer tokens; PromQL reads the bytes."""

from __future__ import annotations

import asyncio

import pytest

from tests.prometheus_process import PrometheusProcess, scrape_job
from tests.test_server import ADMIN, OPS, SHOP, ServerRig


def _token(tmp_path, name: str, token: str):
    path = tmp_path / f"{name}.token"
    path.write_text(token)
    return path


@pytest.mark.asyncio
async def test_prometheus_scrapes_synthetic_view_with_tls_and_scoped_tokens(tmp_path):
    agent = ServerRig(tmp_path)
    await agent.server.start()
    try:
        port, ca = agent.server.port, agent.pki.ca_file
        jobs = [
            scrape_job(
                "shop", port, "/metrics/shop/web", ca_file=ca, token_file=_token(tmp_path, "shop", SHOP)
            ),
            scrape_job(
                "stolen", port, "/metrics/ops/all", ca_file=ca, token_file=_token(tmp_path, "s2", SHOP)
            ),
            scrape_job("ops", port, "/metrics/ops/all", ca_file=ca, token_file=_token(tmp_path, "ops", OPS)),
            scrape_job("agent", port, "/metrics", ca_file=ca, token_file=_token(tmp_path, "admin", ADMIN)),
        ]
        with PrometheusProcess(tmp_path, jobs) as prom:
            expr = 'flowmon_tcp_sent_bytes_total{job="shop",client_workload="web",server_workload="db"}'
            await asyncio.to_thread(prom.wait_query, expr, "12345")
            await asyncio.to_thread(
                prom.wait_query, 'flowmon_agent_series{job="agent",monitor="shop/web"}', "2"
            )
            await asyncio.to_thread(prom.wait_query, 'up{job="ops"}', "1")
            await asyncio.to_thread(prom.wait_query, 'up{job="stolen"}', "0")
            stolen = next(t for t in prom.targets() if t["labels"]["job"] == "stolen")
            assert "403" in stolen["lastError"]
            # the stolen token's job never received ops' series
            assert prom.query('flowmon_tcp_sent_bytes_total{job="stolen"}') == []
    finally:
        await agent.server.stop()
