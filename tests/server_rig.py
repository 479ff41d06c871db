"""An AgentServer with its collaborators, wired as the runner wires them, on 127.0.0.1 with a test CA."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from flowmon_agent.export.collectors import AgentStatus, Exporter
from flowmon_agent.export.policy_store import PolicyStore
from flowmon_agent.export.server import AgentServer, ServerConfig, ServerLimits
from flowmon_agent.supervision import Restarts
from flowmon_contract.policy import compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from tests.export_samples import agent_view
from tests.tls_samples import make_pki

ADMIN, SHOP, OPS = "admin-token-0123", "shop-token-4567", "ops-token-89ab"


def monitor(namespace: str, name: str, **spec) -> FlowMonitor:
    return FlowMonitor.model_validate({"metadata": {"namespace": namespace, "name": name}, "spec": spec})


def make_policy(*extra: FlowMonitor):
    monitors = [monitor("shop", "web"), monitor("ops", "all"), *extra]
    hashes = {"shop/web": [token_sha256(SHOP)], "ops/all": [token_sha256(OPS)]}
    return compile_policy(monitors, token_hashes=hashes)


class ServerRig:
    """A server with its collaborators, as the runner wires them."""

    def __init__(self, tmp: Path, *, restarts: Restarts | None = None, **config) -> None:
        self.pki = make_pki(tmp)
        token_file = tmp / "admin-token"
        token_file.write_text(ADMIN + "\n")
        self.ready_reason: str | None = "BPF programs not attached yet"
        self.stall: str | None = None
        self.exporter = Exporter()
        self.exporter.swap(AgentStatus(view=agent_view()))
        self.store = PolicyStore(
            on_rejected=lambda source: self.exporter.instruments.policy_rejected.labels(source).inc()
        )
        self.store.apply(make_policy(), source="test")
        defaults = dict(
            host="127.0.0.1",
            port=0,
            tls_cert_file=self.pki.cert_file,
            tls_key_file=self.pki.key_file,
            admin_token_file=token_file,
            reload_interval=0.1,
            limits=ServerLimits(max_connections_per_source=64),  # every test client is 127.0.0.1
        )
        self.server = AgentServer(
            ServerConfig(**(defaults | config)),
            exporter=self.exporter,
            policy=self.store,
            readiness=lambda: self.ready_reason,
            liveness=lambda: self.stall,
            restarts=restarts,
        )
        self.session: aiohttp.ClientSession | None = None

    async def request(
        self, method: str, path: str, token: str | None = None, **kw
    ) -> tuple[int, bytes, dict]:
        headers = {"Accept-Encoding": "identity"} | kw.pop("headers", {})  # aiohttp asks for gzip by default
        if token:
            headers["Authorization"] = f"Bearer {token}"
        ctx = self.pki.client_context() if self.server.mode.tls else False
        async with self.session.request(method, self.server.url + path, headers=headers, ssl=ctx, **kw) as r:
            return r.status, await r.read(), dict(r.headers)

    async def __aenter__(self) -> ServerRig:
        await self.server.start()
        self.session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.session is not None
        await self.session.close()
        await self.server.stop()

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample of the agent's own metrics, as /metrics would show it."""
        return self.exporter.instruments.registry.get_sample_value(name, labels)
