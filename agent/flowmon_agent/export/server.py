"""The agent's one HTTP(S) server: per-monitor metric paths, the agent's own metrics, health, policy API.

aiohttp on the agent's event loop, behind a listener that caps and times out connections (listener.py).
Rendering and gzip run on the server's own small thread pool and policy validation on another, so a slow
scrape never stalls the loop nor waits behind a poll (which runs in the default executor). Every request
has a time limit, bodies a size limit, and malformed input gets a 4xx. No debug or profiling endpoints.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from flowmon_agent.export.auth import (
    AGENT,
    Decision,
    Target,
    TokenReviewer,
    decide_reviewed,
    decide_static,
    digest,
    monitor_digests,
)
from flowmon_agent.export.collectors import CONTENT_TYPE, Exporter, HttpCollector
from flowmon_agent.export.http_log import ClientErrorLog
from flowmon_agent.export.listener import ConnectionGate, HttpStats, ListenerLimits, request_started
from flowmon_agent.export.policy_store import PolicyError, PolicyStore, parse_policy_json
from flowmon_agent.export.review_budget import ReviewThrottled
from flowmon_agent.export.scrapes import ScrapeLog
from flowmon_agent.export.tls import ServingContext
from flowmon_agent.export.tokens import TokenFileError, bearer_token, read_token_file
from flowmon_agent.filewatch import FileWatch
from flowmon_agent.supervision import Restarts
from flowmon_contract.policy import AgentPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits(ListenerLimits):
    """What one client may cost; every field is FLOWMON_AGENT_SERVER_LIMITS (JSON) in AgentSettings."""

    idle_timeout: float = 30.0  # keep-alive: an idle connection is closed after this long
    handler_timeout: float = 30.0  # one request, body read included: 503 after this long
    max_policy_bytes: int = 8 * 1024 * 1024  # PUT /v1/policy bodies (413 beyond)
    max_request_line_bytes: int = 4096  # method, path and version (414 beyond)
    max_header_bytes: int = 8190  # one header line: a ServiceAccount JWT fits (431 beyond)
    max_headers: int = 32  # header lines per request (431 beyond)
    render_threads: int = 2  # scrape rendering and gzip, apart from the poll's threads


class ServerConfigError(ValueError):
    """The listen/TLS/auth settings are unsafe or inconsistent; the message says what to change."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9400
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    admin_token_file: Path | None = None
    insecure: bool = False  # plain HTTP without auth on a non-loopback address (logs a warning)
    token_reviewer: TokenReviewer | None = None
    token_review_admin_users: tuple[str, ...] = ()
    token_review_readers: tuple[str, ...] = ()  # usernames that read every monitor's path
    reload_interval: float = 1.0  # how often cert, key and token files are checked for changes
    no_auth: bool = False  # an explicit choice, plain HTTP on a loopback address only
    limits: ServerLimits = field(default_factory=ServerLimits)


@dataclass(frozen=True)
class Mode:
    tls: bool
    auth: bool
    warnings: tuple[str, ...] = field(default=())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_mode(config: ServerConfig) -> Mode:
    """Pure: which transport and whether auth is on, or ServerConfigError for an unsafe combination.

    Auth is always on, unless `no_auth` is given explicitly, which only plain HTTP on a loopback address
    allows: leaving out a token never turns it off. Plain HTTP is for loopback, or for any address with an
    explicit `insecure` (a warning: bearer tokens cross the network in clear text).
    """
    cert, key = config.tls_cert_file, config.tls_key_file
    if (cert is None) != (key is None):
        raise ServerConfigError("give both a TLS certificate and key file, or neither")
    if config.no_auth and (cert is not None or not is_loopback(config.host)):
        raise ServerConfigError(
            f"--no-auth serves metrics to anyone who connects: it is allowed with plain HTTP on a loopback "
            f"address only, not {'HTTPS' if cert is not None else config.host}. Give tokens "
            "(--token-file, --admin-token-file) instead"
        )
    if cert is not None:
        if config.insecure:
            raise ServerConfigError("--insecure serves plain HTTP: drop it, or drop the TLS certificate/key")
        return Mode(tls=True, auth=True)
    if is_loopback(config.host):
        return Mode(tls=False, auth=not config.no_auth)
    if not config.insecure:
        raise ServerConfigError(
            f"refusing plain HTTP on {config.host}:{config.port}: it is not a loopback address. "
            "Give a TLS certificate and key (--tls-cert-file/--tls-key-file), listen on 127.0.0.1, "
            "or pass --insecure to serve metrics unencrypted to the network"
        )
    warning = (
        f"--insecure: serving plain HTTP on {config.host}:{config.port}; "
        "bearer tokens cross the network in clear text"
    )
    return Mode(tls=False, auth=True, warnings=(warning,))


def read_admin_tokens(path: Path) -> list[bytes]:
    """The admin token file holds one token per line (several during a rotation); only digests are kept."""
    return [digest(token) for token in read_token_file(path)]


def accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


class AgentServer:
    """Start with `await start()`, stop with `await stop()`; `url` is known after start (port 0 works)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        exporter: Exporter,
        policy: PolicyStore,
        readiness: Callable[[], str | None],  # None when ready, else why not
        liveness: Callable[[], str | None] = lambda: None,  # None while healthy, else what is stuck
        restarts: Restarts | None = None,  # the agent's: restarts the file reload task if it ever dies
    ) -> None:
        self.config = config
        self.mode = server_mode(config)
        self._exporter, self._policy, self._readiness = exporter, policy, readiness
        self._liveness = liveness
        self._restarts = restarts or Restarts()
        self._instruments = exporter.instruments
        self._admin: list[bytes] = []
        self._tls: ServingContext | None = None
        self._runner: web.AppRunner | None = None
        self._gate: ConnectionGate | None = None
        self.stats = HttpStats()
        self._listening: asyncio.Server | None = None
        self._collector: HttpCollector | None = None
        self._watch_task: asyncio.Task | None = None
        self._render_pool: ThreadPoolExecutor | None = None
        self._policy_pool: ThreadPoolExecutor | None = None
        self._policy_push = asyncio.Lock()  # one push validated at a time: memory stays one body's worth
        self.scrapes = ScrapeLog()
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.mode.tls else 'http'}://{host}:{self.port}"

    @property
    def tls_reloads(self) -> int:
        return self._tls.reloads if self._tls else 0

    # ---- lifecycle ----

    async def start(self) -> None:
        for warning in self.mode.warnings:
            log.warning(warning)
        limits = self.config.limits
        # Watched from before the first read: a change made meanwhile is a change, never missed.
        cert, key, token = self.config.tls_cert_file, self.config.tls_key_file, self.config.admin_token_file
        tls_watch = FileWatch(cert, key) if cert and key else None
        token_watch = FileWatch(token) if token else None
        if self.config.admin_token_file is not None:
            try:
                self._admin = read_admin_tokens(self.config.admin_token_file)
            except (OSError, TokenFileError) as exc:
                raise ServerConfigError(f"admin token file {self.config.admin_token_file}: {exc}") from None
        if self.mode.tls:
            assert self.config.tls_cert_file and self.config.tls_key_file
            self._tls = ServingContext(self.config.tls_cert_file, self.config.tls_key_file)
        self._render_pool = ThreadPoolExecutor(limits.render_threads, thread_name_prefix="flowmon-render")
        self._policy_pool = ThreadPoolExecutor(1, thread_name_prefix="flowmon-policy")
        app = web.Application(client_max_size=limits.max_policy_bytes, middlewares=[self._guard])
        app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._agent_metrics),
                web.get("/metrics/{namespace}/{name}", self._monitor_metrics),
                web.put("/v1/policy", self._put_policy),
                web.get("/v1/policy", self._get_policy),
            ]
        )
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            logger=ClientErrorLog(logging.getLogger("aiohttp.server"), self._count_malformed),
            keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_request_line_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            auto_decompress=False,  # compressed bodies are refused (415), never inflated
            lingering_time=1.0,  # an unread body (a refused push) is drained for 1 s at most
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self._gate = ConnectionGate(
            self._runner.server, limits, lambda: self._tls.context if self._tls else None, self.stats
        )
        self._collector = HttpCollector(self.stats, lambda: self._gate.open if self._gate else 0)
        self._instruments.registry.register(self._collector)
        if self.config.token_reviewer is not None:
            self._instruments.registry.register(self.config.token_reviewer)
        loop = asyncio.get_running_loop()
        self._listening = await loop.create_server(self._gate, self.config.host, self.config.port)
        self.port = self._listening.sockets[0].getsockname()[1]
        watch = functools.partial(self._watch_files, tls_watch, token_watch)
        self._watch_task = asyncio.create_task(
            self._restarts.supervise("server-files", watch), name="flowmon-server-files"
        )
        log.info("serving %s (auth %s)", self.url, "on" if self.mode.auth else "OFF")

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._listening:
            self._listening.close()
        if self._gate:
            await self._gate.close()
        if self._runner:
            await self._runner.cleanup()
        if self._collector:
            self._instruments.registry.unregister(self._collector)
            self._collector = None
            if self.config.token_reviewer is not None:
                self._instruments.registry.unregister(self.config.token_reviewer)
        for pool in (self._render_pool, self._policy_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def _watch_files(self, tls_watch: FileWatch | None, token_watch: FileWatch | None) -> None:
        """Certificates and tokens rotate without a restart: reload what changed, keep the last good on
        any error. Nothing ends this loop but stop(); an error outside a reload (the files' stat, e.g. a
        symlink loop) restarts it with a backoff."""
        cert, token = self.config.tls_cert_file, self.config.admin_token_file
        while True:
            await asyncio.sleep(self.config.reload_interval)
            if tls_watch and self._tls and tls_watch.changed():  # small files: stat, at most a hash
                await self._reload("tls", f"TLS certificate {cert}", self._tls.reload)
            if token_watch and token_watch.changed():
                await self._reload("admin_token", f"admin token file {token}", self._reload_admin)

    def _count_malformed(self) -> None:
        self.stats.malformed_requests += 1

    def _reload_admin(self) -> None:
        assert self.config.admin_token_file is not None
        self._admin = read_admin_tokens(self.config.admin_token_file)

    async def _reload(self, kind: str, what: str, reload: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(reload)
        except Exception as exc:  # whatever the files hold, the loop and the last good state survive
            # Mid-rotation (cert written, key not yet): the next write changes the files again.
            self._instruments.reload_rejected.labels(kind).inc()
            log.error("%s refused, keeping the last good one: %s", what, _describe(exc))
        else:
            log.info("%s reloaded", what)

    # ---- every request ----

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Time limit and body rules for every request; the connection's header timer stops meanwhile."""
        finished = request_started(request.transport)
        stats = self.stats
        limits = self.config.limits
        try:
            if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
                stats.bodies_refused += 1
                return _closing(415, "compressed request bodies are not accepted")
            if (request.content_length or 0) > limits.max_policy_bytes:
                stats.bodies_refused += 1
                return _closing(413, f"request bodies are limited to {limits.max_policy_bytes} bytes")
            async with asyncio.timeout(limits.handler_timeout):
                return await handler(request)
        except TimeoutError:
            stats.handler_timeouts += 1
            if not request.content.at_eof():  # still waiting for the client's body
                return _closing(408, "the request body did not arrive in time")
            return _closing(503, "request took too long")
        except web.HTTPRequestEntityTooLarge:
            stats.bodies_refused += 1
            raise
        finally:
            finished()

    # ---- auth ----

    async def _authorize(self, request: web.Request, target: Target) -> web.Response | None:
        """None when the request may proceed, else the 401/403 response."""
        if not self.mode.auth:
            return None
        token = bearer_token(request.headers.get("Authorization"))
        decision = decide_static(
            token, target, admin=self._admin, monitors=monitor_digests(self._policy.policy)
        )
        if decision is None and token is not None and self.config.token_reviewer is not None:
            try:
                user = await self.config.token_reviewer.review(token, request.remote or "")
            except ReviewThrottled as exc:  # nothing was asked: the client may come back later
                return web.Response(
                    status=exc.status,
                    text="too many token reviews, retry later\n",
                    headers={"Retry-After": exc.retry_after_header},
                )
            decision = decide_reviewed(
                user,
                target,
                admin_users=self.config.token_review_admin_users,
                readers=self.config.token_review_readers,
            )
        decision = decision or Decision.UNAUTHENTICATED
        if decision is Decision.ALLOW:
            return None
        if decision is Decision.UNAUTHENTICATED:
            return web.Response(
                status=401, text="unauthorized\n", headers={"WWW-Authenticate": 'Bearer realm="flowmon"'}
            )
        return web.Response(status=403, text="forbidden: this token may not read this path\n")

    # ---- handlers ----

    async def _healthz(self, _request: web.Request) -> web.Response:
        problem = self._liveness()
        return web.Response(text="ok\n") if problem is None else web.Response(status=503, text=problem + "\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        reason = self._readiness()
        return (
            web.Response(text="ready\n") if reason is None else web.Response(status=503, text=reason + "\n")
        )

    async def _agent_metrics(self, request: web.Request) -> web.Response:
        if denied := await self._authorize(request, AGENT):
            return denied
        return await self._metrics_response(request, self._exporter.agent_text)

    async def _monitor_metrics(self, request: web.Request) -> web.Response:
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        if denied := await self._authorize(request, Target(monitor=key)):
            return denied
        policy = self._policy.policy
        if policy is None or policy.monitor(*key.split("/", 1)) is None:
            return web.Response(status=404, text="no such FlowMonitor in the running policy\n")
        response = await self._metrics_response(request, lambda: self._exporter.monitor_text(key))
        self.scrapes.served(key)
        return response

    async def _metrics_response(self, request: web.Request, render: Callable[[], bytes]) -> web.Response:
        use_gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))

        def body() -> bytes:
            text = render()
            return gzip.compress(text, compresslevel=6) if use_gzip else text

        payload = await asyncio.get_running_loop().run_in_executor(self._render_pool, body)
        headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
        if use_gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=payload, headers=headers)

    async def _put_policy(self, request: web.Request) -> web.Response:
        if denied := await self._authorize(request, AGENT):
            return denied
        async with self._policy_push:
            data = await request.read()  # 413 beyond limits.max_policy_bytes
            loop = asyncio.get_running_loop()
            try:  # validation is CPU work proportional to the body: off the event loop
                policy = await loop.run_in_executor(self._policy_pool, _parse_and_hash, data)
            except PolicyError as exc:
                self._policy.rejected("api")
                return _json(422, {"errors": exc.dump()})
        return _json(200, self._policy_answer(self._policy.apply(policy, source="api")))

    async def _get_policy(self, request: web.Request) -> web.Response:
        if denied := await self._authorize(request, AGENT):
            return denied
        return _json(200, self._policy_answer(self._policy.hash))

    def _policy_answer(self, policy_hash: str | None) -> dict:
        """The running policy's hash, and how long ago each of its monitors' paths was last scraped."""
        policy = self._policy.policy
        keys = {m.key for m in policy.monitors} if policy is not None else set()
        return {"policyHash": policy_hash, "scrapedSecondsAgo": self.scrapes.seconds_ago(keys)}


def _parse_and_hash(data: bytes) -> AgentPolicy:
    policy = parse_policy_json(data)
    _ = policy.hash  # cached: hashing a large policy is CPU work too, done here rather than on the loop
    return policy


def _describe(exc: BaseException) -> str:
    """An error for a log line, by type and message: never a repr (a UnicodeDecodeError's repr quotes the
    bytes it failed on, which may be a token)."""
    return f"{type(exc).__name__}: {exc}"


def _closing(status: int, text: str) -> web.Response:
    """An error after which the connection closes: what is left of the request is never read."""
    return web.Response(status=status, text=text + "\n", headers={"Connection": "close"})


def _json(status: int, document: dict | Iterable) -> web.Response:
    return web.Response(status=status, text=json.dumps(document), content_type="application/json")
