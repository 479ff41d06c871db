"""Policy delivery to running agents: PUT /v1/policy over HTTPS, read back each agent's policy hash and
how long ago each monitor's path was last scraped there (`scrapedSecondsAgo`, for the Scraped condition).

Concurrent over all agent pods, each call bounded by a timeout. The agents' serving certificate carries
the Service's DNS name, not pod IPs: connections go to the pod IP and verify that name (SNI + hostname).
The operator keeps one `AgentChannel` for its life: connections stay open between rounds (keep-alive),
so a steady round costs one request per agent and no TLS handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp

POLICY_PATH = "/v1/policy"


@dataclass(frozen=True)
class AgentPod:
    name: str
    ip: str | None
    ready: bool
    node: str | None = None  # spec.nodeName
    start_failure: str | None = None  # why its agent does not run (start_failure), for the monitors' status


@dataclass(frozen=True)
class AgentReport:
    """What one agent runs after this round (policy_hash None: unknown, see error)."""

    pod: str
    ready: bool
    policy_hash: str | None = None
    pushed: bool = False
    error: str | None = None
    # monitor key → seconds since a scraper last read its path on this agent (absent: never); None: the
    # agent does not say (unknown, or a release before the Scraped condition)
    scraped_seconds_ago: Mapping[str, float] | None = field(default=None, hash=False)


def _pod_ready(pod: Mapping) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def agent_pods(pods: Iterable[Mapping]) -> list[AgentPod]:
    """Pure: the DaemonSet's pods → agents (terminating pods are not agents any more)."""
    agents = []
    for pod in pods:
        meta = pod.get("metadata", {})
        if meta.get("deletionTimestamp"):
            continue
        ip = pod.get("status", {}).get("podIP")
        node = pod.get("spec", {}).get("nodeName")
        ready = bool(ip) and _pod_ready(pod)
        failure = None if ready else start_failure(pod)
        agents.append(AgentPod(meta["name"], ip, ready=ready, node=node, start_failure=failure))
    return sorted(agents, key=lambda a: a.name)


# Waiting reasons that mean "it will not start by itself" (not ContainerCreating or PodInitializing).
_STUCK = {"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
          "ErrImagePull", "ImagePullBackOff", "InvalidImageName"}  # fmt: skip


def start_failure(pod: Mapping) -> str | None:
    """Pure: why a pod's containers do not run, in one line — the agent's own termination message (its
    one-line cause, and the exit code that names it, docs/operator.md) or the kubelet's waiting reason —
    or None while nothing failed."""
    status = pod.get("status") or {}
    where = f"{pod.get('metadata', {}).get('name')} on {pod.get('spec', {}).get('nodeName') or '?'}"
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state, previous = container.get("state") or {}, container.get("lastState") or {}
        terminated = state.get("terminated") or previous.get("terminated")
        waiting = state.get("waiting") or {}
        name = container.get("name")
        if terminated and terminated.get("exitCode", 0) != 0:
            lines = (terminated.get("message") or terminated.get("reason") or "").strip().splitlines()
            line = lines[-1] if lines else ""  # FallbackToLogsOnError: the log's last line says why
            return f"{where}: {name} exited {terminated['exitCode']}: {line}"
        if waiting.get("reason") in _STUCK:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"{where}: {name} {waiting['reason']}{detail}"
    return None


def agent_nodes(agents: Iterable[AgentPod]) -> list[str]:
    """Pure: the nodes whose agent is ready, for the policy (count-once: a client's connections are
    reported by its node's agent only when there is one)."""
    return sorted({a.node for a in agents if a.ready and a.node})


def client_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class PushTarget:
    """How to reach agents: port, the name their certificate carries, the CA, the admin token."""

    port: int
    server_name: str
    ca_pem: str
    token: str
    timeout: float = 5.0


def _url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"https://{host}:{port}{POLICY_PATH}"


class RefusedError(RuntimeError):
    """The agent answered, with an error status (401, 422...)."""


@dataclass(frozen=True)
class AgentAnswer:
    policy_hash: str
    scraped_seconds_ago: Mapping[str, float] | None


def parse_answer(document: object) -> AgentAnswer:
    """Pure: the agent's JSON answer to GET/PUT /v1/policy (an agent too old to report scrapes: none)."""
    document = document if isinstance(document, dict) else {}
    ages = document.get("scrapedSecondsAgo")
    return AgentAnswer(
        str(document.get("policyHash") or ""),
        {str(k): float(v) for k, v in ages.items() if isinstance(v, int | float) and v >= 0}
        if isinstance(ages, dict)
        else None,
    )


_FAILURES = (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, OSError)


async def _call(
    session: aiohttp.ClientSession,
    target: PushTarget,
    context: ssl.SSLContext,
    agent: AgentPod,
    method: str,
    body: str | None = None,
) -> AgentAnswer:
    """One request; the agent's answer, or an exception with a short reason."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    async with session.request(
        method,
        _url(agent.ip or "", target.port),
        data=body,
        headers=headers,
        ssl=context,
        server_hostname=target.server_name,
        timeout=aiohttp.ClientTimeout(total=target.timeout),
    ) as response:
        if response.status != 200:
            text = (await response.text())[:300]
            raise RefusedError(f"{method} {POLICY_PATH}: HTTP {response.status}: {text}")
        return parse_answer(await response.json(content_type=None))


async def _converge(
    session: aiohttp.ClientSession,
    target: PushTarget,
    context: ssl.SSLContext,
    agent: AgentPod,
    policy_json: str,
    policy_hash: str,
    force: bool,
) -> AgentReport:
    if not agent.ready:
        return AgentReport(agent.name, ready=False)
    running: AgentAnswer | None = None
    try:
        running = None if force else await _call(session, target, context, agent, "GET")
        if running is not None and running.policy_hash == policy_hash:
            return _report(agent, running)
        running = await _call(session, target, context, agent, "PUT", policy_json)
        return _report(agent, running, pushed=True)
    except _FAILURES as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
        refused = isinstance(exc, RefusedError)
    if refused and running is None:  # it answered but refused: it keeps its last good policy, which?
        try:
            running = await _call(session, target, context, agent, "GET")
        except _FAILURES:
            running = None
    if running is None:
        return AgentReport(agent.name, ready=True, error=error)
    return _report(agent, running, error=error)


def _report(
    agent: AgentPod, answer: AgentAnswer, *, pushed: bool = False, error: str | None = None
) -> AgentReport:
    return AgentReport(agent.name, True, answer.policy_hash, pushed, error, answer.scraped_seconds_ago)


class AgentChannel:
    """One HTTP session to every agent, for the operator's life (or one `async with` block)."""

    def __init__(self, *, keepalive_seconds: float = 60.0):
        # Idle connections live across rounds; the agent's server keeps them 75 s (aiohttp's default), so
        # the client lets go first. No connection limit: one open connection per agent is the point.
        self.keepalive_seconds = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}

    async def __aenter__(self) -> AgentChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _context(self, ca_pem: str) -> ssl.SSLContext:
        """The same context object per CA: aiohttp pools connections by it, so a new one would reconnect."""
        if ca_pem not in self._contexts:
            self._contexts = {ca_pem: client_context(ca_pem)}  # a new CA: the old trust goes
        return self._contexts[ca_pem]

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive_seconds)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def sync(
        self,
        agents: Iterable[AgentPod],
        target: PushTarget,
        policy_json: str,
        policy_hash: str,
        *,
        force: bool = False,
    ) -> list[AgentReport]:
        """Bring every ready agent to the policy: ask its hash, PUT when it differs (always PUT with force,
        i.e. right after the policy changed). Agents that miss a round are caught up by the next one."""
        session, context = self._open(), self._context(target.ca_pem)
        return list(
            await asyncio.gather(
                *(
                    _converge(session, target, context, agent, policy_json, policy_hash, force)
                    for agent in agents
                )
            )
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def sync_agents(
    agents: Iterable[AgentPod],
    target: PushTarget,
    policy_json: str,
    policy_hash: str,
    *,
    force: bool = False,
) -> list[AgentReport]:
    """One round on a channel of its own (tests, one-off pushes); the operator keeps its channel open."""
    async with AgentChannel() as channel:
        return await channel.sync(agents, target, policy_json, policy_hash, force=force)
