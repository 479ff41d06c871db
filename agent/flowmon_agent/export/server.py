"""The agent's one HTTP(S) server: per-monitor metric paths, the agent's own metrics, health, policy API.

aiohttp on the agent's event loop; rendering and gzip run in the default executor, so a slow scrape never
stalls the loop (and the poll loop's own work runs in a thread as well). No debug or profiling endpoints.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from flowmon_agent.export.auth import (
    AGENT,
    Decision,
    Target,
    TokenReviewer,
    bearer_token,
    decide_reviewed,
    decide_static,
    digest,
    monitor_digests,
)
from flowmon_agent.export.collectors import CONTENT_TYPE, Exporter
from flowmon_agent.export.policy_store import PolicyError, PolicyStore
from flowmon_agent.filewatch import FileWatch

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 8 * 1024 * 1024


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

    HTTPS always authenticates. Plain HTTP is for loopback (auth only if an admin token is given), or
    for any address with an explicit `insecure` (no auth unless an admin token is given, and a warning).
    """
    cert, key = config.tls_cert_file, config.tls_key_file
    if (cert is None) != (key is None):
        raise ServerConfigError("give both a TLS certificate and key file, or neither")
    if cert is not None:
        if config.insecure:
            raise ServerConfigError("--insecure serves plain HTTP: drop it, or drop the TLS certificate/key")
        return Mode(tls=True, auth=True)
    with_token = config.admin_token_file is not None
    if is_loopback(config.host):
        return Mode(tls=False, auth=with_token)
    if not config.insecure:
        raise ServerConfigError(
            f"refusing plain HTTP on {config.host}:{config.port}: it is not a loopback address. "
            "Give a TLS certificate and key (--tls-cert-file/--tls-key-file), listen on 127.0.0.1, "
            "or pass --insecure to serve metrics unencrypted to the network"
        )
    warning = f"--insecure: serving plain HTTP on {config.host}:{config.port}" + (
        "; bearer tokens cross the network in clear text" if with_token else " without authentication"
    )
    return Mode(tls=False, auth=with_token, warnings=(warning,))


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def read_admin_tokens(path: Path) -> list[bytes]:
    """The admin token file holds one token per line (several during a rotation); only digests are kept."""
    return [digest(line.strip()) for line in path.read_text().splitlines() if line.strip()]


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
    ) -> None:
        self.config = config
        self.mode = server_mode(config)
        self._exporter, self._policy, self._readiness = exporter, policy, readiness
        self._liveness = liveness
        self._admin: list[bytes] = []
        self._ssl: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._watch_task: asyncio.Task | None = None
        self.port: int | None = None
        self.tls_reloads = 0

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.mode.tls else 'http'}://{host}:{self.port}"

    # ---- lifecycle ----

    async def start(self) -> None:
        for warning in self.mode.warnings:
            log.warning(warning)
        if self.config.admin_token_file is not None:
            self._admin = read_admin_tokens(self.config.admin_token_file)
        if self.mode.tls:
            assert self.config.tls_cert_file and self.config.tls_key_file
            self._ssl = tls_context(self.config.tls_cert_file, self.config.tls_key_file)
        app = web.Application(client_max_size=MAX_POLICY_BYTES)
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
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._watch_task = asyncio.create_task(self._watch_files(), name="flowmon-server-files")
        log.info("serving %s (auth %s)", self.url, "on" if self.mode.auth else "OFF")

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()

    async def _watch_files(self) -> None:
        """Certificates and tokens rotate without a restart: reload what changed, keep the old on error."""
        cert, key, token = self.config.tls_cert_file, self.config.tls_key_file, self.config.admin_token_file
        tls_watch = FileWatch(cert, key) if cert and key else None
        token_watch = FileWatch(token) if token else None
        while True:
            await asyncio.sleep(self.config.reload_interval)
            if tls_watch and self._ssl and tls_watch.changed():
                try:
                    # Same context object: new handshakes get the new chain, open connections keep theirs.
                    self._ssl.load_cert_chain(cert, key)  # type: ignore[arg-type]
                    self.tls_reloads += 1
                    log.info("TLS certificate reloaded from %s", cert)
                except (OSError, ssl.SSLError) as exc:
                    # Mid-rotation (cert written, key not yet): the next write changes the files again.
                    log.error("TLS certificate reload failed, keeping the old one: %s", exc)
            if token_watch and token and token_watch.changed():
                try:
                    self._admin = read_admin_tokens(token)
                    log.info("admin token reloaded from %s", token)
                except OSError as exc:
                    log.error("admin token reload failed, keeping the old one: %s", exc)

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
            user = await self.config.token_reviewer.review(token)
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
            return web.Response(status=404, text=f"no FlowMonitor {key} in the running policy\n")
        return await self._metrics_response(request, lambda: self._exporter.monitor_text(key))

    async def _metrics_response(self, request: web.Request, render: Callable[[], bytes]) -> web.Response:
        use_gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))

        def body() -> bytes:
            text = render()
            return gzip.compress(text, compresslevel=6) if use_gzip else text

        payload = await asyncio.get_running_loop().run_in_executor(None, body)
        headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
        if use_gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=payload, headers=headers)

    async def _put_policy(self, request: web.Request) -> web.Response:
        if denied := await self._authorize(request, AGENT):
            return denied
        data = await request.read()
        try:
            policy_hash = self._policy.apply_json(data, source="api")
        except PolicyError as exc:
            return _json(422, {"errors": [e.dump() for e in exc.errors]})
        return _json(200, {"policyHash": policy_hash})

    async def _get_policy(self, request: web.Request) -> web.Response:
        if denied := await self._authorize(request, AGENT):
            return denied
        return _json(200, {"policyHash": self._policy.hash})


def _json(status: int, document: dict | Iterable) -> web.Response:
    return web.Response(status=status, text=json.dumps(document), content_type="application/json")
