"""The operator end to end: the real kopf event loop (flowmon_operator.handlers.operator) against the
Kubernetes API emulator (tests/kubeapi), pushing policy over HTTPS to real agent servers
(flowmon_agent.export.server) that listen on loopback addresses standing in for two nodes.

There is no DaemonSet controller here: once the operator has created the DaemonSet and the agents'
Secrets, the test plays the controller and the kubelet. It starts one agent server per "node" with the
serving certificate and admin token from those Secrets, and creates the agent Pods (owned by the
DaemonSet, Ready, with the loopback address as pod IP).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flowmon_agent.export.collectors import Exporter
from flowmon_agent.export.policy_store import PolicyStore
from flowmon_agent.export.server import AgentServer, ServerConfig
from flowmon_contract.policy import AgentPolicy, token_sha256
from flowmon_lab.prometheus import free_port
from flowmon_operator import builders
from flowmon_operator import pki as certs
from flowmon_operator.handlers import operator
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi import KubeAPI
from tests.kubeapi.resources import crd_body
from tests.kubeapi.shipped import operator_kubeconfig
from tests.schemas import FLOWMON_CRD, SHARED_SCHEMAS, validate_any

NS = "flowmon-system"
FM = "flowmon.io/v1alpha1"
NODES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
TIMER = 1.0  # the operator's timer period in these tests
WAIT = 20.0  # generous bound for anything that must happen within a few timer periods


def decode(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


class AgentFleet:
    """Real agent HTTPS servers, one per node address, on one background event loop."""

    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agents", daemon=True)
        self.thread.start()
        self.servers: dict[str, AgentServer] = {}
        self.stores: dict[str, PolicyStore] = {}

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def start(self, ip: str, cert_pem: str, key_pem: str, admin_token: str) -> None:
        files = {"tls.crt": cert_pem, "tls.key": key_pem, "admin-token": admin_token + "\n"}
        for name, text in files.items():
            (self.directory / f"{ip}-{name}").write_text(text)
        config = ServerConfig(
            host=ip,
            port=self.port,
            tls_cert_file=self.directory / f"{ip}-tls.crt",
            tls_key_file=self.directory / f"{ip}-tls.key",
            admin_token_file=self.directory / f"{ip}-admin-token",
        )
        store = self.stores.setdefault(ip, PolicyStore())
        self.servers[ip] = AgentServer(config, exporter=Exporter(), policy=store, readiness=lambda: None)
        self._run(self.servers[ip].start())

    def stop(self, ip: str) -> None:
        self._run(self.servers.pop(ip).stop())

    def hash(self, ip: str) -> str | None:
        return self.stores[ip].hash

    def policy(self, ip: str) -> AgentPolicy | None:
        return self.stores[ip].policy

    def scrape(self, ip: str, path: str, token: str, ca_pem: str) -> int:
        """The HTTP status a scraper with this token gets (CA verified; names are the push tests' job)."""
        context = ssl.create_default_context(cadata=ca_pem)
        context.check_hostname = False
        connection = http.client.HTTPSConnection(ip, self.port, context=context, timeout=5)
        try:
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            return connection.getresponse().status
        finally:
            connection.close()

    def close(self) -> None:
        for ip in list(self.servers):
            self.stop(ip)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Cluster:
    """The emulated cluster, the running operator, and helpers to read what it did."""

    def __init__(self, api: KubeAPI, settings: OperatorSettings, agents: AgentFleet):
        self.api, self.settings, self.agents = api, settings, agents
        self._operator: tuple[threading.Thread, threading.Event] | None = None

    def start_operator(self) -> None:
        """The real kopf operator on its own event loop in a thread, as `flowmon operator` runs it."""
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=lambda: asyncio.run(operator(self.settings, stop_flag=stop, ready_flag=ready)),
            name="operator",
        )
        thread.start()
        self._operator = thread, stop
        assert ready.wait(15), "the operator did not start"

    def stop_operator(self) -> None:
        if self._operator is None:
            return
        thread, stop = self._operator
        stop.set()
        thread.join(20)
        self._operator = None
        assert not thread.is_alive(), "the operator did not stop"

    def wait(self, predicate, timeout: float = WAIT):
        return self.api.wait_for(predicate, timeout)

    def wait_rounds(self, count: int) -> None:
        """Wait until `count` more operator rounds have run to their end, so a check that nothing changed
        follows rounds that had their chance to change it (not a fixed window a loaded host may not fill).
        Every round starts by listing the FlowMonitors; the round after the `count`-th listing has begun,
        so the `count`-th has ended."""
        asked = len(self.api.requests)

        def listings() -> int:
            return sum(
                1
                for method, path in self.api.requests[asked:]
                if method == "GET" and path.split("?")[0].endswith("/flowmonitors") and "watch=" not in path
            )

        self.wait(lambda: listings() > count, timeout=(count + 1) * TIMER + WAIT)

    # FlowMonitors
    def create_monitor(self, name: str, namespace: str = "team-a", spec: dict | None = None) -> dict:
        return self.api.create(
            {
                "apiVersion": FM,
                "kind": "FlowMonitor",
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec or {},
            }
        )

    def monitor(self, name: str, namespace: str = "team-a") -> dict | None:
        return self.api.find(FM, "FlowMonitor", name, namespace)

    def condition(self, name: str, type_: str, namespace: str = "team-a") -> dict:
        conditions = ((self.monitor(name, namespace) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), {})

    def ready_with(self, name: str, policy_hash: str | None = None, namespace: str = "team-a") -> bool:
        """Reconciled at its current generation; every agent is ready and runs the (given) policy."""
        body = self.monitor(name, namespace) or {}
        status = body.get("status") or {}
        return (
            self.condition(name, "Ready", namespace).get("status") == "True"
            and self.condition(name, "PolicyApplied", namespace).get("status") == "True"
            and self.condition(name, "Degraded", namespace).get("status") == "False"
            and status.get("observedGeneration") == body["metadata"]["generation"]
            and (policy_hash is None or status.get("policyHash") == policy_hash)
        )

    # what the operator created
    def shared(self) -> dict[str, dict | None]:
        s = self.settings
        return {
            "DaemonSet": self.api.find("apps/v1", "DaemonSet", s.daemonset_name, NS),
            "Service": self.api.find("v1", "Service", s.agent_service_name, NS),
            "ConfigMap": self.api.find("v1", "ConfigMap", s.configmap_name, NS),
        }

    def children(self, name: str, namespace: str = "team-a") -> dict[str, dict | None]:
        s = self.settings
        return {
            "Secret": self.api.find("v1", "Secret", f"{s.scrape_secret_prefix}{name}", namespace),
            "ServiceMonitor": self.api.find(
                "monitoring.coreos.com/v1", "ServiceMonitor", f"{s.service_monitor_prefix}{name}", namespace
            ),
            "PrometheusRule": self.api.find(
                "monitoring.coreos.com/v1", "PrometheusRule", f"flowmon-{name}", namespace
            ),
        }

    def policy(self) -> AgentPolicy | None:
        cm = self.shared()["ConfigMap"]
        return AgentPolicy.model_validate_json(cm["data"][builders.POLICY_FILE]) if cm else None

    def secret(self, name: str) -> dict | None:
        return self.api.find("v1", "Secret", name, NS)

    def bring_up_agents(self) -> None:
        """Play the DaemonSet controller and kubelet: agent servers and Ready pods on every node. The
        DaemonSet's status says how many it wants first, so no round sees a partial fleet as complete."""
        s = self.settings
        daemonset = self.wait(lambda: self.shared()["DaemonSet"])
        tls = self.wait(lambda: self.secret(s.serving_cert_secret_name))
        admin = self.wait(lambda: self.secret(s.admin_token_secret_name))
        counts = dict.fromkeys(
            ("desiredNumberScheduled", "currentNumberScheduled", "numberReady"), len(NODES)
        )
        self.api.patch(
            "apps/v1",
            "DaemonSet",
            s.daemonset_name,
            {"status": {**counts, "numberMisscheduled": 0}},
            NS,
            subresource="status",
        )
        owner = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "name": s.daemonset_name,
            "uid": daemonset["metadata"]["uid"],
            "controller": True,
        }
        for node, ip in NODES.items():
            self.agents.start(ip, decode(tls, "tls.crt"), decode(tls, "tls.key"), decode(admin, "token"))
            self.api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"flowmon-agent-{node}",
                        "namespace": NS,
                        "labels": s.agent_labels,
                        "ownerReferences": [owner],
                    },
                    "spec": {"nodeName": node, "containers": [{"name": "agent", "image": s.agent_image}]},
                    "status": {
                        "phase": "Running",
                        "podIP": ip,
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )


def running_cluster(
    kube_api: KubeAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlays: tuple[str, ...] = ("",),  # whose RBAC the operator gets: the base, or an overlay (manifests/)
    **settings_overrides,
) -> Iterator[Cluster]:
    kube_api.create(yaml.safe_load(FLOWMON_CRD.read_text()))
    for kind in ("servicemonitors", "prometheusrules"):
        kube_api.create(yaml.safe_load((SHARED_SCHEMAS / f"monitoring.coreos.com_{kind}.yaml").read_text()))
    for namespace in (NS, "team-a", "team-b"):
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    # the operator runs as its ServiceAccount, with the shipped RBAC
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig(kube_api, tmp_path / "kubeconfig", overlays)))
    settings = OperatorSettings(
        timer_interval_seconds=TIMER, push_timeout_seconds=2.0, agent_port=free_port(), **settings_overrides
    )
    cluster = Cluster(kube_api, settings, AgentFleet(tmp_path, settings.agent_port))
    try:
        cluster.start_operator()
        yield cluster
    finally:
        try:
            cluster.stop_operator()
        finally:
            cluster.agents.close()


@pytest.fixture
def cluster(kube_api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield from running_cluster(kube_api, tmp_path, monkeypatch)


@pytest.fixture
def cert_manager_cluster(
    kube_api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    # A minimal Certificate CRD: the emulator serves the kind; cert-manager's schema is not in ../shared.
    kube_api.create(crd_body("cert-manager.io", "Certificate", "certificates"))
    yield from running_cluster(
        kube_api, tmp_path, monkeypatch, ("cert-manager",), cert_manager_issuer="ClusterIssuer/test-ca"
    )


def test_create_builds_every_object_and_pushes_the_policy_to_every_agent(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))

    shared, children = cluster.shared(), cluster.children("web")
    assert all(shared.values()) and all(children.values()), (shared, children)
    s = cluster.settings
    for name in (s.ca_secret_name, s.serving_cert_secret_name, s.admin_token_secret_name):
        assert cluster.secret(name) is not None
    # Only the token's hash is in the policy; the token itself is in the monitor's namespace.
    policy = cluster.policy()
    token = decode(children["Secret"], builders.SCRAPE_TOKEN_KEY)
    assert policy.monitor("team-a", "web").token_sha256 == [token_sha256(token)]
    assert token not in cluster.shared()["ConfigMap"]["data"][builders.POLICY_FILE]
    # Per-monitor children are owned by the monitor; the agents run exactly the ConfigMap's policy.
    uid = cluster.monitor("web")["metadata"]["uid"]
    for child in children.values():
        assert [ref["uid"] for ref in child["metadata"]["ownerReferences"]] == [uid]
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {policy.hash}
    # Count-once: the pushed policy names the nodes whose agent is ready.
    assert policy.agent_nodes == sorted(NODES)
    assert {tuple(cluster.agents.policy(ip).agent_nodes) for ip in NODES.values()} == {tuple(sorted(NODES))}

    status = cluster.monitor("web")["status"]
    assert status["agents"] == {"desired": 2, "ready": 2, "inSync": 2, "summary": "2/2"}
    assert status["policyHash"] == policy.hash
    assert status["predictedSeries"] > 0
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {
        "Ready": ("True", "Reconciled"),
        "PolicyApplied": ("True", "AllAgentsInSync"),
        "Degraded": ("False", "AsExpected"),
        "Scraped": ("False", "NotScraped"),  # no Prometheus here yet: the status says so, and why
    }
    assert "flowmon-web" in cluster.condition("web", "Scraped")["message"]
    assert "finalizers" not in cluster.monitor("web")["metadata"]  # nothing waits for the operator
    # Steady state: timer rounds keep running and write nothing at all (no churn, no watch events).
    settled, asked = cluster.api.store.rv, len(cluster.api.requests)
    cluster.wait_rounds(2)
    rounds = [p for m, p in cluster.api.requests[asked:] if m == "PATCH" and "/daemonsets/" in p]
    assert len(rounds) >= 2 and cluster.api.store.rv == settled
    # Everything the operator wrote is what a real API server with these CRDs would accept.
    for obj in [*shared.values(), *children.values(), cluster.monitor("web")]:
        validate_any(obj)
    # A scraper with the monitor's token reads its path on one agent: the agents tell the operator.
    ca = decode(cluster.secret(s.ca_secret_name), "tls.crt")
    assert cluster.agents.scrape(NODES["node-a"], "/metrics/team-a/web", token, ca) == 200
    cluster.wait(lambda: cluster.condition("web", "Scraped").get("status") == "True")
    assert cluster.condition("web", "Scraped")["reason"] == "Scraped"


def test_update_pushes_the_new_policy_to_running_agents(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    before = cluster.policy().hash
    daemonset_uid = cluster.shared()["DaemonSet"]["metadata"]["uid"]

    cluster.api.patch(FM, "FlowMonitor", "web", {"spec": {"aggregation": {"maxSeries": 500}}}, "team-a")
    cluster.wait(lambda: (p := cluster.policy()) is not None and p.hash != before)
    after = cluster.policy()
    assert after.monitor("team-a", "web").max_series == 500
    cluster.wait(lambda: cluster.ready_with("web", after.hash))
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {after.hash}
    assert cluster.monitor("web")["status"]["agents"]["inSync"] == 2
    assert cluster.monitor("web")["status"]["observedGeneration"] == 2
    # Pushed, not rolled out: the same DaemonSet, the pod template does not carry the hash.
    daemonset = cluster.shared()["DaemonSet"]
    assert daemonset["metadata"]["uid"] == daemonset_uid
    assert before not in json.dumps(daemonset["spec"]) and after.hash not in json.dumps(daemonset["spec"])


def test_monitors_share_one_round_per_period(cluster: Cluster):
    """Three monitors, one cluster round per timer period (each round applies the DaemonSet once and asks
    each agent once): not one round per monitor."""
    monitors = (("web", "team-a"), ("api", "team-a"), ("db", "team-b"))
    for name, namespace in monitors:
        cluster.create_monitor(name, namespace)
    cluster.bring_up_agents()
    cluster.wait(lambda: all(cluster.ready_with(name, namespace=ns) for name, ns in monitors))
    asked, started = len(cluster.api.requests), time.monotonic()

    def rounds() -> list[str]:
        return [p for m, p in cluster.api.requests[asked:] if m == "PATCH" and "/daemonsets/" in p]

    # Wait for the rounds themselves (no fixed window). One round per period spends about three periods on
    # four rounds; a round per monitor (three per period) would reach four within about one and a half.
    cluster.wait(lambda: len(rounds()) >= 4, timeout=10 * TIMER + WAIT)
    count = len(rounds())
    elapsed = time.monotonic() - started
    assert 4 <= count <= elapsed / TIMER + 2, (count, elapsed)


def test_an_agent_that_stops_being_ready_leaves_the_policys_agent_nodes(cluster: Cluster):
    """Its node's clients are then reported by the servers' agents: the others must learn it."""
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web") and cluster.policy().agent_nodes == sorted(NODES))
    cluster.api.patch(
        "v1",
        "Pod",
        "flowmon-agent-node-b",
        {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        NS,
        subresource="status",
    )
    cluster.wait(lambda: cluster.policy().agent_nodes == ["node-a"])
    node_a = NODES["node-a"]
    cluster.wait(lambda: cluster.agents.hash(node_a) == cluster.policy().hash)
    assert cluster.agents.policy(node_a).agent_nodes == ["node-a"]


def test_an_agent_that_missed_a_push_is_caught_up_by_the_timer(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    down = NODES["node-b"]
    tls = cluster.secret(cluster.settings.serving_cert_secret_name)
    admin = cluster.secret(cluster.settings.admin_token_secret_name)
    cluster.agents.stop(down)

    cluster.api.patch(FM, "FlowMonitor", "web", {"spec": {"aggregation": {"maxSeries": 700}}}, "team-a")
    cluster.wait(lambda: cluster.condition("web", "Degraded").get("status") == "True")
    new_hash = cluster.policy().hash
    status = cluster.monitor("web")["status"]
    assert status["agents"] == {"desired": 2, "ready": 2, "inSync": 1, "summary": "1/2"}
    assert cluster.condition("web", "PolicyApplied")["reason"] == "AgentsOutOfSync"
    assert "flowmon-agent-node-b" in cluster.condition("web", "Degraded")["message"]
    assert cluster.agents.hash(NODES["node-a"]) == new_hash and cluster.agents.hash(down) != new_hash

    cluster.agents.start(down, decode(tls, "tls.crt"), decode(tls, "tls.key"), decode(admin, "token"))
    cluster.wait(lambda: cluster.agents.hash(down) == new_hash)
    cluster.wait(lambda: cluster.condition("web", "Degraded").get("status") == "False")
    assert cluster.monitor("web")["status"]["agents"]["inSync"] == 2


def test_invalid_spec_gets_a_condition_naming_the_field_and_changes_nothing(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))

    def versions() -> dict[str, str]:
        objects = {**cluster.shared(), **{f"web/{k}": v for k, v in cluster.children("web").items()}}
        return {kind: obj["metadata"]["resourceVersion"] for kind, obj in objects.items()}

    before, running = versions(), cluster.policy().hash
    # A new monitor that is invalid: nothing is created for it.
    cluster.create_monitor("bad", spec={"aggregation": {"maxSeries": 0}})
    cluster.wait(lambda: cluster.condition("bad", "Ready").get("reason") == "InvalidSpec")
    assert "spec.aggregation.maxSeries" in cluster.condition("bad", "Ready")["message"]
    assert not any(cluster.children("bad").values())
    # A running monitor updated into an invalid spec: its last good policy keeps running.
    cluster.api.patch(FM, "FlowMonitor", "web", {"spec": {"metrics": ["no_such_metric"]}}, "team-a")
    cluster.wait(lambda: cluster.condition("web", "Ready").get("reason") == "InvalidSpec")
    assert "spec.metrics.0" in cluster.condition("web", "Ready")["message"]
    assert cluster.monitor("web")["status"]["observedGeneration"] == 2
    # Several timer rounds later, nothing that runs has changed.
    cluster.wait_rounds(3)
    assert versions() == before
    assert cluster.policy().hash == running
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {running}
    # And no retry storm: a permanent error is reported once per spec, not retried.
    failures = [r for r in caplog.records if "failed permanently" in r.getMessage()]
    assert sum("spec.aggregation.maxSeries" in r.getMessage() for r in failures) == 1
    assert sum("spec.metrics.0" in r.getMessage() for r in failures) == 1


def test_deleting_one_of_two_monitors_removes_its_children_and_the_last_removes_everything(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.create_monitor("db", namespace="team-b")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web") and cluster.ready_with("db", namespace="team-b"))
    both = cluster.policy()
    assert [m.key for m in both.monitors] == ["team-a/web", "team-b/db"]
    cluster.wait(
        lambda: cluster.ready_with("web", both.hash) and cluster.ready_with("db", both.hash, "team-b")
    )

    # Tenancy through the whole chain: each ServiceMonitor's token reads its own monitor's path only.
    tokens = {
        key: decode(cluster.children(name, ns)["Secret"], builders.SCRAPE_TOKEN_KEY)
        for key, (ns, name) in {"web": ("team-a", "web"), "db": ("team-b", "db")}.items()
    }
    ca = decode(cluster.secret(cluster.settings.ca_secret_name), "tls.crt")
    for ip in NODES.values():
        assert cluster.agents.scrape(ip, "/metrics/team-b/db", tokens["db"], ca) == 200
        assert cluster.agents.scrape(ip, "/metrics/team-b/db", tokens["web"], ca) == 403
        assert cluster.agents.scrape(ip, "/metrics/team-a/web", tokens["web"], ca) == 200

    # No finalizer: the monitor goes at once, garbage collection takes its children, a round the policy.
    cluster.api.delete(FM, "FlowMonitor", "db", "team-b")
    assert cluster.monitor("db", "team-b") is None
    assert not any(cluster.children("db", "team-b").values())
    cluster.wait(lambda: [m.key for m in cluster.policy().monitors] == ["team-a/web"])
    assert all(cluster.shared().values()) and all(cluster.children("web").values())
    only_web = cluster.policy()
    cluster.wait(lambda: {cluster.agents.hash(ip) for ip in NODES.values()} == {only_web.hash})
    cluster.wait(lambda: cluster.ready_with("web", only_web.hash))

    cluster.api.delete(FM, "FlowMonitor", "web", "team-a")
    cluster.wait(lambda: not any(cluster.shared().values()))
    assert not any(cluster.children("web").values())
    # The DaemonSet's pods went with it (garbage collection of owned objects).
    assert cluster.api.list("v1", "Pod", NS) == []


def test_children_deleted_or_edited_by_hand_are_restored_and_foreign_fields_kept(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    s = cluster.settings
    monitor_uid = cluster.monitor("web")["metadata"]["uid"]
    token = decode(cluster.children("web")["Secret"], builders.SCRAPE_TOKEN_KEY)

    cluster.api.delete(
        "monitoring.coreos.com/v1", "ServiceMonitor", f"{s.service_monitor_prefix}web", "team-a"
    )
    cluster.api.delete("v1", "ConfigMap", s.configmap_name, NS)
    cluster.api.patch(
        "apps/v1",
        "DaemonSet",
        s.daemonset_name,
        {
            "metadata": {"annotations": {"example.com/other-controller": "kept"}},
            "spec": {"minReadySeconds": 99},
        },
        NS,
    )
    cluster.api.patch(
        "v1", "Secret", f"{s.scrape_secret_prefix}web", {"data": {"ca.crt": "bm9wZQ=="}}, "team-a"
    )
    cluster.wait(
        lambda: all(cluster.children("web").values()) and all(cluster.shared().values()),
        timeout=3 * TIMER + 5,
    )
    cluster.wait(lambda: cluster.shared()["DaemonSet"]["spec"]["minReadySeconds"] == 5, timeout=3 * TIMER + 5)
    cluster.wait(
        lambda: (
            decode(cluster.children("web")["Secret"], "ca.crt")
            == decode(cluster.secret(s.ca_secret_name), "tls.crt")
        ),
        timeout=3 * TIMER + 5,
    )
    daemonset = cluster.shared()["DaemonSet"]
    assert daemonset["metadata"]["annotations"]["example.com/other-controller"] == "kept"
    service_monitor = cluster.children("web")["ServiceMonitor"]
    assert service_monitor["metadata"]["ownerReferences"][0]["uid"] == monitor_uid
    # The scrape token survives the repair (Prometheus keeps working), and the policy still holds its hash.
    assert decode(cluster.children("web")["Secret"], builders.SCRAPE_TOKEN_KEY) == token
    assert cluster.policy().monitor("team-a", "web").token_sha256 == [token_sha256(token)]


def test_the_operator_survives_the_api_going_away(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))

    def failed_rounds() -> int:
        return sum("the periodic round failed" in r.getMessage() for r in caplog.records)

    before = failed_rounds()
    cluster.api.stop()
    cluster.wait(lambda: failed_rounds() >= before + 2)  # timer rounds fail meanwhile
    cluster.api.start()
    # Watches resume: a new monitor is reconciled.
    cluster.create_monitor("db", namespace="team-b")
    cluster.wait(lambda: cluster.ready_with("db", namespace="team-b"))
    assert all(cluster.children("db", "team-b").values())
    assert [m.key for m in cluster.policy().monitors] == ["team-a/web", "team-b/db"]
    # Timers resume within a period or two, not after kopf's default one-minute error backoff.
    service_monitor = "monitoring.coreos.com/v1", "ServiceMonitor", "flowmon-web", "team-a"
    cluster.api.delete(*service_monitor)
    cluster.wait(lambda: cluster.api.find(*service_monitor) is not None, timeout=4 * TIMER + 3)


def test_expired_watches_make_kopf_relist_and_carry_on(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.wait(lambda: cluster.condition("web", "Ready").get("reason") == "NoAgentsReady")
    asked = len(cluster.api.requests)
    assert cluster.api.expire_watches() >= 1  # ERROR 410 on every open stream, history compacted
    cluster.create_monitor("db", namespace="team-b")
    cluster.wait(lambda: cluster.condition("db", "Ready", "team-b").get("reason") == "NoAgentsReady")
    relists = [
        path
        for method, path in cluster.api.requests[asked:]
        if method == "GET"
        and path.startswith("/apis/flowmon.io/v1alpha1/flowmonitors")
        and "watch=" not in path
    ]
    assert relists, "kopf did not list again after 410 Gone"


def test_a_restarted_operator_resumes_with_the_same_pki_and_tokens(cluster: Cluster):
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    s = cluster.settings
    names = (s.ca_secret_name, s.serving_cert_secret_name, s.admin_token_secret_name)
    identity = {name: cluster.secret(name) for name in names}
    scrape = cluster.children("web")["Secret"]

    cluster.stop_operator()
    cluster.api.patch(FM, "FlowMonitor", "web", {"spec": {"aggregation": {"maxSeries": 321}}}, "team-a")
    cluster.start_operator()
    cluster.wait(lambda: (p := cluster.policy()) is not None and p.monitor("team-a", "web").max_series == 321)
    cluster.wait(lambda: cluster.ready_with("web", cluster.policy().hash))
    # Created once, reused: same Secrets (uid, data), so agents and Prometheus keep trusting them.
    for name, before in identity.items():
        after = cluster.secret(name)
        assert (after["metadata"]["uid"], after["data"]) == (before["metadata"]["uid"], before["data"])
    assert cluster.children("web")["Secret"]["data"] == scrape["data"]


def test_flowmon_operator_command_runs_kopf_and_stops_on_sigint(kube_api: KubeAPI, tmp_path: Path):
    """`flowmon operator -n team-a` as a process: serves its namespace only, stops cleanly on Ctrl-C."""
    kube_api.create(yaml.safe_load(FLOWMON_CRD.read_text()))
    for namespace in (NS, "team-a", "team-b"):
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    env = {
        **os.environ,
        "KUBECONFIG": str(operator_kubeconfig(kube_api, tmp_path / "kubeconfig")),
        "FLOWMON_TIMER_INTERVAL_SECONDS": str(TIMER),
        "FLOWMON_AGENT_PORT": str(free_port()),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "flowmon_cli.main", "operator", "-n", "team-a"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for namespace in ("team-a", "team-b"):
            kube_api.create(
                {"apiVersion": FM, "kind": "FlowMonitor", "metadata": {"name": "web", "namespace": namespace}}
            )
        cluster = Cluster(kube_api, OperatorSettings(), agents=None)  # type: ignore[arg-type]
        # No agent pods exist: everything is created, the monitor says why it is not ready yet.
        cluster.wait(lambda: cluster.condition("web", "Ready").get("reason") == "NoAgentsReady")
        assert all(cluster.shared().values())
        assert [m.key for m in cluster.policy().monitors] == ["team-a/web"]
        assert "status" not in cluster.monitor("web", "team-b")
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_missing_prometheus_operator_crds_degrade_but_the_policy_still_runs(cluster: Cluster):
    monitors = (("web", "team-a"), ("db", "team-b"))
    for name, namespace in monitors:
        cluster.create_monitor(name, namespace)
    cluster.bring_up_agents()
    cluster.wait(lambda: all(cluster.ready_with(name, namespace=ns) for name, ns in monitors))
    crd = "apiextensions.k8s.io/v1", "CustomResourceDefinition", "servicemonitors.monitoring.coreos.com"
    cluster.api.delete(*crd)

    def degraded() -> list[dict]:
        return [cluster.condition(name, "Degraded", ns) for name, ns in monitors]

    cluster.wait(lambda: all(c.get("reason") == "ChildrenNotApplied" for c in degraded()))
    assert all("ServiceMonitor CRD" in c["message"] for c in degraded())
    assert all(cluster.condition(name, "Ready", ns)["status"] == "True" for name, ns in monitors)
    assert cluster.children("web")["Secret"] is not None
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {cluster.policy().hash}
    # Each monitor's round and the other's agree: the condition does not flap between rounds.
    settled = degraded()
    cluster.wait_rounds(3)
    assert degraded() == settled


def test_flowmon_operator_without_credentials_says_so(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    result = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "operator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no Kubernetes API credentials" in result.stderr


def test_cert_manager_issues_the_serving_certificate_and_its_ca_is_trusted(cert_manager_cluster: Cluster):
    cluster, s = cert_manager_cluster, cert_manager_cluster.settings
    cluster.create_monitor("web")
    certificate = cluster.wait(
        lambda: cluster.api.find("cert-manager.io/v1", "Certificate", s.serving_cert_secret_name, NS)
    )
    assert certificate["spec"]["issuerRef"] == {
        "group": "cert-manager.io",
        "kind": "ClusterIssuer",
        "name": "test-ca",
    }
    # Until cert-manager has issued the Secret, the monitor waits and says why; nothing runs yet.
    cluster.wait(lambda: cluster.condition("web", "Ready").get("reason") == "WaitingForCertificate")
    assert s.serving_cert_secret_name in cluster.condition("web", "Ready")["message"]
    cluster.wait_rounds(2)
    assert cluster.secret(s.serving_cert_secret_name) is None  # the operator does not issue it itself
    assert cluster.secret(s.ca_secret_name) is None
    assert not any(cluster.shared().values()) and cluster.children("web")["Secret"] is None

    # The test plays cert-manager's controller (an external component, not flowmon's): it issues the
    # Certificate's names from its CA and writes the Secret as cert-manager's CA issuer does.
    issuer_ca = certs.generate_ca("test-ca")
    serving = certs.issue_serving_cert(issuer_ca, certificate["spec"]["dnsNames"])
    cluster.api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": certificate["spec"]["secretName"], "namespace": NS},
            "type": "kubernetes.io/tls",
            "data": {
                k: base64.b64encode(v.encode()).decode()
                for k, v in (
                    ("tls.crt", serving.cert_pem),
                    ("tls.key", serving.key_pem),
                    ("ca.crt", issuer_ca.cert_pem),
                )
            },
        }
    )
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    # The push verified the agents against cert-manager's CA (and the Service name): they run the policy.
    policy = cluster.policy()
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {policy.hash}
    scrape = cluster.children("web")["Secret"]
    assert decode(scrape, builders.CA_KEY) == issuer_ca.cert_pem
    token = decode(scrape, builders.SCRAPE_TOKEN_KEY)
    assert (
        cluster.agents.scrape(NODES["node-a"], "/metrics/team-a/web", token, decode(scrape, builders.CA_KEY))
        == 200
    )
    # The serving Secret is cert-manager's: the operator left it as issued and made no CA of its own.
    assert decode(cluster.secret(s.serving_cert_secret_name), "tls.crt") == serving.cert_pem
    assert cluster.secret(s.ca_secret_name) is None


def test_a_network_with_host_bits_gets_ready_false_naming_the_network(cluster: Cluster):
    """The CRD checks only a CIDR's shape (no CEL IP library before Kubernetes 1.31), so the API stores
    10.0.0.1/8; the operator refuses it in the monitor's status, with the network it meant."""
    spec = {"selection": {"networks": [{"name": "corp", "cidr": "10.0.0.1/8"}]}}
    cluster.create_monitor("corp", spec=spec)
    validate_any(cluster.monitor("corp"))  # what a real API server with this CRD accepts
    cluster.wait(lambda: cluster.condition("corp", "Ready").get("reason") == "InvalidSpec")
    ready = cluster.condition("corp", "Ready")
    assert ready["status"] == "False"
    assert ready["message"] == (
        "spec.selection.networks.0.cidr: '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8"
    )
    assert not any(cluster.children("corp").values())


def test_one_monitors_refused_child_never_stops_the_others(cluster: Cluster):
    """An admission webhook refuses every ServiceMonitor in team-b: that monitor says so in its status,
    the other monitor's children and both policies are applied, round after round."""
    refusal = "no ServiceMonitors in team-b"
    cluster.api.deny("PATCH", "/apis/monitoring.coreos.com/v1/namespaces/team-b/servicemonitors", refusal)
    cluster.create_monitor("db", namespace="team-b")
    cluster.create_monitor("web")
    cluster.bring_up_agents()
    cluster.wait(lambda: cluster.ready_with("web"))
    cluster.wait(lambda: cluster.condition("db", "Degraded", "team-b").get("reason") == "ChildrenNotApplied")
    assert refusal in cluster.condition("db", "Degraded", "team-b")["message"]
    assert all(cluster.children("web").values())
    assert cluster.children("db", "team-b")["ServiceMonitor"] is None
    policy = cluster.policy()
    assert [m.key for m in policy.monitors] == ["team-a/web", "team-b/db"]
    assert {cluster.agents.hash(ip) for ip in NODES.values()} == {policy.hash}
    # The next rounds retry team-b and leave team-a as it is.
    asked = len(cluster.api.requests)
    refused = "/apis/monitoring.coreos.com/v1/namespaces/team-b/servicemonitors/flowmon-db"
    cluster.wait(lambda: sum(p.startswith(refused) for _, p in cluster.api.requests[asked:]) >= 2)
    assert cluster.ready_with("web") and all(cluster.children("web").values())
