"""The agent's main loop: poll the kernel, aggregate, swap the view into the exporter, serve it.

One asyncio loop runs the HTTPS server; each poll runs in a worker thread (`asyncio.to_thread`), so map
reads and aggregation never stall a scrape and a slow scrape never delays a poll. Policy changes (file or
`PUT /v1/policy`) wake the loop at once. Composable: `Agent(settings, tracer_factory=...)` can be started
and stopped in-process (tests, `flowmon demo`); `run_agent(settings)` runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.aggregation.count_once import NatBackends, effective_agent_nodes
from flowmon_agent.aggregation.dns_series import DnsAggregator, DnsTotals, with_dns
from flowmon_agent.aggregation.tracing_scope import NAMED_PEERS_MAX, kernel_config
from flowmon_agent.aggregation.view import AgentView
from flowmon_agent.dns.lifecycle import DnsLifecycle, DnsSource
from flowmon_agent.dns.tracker import DnsTracker
from flowmon_agent.event_wait import wait_event
from flowmon_agent.export.auth import IN_CLUSTER_SA as SA_DIR
from flowmon_agent.export.auth import KubeTokenReviewer, TokenReviewer
from flowmon_agent.export.collectors import AgentInstruments, AgentStatus, Exporter
from flowmon_agent.export.dns_health import dns_health_families
from flowmon_agent.export.policy_store import PolicyFile, PolicyStore
from flowmon_agent.export.review_budget import ReviewLimits
from flowmon_agent.export.server import AgentServer, ServerConfig, ServerLimits
from flowmon_agent.filewatch import FileWatch
from flowmon_agent.kernel.flows import FlowSnapshot, KernelConfig, Tracer
from flowmon_agent.kernel.skb_hooks import SharedSkbHooks, SkbHooks
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_agent.metadata.inventory import read_inventory
from flowmon_agent.metadata.watcher import KubeWatcher
from flowmon_agent.scheduling import FullCollections
from flowmon_agent.supervision import Restarts, where
from flowmon_contract.policy import AgentPolicy

log = logging.getLogger(__name__)

IN_CLUSTER_API = "https://kubernetes.default.svc"
STALL_SECONDS = 30.0


class AgentSettings(BaseSettings):
    """Process settings; every field can be set as FLOWMON_AGENT_<FIELD> (lists as JSON)."""

    model_config = SettingsConfigDict(env_prefix="FLOWMON_AGENT_", extra="forbid")

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=9400, ge=0, le=65535)
    node_name: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [socket.gethostname()],
        min_length=1,
        description="This node's name; several (a,b or a JSON list) for a standalone agent that stands for "
        "every node of its inventory, whose sockets all share its kernel.",
    )
    agent_nodes: list[str] | None = Field(default=None, description="Nodes running an agent; default all.")
    policy_file: Path | None = None
    admin_token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    insecure: bool = False
    no_auth: bool = Field(default=False, description="Serve without auth: plain HTTP on loopback only.")
    server_limits: ServerLimits = Field(default_factory=ServerLimits, description="Connections, timeouts.")
    inventory_file: Path | None = Field(default=None, description="Static inventory (standalone mode).")
    kube_metadata: bool | None = Field(
        default=None,
        description="Watch the Kubernetes API for metadata; default: when in a pod and no inventory file.",
    )
    kube_api_url: str | None = Field(
        default=None, description="API server for the metadata watch and TokenReview; default in-cluster."
    )
    token_review: bool = False
    token_review_admin_users: list[str] = Field(default_factory=list)
    token_review_readers: list[str] = Field(
        default_factory=list, description="Reviewed usernames that read every monitor (a cluster Prometheus)."
    )
    token_review_audiences: list[str] = Field(default_factory=list)
    token_review_limits: ReviewLimits = Field(
        default_factory=ReviewLimits, description="TokenReview verdict cache bounds and rate limits."
    )
    poll_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    ignored_ports: list[int] = Field(default_factory=list, description="Server ports never traced.")
    batch_scheduling: bool = Field(
        default=True,
        description="Run the agent's threads as SCHED_BATCH: they never preempt the applications it "
        "measures when they wake (flowmon agent only; not for an Agent embedded in another process).",
    )
    full_gc_period_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Python's full garbage collections only between polls, one per this many seconds "
        "(flowmon agent only: the process's thresholds); 0: wherever Python triggers them. Off by default: "
        "on the mixed soak it took the poll's p99 from 167 to 99 ms but held ~25-30 MB more RSS (30 s and "
        "10 s alike; docs/BENCHMARKS.md, Mixed soak).",
    )
    # sock_ops (srtt at close), UDP and DNS all link there; in a pod: the host's /sys/fs/cgroup, not its own
    cgroup_root: Path | None = Field(
        None, description="Where the node's cgroup v2 root is mounted (at or below); default: the shallowest."
    )
    rtt_window_ms: int = Field(
        default=100,
        gt=0,
        le=1000,
        description="srtt is sampled while tcp:tcp_probe (every received segment) is attached: for this "
        "long at the start of each 1 s sampling epoch; 1000: always (one sample for every connection).",
    )

    dns_capture: bool = Field(
        default=True,
        description="Allow the DNS capture (flowmon_dns_* metrics, server_dns_name): cgroup-skb programs on "
        "the cgroup v2 root, attached only while a monitor asks for DNS. A failure to attach is logged, "
        "counted and retried a minute later; everything else keeps working. False: never attached.",
    )
    dns_ring_pages: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="DNS ring buffer pages (a power of two); 256 pages (1 MiB) hold ~6,000 records, "
        "~12,000 DNS packets/s between two polls of 0.5 s.",
    )

    @field_validator("node_name", mode="before")
    @classmethod
    def _node_names(cls, value: object) -> object:
        """FLOWMON_AGENT_NODE_NAME is one name (the DaemonSet's spec.nodeName) or several, comma-separated."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    def use_kube_metadata(self) -> bool:
        if self.kube_metadata is not None:
            return self.kube_metadata
        return self.inventory_file is None and "KUBERNETES_SERVICE_HOST" in os.environ

    def server_config(self, token_reviewer: TokenReviewer | None = None) -> ServerConfig:
        return ServerConfig(
            host=self.listen_host,
            port=self.listen_port,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            admin_token_file=self.admin_token_file,
            insecure=self.insecure,
            no_auth=self.no_auth,
            limits=self.server_limits,
            token_reviewer=token_reviewer,
            token_review_admin_users=tuple(self.token_review_admin_users),
            token_review_readers=tuple(self.token_review_readers),
        )


def default_skb_hooks(settings: AgentSettings, tracker: DnsTracker) -> SkbHooks:
    """UDP accounting and the DNS capture in one cgroup-skb program pair (kernel/skb_hooks.py)."""
    from flowmon_agent.dns.capture import dns_cflags
    from flowmon_agent.kernel.skb_hooks import SkbHooks
    from flowmon_agent.kernel.udp_flows import udp_cflags

    cflags = udp_cflags() | dns_cflags(tracker.latency_bounds, ring_pages=settings.dns_ring_pages)
    return SkbHooks(cflags, cgroup=settings.cgroup_root)


def default_tracer(
    settings: AgentSettings,
    config: KernelConfig,
    *,
    force_compat: bool = False,
    skb_hooks: Callable[[], SkbHooks] | None = None,
) -> Tracer:
    """The real tracer; `config` (the ignored ports: no policy yet) applies from its first socket.
    `skb_hooks`: the program pair UDP shares with the DNS capture (default: UDP's own)."""
    from flowmon_agent.kernel.tracer import FlowTracer  # imports BCC: only when the kernel is wanted

    window_ms, cgroup_root = settings.rtt_window_ms, settings.cgroup_root
    return FlowTracer(
        config,
        force_compat=force_compat,
        rtt_window_ms=window_ms,
        cgroup_root=cgroup_root,
        udp_hooks=skb_hooks,
    )


def default_dns_capture(
    settings: AgentSettings, tracker: DnsTracker, *, skb_hooks: Callable[[], SkbHooks] | None = None
) -> DnsSource:
    """`skb_hooks`: the program pair the capture shares with UDP (default: the capture's own)."""
    from flowmon_agent.dns.capture import DnsCapture  # imports BCC: only when the kernel is wanted

    hooks = skb_hooks() if skb_hooks is not None else None
    return DnsCapture(tracker, hooks=hooks, cgroup=settings.cgroup_root, ring_pages=settings.dns_ring_pages)


def stall_reason(
    last_poll_at: float | None, now: float, interval: float, last_error: str | None
) -> str | None:
    """Pure, for /healthz (a liveness probe): polls that keep failing or hang mean a restart may help.
    Before the first poll nothing is stalled yet (BPF compiles for seconds): readiness covers that."""
    if last_poll_at is None:
        return None
    idle = now - last_poll_at
    if idle > max(STALL_SECONDS, 10 * interval):
        return f"no successful poll for {idle:.0f} s (last error: {last_error})"
    return None


def reload_inventory(path: Path, store: MetadataStore) -> None:
    """Replace every kind the inventory describes (a relist), so that removed objects disappear; an
    unreadable, invalid or truncated-looking file raises (OSError, InventoryError) and changes nothing."""
    store.replace_all(read_inventory(path))


class Agent:
    """The whole agent in-process: `await start()`, `await stop()`; `url`, `exporter`, `policy` exposed."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        tracer_factory: Callable[[KernelConfig], Tracer] | None = None,
        store: MetadataStore | None = None,
        nat_backends: Callable[[FlowSnapshot], NatBackends] | None = None,
        token_reviewer: TokenReviewer | None = None,
        watcher: KubeWatcher | None = None,
        restarts: Restarts | None = None,
        clock: Callable[[], float] = time.monotonic,
        dns_tracker: DnsTracker | None = None,
        dns_capture_factory: Callable[[DnsTracker], DnsSource] | None = None,
        force_compat: bool = False,
        full_collections: FullCollections | None = None,
    ) -> None:
        """The default tracer and DNS capture share one cgroup-skb program pair (`skb_hooks`, loaded when
        the first of them needs it); `force_compat`: the default tracer's kernel path."""
        self.settings = settings
        self.instruments = AgentInstruments()
        self.restarts = restarts or Restarts()  # every long-lived task's restarts, counted here
        self.instruments.registry.register(self.restarts)
        self.exporter = Exporter(instruments=self.instruments)
        self.policy = PolicyStore(
            on_rejected=lambda source: self.instruments.policy_rejected.labels(source).inc()
        )
        self.store = store if store is not None else MetadataStore()
        self.resolver = Resolver(self.store)
        if watcher is None and settings.use_kube_metadata():
            watcher = (
                KubeWatcher(
                    self.store, settings.kube_api_url, token_file=SA_DIR / "token", ca_file=SA_DIR / "ca.crt"
                )
                if settings.kube_api_url
                else KubeWatcher.in_cluster(self.store)
            )
        self.watcher = watcher
        self.dns_tracker = dns_tracker if dns_tracker is not None else DnsTracker()
        self.aggregator = Aggregator(settings.node_name, settings.agent_nodes, self.dns_tracker.names)
        self.dns_aggregator = DnsAggregator()
        self.skb_hooks = SharedSkbHooks(functools.partial(default_skb_hooks, settings, self.dns_tracker))
        capture_factory = dns_capture_factory or functools.partial(
            default_dns_capture, settings, skb_hooks=self.skb_hooks.get
        )
        self.dns = DnsLifecycle(self.dns_tracker, capture_factory, enabled=settings.dns_capture, clock=clock)
        if token_reviewer is None and settings.token_review:
            token_reviewer = KubeTokenReviewer(
                settings.kube_api_url or IN_CLUSTER_API,
                audiences=settings.token_review_audiences,
                limits=settings.token_review_limits,
            )
        self.server = AgentServer(
            settings.server_config(token_reviewer),
            exporter=self.exporter,
            policy=self.policy,
            readiness=self.not_ready_reason,
            liveness=self.stall_reason,
            restarts=self.restarts,
        )
        self._tracer_factory = tracer_factory or functools.partial(
            default_tracer, settings, force_compat=force_compat, skb_hooks=self.skb_hooks.get
        )
        self._nat_backends, self._clock = nat_backends, clock
        self.full_collections = full_collections  # taken over from start to stop
        self._policy_file = PolicyFile(settings.policy_file, self.policy) if settings.policy_file else None
        self._inventory_watch = FileWatch(settings.inventory_file) if settings.inventory_file else None
        self._metadata_at: float | None = None
        self.tracer: Tracer | None = None
        self.ignored_ports: frozenset[int] = frozenset()  # settled at start: the server's port is known then
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.polls = 0
        self.last_error: str | None = None
        self._last_poll_at: float | None = None  # end of the last successful poll

    @property
    def url(self) -> str:
        return self.server.url

    def not_ready_reason(self) -> str | None:
        if self.tracer is None:
            return "BPF programs not attached yet"
        if self.policy.policy is None:
            return "no policy loaded yet"
        if self.watcher is not None and not self.watcher.synced:
            return "Kubernetes metadata not listed yet"
        return None

    def stall_reason(self) -> str | None:
        return stall_reason(
            self._last_poll_at, self._clock(), self.settings.poll_interval_seconds, self.last_error
        )

    # ---- lifecycle ----

    async def start(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self.policy.subscribe(lambda _policy: self.poll_soon())
        if self.settings.inventory_file:
            await asyncio.to_thread(self._load_inventory)
        if self.watcher is not None:
            self.watcher.start(self.restarts)
        if self._policy_file:
            await asyncio.to_thread(self._policy_file.load)
        await self.server.start()  # health answers while BPF compiles (seconds)
        try:
            # our own port too (scrapes and policy pushes), from the first socket on
            self.ignored_ports = frozenset({*self.settings.ignored_ports, self.server.port or 0} - {0})
            initial = KernelConfig(ignored_ports=self.ignored_ports)
            self.tracer = await asyncio.to_thread(self._tracer_factory, initial)
        except BaseException:
            await self.server.stop()
            raise
        # the first view before anyone is told we are ready (with the DNS capture, if the policy wants it)
        await asyncio.to_thread(self.poll_once)
        if self.full_collections is not None:
            self.full_collections.take_over()
        self._task = asyncio.create_task(self.restarts.supervise("poll", self._run), name="flowmon-poll")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.stop()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)
            self.tracer = None
        await asyncio.to_thread(self.dns.close)
        await asyncio.to_thread(self.skb_hooks.close)  # after both jobs stopped
        if self.full_collections is not None:
            self.full_collections.give_back()

    def poll_soon(self) -> None:
        """Wake the poll loop now (a policy change); from any thread."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        interval = self.settings.poll_interval_seconds
        assert self._wake is not None
        next_at = self._clock() + interval
        while True:
            await wait_event(self._wake, next_at - self._clock())
            self._wake.clear()
            next_at = self._clock() + interval  # the period runs from poll start to poll start
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception as exc:  # keep serving the last good view; the error is logged
                self.last_error = repr(exc)
                self.instruments.poll_errors.inc()
                log.exception("poll failed")
            if self.full_collections is not None:  # in the gap before the next poll, never inside one
                await asyncio.to_thread(self.full_collections.after_poll)

    # ---- one poll (worker thread) ----

    def _load_inventory(self) -> None:
        assert self.settings.inventory_file is not None
        reload_inventory(self.settings.inventory_file, self.store)
        self._metadata_at = self._clock()

    def _reload_inventory_if_changed(self) -> None:
        assert self._inventory_watch is not None
        if self._inventory_watch.changed():
            self._load_inventory()

    def _reload_guarded(self, kind: str, reload: Callable[[], object]) -> None:
        """A file reload inside the poll: whatever the file (or its stat: a symlink loop) does, it is
        refused, counted and logged, the last good content stays, and the poll goes on."""
        try:
            reload()
        except (OSError, ValueError) as exc:  # unreadable, does not parse, looks truncated: says which
            self.instruments.reload_rejected.labels(kind).inc()
            log.error("%s file reload refused, keeping the last good one: %s", kind, exc)
        except Exception as exc:
            self.instruments.reload_rejected.labels(kind).inc()
            log.error("%s file reload refused, keeping the last good one: unexpected %s", kind, where(exc))

    def poll_once(self) -> AgentView | None:
        """Read the kernel, apply filters for the running policy, aggregate, swap the view in."""
        assert self.tracer is not None
        started = time.perf_counter()
        if self._policy_file:
            self._reload_guarded("policy", self._policy_file.reload_if_changed)
        if self._inventory_watch:
            self._reload_guarded("inventory", self._reload_inventory_if_changed)
        policy = self.policy.policy
        self.dns.poll(policy)  # attaches or closes the capture as the policy asks
        snapshot = self.tracer.poll()
        now = self._clock()
        view = self._view(snapshot, policy, now)
        age = self._metadata_age(now)
        self.exporter.swap(
            AgentStatus(view, snapshot.kernel_path, snapshot.rtt_at_close, dict(snapshot.dropped), age)
        )
        self.instruments.poll_duration.observe(time.perf_counter() - started)
        self.polls += 1
        self._last_poll_at = self._clock()
        return view

    def _metadata_age(self, now: float) -> float | None:
        if self.watcher is not None:
            return self.watcher.age_seconds()
        return None if self._metadata_at is None else max(0.0, now - self._metadata_at)

    def _view(self, snapshot: FlowSnapshot, policy: AgentPolicy | None, now: float) -> AgentView:
        if policy is None:
            return AgentView(policy_hash="", monitors={})
        assert self.tracer is not None
        named = self.dns_tracker.names.addresses(NAMED_PEERS_MAX)  # kept exact: their flows carry the name
        config = kernel_config(policy, self.store, self.settings.node_name, self.ignored_ports, named)
        self.tracer.configure(config)
        backends = self._nat_backends(snapshot) if self._nat_backends else None
        view = self.aggregator.build_view(snapshot, policy, self.resolver, now, backends)
        tracker, nodes = self.dns_tracker, set(self.settings.node_name)
        agent_nodes = effective_agent_nodes(policy, self.settings.agent_nodes, self.store) | nodes
        totals = DnsTotals(tracker.requests(), tracker.latency())
        dns = self.dns_aggregator.build(
            totals, policy, self.resolver, now, local=nodes, agent_nodes=agent_nodes
        )
        return with_dns(view, dns, dns_health_families(self.dns.health()))


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
    """While inside: these signals, sent to this process, set `stop`; the previous handlers come back after.

    Not `loop.add_signal_handler`: it routes signals through a wakeup fd (the loop's self-pipe), and a
    child that a library forks without exec shares that socket. pyroute2 opens a socket in another netns
    from such a child and then SIGTERMs it: the child's C-level handler writes SIGTERM into the shared
    socket and this process's loop stops. A plain handler runs in the child as its own Python code
    instead, which sees another pid and dies as SIGTERM's default action would."""
    loop = asyncio.get_running_loop()
    pid = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != pid:  # a forked child: never talk to the parent's loop
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def run_agent(settings: AgentSettings, **kwargs) -> int:
    """Run until SIGTERM or SIGINT; the kwargs are Agent's (tracer_factory, store, nat_backends...)."""
    agent = Agent(settings, **kwargs)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        await agent.start()
        log.info("flowmon agent on node %s serving %s", ", ".join(settings.node_name), agent.url)
        try:
            await stop.wait()
        finally:
            await agent.stop()
    return 0
