"""Install, upgrade and uninstall as docs/operator.md gives them: the real `kubectl` (apply -k, delete -k,
delete namespace) against the API emulator over HTTPS, with the shipped RBAC, and the operator running as
its ServiceAccount.

Nothing may stay behind or hang: no FlowMonitor, CRD, namespace, child or finalizer, whichever order
things go in — the operator deleted first, the whole install deleted while it runs, a team's namespace
deleted with its monitors in it. An upgrade (newer manifests applied over older ones) keeps the monitors
and their status.

The emulator serves no OpenAPI documents, which kubectl's client-side validation downloads, so `apply`
runs with `--validate=false` here; everything else is the documented command line.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flowmon_contract.policy import token_sha256
from flowmon_lab.prometheus import free_port
from flowmon_operator import builders
from flowmon_operator.handlers import FINALIZER
from flowmon_operator.labels import MANAGED_BY, MANAGED_BY_LABEL, PART_OF_LABEL
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi import ApiError, KubeAPI
from tests.kubeapi.admission import OWNER_REFERENCES_PERMISSION_ENFORCEMENT
from tests.kubeapi.shipped import operator_token
from tests.schemas import REPO, SHARED_SCHEMAS
from tests.test_operator_e2e import FM, NS, TIMER, AgentFleet, Cluster

TEAM = "shop"  # examples/team-namespace.yaml's namespace
MONITOR = "shop-flows"
MONITORING = "monitoring.coreos.com/v1"
BUILT_IN_NAMESPACES = {"default", "kube-system", "kube-public"}
# Every kind flowmon installs or creates, and the Prometheus Operator's (their CRDs stay installed).
KINDS = (
    ("v1", "Namespace"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    (FM, "FlowMonitor"),
    (MONITORING, "ServiceMonitor"),
    (MONITORING, "PrometheusRule"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
)


@dataclass
class Install:
    api: KubeAPI
    admin: Path  # the cluster admin's kubeconfig
    cluster: Cluster  # the operator (as its ServiceAccount) and helpers

    def kubectl(self, *args: str) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.admin), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,  # a delete that waits on a finalizer nobody removes hangs: that is a failure
            check=False,
        )
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def kubectl_in_background(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["kubectl", "--kubeconfig", str(self.admin), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def apply_manifests(self, directory: Path | str = "manifests/") -> None:
        self.kubectl("apply", "--validate=false", "-k", str(directory))

    def everything(self) -> list[dict]:
        """Every object of KINDS in the cluster (kinds whose CRD is gone have none)."""
        found = []
        for api_version, kind in KINDS:
            try:
                found += [{"kind": kind, **o} for o in self.api.list(api_version, kind)]
            except ApiError as exc:
                assert exc.code == 404, exc
        return found

    def flowmon_leftovers(self) -> list[str]:
        """What flowmon left: its namespace, CRD, FlowMonitors, anything labelled as flowmon's or the
        operator's, anything deleted but still held by a finalizer (Terminating)."""
        left = []
        for obj in self.everything():
            meta = obj["metadata"]
            labels = meta.get("labels") or {}
            name = f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}"
            if (
                obj["kind"] == "FlowMonitor"
                or meta["name"] in (NS, "flowmonitors.flowmon.io")
                or labels.get(MANAGED_BY_LABEL) == MANAGED_BY
                or labels.get(PART_OF_LABEL) == "flowmon"
                or meta.get("deletionTimestamp")  # held by a finalizer: stuck
            ):
                left.append(name)
        return sorted(left)


def monitor_labels_secret(cluster: Cluster) -> dict | None:
    return cluster.children(MONITOR, TEAM)["Secret"]


@pytest.fixture
def install(kube_api_https: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """`kubectl apply -k manifests/`, the Prometheus Operator CRDs, the team's namespace; the operator
    runs (in this process, as the Deployment would) with its ServiceAccount's token, on an API server
    that checks who may set owner references (OwnerReferencesPermissionEnforcement)."""
    api = kube_api_https
    api.admission_plugins.add(
        OWNER_REFERENCES_PERMISSION_ENFORCEMENT
    )  # as on OpenShift and hardened clusters
    install = Install(api, api.kubeconfig(tmp_path / "admin"), None)  # type: ignore[arg-type]
    install.apply_manifests()
    for kind in ("servicemonitors", "prometheusrules"):
        install.kubectl(
            "apply", "--validate=false", "-f", str(SHARED_SCHEMAS / f"monitoring.coreos.com_{kind}.yaml")
        )
    install.kubectl("create", "namespace", TEAM)
    kubeconfig = api.kubeconfig(tmp_path / "operator", token=operator_token(api))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = OperatorSettings(
        timer_interval_seconds=TIMER, push_timeout_seconds=2.0, agent_port=free_port()
    )
    install.cluster = Cluster(api, settings, AgentFleet(tmp_path, settings.agent_port))
    try:
        install.cluster.start_operator()
        yield install
    finally:
        try:
            install.cluster.stop_operator()
        finally:
            install.cluster.agents.close()


def reconciled(install: Install) -> None:
    """examples/team-namespace.yaml applied and reconciled (no agents here: NoAgentsReady)."""
    cluster = install.cluster
    install.kubectl("apply", "--validate=false", "-f", "examples/team-namespace.yaml")
    cluster.wait(lambda: cluster.condition(MONITOR, "Ready", TEAM).get("reason") == "NoAgentsReady")
    cluster.wait(lambda: all(cluster.shared().values()) and all(cluster.children(MONITOR, TEAM).values()))
    assert "finalizers" not in cluster.monitor(MONITOR, TEAM)["metadata"]


def test_uninstall_in_the_documented_order_leaves_nothing(install: Install):
    reconciled(install)
    install.kubectl("delete", "flowmonitors", "--all", "--all-namespaces")
    install.cluster.wait(lambda: not any(install.cluster.shared().values()))
    install.cluster.stop_operator()  # what deleting the Deployment does
    install.kubectl("delete", "-k", "manifests/", "--ignore-not-found")
    assert install.flowmon_leftovers() == []
    assert {o["metadata"]["name"] for o in install.everything() if o["kind"] == "Namespace"} == {
        *BUILT_IN_NAMESPACES,
        TEAM,
    }


def test_uninstall_with_the_operator_deleted_first_leaves_nothing(install: Install):
    """Nothing waits for the operator: deleting the CRD takes the FlowMonitors, garbage collection their
    children, the namespace the agents and the operator's keys."""
    reconciled(install)
    install.cluster.stop_operator()
    install.kubectl("delete", "deployment", "flowmon-operator", "-n", NS)
    install.kubectl("delete", "-k", "manifests/", "--ignore-not-found")
    assert install.flowmon_leftovers() == []


def test_uninstall_in_one_command_while_the_operator_runs_leaves_nothing(install: Install):
    """The operator still running through the uninstall writes nothing into its terminating (or gone)
    namespace and creates nothing anywhere."""
    reconciled(install)
    # As a real namespace controller, asynchronous: flowmon-system stays Terminating with its content a while.
    install.api.pause_namespace_controller()
    uninstall = install.kubectl_in_background("delete", "-k", "manifests/", "--ignore-not-found")
    try:  # kubectl waits for the namespace; meanwhile the operator's rounds go on
        install.cluster.wait(
            lambda: (
                (install.api.find("v1", "Namespace", NS) or {}).get("metadata", {}).get("deletionTimestamp")
            )
        )
        install.cluster.wait_rounds(3)  # rounds while it terminates, which must not bring anything back
        install.api.finalize_namespaces()
        _, errors = uninstall.communicate(timeout=60)
    finally:
        uninstall.kill()
    assert uninstall.returncode == 0, errors
    assert install.flowmon_leftovers() == []


def test_while_its_namespace_terminates_the_operator_writes_nothing_there(install: Install):
    """Something holds flowmon-system in Terminating (another controller's finalizer on the operator's Role
    and RoleBinding, which so keep granting): the operator's rounds see it and never try to re-create the
    agents' objects or its keys there (the API would refuse: 403, the namespace is terminating)."""
    cluster = install.cluster
    reconciled(install)
    rbac = [("rbac.authorization.k8s.io/v1", kind, "flowmon-operator") for kind in ("Role", "RoleBinding")]
    for api_version, kind, name in rbac:
        install.api.patch(api_version, kind, name, {"metadata": {"finalizers": ["example.com/hold"]}}, NS)
    install.kubectl("delete", "namespace", NS, "--wait=false")
    assert install.api.get("v1", "Namespace", NS)["metadata"].get("deletionTimestamp")
    asked = len(install.api.requests)
    cluster.wait_rounds(3)
    writes = [
        (method, path)
        for method, path in install.api.requests[asked:]
        if method in ("POST", "PUT", "PATCH") and f"/namespaces/{NS}/" in path
    ]
    assert writes == []
    assert not any(cluster.shared().values())  # gone with the namespace, and not brought back
    for api_version, kind, name in rbac:
        install.api.patch(api_version, kind, name, {"metadata": {"finalizers": None}}, NS)
    cluster.wait(lambda: install.api.find("v1", "Namespace", NS) is None)


def test_a_namespace_deleted_with_its_flowmonitors_goes_and_the_others_carry_on(install: Install):
    cluster = install.cluster
    reconciled(install)
    install.kubectl("create", "namespace", "pay")
    cluster.create_monitor("pay-flows", namespace="pay")
    cluster.wait(lambda: [m.key for m in cluster.policy().monitors] == ["pay/pay-flows", f"{TEAM}/{MONITOR}"])
    install.kubectl("delete", "namespace", TEAM)
    cluster.wait(lambda: [m.key for m in cluster.policy().monitors] == ["pay/pay-flows"])
    assert install.api.find("v1", "Namespace", TEAM) is None
    left = [o for o in install.everything() if o["metadata"].get("namespace") == TEAM]
    assert left == []
    assert all(cluster.children("pay-flows", "pay").values())
    assert not [o for o in install.everything() if o["metadata"].get("deletionTimestamp")]


def previous_release(objects: list[dict]) -> list[dict]:
    """The install as the previous release shipped it: the operator read Secrets cluster-wide, had no
    Role rule for its keys and namespace, and the status had no Scraped condition."""
    older = []
    for obj in yaml.safe_load_all(yaml.safe_dump_all(objects)):
        if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == "flowmon-operator":
            obj["rules"] = [r for r in obj["rules"] if r["resources"] != ["namespaces"]]
            for rule in obj["rules"]:
                if rule["resources"] == ["secrets"]:
                    rule["verbs"] = ["get", "list", "create", "patch", "delete"]
        if obj["kind"] == "Role" and obj["metadata"]["name"] == "flowmon-operator":
            obj["rules"] = [r for r in obj["rules"] if r["resources"] != ["secrets"]]
        if obj["kind"] == "CustomResourceDefinition":
            (version,) = obj["spec"]["versions"]
            status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            condition_type = status["conditions"]["items"]["properties"]["type"]
            condition_type["enum"] = [t for t in condition_type["enum"] if t != "Scraped"]
        older.append(obj)
    return older


def test_upgrade_over_the_previous_release_keeps_monitors_and_their_status(install: Install, tmp_path: Path):
    cluster = install.cluster
    # The previous release's install, with the monitor as its operator left it: kopf's finalizer on it and
    # a random scrape token (this release derives it).
    current = yaml.safe_load_all(install.kubectl("kustomize", "manifests/"))
    older = tmp_path / "previous-release.yaml"
    older.write_text(yaml.safe_dump_all(previous_release([o for o in current if o])))
    install.kubectl("apply", "--validate=false", "-f", str(older))
    reconciled(install)
    cluster.stop_operator()
    install.kubectl(
        "patch",
        "flowmonitor",
        MONITOR,
        "-n",
        TEAM,
        "--type=merge",
        "-p",
        f'{{"metadata":{{"finalizers":["{FINALIZER}"]}}}}',
    )
    old_token = base64.b64encode(b"a-random-token-of-the-previous-release").decode()
    cluster.api.patch("v1", "Secret", f"flowmon-scrape-{MONITOR}", {"data": {"token": old_token}}, TEAM)
    before = cluster.monitor(MONITOR, TEAM)

    install.apply_manifests()  # the newer release over the older one
    cluster.start_operator()
    # kopf drops the finalizer no handler needs any more; the token becomes the derived one everywhere.
    cluster.wait(lambda: "finalizers" not in cluster.monitor(MONITOR, TEAM)["metadata"])
    cluster.wait(lambda: monitor_labels_secret(cluster)["data"]["token"] != old_token)
    token = base64.b64decode(monitor_labels_secret(cluster)["data"][builders.SCRAPE_TOKEN_KEY]).decode()
    cluster.wait(lambda: cluster.policy().monitor(TEAM, MONITOR).token_sha256 == [token_sha256(token)])
    after = cluster.monitor(MONITOR, TEAM)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"] == before["spec"]
    kept = ("observedGeneration", "agents", "predictedSeries")
    assert {k: after["status"][k] for k in kept} == {k: before["status"][k] for k in kept}
    ready = [c for c in after["status"]["conditions"] if c["type"] == "Ready"]
    assert ready == [c for c in before["status"]["conditions"] if c["type"] == "Ready"]
    # The newer RBAC replaced the older: the operator may no longer read Secrets outside its keys.
    role = cluster.api.get("rbac.authorization.k8s.io/v1", "ClusterRole", "flowmon-operator")
    assert all("get" not in r["verbs"] for r in role["rules"] if r["resources"] == ["secrets"])


def test_the_docs_give_the_commands_these_tests_run():
    docs = (REPO / "docs" / "operator.md").read_text()
    for command in (
        "kubectl apply -k manifests/",
        "kubectl create namespace shop",
        "kubectl apply -f examples/team-namespace.yaml",
        "kubectl delete flowmonitors --all --all-namespaces",
        "kubectl delete -k manifests/ --ignore-not-found",
        "kubectl apply -k manifests/prometheus-discovery/",
    ):
        assert command in docs, command
