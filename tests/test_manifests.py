"""manifests/ (the kustomize base), the container images and the agent's kernel-header discovery.

Every manifest validates against the Kubernetes schemas; RBAC grants exactly what the operator and the
agents use (derived from what the builders render and what the agent's metadata watcher lists); with
KUBECONFIG set, a real API server accepts everything in a server-side dry run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from flowmon_agent.metadata.watcher import RESOURCES
from flowmon_contract.spec import FlowMonitor
from flowmon_operator.labels import MONITOR_NAME_LABEL
from flowmon_operator.render import render_all
from flowmon_operator.settings import OperatorSettings
from tests import schemas

REPO = schemas.REPO
MANIFESTS = REPO / "manifests"
SETTINGS = OperatorSettings()
NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "FlowMonitor"}
CLUSTER_KINDS = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def kustomize_build(directory: Path) -> list[dict]:
    """What `kubectl apply -k DIR` would send: the real kustomize of kubectl, never a re-implementation."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)}: {built.stderr}"
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


KUSTOMIZATIONS = sorted(
    p.parent for p in REPO.rglob("kustomization.yaml") if not {".venv", ".git"} & set(p.parts)
)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_kustomization_builds_with_real_kustomize(directory: Path) -> None:
    objects = kustomize_build(directory)
    assert objects
    for obj in objects:
        schemas.validate_k8s(obj)


OBJECTS = kustomize_build(MANIFESTS)
BASE = MANIFESTS / "base"
TOKEN_REVIEW = MANIFESTS / "token-review"  # the overlay that lets agents use TokenReview
CERT_MANAGER = MANIFESTS / "cert-manager"  # the overlay that takes the serving certificate from cert-manager


def find(kind: str, name: str, objects: list[dict] = OBJECTS) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_manifest_validates(obj):
    schemas.validate_k8s(obj)


def test_the_base_holds_what_installs_flowmon():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in OBJECTS)
    assert kinds == sorted(
        [
            ("Namespace", "flowmon-system"),
            ("CustomResourceDefinition", "flowmonitors.flowmon.io"),
            ("ServiceAccount", "flowmon-operator"),
            ("ClusterRole", "flowmon-operator"),
            ("ClusterRoleBinding", "flowmon-operator"),
            ("Role", "flowmon-operator"),
            ("RoleBinding", "flowmon-operator"),
            ("Deployment", "flowmon-operator"),
            ("ServiceAccount", "flowmon-agent"),
            ("ClusterRole", "flowmon-agent"),
            ("ClusterRoleBinding", "flowmon-agent"),
            ("ClusterRole", "flowmon-flowmonitors-edit"),
            ("ClusterRole", "flowmon-flowmonitors-view"),
        ]
    )
    assert kustomize_build(BASE) == OBJECTS
    assert find("CustomResourceDefinition", "flowmonitors.flowmon.io") == schemas.load_crd(
        schemas.FLOWMON_CRD
    )


def test_files_apply_without_kustomize_too():
    """Every namespaced object names its namespace itself, so the namespace transformer changes nothing
    (and `kubectl apply -f manifests/` would work as well)."""
    for path in BASE.glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            if obj["kind"] not in CLUSTER_KINDS:
                assert obj["metadata"].get("namespace") == SETTINGS.operator_namespace, (
                    path.name,
                    obj["kind"],
                )


# --- RBAC: an evaluator, then what each identity needs --------------------------------------------------
def allowed(
    account: str,
    group: str,
    resource: str,
    verb: str,
    namespace: str | None,
    objects: list[dict] = OBJECTS,
    *,
    name: str | None = None,
) -> bool:
    """Whether the ServiceAccount may do `verb` on `resource` in `namespace` (None: cluster-wide), on the
    object `name` (None: a request without a name, as list or POST; rules with resourceNames never match
    it). A namespace's own object counts as in that namespace, as kube-apiserver authorizes it."""
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        ref = binding["roleRef"]
        role = find(ref["kind"], ref["name"], objects)
        for rule in role["rules"]:
            names = rule.get("resourceNames")
            if names is not None and name not in names:
                continue
            if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
                return True
    return False


def granted(account: str, objects: list[dict] = OBJECTS) -> set[tuple[str, str, str]]:
    out = set()
    for binding in objects:
        if binding["kind"] in ("ClusterRoleBinding", "RoleBinding") and any(
            s["name"] == account for s in binding["subjects"]
        ):
            role = find(binding["roleRef"]["kind"], binding["roleRef"]["name"], objects)
            for rule in role["rules"]:
                out |= {
                    (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                }
    return out


def test_no_wildcards_anywhere():
    for obj in OBJECTS:
        for rule in obj.get("rules", []):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (obj["metadata"]["name"], rule)
            assert "resourceNames" not in rule or rule["resourceNames"]


PLURALS = {
    "ConfigMap": ("", "configmaps"),
    "Secret": ("", "secrets"),
    "Service": ("", "services"),
    "DaemonSet": ("apps", "daemonsets"),
    "ServiceMonitor": ("monitoring.coreos.com", "servicemonitors"),
    "PrometheusRule": ("monitoring.coreos.com", "prometheusrules"),
    "Certificate": ("cert-manager.io", "certificates"),
}
Need = tuple[str, str, str, str | None, str | None]  # group, resource, verb, namespace, name


def writes(obj: dict) -> set[Need]:
    """How the operator writes an object it renders. Server-side apply = patch by name, and create when
    absent; nothing is listed. A monitor's children are written blind (their names and the scrape token are
    derived) and go with the monitor (garbage collection; the PrometheusRule deleted by name when alerting
    is off). Shared objects are also read by name; the operator's keys are read by name, the CA and admin
    token created once (POST: no name), a broken CA deleted by name. The Certificate is applied only."""
    group, plural = PLURALS[obj["kind"]]
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if MONITOR_NAME_LABEL in obj["metadata"]["labels"]:
        verbs = {"create": None, "patch": name, "delete": name}
    elif obj["kind"] == "Certificate":
        verbs = {"create": None, "patch": name}
    else:
        verbs = {"get": name, "create": None, "patch": name, "delete": name}
    return {(group, plural, verb, ns, named) for verb, named in verbs.items()}


def operator_needs(settings: OperatorSettings = SETTINGS) -> set[Need]:
    """Everything the operator does; derived from what the builders render for monitors in two
    namespaces, plus kopf's and the reconciler's reads."""
    monitors = [
        FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": ns, "uid": "u"}})
        for ns in ("shop", SETTINGS.operator_namespace)
    ]
    needs: set[Need] = set()
    for obj in render_all(monitors, settings, token_for=lambda _m: "t"):
        needs |= writes(obj)
    own = SETTINGS.operator_namespace
    needs |= {("flowmon.io", "flowmonitors", v, None, None) for v in ("get", "list", "watch", "patch")}
    needs |= {("flowmon.io", "flowmonitors/status", v, None, None) for v in ("get", "patch")}
    needs |= {("", "pods", v, own, None) for v in ("get", "list", "watch")}
    needs.add(("", "namespaces", "get", own, own))  # is its namespace being deleted?
    needs |= {(g, "events", v, "shop", None) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    return needs


def operator_may(need: Need, objects: list[dict] = OBJECTS) -> bool:
    group, resource, verb, namespace, name = need
    return allowed("flowmon-operator", group, resource, verb, namespace, objects, name=name)


# Granted beyond operator_needs(), on purpose: kopf watches CRDs to notice its resource (read-only).
OPERATOR_EXTRAS = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}


def test_operator_may_do_what_it_does():
    missing = [n for n in operator_needs() if not operator_may(n)]
    assert missing == []


def test_operator_reads_no_secret_but_its_own_keys():
    """No cluster-wide get/list/watch of Secrets; in its namespace, its three keys by name."""
    own = SETTINGS.operator_namespace
    for namespace in ("shop", own, None):
        for verb in ("get", "list", "watch"):
            assert not allowed("flowmon-operator", "", "secrets", verb, namespace), (verb, namespace)
    keys = (SETTINGS.ca_secret_name, SETTINGS.serving_cert_secret_name, SETTINGS.admin_token_secret_name)
    assert all(allowed("flowmon-operator", "", "secrets", "get", own, name=key) for key in keys)
    assert not allowed("flowmon-operator", "", "secrets", "get", own, name="someone-elses")
    assert not allowed("flowmon-operator", "", "secrets", "get", "shop", name=SETTINGS.ca_secret_name)


def test_operator_may_do_nothing_else():
    needed = {(g, r, v) for g, r, v, _, _ in operator_needs()} | OPERATOR_EXTRAS
    assert granted("flowmon-operator") - needed == set()
    # the agent objects are written in the operator's namespace only
    assert not allowed("flowmon-operator", "apps", "daemonsets", "create", "shop")
    assert not allowed("flowmon-operator", "", "configmaps", "patch", "shop")
    assert not allowed("flowmon-operator", "", "pods", "list", "shop")


def agent_needs(settings: OperatorSettings) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the agents use: the metadata watcher's lists and watches, plus TokenReview
    when the DaemonSet the operator renders with these settings turns it on."""
    needs = set()
    for resource in RESOURCES:
        match = re.fullmatch(r"/api/v1/(\w+)|/apis/([\w.]+)/v1/(\w+)", resource.path)
        assert match, resource.path
        group, plural = ("", match[1]) if match[1] else (match[2], match[3])
        needs |= {(group, plural, verb) for verb in ("list", "watch")}
    monitors = [FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": "shop", "uid": "u"}})]
    (daemonset,) = [
        o for o in render_all(monitors, settings, token_for=lambda _m: "t") if o["kind"] == "DaemonSet"
    ]
    env = {e["name"]: e.get("value") for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env.get("FLOWMON_AGENT_TOKEN_REVIEW") == "true":
        needs.add(("authentication.k8s.io", "tokenreviews", "create"))
    return needs


def test_agent_may_read_the_metadata_it_watches_and_nothing_more():
    needs = agent_needs(SETTINGS)
    assert all(allowed("flowmon-agent", g, r, v, None) for g, r, v in needs)
    # get is granted with list/watch (harmless, read-only); no writes, no secrets, no TokenReview
    assert {(g, r) for g, r, _ in granted("flowmon-agent")} == {(g, r) for g, r, _ in needs}
    assert {v for _, _, v in granted("flowmon-agent")} == {"get", "list", "watch"}


def operator_settings_of(objects: list[dict], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """The settings the operator Deployment's env gives (plain values; fieldRefs keep their defaults)."""
    (container,) = find("Deployment", "flowmon-operator", objects)["spec"]["template"]["spec"]["containers"]
    for item in container["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    return OperatorSettings()


def test_token_review_overlay_grants_the_agents_tokenreviews_and_turns_it_on(monkeypatch):
    overlay = kustomize_build(TOKEN_REVIEW)
    for obj in overlay:
        schemas.validate_k8s(obj)
    settings = operator_settings_of(overlay, monkeypatch)
    assert settings.token_review_readers == ["monitoring/prometheus-k8s"]
    needs = agent_needs(settings)
    assert ("authentication.k8s.io", "tokenreviews", "create") in needs
    assert all(allowed("flowmon-agent", g, r, v, None, overlay) for g, r, v in needs)
    extra = granted("flowmon-agent", overlay) - granted("flowmon-agent")
    assert extra == {("authentication.k8s.io", "tokenreviews", "create")}
    assert granted("flowmon-operator", overlay) == granted("flowmon-operator")
    # The base turns nothing on: its agents never call TokenReview, so they may not.
    (base,) = find("Deployment", "flowmon-operator")["spec"]["template"]["spec"]["containers"]
    assert "FLOWMON_TOKEN_REVIEW_READERS" not in {e["name"] for e in base["env"]}
    assert ("authentication.k8s.io", "tokenreviews", "create") not in agent_needs(SETTINGS)


def test_cert_manager_overlay_grants_the_operator_certificates_and_turns_it_on(monkeypatch):
    overlay = kustomize_build(CERT_MANAGER)
    for obj in overlay:
        schemas.validate_k8s(obj)
    settings = operator_settings_of(overlay, monkeypatch)
    assert settings.cert_manager_issuer_ref == {
        "group": "cert-manager.io",
        "kind": "ClusterIssuer",
        "name": "flowmon-ca",
    }
    needs = operator_needs(settings)
    missing = [n for n in needs if not operator_may(n, overlay)]
    assert missing == []
    extra = granted("flowmon-operator", overlay) - granted("flowmon-operator")
    assert extra == {("cert-manager.io", "certificates", v) for v in ("create", "patch")}
    assert not allowed("flowmon-operator", "cert-manager.io", "certificates", "create", "shop", overlay)
    assert granted("flowmon-agent", overlay) == granted("flowmon-agent")
    # The base issues its own certificate: no Certificate rendered, none may be written.
    assert not any(n[0] == "cert-manager.io" for n in operator_needs())
    assert not allowed(
        "flowmon-operator", "cert-manager.io", "certificates", "get", SETTINGS.operator_namespace
    )


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def aggregated_into(builtin: str, objects: list[dict] = OBJECTS) -> set[tuple[str, str, str]]:
    """What the base adds to a built-in role (admin, edit, view) through ClusterRole aggregation labels."""
    out = set()
    for role in objects:
        if (
            role["kind"] == "ClusterRole"
            and role["metadata"].get("labels", {}).get(AGGREGATE + builtin) == "true"
        ):
            for rule in role["rules"]:
                out |= {
                    (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                }
    return out


def test_namespace_admins_and_editors_manage_flowmonitors_and_viewers_read_them():
    writes = {"create", "delete", "deletecollection", "patch", "update"}
    reads = {"get", "list", "watch"}
    for builtin in ("admin", "edit"):
        assert aggregated_into(builtin) == {("flowmon.io", "flowmonitors", v) for v in writes | reads} | {
            ("flowmon.io", "flowmonitors/status", v) for v in reads
        }
    assert aggregated_into("view") == {
        ("flowmon.io", r, v) for r in ("flowmonitors", "flowmonitors/status") for v in reads
    }


def test_prometheus_discovery_overlay_grants_reading_endpoints_in_flowmon_system_only():
    overlay = kustomize_build(MANIFESTS / "prometheus-discovery")
    (binding,) = [
        o for o in overlay if o["kind"] == "RoleBinding" and o["metadata"]["name"].endswith("discovery")
    ]
    assert binding["metadata"]["namespace"] == SETTINGS.operator_namespace
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "prometheus-k8s", "namespace": "monitoring"}
    ]
    account = binding["subjects"][0]["name"]
    assert granted(account, overlay) == {
        *(("", r, v) for r in ("services", "endpoints", "pods") for v in ("get", "list", "watch")),
        *(("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")),
    }
    assert not allowed(account, "", "pods", "list", None, overlay)  # namespaced, never cluster-wide
    assert sorted(o["kind"] for o in overlay if o not in OBJECTS) == ["Role", "RoleBinding"]


def test_kind_config_mounts_the_host_kernel_headers():
    config = yaml.safe_load((REPO / "docs" / "kind-cluster.yaml").read_text())
    (node,) = config["nodes"]
    mounts = {(m["hostPath"], m["containerPath"], m["readOnly"]) for m in node["extraMounts"]}
    assert mounts == {("/lib/modules", "/lib/modules", True), ("/usr/src", "/usr/src", True)}
    assert "--config docs/kind-cluster.yaml" in (REPO / "docs" / "operator.md").read_text()


def test_service_accounts_match_the_operator_settings():
    assert find("Namespace", SETTINGS.operator_namespace)
    assert find("ServiceAccount", SETTINGS.agent_service_account)
    for binding in (o for o in OBJECTS if o["kind"].endswith("RoleBinding")):
        for subject in binding["subjects"]:
            assert find("ServiceAccount", subject["name"])["metadata"]["namespace"] == subject["namespace"]


def test_operator_deployment():
    deployment = find("Deployment", "flowmon-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "flowmon-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["FLOWMON_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert set(env) <= {f"FLOWMON_{name.upper()}" for name in OperatorSettings.model_fields}
    assert container["image"] == "flowmon/operator:0.1.0"
    # the image's entrypoint is `python -m flowmon_operator`: the args are its command line, and the probe
    # asks kopf's liveness endpoint where --liveness serves it
    from flowmon_operator.main import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(container["args"])
    assert args.all_namespaces and not args.namespace
    url = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S*)", args.liveness)
    probe = container["livenessProbe"]["httpGet"]
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert (port["containerPort"], probe["path"]) == (int(url[1]), url[2])
    assert not pod.get("hostNetwork") and not any("hostPath" in v for v in pod.get("volumes", []))


def test_real_cluster_or_schemas_accept_everything():
    """With KUBECONFIG set: a server-side dry run on that cluster, where `kubectl apply -k manifests/`
    ran before (the namespace and CRD exist) and the Prometheus Operator CRDs are installed.
    Without: the schema validators."""
    monitors = [FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": "default"}})]
    rendered = render_all(monitors, SETTINGS, token_for=lambda _m: "t")
    if not os.environ.get("KUBECONFIG"):
        for obj in [*OBJECTS, *rendered]:
            schemas.validate_any(obj)
        return
    from kubernetes import client, config, dynamic

    config.load_kube_config()
    api = dynamic.DynamicClient(client.ApiClient())
    for obj in [*OBJECTS, *rendered]:
        resource = api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        namespace = obj["metadata"].get("namespace")
        api.server_side_apply(
            resource,
            body=obj,
            namespace=namespace,
            field_manager="flowmon-test",
            dry_run="All",
            force_conflicts=True,
        )


def test_docs_explain_install_and_kind():
    docs = (REPO / "docs" / "operator.md").read_text()
    for phrase in (
        "kubectl apply -k manifests/",
        "kind create cluster",
        "kind load image-archive",
        "KUBECONFIG",
    ):
        assert phrase in docs


def test_the_documented_discovery_patch_binds_another_prometheus(tmp_path: Path):
    """docs/operator.md's kustomization for a Prometheus with another ServiceAccount builds as written."""
    docs = (REPO / "docs" / "operator.md").read_text()
    block = docs.split("For another ServiceAccount", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    checkout = os.path.relpath(REPO, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(block.replace("../flowmon/", f"{checkout}/"))
    built = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    overlay = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    (binding,) = [
        o
        for o in overlay
        if o["metadata"]["name"] == "flowmon-prometheus-discovery" and o["kind"] == "RoleBinding"
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kube-prometheus-stack-prometheus", "namespace": "monitoring"}
    ]
    assert granted("kube-prometheus-stack-prometheus", overlay) == granted(
        "prometheus-k8s", kustomize_build(MANIFESTS / "prometheus-discovery")
    )
