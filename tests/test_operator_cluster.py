"""The operator's create / update / delete scenarios through a real Kubernetes client, against a real
cluster when KUBECONFIG is set, and always against the Kubernetes API emulator (tests/kubeapi).

The real kopf operator runs in-process (as in test_operator_e2e), restricted to a namespace of its own
and with an operator namespace of its own (both named per run), so it never touches a flowmon installed
in the cluster. Its agent DaemonSet gets a node selector no node matches: no agent pod is started on
someone's cluster, and no pod IP is invented. The assertions are about what the operator writes: the
shared objects, the Secrets, the policy ConfigMap, the per-monitor children and the FlowMonitor status.

The one environment-dependent part: the `real` parameter runs only with KUBECONFIG set (a kind cluster,
docs/operator.md). Without it, that parameter does not exist (nothing is skipped); the `emulator`
parameter runs everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config, dynamic
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from flowmon_contract.policy import AgentPolicy, token_sha256
from flowmon_operator import builders
from flowmon_operator.handlers import operator
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi import KubeAPI
from tests.schemas import FLOWMON_CRD, SHARED_SCHEMAS
from tests.waiting import wait_for

FM = "flowmon.io/v1alpha1"
MONITORING = "monitoring.coreos.com/v1"
TIMER = 1.0
WAIT = 60.0  # a real API server and kopf's watch reconnects: generous, polled every 0.2 s
REAL = bool(os.environ.get("KUBECONFIG"))


class Api:
    """A thin layer over the kubernetes package's dynamic client (the same for both environments)."""

    def __init__(self, kubeconfig: str) -> None:
        self.client = dynamic.DynamicClient(config.new_client_from_config(config_file=kubeconfig))

    def _resource(self, api_version: str, kind: str):
        return self.client.resources.get(api_version=api_version, kind=kind)

    def served(self, api_version: str, kind: str) -> bool:
        try:
            self._resource(api_version, kind)
        except ResourceNotFoundError:
            return False
        return True

    def find(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def create(self, obj: dict) -> dict:
        resource = self._resource(obj["apiVersion"], obj["kind"])
        return resource.create(body=obj, namespace=obj["metadata"].get("namespace")).to_dict()

    def merge_patch(self, api_version: str, kind: str, name: str, namespace: str, patch: dict) -> dict:
        resource = self._resource(api_version, kind)
        return resource.patch(
            body=patch, name=name, namespace=namespace, content_type="application/merge-patch+json"
        ).to_dict()

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        with contextlib.suppress(NotFoundError):
            self._resource(api_version, kind).delete(name=name, namespace=namespace)


def wait(predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
    return wait_for(predicate, timeout, interval=0.2)


class Scenario:
    """The running operator, its namespaces, and readers for what it wrote."""

    def __init__(self, api: Api, settings: OperatorSettings, team: str) -> None:
        self.api, self.settings, self.team = api, settings, team
        self.ns = settings.operator_namespace

    def create_monitor(self, name: str, spec: dict | None = None) -> dict:
        body = {"apiVersion": FM, "kind": "FlowMonitor", "metadata": {"name": name, "namespace": self.team}}
        return self.api.create({**body, "spec": spec or {}})

    def monitor(self, name: str) -> dict | None:
        return self.api.find(FM, "FlowMonitor", name, self.team)

    def condition(self, name: str, type_: str) -> dict:
        conditions = ((self.monitor(name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), {})

    def reconciled(self, name: str) -> bool:
        body = self.monitor(name) or {}
        status = body.get("status") or {}
        return (  # Ready stays False (no agent anywhere); the round itself is done
            status.get("observedGeneration") == body["metadata"]["generation"]
            and status.get("policyHash") == getattr(self.policy(), "hash", None)
        )

    def shared(self) -> dict[str, dict | None]:
        s = self.settings
        return {
            "DaemonSet": self.api.find("apps/v1", "DaemonSet", s.daemonset_name, self.ns),
            "Service": self.api.find("v1", "Service", s.agent_service_name, self.ns),
            "ConfigMap": self.api.find("v1", "ConfigMap", s.configmap_name, self.ns),
        }

    def scrape_secret(self, name: str) -> dict | None:
        return self.api.find("v1", "Secret", f"{self.settings.scrape_secret_prefix}{name}", self.team)

    def service_monitor(self, name: str) -> dict | None:
        name = f"{self.settings.service_monitor_prefix}{name}"
        return self.api.find(MONITORING, "ServiceMonitor", name, self.team)

    def policy(self) -> AgentPolicy | None:
        cm = self.shared()["ConfigMap"]
        return AgentPolicy.model_validate_json(cm["data"][builders.POLICY_FILE]) if cm else None


def run_operator(settings: OperatorSettings, namespace: str) -> Callable[[], None]:
    """The real kopf operator in a thread, watching one namespace; returns its stop function."""
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(
            operator(settings, namespaces=[namespace], stop_flag=stop, ready_flag=ready)
        ),
        name="operator",
    )
    thread.start()
    assert ready.wait(30), "the operator did not start"

    def halt() -> None:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the operator did not stop"

    return halt


# The real cluster is a parameter only when KUBECONFIG names one: CI without a cluster reports no skips.
@pytest.fixture(params=["emulator", "real"] if REAL else ["emulator"])
def scenario(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scenario]:
    emulator = None
    if request.param == "emulator":
        emulator = KubeAPI().start()
        monkeypatch.setenv("KUBECONFIG", str(emulator.kubeconfig(tmp_path / "kubeconfig")))
        for kind in ("servicemonitors", "prometheusrules"):
            path = SHARED_SCHEMAS / f"monitoring.coreos.com_{kind}.yaml"
            emulator.create(yaml.safe_load(path.read_text()))
    api = Api(os.environ["KUBECONFIG"].split(os.pathsep)[0])
    if api.find("apiextensions.k8s.io/v1", "CustomResourceDefinition", "flowmonitors.flowmon.io") is None:
        api.create(yaml.safe_load(FLOWMON_CRD.read_text()))  # kept afterwards: cluster-wide, maybe shared
        wait(lambda: api.client.resources.invalidate_cache() or api.served(FM, "FlowMonitor"))
    run = f"flowmon-e2e-{secrets.token_hex(3)}"
    team = f"{run}-team"
    for namespace in (run, team):
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    settings = OperatorSettings(
        operator_namespace=run,
        timer_interval_seconds=TIMER,
        push_timeout_seconds=2.0,
        node_selector={"flowmon.io/e2e": "no-such-node"},  # no agent pod anywhere
    )
    halt = run_operator(settings, team)
    try:
        yield Scenario(api, settings, team)
    finally:
        try:
            for body in (
                api.client.resources.get(api_version=FM, kind="FlowMonitor").get(namespace=team).items
            ):
                api.delete(FM, "FlowMonitor", body.metadata.name, team)
            wait(
                lambda: (
                    not api.client.resources.get(api_version=FM, kind="FlowMonitor").get(namespace=team).items
                )
            )
        finally:
            halt()
            for namespace in (team, run):
                api.delete("v1", "Namespace", namespace)
            if emulator is not None:
                emulator.stop()


def decode(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_create_writes_the_shared_objects_secrets_policy_and_status(scenario: Scenario):
    scenario.create_monitor("web")
    wait(lambda: scenario.reconciled("web"))

    shared = scenario.shared()
    assert all(shared.values()), shared
    s, ns = scenario.settings, scenario.ns
    for name in (s.ca_secret_name, s.serving_cert_secret_name, s.admin_token_secret_name):
        assert scenario.api.find("v1", "Secret", name, ns) is not None, name
    policy = scenario.policy()
    secret = scenario.scrape_secret("web")
    assert policy.monitor(scenario.team, "web").token_sha256 == [
        token_sha256(decode(secret, builders.SCRAPE_TOKEN_KEY))
    ]
    assert policy.agent_nodes == []  # no agent is ready anywhere
    assert shared["DaemonSet"]["spec"]["template"]["spec"]["nodeSelector"] == s.node_selector
    uid = scenario.monitor("web")["metadata"]["uid"]
    assert [ref["uid"] for ref in secret["metadata"]["ownerReferences"]] == [uid]
    if scenario.api.served(MONITORING, "ServiceMonitor"):
        service_monitor = scenario.service_monitor("web")
        assert [ref["uid"] for ref in service_monitor["metadata"]["ownerReferences"]] == [uid]
    status = scenario.monitor("web")["status"]
    assert status["agents"] == {"desired": 0, "ready": 0, "inSync": 0, "summary": "0/0"}
    assert status["predictedSeries"] > 0
    ready = scenario.condition("web", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoAgentsReady")
    assert "finalizers" not in scenario.monitor("web")["metadata"]  # nothing waits for the operator


def test_update_changes_the_policy_and_the_status(scenario: Scenario):
    scenario.create_monitor("web")
    wait(lambda: scenario.reconciled("web"))
    before = scenario.policy().hash
    daemonset_uid = scenario.shared()["DaemonSet"]["metadata"]["uid"]

    patch = {"spec": {"aggregation": {"maxSeries": 500}}}
    scenario.api.merge_patch(FM, "FlowMonitor", "web", scenario.team, patch)
    wait(lambda: scenario.policy().hash != before and scenario.reconciled("web"))
    assert scenario.policy().monitor(scenario.team, "web").max_series == 500
    assert scenario.monitor("web")["status"]["observedGeneration"] == 2
    daemonset = scenario.shared()["DaemonSet"]
    assert daemonset["metadata"]["uid"] == daemonset_uid  # a push, not a new DaemonSet
    assert daemonset["metadata"]["annotations"][builders.POLICY_HASH_ANNOTATION] == scenario.policy().hash


def test_delete_one_then_the_last_monitor(scenario: Scenario):
    scenario.create_monitor("web")
    scenario.create_monitor("api")
    wait(lambda: scenario.reconciled("web") and scenario.reconciled("api"))
    wait(lambda: {m.name for m in scenario.policy().monitors} == {"web", "api"})

    scenario.api.delete(FM, "FlowMonitor", "web", scenario.team)
    wait(lambda: scenario.monitor("web") is None and scenario.scrape_secret("web") is None)
    wait(lambda: [m.name for m in scenario.policy().monitors] == ["api"])
    assert all(scenario.shared().values()) and scenario.scrape_secret("api") is not None

    scenario.api.delete(FM, "FlowMonitor", "api", scenario.team)
    wait(lambda: not any(scenario.shared().values()) and scenario.scrape_secret("api") is None)
    assert scenario.monitor("api") is None
