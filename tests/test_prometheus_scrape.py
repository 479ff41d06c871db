"""A real Prometheus scrapes the agent over TLS (a test CA) with bearer tokens; PromQL reads the bytes."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from flowmon_lab.prometheus import Prometheus, config, https_scrape_job
from tests.test_server import ADMIN, OPS, SHOP, ServerRig
from tests.waiting import until, wait_for


def _job(name: str, port: int, path: str, ca_file: Path, token_file: Path) -> dict:
    return https_scrape_job(name, path, {f"127.0.0.1:{port}": {}}, ca_file=ca_file, token_file=token_file)


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
            _job("shop", port, "/metrics/shop/web", ca, _token(tmp_path, "shop", SHOP)),
            _job("stolen", port, "/metrics/ops/all", ca, _token(tmp_path, "s2", SHOP)),
            _job("ops", port, "/metrics/ops/all", ca, _token(tmp_path, "ops", OPS)),
            _job("agent", port, "/metrics", ca, _token(tmp_path, "admin", ADMIN)),
        ]
        with Prometheus(tmp_path).start(config(jobs, interval="1s")) as prom:
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


# ---- the real path: kernel → aggregation → exporter → Prometheus, in a netns mini-cluster ----

SERVER = """
import socket, sys
want, reply = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 5432)); srv.listen(); srv.settimeout(60)
print("listening", flush=True)
conn, _ = srv.accept(); got = 0
while got < want:
    chunk = conn.recv(65536)
    if not chunk: break
    got += len(chunk)
conn.sendall(b"r" * reply); conn.close()
print(got, flush=True)
"""
CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 5432), timeout=30)
sock.sendall(b"s" * int(sys.argv[2])); got = 0
while True:
    chunk = sock.recv(65536)
    if not chunk: break
    got += len(chunk)
sock.close(); print(got)
"""
SENT, RECEIVED = 1_234_567, 76_543  # payload bytes client → server and back: what Prometheus must show


def _cluster_spec():
    from flowmon_lab.cluster_plan import ClusterSpec, DeploymentSpec, NamespaceSpec

    return ClusterSpec(
        namespaces=[NamespaceSpec("shop")],
        deployments=[DeploymentSpec("shop", "web", replicas=1), DeploymentSpec("shop", "db", replicas=1)],
    )


@pytest.mark.asyncio
@pytest.mark.root
async def test_prometheus_reads_kernel_measured_bytes_of_a_known_flow(tmp_path):
    import yaml

    from flowmon_agent.export.policy_store import dump_policy_json
    from flowmon_agent.runner import Agent as FlowAgent
    from flowmon_agent.runner import AgentSettings
    from flowmon_contract.policy import compile_policy, token_sha256
    from flowmon_lab.minicluster import MiniCluster, cleanup, new_prefix
    from tests.test_server import monitor
    from tests.tls_samples import make_pki

    prefix = new_prefix("fx")
    pki = make_pki(tmp_path)
    (tmp_path / "admin").write_text(ADMIN)
    policy = compile_policy([monitor("shop", "web")], token_hashes={"shop/web": [token_sha256(SHOP)]})
    (tmp_path / "policy.json").write_text(dump_policy_json(policy))
    try:
        with MiniCluster(_cluster_spec(), prefix=prefix) as cluster:
            (tmp_path / "inventory.yaml").write_text(yaml.safe_dump_all(cluster.inventory()))
            settings = AgentSettings(
                listen_host="127.0.0.1",
                listen_port=0,
                node_name=cluster.pods[0].node,
                policy_file=tmp_path / "policy.json",
                inventory_file=tmp_path / "inventory.yaml",
                admin_token_file=tmp_path / "admin",
                tls_cert_file=pki.cert_file,
                tls_key_file=pki.key_file,
            )
            agent = FlowAgent(settings)
            await agent.start()
            try:
                assert agent.not_ready_reason() is None
                web, db = cluster.pods_of("shop", "web")[0], cluster.pods_of("shop", "db")[0]
                server = cluster.spawn(
                    db, ["python3", "-c", SERVER, str(SENT), str(RECEIVED)], stdout=subprocess.PIPE, text=True
                )
                assert server.stdout.readline().strip() == "listening"
                client = await asyncio.to_thread(
                    cluster.exec, web, ["python3", "-c", CLIENT, db.ip, str(SENT)], timeout=60
                )
                assert client.stdout.strip() == str(RECEIVED)
                assert server.wait(timeout=30) == 0 and server.stdout.read().strip() == str(SENT)
                job = _job(
                    "shop",
                    agent.server.port,
                    "/metrics/shop/web",
                    pki.ca_file,
                    _token(tmp_path, "shop", SHOP),
                )
                with Prometheus(tmp_path).start(config([job], interval="1s")) as prom:
                    flow = 'client_workload="web",server_workload="db",server_port="5432"'
                    await asyncio.to_thread(
                        prom.wait_query, f"flowmon_tcp_sent_bytes_total{{{flow}}}", str(SENT)
                    )
                    await asyncio.to_thread(
                        prom.wait_query, f"flowmon_tcp_received_bytes_total{{{flow}}}", str(RECEIVED)
                    )
                    await asyncio.to_thread(
                        prom.wait_query, f"flowmon_tcp_connections_closed_total{{{flow}}}", "1"
                    )
                    # A new policy applies without restart; the unchanged monitor's counters continue.
                    wider = compile_policy(
                        [monitor("shop", "web"), monitor("shop", "all")],
                        token_hashes={"shop/web": [token_sha256(SHOP)]},
                    )
                    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                        put = await http.put(
                            agent.url + "/v1/policy", data=dump_policy_json(wider), ssl=pki.client_context()
                        )
                        assert put.status == 200 and (await put.json())["policyHash"] == wider.hash
                    await until(lambda: agent.exporter.holder.status.view.policy_hash == wider.hash)
                    applied = time.time()

                    def scraped_since() -> bool:  # a scrape that started after the new policy's view
                        stamps = prom.query(f"timestamp(flowmon_tcp_sent_bytes_total{{{flow}}})")
                        return any(float(r["value"][1]) > applied for r in stamps)

                    await asyncio.to_thread(wait_for, scraped_since)
                    await asyncio.to_thread(
                        prom.wait_query, f"flowmon_tcp_sent_bytes_total{{{flow}}}", str(SENT)
                    )
                    assert set(agent.exporter.holder.status.view.monitors) == {"shop/web", "shop/all"}
                    resets = prom.query(f"resets(flowmon_tcp_sent_bytes_total{{{flow}}}[1m])")
                    assert [r["value"][1] for r in resets] == ["0"]
            finally:
                await agent.stop()
    finally:
        cleanup(prefix)
