"""One cluster round, not one per monitor (flowmon_operator.rounds, flowmon_operator.reconcile.run_round).

The scheduler: a burst of requests shares one round, a request during a round gets the next one, a
failed round reaches every waiter, and without requests only the periodic full round runs. The round,
against the Kubernetes API emulator and stand-in agents (bench.agent_standins) that count what they
receive: each round asks every agent once over one kept-alive connection, whatever the number of
monitors; an edit reaches every agent with exactly one push; a monitor the API refuses children for is
told so in its own status while the others run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bench.agent_standins import StandinAgents, agent_ips, agent_pod
from flowmon_contract.policy import AgentPolicy
from flowmon_lab.prometheus import free_port
from flowmon_operator import builders, pki
from flowmon_operator.reconcile import Runtime, run_round
from flowmon_operator.rounds import RoundScheduler
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi import KubeAPI
from tests.kubeapi.shipped import operator_kubeconfig
from tests.schemas import FLOWMON_CRD, SHARED_SCHEMAS

FM = "flowmon.io/v1alpha1"
NS = "flowmon-system"
MONITORS = (("team-a", "web"), ("team-a", "api"), ("team-b", "db"))
AGENTS = agent_ips("127.78.0.1", 4)


# --- the scheduler ------------------------------------------------------------------------------------
class Recorder:
    """A round function that records (requested, full) and can be held open or made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[frozenset[str], bool]] = []
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_next = False

    async def __call__(self, requested: frozenset[str], full: bool) -> int:
        self.calls.append((requested, full))
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the API went away")
        return len(self.calls)


@pytest_asyncio.fixture
async def scheduled() -> AsyncIterator[tuple[RoundScheduler, Recorder]]:
    recorder = Recorder()
    rounds = RoundScheduler(recorder, debounce=0.01, period=3600)
    task = asyncio.create_task(rounds.run())
    yield rounds, recorder
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_a_burst_of_requests_shares_one_round(scheduled):
    rounds, recorder = scheduled
    reports = await asyncio.gather(*(rounds.request(key) for key in ("a/x", "a/y", "b/z", "a/x")))
    assert recorder.calls == [(frozenset({"a/x", "a/y", "b/z"}), False)]
    assert reports == [1, 1, 1, 1]


@pytest.mark.asyncio
async def test_a_request_during_a_round_is_served_by_the_next_one(scheduled):
    rounds, recorder = scheduled
    recorder.hold = asyncio.Event()
    first = asyncio.create_task(rounds.request("a/x"))
    await recorder.started.wait()
    second = asyncio.create_task(rounds.request("b/z"))
    await asyncio.sleep(0)  # the request is registered before the round ends
    recorder.hold.set()
    assert (await first, await second) == (1, 2)
    assert [requested for requested, _ in recorder.calls] == [{"a/x"}, {"b/z"}]


@pytest.mark.asyncio
async def test_a_failed_round_reaches_every_waiter_and_the_next_round_runs(scheduled):
    rounds, recorder = scheduled
    recorder.fail_next = True
    failures = await asyncio.gather(rounds.request("a/x"), rounds.request("b/z"), return_exceptions=True)
    assert [str(f) for f in failures] == ["the API went away"] * 2
    assert await rounds.request("a/x") == 2


@pytest.mark.asyncio
async def test_without_requests_only_the_periodic_full_round_runs():
    recorder = Recorder()
    period = 0.05
    rounds = RoundScheduler(recorder, debounce=0.01, period=period)
    started = time.monotonic()
    task = asyncio.create_task(rounds.run())
    try:
        async with asyncio.timeout(10):
            while rounds.rounds < 3:
                await asyncio.sleep(period / 2)
    finally:
        task.cancel()
    elapsed = time.monotonic() - started
    assert all(call == (frozenset(), True) for call in recorder.calls)
    assert len(recorder.calls) <= elapsed / period + 1  # one per period at most, however many monitors


# --- the round, against the API emulator and stand-in agents --------------------------------------------
@dataclass
class Cluster:
    api: KubeAPI
    settings: OperatorSettings
    agents: StandinAgents

    def calls(self, method: str) -> set[int]:
        """How many `method` calls each agent received (a set: equal everywhere → one element)."""
        return {state["get" if method == "GET" else "put"] for state in self.agents.state().values()}

    def hashes(self) -> set[str | None]:
        return {state["hash"] for state in self.agents.state().values()}

    def policy(self) -> AgentPolicy:
        cm = self.api.find("v1", "ConfigMap", self.settings.configmap_name, NS)
        return AgentPolicy.model_validate_json(cm["data"][builders.POLICY_FILE])

    def status(self, namespace: str, name: str) -> dict:
        return self.api.find(FM, "FlowMonitor", name, namespace).get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict:
        return next(c for c in self.status(namespace, name)["conditions"] if c["type"] == type_)


@pytest_asyncio.fixture
async def cluster(
    kube_api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    """Three monitors in two namespaces, four Ready agent pods served by stand-ins, and the operator's
    identity Secrets already there (the operator reuses them; the stand-ins serve their certificate)."""
    kube_api.create(yaml.safe_load(FLOWMON_CRD.read_text()))
    for kind in ("servicemonitors", "prometheusrules"):
        kube_api.create(yaml.safe_load((SHARED_SCHEMAS / f"monitoring.coreos.com_{kind}.yaml").read_text()))
    for namespace in (NS, "team-a", "team-b"):
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    # the operator runs as its ServiceAccount, with the shipped RBAC
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig(kube_api, tmp_path / "kubeconfig")))
    settings = OperatorSettings(agent_port=free_port(), push_timeout_seconds=5.0)
    ca = pki.generate_ca("rounds-test-ca")
    serving = pki.issue_serving_cert(ca, settings.agent_dns_names)
    admin = pki.generate_token()
    for secret in (
        builders.build_ca_secret(settings, ca),
        builders.build_serving_cert_secret(settings, serving, ca.cert_pem),
        builders.build_admin_token_secret(settings, admin),
    ):
        kube_api.create(secret)
    for i, ip in enumerate(AGENTS):
        kube_api.create(agent_pod(i, ip, NS, settings.agent_labels))
    for namespace, name in MONITORS:
        body = {"apiVersion": FM, "kind": "FlowMonitor", "metadata": {"name": name, "namespace": namespace}}
        kube_api.create(body)
    (tmp_path / "tls.crt").write_text(serving.cert_pem)
    (tmp_path / "tls.key").write_text(serving.key_pem)
    agents = StandinAgents(AGENTS, settings.agent_port, tmp_path / "tls.crt", tmp_path / "tls.key", admin)
    await agents.start()
    try:
        yield Cluster(kube_api, settings, agents)
    finally:
        await agents.stop()


@pytest.mark.asyncio
async def test_each_round_asks_every_agent_once_over_one_connection(cluster: Cluster):
    runtime = Runtime.connect(cluster.settings)
    try:
        first = await run_round(runtime, full=True)
        assert cluster.hashes() == {first.policy.hash}
        assert (cluster.calls("PUT"), cluster.calls("GET")) == ({1}, {0})  # a new policy: pushed, not asked
        for _ in range(3):  # steady: three periods' full rounds for three monitors
            report = await run_round(runtime, full=True)
            assert report.policy.hash == first.policy.hash and not report.errors
    finally:
        await runtime.close()
    assert (cluster.calls("PUT"), cluster.calls("GET")) == ({1}, {3})  # one call per agent per round
    assert {state["connections"] for state in cluster.agents.state().values()} == {1}  # kept alive
    for namespace, name in MONITORS:
        status = cluster.status(namespace, name)
        assert status["agents"]["inSync"] == len(AGENTS) and status["policyHash"] == first.policy.hash


@pytest.mark.asyncio
async def test_an_edit_reaches_every_agent_with_exactly_one_push(cluster: Cluster):
    runtime = Runtime.connect(cluster.settings)
    try:
        before = (await run_round(runtime, full=True)).policy
        cluster.api.patch(FM, "FlowMonitor", "web", {"spec": {"aggregation": {"maxSeries": 77}}}, "team-a")
        after = (await run_round(runtime, {"team-a/web"})).policy
        assert after.hash != before.hash and after.monitor("team-a", "web").max_series == 77
        assert cluster.hashes() == {after.hash} and cluster.policy().hash == after.hash
        assert (cluster.calls("PUT"), cluster.calls("GET")) == ({2}, {0})  # one push each, nothing asked
        await run_round(runtime, full=True)  # the next period only asks
    finally:
        await runtime.close()
    assert (cluster.calls("PUT"), cluster.calls("GET")) == ({2}, {1})
    # Every monitor's status follows the one policy; the edited one's generation is observed.
    assert {cluster.status(ns, name)["policyHash"] for ns, name in MONITORS} == {after.hash}
    assert cluster.status("team-a", "web")["observedGeneration"] == 2


@pytest.mark.asyncio
async def test_a_monitor_whose_children_are_refused_is_told_and_the_others_run(cluster: Cluster):
    cluster.api.deny("PATCH", "/apis/monitoring.coreos.com/v1/namespaces/team-b/", "no monitoring in team-b")
    runtime = Runtime.connect(cluster.settings)
    try:
        report = await run_round(runtime, full=True)
    finally:
        await runtime.close()
    assert list(report.errors) == ["team-b/db"] and "no monitoring in team-b" in report.errors["team-b/db"]
    degraded = cluster.condition("team-b", "db", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ChildrenNotApplied")
    assert "no monitoring in team-b" in degraded["message"]
    # Its spec is valid: it runs in the policy like the others, and the others are not degraded.
    assert [m.key for m in report.policy.monitors] == sorted(f"{ns}/{name}" for ns, name in MONITORS)
    assert cluster.hashes() == {report.policy.hash}
    for namespace, name in MONITORS[:2]:
        assert cluster.condition(namespace, name, "Degraded")["status"] == "False"
        assert cluster.status(namespace, name)["observedGeneration"] == 1
    assert "observedGeneration" not in cluster.status("team-b", "db")  # its children are not applied yet
