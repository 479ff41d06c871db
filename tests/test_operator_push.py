"""Policy push (flowmon_operator.push) to real agent servers (flowmon_agent.export.server) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
import pytest_asyncio

from flowmon_agent.export.collectors import Exporter
from flowmon_agent.export.policy_store import PolicyStore
from flowmon_agent.export.server import AgentServer, ServerConfig
from flowmon_contract.policy import canonical_json, compile_policy
from flowmon_contract.spec import FlowMonitor
from flowmon_lab.prometheus import free_port
from flowmon_operator.pki import generate_ca, issue_serving_cert
from flowmon_operator.push import (
    AgentPod,
    PushTarget,
    agent_nodes,
    agent_pods,
    parse_answer,
    start_failure,
    sync_agents,
)
from tests.waiting import WAIT, until

SERVICE_DNS = "flowmon-agent.flowmon-system.svc"
ADMIN = "admin-token-for-push-tests"
IPS = ("127.0.0.2", "127.0.0.3")
POLICY = compile_policy([FlowMonitor.model_validate({"metadata": {"namespace": "shop", "name": "web"}})])


@pytest_asyncio.fixture
async def fleet(tmp_path: Path):
    """Two agent servers with a serving certificate for the Service name, on one port."""
    ca = generate_ca("push-test-ca")
    pair = issue_serving_cert(ca, [SERVICE_DNS])
    (tmp_path / "tls.crt").write_text(pair.cert_pem)
    (tmp_path / "tls.key").write_text(pair.key_pem)
    (tmp_path / "admin").write_text(ADMIN + "\n")
    port = free_port()
    stores = {ip: PolicyStore() for ip in IPS}
    servers = []
    for ip in IPS:
        config = ServerConfig(
            host=ip,
            port=port,
            tls_cert_file=tmp_path / "tls.crt",
            tls_key_file=tmp_path / "tls.key",
            admin_token_file=tmp_path / "admin",
        )
        server = AgentServer(config, exporter=Exporter(), policy=stores[ip], readiness=lambda: None)
        await server.start()
        servers.append(server)
    target = PushTarget(port=port, server_name=SERVICE_DNS, ca_pem=ca.cert_pem, token=ADMIN, timeout=WAIT)
    yield target, stores
    for server in servers:
        await server.stop()


def agents(*ips: str) -> list[AgentPod]:
    return [AgentPod(f"agent-{i}", ip, ready=True) for i, ip in enumerate(ips)]


@pytest.mark.asyncio
async def test_push_brings_every_agent_to_the_policy_and_then_only_asks(fleet):
    target, stores = fleet
    reports = await sync_agents(agents(*IPS), target, canonical_json(POLICY), POLICY.hash)
    assert [(r.policy_hash, r.pushed, r.error) for r in reports] == [(POLICY.hash, True, None)] * 2
    assert {store.hash for store in stores.values()} == {POLICY.hash}
    again = await sync_agents(agents(*IPS), target, canonical_json(POLICY), POLICY.hash)
    assert [(r.policy_hash, r.pushed) for r in again] == [(POLICY.hash, False)] * 2


@pytest.mark.asyncio
async def test_refusals_are_reported_and_change_nothing(fleet):
    target, stores = fleet
    wrong_token = PushTarget(target.port, target.server_name, target.ca_pem, "not-the-admin-token")
    (report,) = await sync_agents(agents(IPS[0]), wrong_token, canonical_json(POLICY), POLICY.hash)
    assert "HTTP 401" in report.error and report.policy_hash is None
    (report,) = await sync_agents(agents(IPS[0]), target, '{"monitors": 5}', "0" * 64, force=True)
    assert "HTTP 422" in report.error and "monitors" in report.error
    assert stores[IPS[0]].hash is None
    # An agent that refuses a push keeps its last good policy, and the report says which one it runs.
    await sync_agents(agents(IPS[0]), target, canonical_json(POLICY), POLICY.hash)
    (report,) = await sync_agents(agents(IPS[0]), target, '{"monitors": 5}', "0" * 64, force=True)
    assert "HTTP 422" in report.error and report.policy_hash == POLICY.hash == stores[IPS[0]].hash


@pytest.mark.asyncio
async def test_the_agent_certificate_must_carry_the_service_name(fleet):
    target, _ = fleet
    other_name = PushTarget(target.port, "someone-else.example", target.ca_pem, target.token)
    (report,) = await sync_agents(agents(IPS[0]), other_name, canonical_json(POLICY), POLICY.hash)
    assert report.error and "certificate" in report.error.lower()


def silent_agents(port: int, *ips: str) -> list[socket.socket]:
    """Listeners that accept connections (the kernel does) and never answer the TLS handshake."""
    silent = []
    for ip in ips:
        sock = socket.socket()
        sock.bind((ip, port))
        sock.listen()
        sock.setblocking(False)
        silent.append(sock)
    return silent


@pytest.mark.asyncio
async def test_silent_agents_are_waited_for_concurrently(fleet):
    """Every silent agent is contacted while the others still hang: a push one agent after the other would
    reach the second only once the first timed out (a minute here, past the wait below)."""
    target, stores = fleet
    silent = silent_agents(target.port, "127.0.0.4", "127.0.0.5")
    patient = PushTarget(target.port, target.server_name, target.ca_pem, target.token, timeout=2 * WAIT)
    pods = agents(IPS[0], "127.0.0.4", "127.0.0.5")
    push = asyncio.create_task(sync_agents(pods, patient, canonical_json(POLICY), POLICY.hash))
    held: dict[int, socket.socket] = {}

    def every_silent_agent_contacted() -> bool:
        for i, sock in enumerate(silent):
            if i not in held:
                with contextlib.suppress(BlockingIOError):
                    held[i] = sock.accept()[0]
        return len(held) == len(silent)

    try:
        await until(every_silent_agent_contacted)
        assert not push.done()
    finally:
        for sock in [*held.values(), *silent]:
            sock.close()  # the hanging handshakes fail now
    reports = await push
    assert reports[0].policy_hash == POLICY.hash and stores[IPS[0]].hash == POLICY.hash
    assert all(r.error and r.policy_hash is None for r in reports[1:])


@pytest.mark.asyncio
async def test_a_silent_agent_times_out(fleet):
    target, _ = fleet
    silent = silent_agents(target.port, "127.0.0.4")
    quick = PushTarget(target.port, target.server_name, target.ca_pem, target.token, timeout=0.5)
    try:
        (report,) = await sync_agents(agents("127.0.0.4"), quick, canonical_json(POLICY), POLICY.hash)
    finally:
        silent[0].close()
    assert report.error and report.policy_hash is None


@pytest.mark.asyncio
async def test_agents_that_are_not_ready_are_not_contacted(fleet):
    target, stores = fleet
    pods = [AgentPod("down", IPS[0], ready=False), AgentPod("up", IPS[1], ready=True)]
    reports = await sync_agents(pods, target, canonical_json(POLICY), POLICY.hash)
    assert [(r.pod, r.ready, r.policy_hash) for r in reports] == [
        ("down", False, None),
        ("up", True, POLICY.hash),
    ]
    assert stores[IPS[0]].hash is None


def pod(name: str, ip: str | None, ready: str | None, deleting: bool = False) -> dict:
    meta = {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    status = {"podIP": ip} if ip else {}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        (
            [pod("b", "10.0.0.2", "True"), pod("a", "10.0.0.1", "True")],
            [AgentPod("a", "10.0.0.1", True), AgentPod("b", "10.0.0.2", True)],
        ),
        ([pod("a", "10.0.0.1", "False")], [AgentPod("a", "10.0.0.1", False)]),
        ([pod("a", None, "True")], [AgentPod("a", None, False)]),
        ([pod("a", "10.0.0.1", None)], [AgentPod("a", "10.0.0.1", False)]),
        ([pod("a", "10.0.0.1", "True", deleting=True)], []),
    ],
)
def test_agent_pods(pods, expected):
    assert agent_pods(pods) == expected


def test_agent_nodes_are_the_nodes_of_ready_agents():
    pods = [
        {**pod("c", "10.0.0.3", "True"), "spec": {"nodeName": "n2"}},
        {**pod("a", "10.0.0.1", "True"), "spec": {"nodeName": "n1"}},
        {**pod("b", "10.0.0.2", "False"), "spec": {"nodeName": "n3"}},  # not ready: its clients unreported
        {**pod("d", "10.0.0.4", "True", deleting=True), "spec": {"nodeName": "n4"}},
        pod("e", "10.0.0.5", "True"),  # not scheduled yet
    ]
    assert agent_nodes(agent_pods(pods)) == ["n1", "n2"]


SECCOMP_LINE = "flowmon agent: the seccomp profile denies bpf() (EPERM with the capabilities present): use …"


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        # crash-looping: the last run's termination message, the agent's one line, and its exit code
        (
            {"containerStatuses": [{"name": "agent", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
              "lastState": {"terminated": {"exitCode": 11, "message": SECCOMP_LINE + "\n"}}}]},
            f"a on n1: agent exited 11: {SECCOMP_LINE}",
        ),
        # FallbackToLogsOnError: the log's tail; its last line is the one that says why
        (
            {"containerStatuses": [{"name": "agent", "state": {"terminated": {"exitCode": 13,
              "message": "noise\nflowmon-agent: no kernel header tree for kernel 6.1 on node n1: …"}}}]},
            "a on n1: agent exited 13: flowmon-agent: no kernel header tree for kernel 6.1 on node n1: …",
        ),
        # kubelet could not create it: the Localhost profile is not there
        (
            {"initContainerStatuses": [{"name": "seccomp-profile", "state": {"terminated": {"exitCode": 0}}}],
             "containerStatuses": [{"name": "agent", "state": {"waiting": {"reason": "CreateContainerError",
              "message": "cannot load seccomp profile"}}}]},
            "a on n1: agent CreateContainerError: cannot load seccomp profile",
        ),
        ({"containerStatuses": [{"name": "agent", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
         None),
        ({"containerStatuses": [{"name": "agent", "state": {"running": {}}}]}, None),
    ],
)  # fmt: skip
def test_start_failure_names_why_an_agent_does_not_run(statuses, expected):
    body = {
        "metadata": {"name": "a"},
        "spec": {"nodeName": "n1"},
        "status": {"podIP": "10.0.0.1", **statuses},
    }
    assert start_failure(body) == expected
    (agent,) = agent_pods([body])
    assert agent.start_failure == expected and not agent.ready


@pytest.mark.parametrize(
    ("document", "policy_hash", "ages"),
    [
        (
            {"policyHash": "ab", "scrapedSecondsAgo": {"shop/web": 3.5, "x/y": 0}},
            "ab",
            {"shop/web": 3.5, "x/y": 0},
        ),
        ({"policyHash": "ab"}, "ab", None),  # an agent of an earlier release: it does not say
        ({"policyHash": "ab", "scrapedSecondsAgo": {"a/b": -1, "c/d": "x", "e/f": 2}}, "ab", {"e/f": 2.0}),
        ({"policyHash": None, "scrapedSecondsAgo": []}, "", None),
        ([], "", None),
    ],
)
def test_parse_answer(document, policy_hash, ages):
    answer = parse_answer(document)
    assert (answer.policy_hash, answer.scraped_seconds_ago) == (policy_hash, ages)
