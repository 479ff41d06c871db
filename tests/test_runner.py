"""The agent runner: its logic with a fake tracer (configuration from policy and metadata, snapshots into
views), and with the real one (root): readiness, metadata from the Kubernetes API emulator, policy file
reload and API pushes that wake the poll loop, the self metrics that describe them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from ipaddress import ip_address

import aiohttp
import pytest
import yaml
from pydantic import ValidationError

from flowmon_agent.aggregation.tracing_scope import cluster_networks
from flowmon_agent.export.policy_store import dump_policy_json
from flowmon_agent.kernel.cgroup import cgroup2_root
from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flows import FlowKey, KernelConfig, Reporter
from flowmon_agent.kernel.loader import BPFUnavailableError
from flowmon_agent.metadata import MetadataStore
from flowmon_agent.metadata.watcher import KubeWatcher
from flowmon_agent.runner import Agent, AgentSettings, stall_reason
from flowmon_agent.scheduling import NEVER, FullCollections
from flowmon_contract.policy import compile_policy
from flowmon_contract.spec import DEFAULT_METRICS
from tests.fake_tracer import FakeTracer
from tests.k8s_objects import namespace, node, pod, service
from tests.test_cli_agent import loopback_exchange
from tests.test_server import monitor
from tests.waiting import until


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


POLLS = "flowmon_agent_poll_duration_seconds_count "


def _sample(text: str, prefix: str) -> float | None:
    return next(
        (float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)), None
    )


@pytest.mark.root
@pytest.mark.asyncio
async def test_runner_lifecycle_metadata_and_live_policy(tmp_path, kube_api):
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    first = compile_policy([monitor("shop", "web")])
    second = compile_policy([monitor("shop", "web"), monitor("shop", "db")])
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(dump_policy_json(first))
    store = MetadataStore()
    # Polls a minute apart: a view that follows a push within the wait below was woken by it.
    settings = AgentSettings(
        listen_port=0, node_name="node-a", policy_file=policy_file, poll_interval_seconds=60, no_auth=True
    )
    agent = Agent(settings, store=store, watcher=KubeWatcher(store, kube_api.url, token=kube_api.token))
    assert agent.not_ready_reason() == "BPF programs not attached yet"
    await agent.start()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: agent.not_ready_reason() is None and agent.watcher.age_seconds() == 0)
            polls = agent.polls
            agent.poll_soon()  # a view taken with every watch connected
            await until(lambda: agent.polls > polls)
            assert store.namespace_labels("shop") is not None
            assert (await http.get(agent.url + "/readyz")).status == 200
            text = await _scrape(http, agent.url + "/metrics")
            assert f'policy_hash="{first.hash}"' in text and 'kernel_path="' in text
            assert _sample(text, "flowmon_agent_metadata_age_seconds ") == 0.0  # watches connected
            assert _sample(text, POLLS) >= 1

            # A push wakes the loop: one poll, well before the next scheduled one.
            polls = agent.polls
            async with http.put(agent.url + "/v1/policy", data=dump_policy_json(second)) as resp:
                assert resp.status == 200 and (await resp.json())["policyHash"] == second.hash
            await until(lambda: agent.polls > polls)
            assert agent.polls == polls + 1 and agent.exporter.holder.status.view.policy_hash == second.hash
            assert set(agent.exporter.holder.status.view.monitors) == {"shop/web", "shop/db"}

            # A bad policy file is refused and counted at the next poll; the pushed policy keeps running.
            policy_file.write_text('{"monitors": [{"name": "x"}]}')
            agent.poll_soon()  # the next poll now, not a minute later
            await until(
                lambda: agent.instruments.registry.get_sample_value(
                    "flowmon_agent_policy_rejected_total", {"source": "file"}
                )
            )
            assert json.loads(await _scrape(http, agent.url + "/v1/policy"))["policyHash"] == second.hash
            # A good file change applies.
            policy_file.write_text(dump_policy_json(first))
            agent.poll_soon()
            await until(lambda: agent.policy.hash == first.hash)
    finally:
        await agent.stop()
    assert agent.tracer is None


SHOP_PODS = [
    namespace("shop"),
    node("node-a", "192.0.2.10"),
    pod("shop", "web-1", "127.0.0.21", "node-a"),
    pod("shop", "db-1", "127.0.0.22", "node-a"),
]
PAIR = {"client_pod": "web-1", "server_pod": "db-1"}


def _pair_sent(agent: Agent) -> float | None:
    """web-1 → db-1 bytes in the running view (None: no such series)."""
    families = agent.exporter.holder.status.view.monitors["shop/pairs"].families
    sent = next(f for f in families if f.info.name == "flowmon_tcp_sent_bytes")
    return sent.samples.get(tuple(PAIR.values()))


@pytest.mark.root
@pytest.mark.asyncio
async def test_the_api_going_away_keeps_attribution_and_the_metadata_age_grows(tmp_path, kube_api):
    """Metadata from the emulator; the API stops mid-run: flows are still named with the last metadata,
    and flowmon_agent_metadata_age_seconds on /metrics grows until the API is back."""
    for obj in SHOP_PODS:
        kube_api.create(obj)
    policy_file = tmp_path / "policy.json"
    pairs = monitor(
        "shop",
        "pairs",
        metrics=[*DEFAULT_METRICS, "udp_sent_bytes"],  # UDP is opt in: its hooks follow the metric
        aggregation={"groupBy": ["client_pod", "server_pod"]},
    )
    policy_file.write_text(dump_policy_json(compile_policy([pairs])))
    store = MetadataStore()
    settings = AgentSettings(
        listen_port=0, node_name="node-a", policy_file=policy_file, poll_interval_seconds=0.2, no_auth=True
    )
    agent = Agent(settings, store=store, watcher=KubeWatcher(store, kube_api.url, token=kube_api.token))
    await agent.start()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: agent.not_ready_reason() is None)
            age = lambda text: _sample(text, "flowmon_agent_metadata_age_seconds ")  # noqa: E731
            assert age(await _scrape(http, agent.url + "/metrics")) == 0.0

            kube_api.stop()
            await until(lambda: agent.watcher.age_seconds() > 0)
            await asyncio.to_thread(loopback_exchange, 1500, 90, 3, "127.0.0.22", "127.0.0.21")
            await until(lambda: _pair_sent(agent) == 3 * 1500)
            first = age(await _scrape(http, agent.url + "/metrics"))
            assert first > 0

            async def grown() -> bool:  # the age on /metrics goes on growing while the API is away
                return age(await _scrape(http, agent.url + "/metrics")) >= first + 0.5

            await until(grown)

            kube_api.start()  # the watches reconnect: current again
            await until(lambda: agent.watcher.age_seconds() == 0.0, timeout=30)
            await until(lambda: agent.exporter.holder.status.metadata_age_seconds == 0.0)
    finally:
        await agent.stop()
        if not kube_api.running:
            kube_api.start()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.root
@pytest.mark.asyncio
async def test_static_inventory_age_is_the_time_since_the_last_good_load(tmp_path):
    """A static inventory's age: since the file was last (re)loaded successfully; a broken edit keeps
    the old metadata and its age growing, a good edit resets it."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump_all(SHOP_PODS))
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(dump_policy_json(compile_policy([monitor("shop", "web")])))
    clock = Clock(1000.0)
    settings = AgentSettings(
        listen_port=0,
        node_name="node-a",
        policy_file=policy_file,
        inventory_file=inventory,
        poll_interval_seconds=0.1,
        no_auth=True,
    )
    agent = Agent(settings, clock=clock)
    await agent.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def age_after_a_poll() -> float | None:
                polls = agent.polls
                await until(lambda: agent.polls >= polls + 2)
                return _sample(
                    await _scrape(http, agent.url + "/metrics"), "flowmon_agent_metadata_age_seconds "
                )

            assert await age_after_a_poll() == 0.0
            clock.now = 1030.0
            assert await age_after_a_poll() == 30.0
            inventory.write_text("kind: [unclosed\n")  # a broken edit: the old metadata stays
            await age_after_a_poll()
            inventory.write_text("")  # a truncated write: refused too, not an empty cluster
            await age_after_a_poll()
            clock.now = 1050.0
            text = await _scrape(http, agent.url + "/metrics")
            assert _sample(text, 'flowmon_agent_reload_rejected_total{file="inventory"} ') == 2.0
            assert await age_after_a_poll() == 50.0
            assert agent.store.namespace_labels("shop") is not None
            inventory.write_text(
                yaml.safe_dump_all([*SHOP_PODS, pod("shop", "web-2", "127.0.0.23", "node-a")])
            )
            assert await age_after_a_poll() == 0.0
            assert agent.store.pod_by_ip(ip_address("127.0.0.23")).name == "web-2"
    finally:
        await agent.stop()


@pytest.mark.root
@pytest.mark.asyncio
async def test_rtt_hook_follows_whether_any_monitor_exports_rtt(tmp_path):
    """tcp:tcp_probe, the costliest hook (every received segment), is attached only while a monitor of
    the running policy exports RTT; a policy change switches it within a poll."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump_all(SHOP_PODS))
    policy_file = tmp_path / "policy.json"
    no_rtt = compile_policy([monitor("shop", "web", metrics=["sent_bytes", "received_bytes"])])
    with_rtt = compile_policy([monitor("shop", "web", metrics=["sent_bytes"]), monitor("shop", "db")])
    assert (no_rtt.wants_rtt, with_rtt.wants_rtt) == (False, True)
    policy_file.write_text(dump_policy_json(no_rtt))
    settings = AgentSettings(
        listen_port=0,
        node_name="node-a",
        policy_file=policy_file,
        inventory_file=inventory,
        poll_interval_seconds=0.1,
        rtt_window_ms=1000,
        no_auth=True,
    )
    agent = Agent(settings)
    await agent.start()
    try:
        await until(lambda: agent.tracer is not None and agent.polls >= 1)
        assert agent.tracer.rtt_sampler.always_open  # the default tracer takes the settings' window
        # What the policy asks; the hook itself may stay attached a while longer for the host's
        # pre-existing connections being adopted (other processes' idle ones: up to 5 minutes). The
        # sock_ops link (srtt at close) follows what is wanted alone.
        await until(
            lambda: agent.tracer.rtt_sampler.wanted is False and not agent.tracer.program.sockops_linked
        )
        body = dump_policy_json(with_rtt)
        async with aiohttp.ClientSession() as http, http.put(agent.url + "/v1/policy", data=body) as resp:
            assert resp.status == 200
        await until(lambda: agent.tracer.rtt_sampler.wanted is True and agent.tracer.program.sockops_linked)
        assert agent.tracer.rtt_sampling
    finally:
        await agent.stop()


@pytest.mark.root
@pytest.mark.asyncio
async def test_own_port_and_ignored_ports_are_never_traced():
    """The agent's own port (scrapes, policy pushes) and the configured ports reach the kernel with the
    tracer, before its first socket: a health check on the agent's port is not a flow; other loopback
    traffic is."""
    settings = AgentSettings(
        listen_port=0, node_name="node-a", ignored_ports=[2222], poll_interval_seconds=60
    )
    agent = Agent(settings)
    await agent.start()
    try:
        own = agent.server.port
        in_kernel = agent.tracer.program.table("ignored_ports")
        assert sorted(k.value for k in in_kernel) == sorted([2222, own])
        async with aiohttp.ClientSession() as http, http.get(agent.url + "/healthz") as resp:
            assert resp.status in (200, 503)
        other = await asyncio.to_thread(loopback_exchange, 10, 20, 1)
        ports = await until(
            lambda: (seen := {k.server_port for k in agent.tracer.poll().flows}) >= {other} and seen
        )
        assert own not in ports
    finally:
        # A stop landing as the poll loop is woken must still stop it (3.11's wait_for lost the cancel)
        agent.poll_soon()
        await asyncio.wait_for(agent.stop(), timeout=10)


# --- the runner's logic with a fake tracer (no root) ----------------------------------------------------

SERVICE_IP = "10.96.0.5"


def fake_agent(
    tmp_path, policy, agent_args: dict | None = None, **settings
) -> tuple[Agent, list[FakeTracer]]:
    """An agent whose tracer factory makes FakeTracers; metadata: SHOP_PODS and a Service; agent_args:
    more of Agent's (a DNS capture factory, a clock)."""
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(dump_policy_json(policy))
    store = MetadataStore()
    for obj in (*SHOP_PODS, pod("other", "x-1", "127.0.0.31", "node-b"), service("shop", "db", [SERVICE_IP])):
        store.apply("ADDED", obj)
    made: list[FakeTracer] = []

    def factory(config: KernelConfig) -> FakeTracer:
        made.append(FakeTracer(config))
        return made[-1]

    fields = {
        "listen_port": 0,
        "node_name": "node-a",
        "policy_file": policy_file,
        "poll_interval_seconds": 60,
    }
    agent = Agent(
        AgentSettings(**{**fields, **settings}), tracer_factory=factory, store=store, **(agent_args or {})
    )
    return agent, made


@pytest.mark.asyncio
async def test_the_tracer_is_configured_from_the_policy_metadata_and_settings(tmp_path):
    """From its first socket the tracer ignores the agent's own port and the configured ones; each poll
    configures it with what the running policy needs traced on this node: the local pods it selects, the
    Service IPs (NAT peers), srtt only while a monitor exports RTT, UDP only while one exports UDP."""
    pairs = monitor(
        "shop",
        "pairs",
        metrics=[*DEFAULT_METRICS, "udp_sent_bytes"],  # UDP is opt in: its hooks follow the metric
        aggregation={"groupBy": ["client_pod", "server_pod"]},
    )
    with_rtt = compile_policy([pairs])
    agent, made = fake_agent(tmp_path, with_rtt, ignored_ports=[2222])
    await agent.start()
    try:
        (tracer,) = made
        own = agent.server.port
        assert tracer.configs[0] == KernelConfig(ignored_ports={2222, own})
        expected = KernelConfig(
            local_ips={ip_address("127.0.0.21"), ip_address("127.0.0.22")},  # shop's pods on node-a
            nat_peers={ip_address(SERVICE_IP)},
            ignored_ports={2222, own},
            rtt=True,
            cluster_networks=cluster_networks(agent.store),  # its pods, nodes and Services stay exact
        )
        assert expected.cluster_networks and tracer.configs[1:] == [expected]
        without_rtt = compile_policy([monitor("shop", "pairs", metrics=["sent_bytes"])])
        polls = agent.polls
        agent.policy.apply(without_rtt, source="api")  # wakes the loop: a poll follows at once
        await until(lambda: agent.polls > polls)
        assert tracer.configs[1:] == [expected, replace(expected, rtt=False, udp=False)]  # no RTT, no UDP
        agent.poll_once()  # nothing changed: the tracer is not reconfigured
        assert len(tracer.configs) == 3
    finally:
        await agent.stop()
    assert tracer.closed and agent.tracer is None


@pytest.mark.asyncio
async def test_each_poll_turns_the_tracers_snapshot_into_the_exported_view(tmp_path):
    pairs = monitor(
        "shop",
        "pairs",
        metrics=[*DEFAULT_METRICS, "udp_sent_bytes"],  # UDP is opt in: its hooks follow the metric
        aggregation={"groupBy": ["client_pod", "server_pod"]},
    )
    agent, made = fake_agent(tmp_path, compile_policy([pairs]))
    await agent.start()
    try:
        (tracer,) = made
        web_to_db = FlowKey(ip_address("127.0.0.21"), ip_address("127.0.0.22"), 5432, Reporter.CLIENT)
        tracer.flows[web_to_db] = FlowCounters.of(sent_bytes=300, received_bytes=40, opened=2, closed=1)
        tracer.dropped["socket_table_full"] = 3
        view = agent.poll_once()
        assert view is not None and _pair_sent(agent) == 300.0
        families = {f.info.name: f for f in view.monitors["shop/pairs"].families}
        assert families["flowmon_tcp_connections_active"].samples == {tuple(PAIR.values()): 1.0}
        status = agent.exporter.holder.status
        assert (status.kernel_path, status.dropped["socket_table_full"]) == ("fake", 3)
        tracer.flows[web_to_db] = FlowCounters.of(sent_bytes=500, received_bytes=40, opened=2, closed=2)
        agent.poll_once()
        assert _pair_sent(agent) == 500.0
    finally:
        await agent.stop()


def test_full_collections_run_when_due_and_thresholds_come_back() -> None:
    now = [0.0]
    collected: list[float] = []
    full = FullCollections(30.0, clock=lambda: now[0], collect=lambda: collected.append(now[0]))
    for now[0] in (1.0, 29.9, 30.0, 31.0, 59.0, 61.0):
        full.after_poll()
    assert collected == [30.0, 61.0] and full.collections == 2
    before = gc.get_threshold()
    full.take_over()
    try:
        assert gc.get_threshold() == (*before[:2], NEVER)  # the young generations as before
    finally:
        full.give_back()
    assert gc.get_threshold() == before


def test_full_collection_period_can_be_turned_off_from_the_environment(monkeypatch) -> None:
    """0 hands full collections back to Python (an operator can set it as FLOWMON_AGENT_...); below 0
    is refused."""
    monkeypatch.setenv("FLOWMON_AGENT_FULL_GC_PERIOD_SECONDS", "0")
    assert AgentSettings().full_gc_period_seconds == 0
    monkeypatch.setenv("FLOWMON_AGENT_FULL_GC_PERIOD_SECONDS", "-1")
    with pytest.raises(ValidationError):
        AgentSettings()


@pytest.mark.asyncio
async def test_full_collections_run_between_polls_while_the_agent_runs(tmp_path):
    """Each full collection comes after a poll has ended (the number of polls ended when it ran), and
    none automatically meanwhile; Python's thresholds are back after stop."""
    before = gc.get_threshold()
    polls_at_collect: list[int] = []
    agent, made = fake_agent(tmp_path, compile_policy([]), poll_interval_seconds=0.01)
    agent.full_collections = FullCollections(1e-9, collect=lambda: polls_at_collect.append(agent.polls))
    await agent.start()
    try:
        assert gc.get_threshold()[2] == NEVER
        await until(lambda: len(polls_at_collect) >= 3)
    finally:
        await agent.stop()
    assert gc.get_threshold() == before
    assert polls_at_collect == sorted(set(polls_at_collect)) and polls_at_collect[0] >= 2
    assert made[0].polls >= polls_at_collect[-1]


@pytest.mark.asyncio
async def test_without_a_policy_the_view_is_empty_and_the_tracer_keeps_its_first_configuration(tmp_path):
    made: list[FakeTracer] = []
    settings = AgentSettings(listen_port=0, node_name="node-a", poll_interval_seconds=60)
    agent = Agent(settings, tracer_factory=lambda config: made.append(FakeTracer(config)) or made[-1])
    await agent.start()
    try:
        assert agent.not_ready_reason() == "no policy loaded yet"
        view = agent.poll_once()
        assert view is not None and (view.policy_hash, view.monitors) == ("", {})
        assert len(made[0].configs) == 1 and made[0].polls == 2  # start() polled once already
    finally:
        await agent.stop()


# --- the DNS capture follows the policy (fake capture, no root) -------------------------------------------


@dataclass(frozen=True)
class FakeCaptureStats:
    seen: int
    read: int


class FakeDnsCapture:
    """Stands for DnsCapture: each poll reads one record (one seen, one read)."""

    batch_max = 2048

    def __init__(self) -> None:
        self.polls, self.closed = 0, False

    def poll(self, timeout_ms: int = 0) -> int:
        assert not self.closed
        self.polls += 1
        return 1

    def stats(self) -> FakeCaptureStats:
        return FakeCaptureStats(seen=self.polls, read=self.polls)

    def close(self) -> None:
        self.closed = True


class FakeCaptureFactory:
    def __init__(self, failures: int = 0) -> None:
        self.made: list[FakeDnsCapture] = []
        self.calls, self.failures = 0, failures

    def __call__(self, _tracker) -> FakeDnsCapture:
        self.calls += 1
        if self.calls <= self.failures:
            raise BPFUnavailableError("no cgroup v2 file system is mounted")
        self.made.append(FakeDnsCapture())
        return self.made[-1]


DNS_MONITOR = monitor("shop", "dns", metrics=["sent_bytes", "dns_requests"])


def dns_self_metrics(agent: Agent) -> tuple[float | None, float | None, float | None]:
    """capture_up, attach failures, and the capture's `seen` count as the agent exports them."""
    text = agent.exporter.agent_text().decode()
    return (
        _sample(text, "flowmon_agent_dns_capture_up "),
        _sample(text, "flowmon_agent_dns_attach_failures_total "),
        _sample(text, 'flowmon_agent_dns_events_total{event="seen"} '),
    )


@pytest.mark.asyncio
async def test_the_dns_capture_is_attached_only_while_a_monitor_asks_for_dns(tmp_path):
    """bpf/dns.c runs on every packet of the node: a policy without DNS never attaches it; a DNS monitor
    pushed attaches it on the next poll, and its removal closes it, the counts exported staying."""
    factory = FakeCaptureFactory()
    agent, _ = fake_agent(
        tmp_path, compile_policy([monitor("shop", "web")]), {"dns_capture_factory": factory}
    )
    await agent.start()
    try:
        agent.poll_once()
        assert factory.calls == 0 and agent.dns.capture is None
        assert dns_self_metrics(agent) == (0.0, 0.0, None)
        polls = agent.polls
        agent.policy.apply(compile_policy([monitor("shop", "web"), DNS_MONITOR]), source="api")
        await until(lambda: agent.polls > polls)  # the push woke the loop: that poll attached it
        (capture,) = factory.made
        assert agent.dns.capture is capture and not capture.closed
        assert dns_self_metrics(agent) == (1.0, 0.0, float(capture.polls))
        polls = agent.polls
        agent.policy.apply(compile_policy([monitor("shop", "web")]), source="api")
        await until(lambda: agent.polls > polls)
        assert capture.closed and agent.dns.capture is None and factory.calls == 1
        seen = dns_self_metrics(agent)[2]
        assert seen == float(capture.polls)  # its last counts read before closing: they stay
        agent.poll_once()
        assert dns_self_metrics(agent) == (0.0, 0.0, seen) and factory.calls == 1
    finally:
        await agent.stop()


def test_a_failed_dns_attach_is_counted_and_retried_only_after_the_backoff(tmp_path):
    """Attaching compiles BPF (seconds): a node where it fails tries again a minute later, not every poll.
    Counts carry on across a second capture."""
    clock, factory = Clock(1000.0), FakeCaptureFactory(failures=2)
    agent, _ = fake_agent(
        tmp_path, compile_policy([DNS_MONITOR]), {"dns_capture_factory": factory, "clock": clock}
    )
    agent.tracer = FakeTracer(KernelConfig())
    agent.policy.apply(compile_policy([DNS_MONITOR]), source="api")  # not started: no file load
    agent.poll_once()
    assert factory.calls == 1 and dns_self_metrics(agent) == (0.0, 1.0, None)
    clock.now = 1059.0
    agent.poll_once()
    assert factory.calls == 1  # not yet
    clock.now = 1060.0
    agent.poll_once()
    assert factory.calls == 2 and dns_self_metrics(agent) == (0.0, 2.0, None)
    clock.now = 1120.0
    agent.poll_once()
    assert factory.calls == 3 and dns_self_metrics(agent) == (1.0, 2.0, 1.0)
    agent.poll_once()
    assert dns_self_metrics(agent) == (1.0, 2.0, 2.0)
    agent.policy.apply(compile_policy([monitor("shop", "web")]), source="api")
    agent.poll_once()  # closed after its last poll: 3 seen
    agent.policy.apply(compile_policy([DNS_MONITOR]), source="api")
    agent.poll_once()  # a new capture (no failure since): attached at once, its 1 adds to the 3
    assert factory.calls == 4 and dns_self_metrics(agent) == (1.0, 2.0, 4.0)
    agent.dns.close()
    assert all(c.closed for c in factory.made)


def test_dns_capture_false_never_attaches_whatever_the_policy(tmp_path):
    factory = FakeCaptureFactory()
    agent, _ = fake_agent(
        tmp_path, compile_policy([DNS_MONITOR]), {"dns_capture_factory": factory}, dns_capture=False
    )
    agent.tracer = FakeTracer(KernelConfig())
    agent.policy.apply(compile_policy([DNS_MONITOR]), source="api")  # not started: no file load
    agent.poll_once()
    assert (
        agent.policy.policy.wants_dns and factory.calls == 0 and dns_self_metrics(agent) == (0.0, 0.0, None)
    )


@pytest.mark.parametrize(
    ("env", "fields", "expected"),
    [
        ({}, {}, False),  # standalone host: no API
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, {}, True),  # in a pod: watch the API
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, {"inventory_file": "/inv.yaml"}, False),
        ({"FLOWMON_AGENT_KUBE_METADATA": "false", "KUBERNETES_SERVICE_HOST": "x"}, {}, False),
        ({"FLOWMON_AGENT_KUBE_METADATA": "true"}, {}, True),
    ],
)
def test_metadata_source_choice(monkeypatch, env, fields, expected):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert AgentSettings(**fields).use_kube_metadata() is expected


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FLOWMON_AGENT_LISTEN_PORT", "9555")
    monkeypatch.setenv("FLOWMON_AGENT_IGNORED_PORTS", "[22, 443]")
    monkeypatch.setenv("FLOWMON_AGENT_POLL_INTERVAL_SECONDS", "0.25")
    settings = AgentSettings()
    assert (settings.listen_port, settings.ignored_ports, settings.poll_interval_seconds) == (
        9555,
        [22, 443],
        0.25,
    )
    assert settings.server_config().port == 9555


@pytest.mark.parametrize(
    ("env", "fields", "expected"),
    [
        ({}, {}, [socket.gethostname()]),  # one node: this host
        ({"FLOWMON_AGENT_NODE_NAME": "node-a"}, {}, ["node-a"]),  # the DaemonSet's spec.nodeName
        ({"FLOWMON_AGENT_NODE_NAME": "node-a, node-b"}, {}, ["node-a", "node-b"]),
        ({"FLOWMON_AGENT_NODE_NAME": '["node-a", "node-b"]'}, {}, ["node-a", "node-b"]),
        ({"FLOWMON_AGENT_NODE_NAME": "node-a"}, {"node_name": "n1,n2"}, ["n1", "n2"]),  # flags win
        ({}, {"node_name": ["n1", "n2"]}, ["n1", "n2"]),
    ],
)
def test_node_names_one_or_several(monkeypatch, env, fields, expected):
    monkeypatch.delenv("FLOWMON_AGENT_NODE_NAME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = AgentSettings(**fields)
    assert settings.node_name == expected
    # The agent stands for each of them: it reports the connections of their pods (aggregate.flow_share).
    assert Agent(settings).aggregator.node == frozenset(expected)


@pytest.mark.parametrize("value", ["", " , ", "[]"])
def test_node_names_cannot_be_empty(monkeypatch, value):
    monkeypatch.setenv("FLOWMON_AGENT_NODE_NAME", value)
    with pytest.raises(ValidationError, match="node_name"):
        AgentSettings()


@pytest.mark.parametrize(
    ("last", "now", "interval", "stalled"),
    [
        (None, 1000.0, 0.5, False),  # starting
        (100.0, 129.0, 0.5, False),
        (100.0, 131.0, 0.5, True),  # 30 s floor
        (100.0, 140.0, 5.0, False),  # ten intervals when those are longer
        (100.0, 151.0, 5.0, True),
    ],
)
def test_stall_reason(last, now, interval, stalled):
    reason = stall_reason(last, now, interval, "OSError('map gone')")
    assert (reason is not None) is stalled
    if stalled:
        assert "no successful poll for" in reason and "map gone" in reason


@pytest.mark.root
@pytest.mark.asyncio
async def test_run_agent_survives_a_forked_childs_sigterm_and_stops_on_its_own(tmp_path):
    """pyroute2 opens a netns socket from a child forked in a worker thread and SIGTERMs it afterwards.
    That signal ends the child; only a SIGTERM to the agent's own pid stops the agent."""
    from pyroute2.process import ChildProcess

    from flowmon_agent.runner import run_agent
    from flowmon_lab.prometheus import free_port

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(dump_policy_json(compile_policy([monitor("shop", "web")])))
    port = free_port()
    settings = AgentSettings(
        listen_port=port, node_name="node-a", policy_file=policy_file, kube_metadata=False, no_auth=True
    )
    task = asyncio.create_task(run_agent(settings))
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                return False

            deadline = time.monotonic() + 60  # BPF compiles for seconds
            while not await ready():
                assert not task.done() and time.monotonic() < deadline, "agent never became ready"
                await asyncio.sleep(0.1)

            def fork_and_terminate() -> int | None:  # as pyroute2 does in a conntrack lookup
                child = ChildProcess(time.sleep, [10])
                child.run()
                time.sleep(0.3)  # the child is asleep in its own code when SIGTERM arrives
                child.stop()
                return child.exitcode

            async def polls() -> float:
                return _sample(await _scrape(http, f"http://127.0.0.1:{port}/metrics"), POLLS) or 0.0

            assert await asyncio.to_thread(fork_and_terminate) == -signal.SIGTERM
            seen = await polls()

            async def polled_on() -> bool:  # several polls: a stop request would have ended the task
                return task.done() or await polls() >= seen + 3

            await until(polled_on)
            assert not task.done()
            assert await ready()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, timeout=15) == 0
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


ONE_ROOT_PROBE = """
import json
from flowmon_agent.dns.tracker import DnsTracker
from flowmon_agent.kernel.flows import KernelConfig
from flowmon_agent.runner import AgentSettings, default_dns_capture, default_tracer

settings = AgentSettings()  # FLOWMON_AGENT_CGROUP_ROOT, when set
tracer = default_tracer(settings, KernelConfig(rtt=True, udp=True))
capture = default_dns_capture(settings, DnsTracker())
try:
    linked = [tracer.program.sockops_linked, tracer.udp_attached]
    roots = [str(tracer.program.sockops_cgroup), str(tracer.udp_cgroup), str(capture.cgroup)]
    print(json.dumps({"linked": linked, "roots": roots}))
finally:
    capture.close()
    tracer.close()
"""


@pytest.mark.parametrize("configured", [True, False])
def test_sock_ops_udp_and_dns_link_to_the_one_configured_cgroup_root(tmp_path, configured: bool) -> None:
    """FLOWMON_AGENT_CGROUP_ROOT is one setting for the three cgroup attachments. In a mount namespace with
    a second, deeper cgroup2 mount (the DaemonSet's /host/sys/fs/cgroup; in a pod the shallowest one is the
    pod's own cgroup namespace, which sees only the agent's sockets), the sock_ops program, the UDP pair
    and the DNS capture all link there when it is configured, and all to the shallowest mount when not."""
    host = tmp_path / "host"
    mount = host / "sys" / "fs" / "cgroup"
    mount.mkdir(parents=True)
    env = {name: value for name, value in os.environ.items() if name != "FLOWMON_AGENT_CGROUP_ROOT"}
    if configured:
        env["FLOWMON_AGENT_CGROUP_ROOT"] = str(host)
    script = f'mount -t cgroup2 none "{mount}" && exec "{sys.executable}" -c "$0"'
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, ONE_ROOT_PROBE],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        env=env,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["linked"] == [True, True], out.stderr
    expected = mount if configured else cgroup2_root()  # this namespace has no mount at `mount`
    assert seen["roots"] == [str(expected)] * 3
