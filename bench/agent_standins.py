"""Lightweight stand-ins for many agents: the agent's policy API (GET/PUT /v1/policy over HTTPS with the
admin token), one listening socket per agent address, all on one aiohttp runner in one event loop.

Each stand-in keeps the policy hash it runs and counts what the operator did to it: GETs, PUTs and TLS
connections accepted (a new connection is a handshake; keep-alive reuses one). The hash of a pushed
policy is the contract's (as the real agent computes it); it is computed once per distinct body, since
each real agent would do it on its own node, in parallel.

    python -m bench.agent_standins --first 127.77.0.1 --count 500 --port 9443 --tls-dir DIR --control 8080

runs them as a process (the operator benchmark does), with a plain-HTTP control endpoint on loopback:
GET /state answers every agent's hash, counts and the monotonic time of its last accepted PUT.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from flowmon_contract.policy import AgentPolicy

POLICY_PATH = "/v1/policy"


def agent_ips(first: str, count: int) -> list[str]:
    """`count` consecutive loopback addresses from `first` (all of 127.0.0.0/8 reaches lo)."""
    start = ipaddress.IPv4Address(first)
    ips = [str(start + i) for i in range(count)]
    if not all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("127.0.0.0/8") for ip in ips):
        raise ValueError("stand-in agents listen on loopback addresses only")
    return ips


def agent_pod(index: int, ip: str, namespace: str, labels: dict[str, str]) -> dict:
    """A Ready agent Pod for the API (there is no DaemonSet controller or kubelet to make one)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"flowmon-agent-{index}", "namespace": namespace, "labels": labels},
        "spec": {"nodeName": f"node-{index}", "containers": [{"name": "agent", "image": "agent"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


@dataclass
class AgentState:
    policy_hash: str | None = None
    calls: Counter = field(default_factory=Counter)  # "GET" / "PUT" → count
    connections: int = 0
    last_put: float | None = None  # time.monotonic() of the last accepted PUT

    def as_json(self) -> dict:
        return {
            "hash": self.policy_hash,
            "get": self.calls["GET"],
            "put": self.calls["PUT"],
            "connections": self.connections,
            "last_put": self.last_put,
        }


class StandinAgents:
    """Agents on (ip, port) for each ip; start() and stop() in the loop that serves them."""

    def __init__(self, ips: list[str], port: int, cert_file: Path, key_file: Path, admin_token: str):
        self.ips, self.port, self.admin_token = ips, port, admin_token
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self.agents = {ip: AgentState() for ip in ips}
        self._hashes: dict[str, str] = {}  # body digest → policy hash
        self._seen: set[int] = set()  # id() of transports already counted (kept alive in _transports)
        self._transports: list[object] = []
        self._runner: web.AppRunner | None = None

    def state(self) -> dict[str, dict]:
        return {ip: agent.as_json() for ip, agent in self.agents.items()}

    def totals(self) -> Counter:
        total: Counter = Counter()
        for agent in self.agents.values():
            total.update(agent.calls)
            total["connections"] += agent.connections
        return total

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get(POLICY_PATH, self._get), web.put(POLICY_PATH, self._put)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for ip in self.ips:
            await web.TCPSite(self._runner, ip, self.port, ssl_context=self.context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _agent(self, request: web.Request, method: str) -> AgentState | web.Response:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else ""
        agent = self.agents[ip]
        if id(request.transport) not in self._seen:
            self._seen.add(id(request.transport))
            self._transports.append(request.transport)
            agent.connections += 1
        agent.calls[method] += 1
        if request.headers.get("Authorization") != f"Bearer {self.admin_token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return agent

    async def _get(self, request: web.Request) -> web.Response:
        agent = self._agent(request, "GET")
        if isinstance(agent, web.Response):
            return agent
        return web.json_response({"policyHash": agent.policy_hash})

    async def _put(self, request: web.Request) -> web.Response:
        agent = self._agent(request, "PUT")
        if isinstance(agent, web.Response):
            return agent
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()
        if digest not in self._hashes:
            self._hashes[digest] = AgentPolicy.model_validate_json(body).hash
        agent.policy_hash = self._hashes[digest]
        agent.last_put = time.monotonic()
        return web.json_response({"policyHash": agent.policy_hash})


async def serve(args: argparse.Namespace) -> None:
    tls = Path(args.tls_dir)
    agents = StandinAgents(
        agent_ips(args.first, args.count),
        args.port,
        tls / "tls.crt",
        tls / "tls.key",
        (tls / "admin-token").read_text().strip(),
    )
    await agents.start()
    control = web.Application()
    control.add_routes([web.get("/state", lambda _r: web.json_response(agents.state()))])
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.control).start()
    print(json.dumps({"ready": len(agents.ips)}), flush=True)
    try:
        await asyncio.Event().wait()  # until the benchmark terminates this process
    finally:
        await runner.cleanup()
        await agents.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", default="127.77.0.1", help="the first agent address")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-dir", required=True, help="holds tls.crt, tls.key and admin-token")
    parser.add_argument("--control", type=int, required=True, help="plain-HTTP control port on 127.0.0.1")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
