"""The operator's pure builders: every rendered object validates against the Kubernetes and Prometheus
Operator schemas, and the objects agree with each other (selectors, ports, secret keys, hashes)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from flowmon_agent.aggregation import series
from flowmon_agent.runner import AgentSettings
from flowmon_contract.metrics import METRICS
from flowmon_contract.policy import AgentPolicy, policy_hash, token_sha256
from flowmon_contract.spec import Dimension, FlowMonitor
from flowmon_operator import builders
from flowmon_operator import pki as certs
from flowmon_operator.builders import (
    AGENT_CAPABILITIES,
    POLICY_HASH_ANNOTATION,
    build_agent_daemonset,
    build_agent_service,
    build_service_monitor,
    predicted_series,
)
from flowmon_operator.labels import MANAGED_BY_LABEL, MONITOR_NAME_LABEL, MONITOR_NAMESPACE_LABEL
from flowmon_operator.render import render_all
from flowmon_operator.settings import OperatorSettings
from tests import schemas

CA = certs.generate_ca("flowmon-test-ca")
SERVING = certs.issue_serving_cert(CA, OperatorSettings().agent_dns_names)


def monitor(name="web", namespace="shop", uid="uid-1", **spec) -> FlowMonitor:
    return FlowMonitor.model_validate(
        {"metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec}
    )


MONITOR_SETS = {
    "one default": [monitor()],
    "team and cluster-wide": [
        monitor(scrape={"interval": "30s", "serviceMonitorLabels": {"release": "kps"}}),
        monitor("all", "flowmon-system", "uid-2", metrics=["sent_bytes"], alerting={"enabled": False}),
    ],
    "no uid (offline render)": [monitor(uid=None)],
    "isolation": [
        monitor(
            alerting={
                "isolation": {
                    "environments": [
                        {"name": "staging", "namespaceSelector": {"matchLabels": {"env": "staging"}}},
                        {"name": "prod", "namespaceSelector": {"matchLabels": {"env": "prod"}}},
                    ],
                    "forbidden": [{"from": "staging", "to": "prod"}],
                }
            }
        )
    ],
}
SETTINGS = {
    "defaults": OperatorSettings(),
    "custom": OperatorSettings(
        operator_namespace="observability",
        agent_port=10443,
        agent_image="registry.example/flowmon/agent:1.2.3",
        priority_class_name="system-node-critical",
        max_unavailable="1",
    ),
}


def rendered(monitors, settings):
    return render_all(
        monitors,
        settings,
        token_for=lambda m: f"token-{m.key}",
        ca=CA,
        serving_cert=SERVING,
        admin_token="admin-token",
    )


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def decoded(secret, key):
    return base64.b64decode(secret["data"][key]).decode()


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("monitors", MONITOR_SETS.values(), ids=MONITOR_SETS.keys())
def test_every_rendered_object_validates(monitors, settings):
    objects = rendered(monitors, settings)
    assert objects
    for obj in objects:
        schemas.validate_any(obj)
        assert obj["metadata"]["labels"][MANAGED_BY_LABEL] == "flowmon-operator"
    names = [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects]
    assert len(set(names)) == len(names)


def test_no_monitors_no_objects():
    assert rendered([], OperatorSettings()) == []


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("monitors", MONITOR_SETS.values(), ids=MONITOR_SETS.keys())
def test_objects_agree_with_each_other(monitors, settings):
    objects = rendered(monitors, settings)
    (daemonset,) = by_kind(objects, "DaemonSet")
    (service,) = by_kind(objects, "Service")
    (configmap,) = by_kind(objects, "ConfigMap")
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in by_kind(objects, "Secret")}
    pod = daemonset["spec"]["template"]
    container = pod["spec"]["containers"][0]
    # the DaemonSet's selector picks its pods; the Service selects the same pods on the named port
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = container["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert port["containerPort"] == service["spec"]["ports"][0]["port"] == settings.agent_port
    # the policy in the ConfigMap is a valid AgentPolicy whose hash the DaemonSet records
    policy = AgentPolicy.model_validate_json(configmap["data"]["policy.json"])
    assert configmap["metadata"]["annotations"][POLICY_HASH_ANNOTATION] == policy_hash(policy)
    assert daemonset["metadata"]["annotations"][POLICY_HASH_ANNOTATION] == policy_hash(policy)
    assert [m.key for m in policy.monitors] == sorted(m.key for m in monitors)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == configmap["metadata"]["name"]
    for name in ("tls", "admin"):
        assert (settings.operator_namespace, volumes[name]["secret"]["secretName"]) in secrets
    for sm in by_kind(objects, "ServiceMonitor"):
        key = f"{sm['metadata']['namespace']}/{sm['metadata']['name'].removeprefix('flowmon-')}"
        (endpoint,) = sm["spec"]["endpoints"]
        # it selects the agent Service, in the operator namespace, on its port
        assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [settings.operator_namespace]}
        assert endpoint["port"] == service["spec"]["ports"][0]["name"]
        assert endpoint["path"] == f"/metrics/{key}"
        # its token and CA come from a Secret in its own namespace; the policy knows the token's hash
        credentials = endpoint["authorization"]["credentials"]
        secret = secrets[(sm["metadata"]["namespace"], credentials["name"])]
        token = decoded(secret, credentials["key"])
        assert token == f"token-{key}"
        assert policy.monitor(*key.split("/")).token_sha256 == [token_sha256(token)]
        ca_ref = endpoint["tlsConfig"]["ca"]["secret"]
        assert decoded(secrets[(sm["metadata"]["namespace"], ca_ref["name"])], ca_ref["key"]) == CA.cert_pem
        assert (
            endpoint["tlsConfig"]["serverName"]
            == f"{settings.agent_service_name}.{settings.operator_namespace}.svc"
        )


def test_serving_certificate_names_what_scrapers_verify():
    objects = rendered(MONITOR_SETS["one default"], OperatorSettings())
    (sm,) = by_kind(objects, "ServiceMonitor")
    server_name = sm["spec"]["endpoints"][0]["tlsConfig"]["serverName"]
    serving = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == "flowmon-agent-tls")
    assert server_name in certs.cert_dns_names(decoded(serving, "tls.crt"))
    assert decoded(serving, "ca.crt") == CA.cert_pem


# --- the DaemonSet --------------------------------------------------------------------------------------
def daemonset(settings=None, policy="a" * 64):
    return build_agent_daemonset(settings or OperatorSettings(), policy)


def test_policy_changes_do_not_restart_agents():
    """The hash is on the DaemonSet, not its pod template: a new policy changes no pod (it is pushed)."""
    first, second = daemonset(policy="a" * 64), daemonset(policy="b" * 64)
    assert first["spec"]["template"] == second["spec"]["template"]
    assert first["metadata"]["annotations"] != second["metadata"]["annotations"]
    assert POLICY_HASH_ANNOTATION not in json.dumps(first["spec"])


def test_least_privilege():
    pod = daemonset()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    assert not {"SYS_ADMIN", "SYSLOG", "SYS_RESOURCE", "SYS_PTRACE"} & set(AGENT_CAPABILITIES)
    assert security["seccompProfile"] == {"type": "Localhost", "localhostProfile": "flowmon/agent.json"}
    assert pod["hostNetwork"] is True and pod["hostPID"] is True and not pod.get("hostIPC")
    assert daemonset(OperatorSettings(agent_host_pid=False))["spec"]["template"]["spec"]["hostPID"] is False
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {
        "tracefs": "/sys/kernel/tracing",
        "modules": "/lib/modules",
        "usr-src": "/usr/src",
        "cgroup": "/sys/fs/cgroup",  # the sock_ops program's cgroup v2 root
        "seccomp": "/var/lib/kubelet/seccomp",  # the init container's only writable host path
    }
    assert all(mounts[name]["readOnly"] for name in host if name != "seccomp")
    assert "seccomp" not in mounts
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "tmp")
    assert not any("subPath" in m for m in container["volumeMounts"])  # ConfigMap updates reach the file


def test_an_init_container_installs_the_localhost_seccomp_profile():
    pod = daemonset()["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"]  # the profile travels in the agent image
    assert init["command"] == ["/usr/local/bin/flowmon-install-seccomp-profile", "/host/seccomp"]
    assert init["volumeMounts"] == [{"name": "seccomp", "mountPath": "/host/seccomp"}]
    security = init["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "seccomp"]
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"


@pytest.mark.parametrize("profile", ["RuntimeDefault", "Unconfined"])
def test_other_seccomp_choices_need_no_init_container(profile):
    pod = daemonset(OperatorSettings(agent_seccomp=profile))["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["seccompProfile"] == {"type": profile}
    assert "initContainers" not in pod and "seccomp" not in {v["name"] for v in pod["volumes"]}


def test_runs_everywhere_and_rolls_safely():
    ds = daemonset(OperatorSettings(max_unavailable="1"))
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "1", "maxSurge": 0},
    }
    resources = pod["containers"][0]["resources"]
    assert set(resources) == {"requests", "limits"} and set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize(
    ("probe", "path"),
    [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")],
)
def test_health_probes_over_https(probe, path):
    container = daemonset(OperatorSettings(agent_port=10443))["spec"]["template"]["spec"]["containers"][0]
    get = container[probe]["httpGet"]
    assert (get["path"], get["scheme"], get["port"]) == (path, "HTTPS", "https")
    assert container["ports"][0] == {"name": "https", "containerPort": 10443, "protocol": "TCP"}


def test_agent_environment():
    container = daemonset(OperatorSettings(agent_port=10443))["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    files = {n: e["value"] for n, e in env.items() if n.endswith("_FILE")}
    assert set(files) == {
        "FLOWMON_AGENT_POLICY_FILE",
        "FLOWMON_AGENT_TLS_CERT_FILE",
        "FLOWMON_AGENT_TLS_KEY_FILE",
        "FLOWMON_AGENT_ADMIN_TOKEN_FILE",
    }
    assert all(path.rsplit("/", 1)[0] in mounted for path in files.values())
    assert env["FLOWMON_AGENT_LISTEN_PORT"]["value"] == "10443"


def test_agent_environment_matches_the_agent_settings():
    """Every FLOWMON_AGENT_* variable is a field of the agent's settings (extra="forbid" there)."""
    from flowmon_agent.runner import AgentSettings

    container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert "args" not in container and "command" not in container  # the image runs python -m flowmon_agent
    for item in container["env"]:
        if item["name"].startswith("FLOWMON_AGENT_"):
            assert item["name"].removeprefix("FLOWMON_AGENT_").lower() in AgentSettings.model_fields


# --- ServiceMonitor and Secrets -------------------------------------------------------------------------
def test_service_monitor_belongs_to_its_monitor():
    m = monitor(
        scrape={"interval": "45s", "serviceMonitorLabels": {"release": "kps", MANAGED_BY_LABEL: "me"}}
    )
    sm = build_service_monitor(OperatorSettings(), m, "flowmon-scrape-web")
    meta = sm["metadata"]
    assert meta["namespace"] == "shop"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "flowmon.io/v1alpha1",
            "kind": "FlowMonitor",
            "name": "web",
            "uid": "uid-1",
            "controller": True,
        }
    ]
    # the user's labels are there, but cannot take over the ownership labels
    assert meta["labels"]["release"] == "kps" and meta["labels"][MANAGED_BY_LABEL] == "flowmon-operator"
    assert (meta["labels"][MONITOR_NAMESPACE_LABEL], meta["labels"][MONITOR_NAME_LABEL]) == ("shop", "web")
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["interval"] == "45s" and endpoint["scheme"] == "https"
    assert {"action": "replace", "targetLabel": "flowmon_monitor", "replacement": "shop/web"} in endpoint[
        "relabelings"
    ]
    schemas.validate_prometheus_operator(sm)


def test_shared_objects_have_no_owner_and_come_in_creation_order():
    objects = builders.build_shared_objects(OperatorSettings(), AgentPolicy())
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "DaemonSet"]
    assert not any("ownerReferences" in o["metadata"] for o in objects)
    for obj in objects:
        schemas.validate_k8s(obj)


def test_offline_children_have_no_owner_reference():
    assert (
        "ownerReferences"
        not in builders.build_scrape_secret(OperatorSettings(), monitor(uid=None), "t", "ca")["metadata"]
    )


# --- the validators catch what they should (so the validations above can fail) -----------------------
def broken(obj, path, value):
    node = obj
    *parents, last = path
    for part in parents:
        node = node[part]
    node[last] = value
    return obj


@pytest.mark.parametrize(
    ("make", "path", "value"),
    [
        (lambda: daemonset(), ("spec", "template", "spec", "hostNetwrk"), True),
        (
            lambda: daemonset(),
            ("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"),
            "9443",
        ),
        (lambda: build_agent_service(OperatorSettings()), ("spec", "ports", 0, "protocl"), "TCP"),
        (lambda: daemonset(), ("metadata", "labels", "bad label"), "x"),
        (
            lambda: build_service_monitor(OperatorSettings(), monitor(), "s"),
            ("spec", "endpoints", 0, "bearerTokenSecrets"),
            {},
        ),
        (
            lambda: build_service_monitor(OperatorSettings(), monitor(), "s"),
            ("spec", "endpoints", 0, "scheme"),
            "ftp",
        ),
        (
            lambda: build_service_monitor(OperatorSettings(), monitor(), "s"),
            ("metadata", "labels", "release"),
            "a b",
        ),
    ],
)
def test_validators_reject_broken_objects(make, path, value):
    with pytest.raises(schemas.SchemaError):
        schemas.validate_any(broken(make(), path, value))


# --- predicted series -----------------------------------------------------------------------------------
NS = {Dimension.CLIENT_NAMESPACE: 3, Dimension.SERVER_NAMESPACE: 4}
PREDICTIONS = [
    # (spec, cardinality, expected): label_sets x extra values x samples, summed over metrics
    ({"metrics": ["sent_bytes"], "aggregation": {"maxSeries": 100}}, None, 101),
    ({"metrics": ["sent_bytes", "received_bytes"], "aggregation": {"maxSeries": 100}}, None, 202),
    ({"metrics": ["connect_failures"], "aggregation": {"maxSeries": 10}}, None, 22),
    ({"metrics": ["retransmits", "resets"], "aggregation": {"maxSeries": 10}}, None, 44),
    ({"metrics": ["rtt"], "aggregation": {"maxSeries": 10}}, None, 11 * (9 + 3)),
    (
        {
            "metrics": ["connect_duration"],
            "aggregation": {"maxSeries": 1, "histogramBuckets": {"connectDuration": [1, 2]}},
        },
        None,
        2 * 5,
    ),
    (
        {
            "metrics": ["sent_bytes", "rtt"],
            "aggregation": {"maxSeries": 100, "groupBy": ["client_namespace", "server_namespace"]},
        },
        NS,
        12 + 12 * 12,
    ),
    # a dimension of unknown cardinality: the cap decides
    (
        {
            "metrics": ["sent_bytes"],
            "aggregation": {"maxSeries": 100, "groupBy": ["client_namespace", "service"]},
        },
        NS,
        101,
    ),
    # the product exceeds the cap: the cap decides
    (
        {
            "metrics": ["sent_bytes"],
            "aggregation": {"maxSeries": 5, "groupBy": ["client_namespace", "server_namespace"]},
        },
        NS,
        6,
    ),
    # the default spec: 9 TCP single-sample metrics (3 of them with two extra-label values), two
    # histograms (min_rtt, UDP and DNS are opt-in)
    ({}, None, 2001 * (5 + 1 + 2 * 3) + 2001 * (10 + 3) + 2001 * (9 + 3)),
    ({"metrics": ["udp_sent_bytes", "udp_received_datagrams"], "aggregation": {"maxSeries": 10}}, None, 22),
    ({"metrics": ["min_rtt", "syn_retransmits"], "aggregation": {"maxSeries": 10}}, None, 11 * (9 + 3) + 11),
]


@pytest.mark.parametrize(("spec", "cardinality", "expected"), PREDICTIONS)
def test_predicted_series(spec, cardinality, expected):
    assert predicted_series(monitor(**spec), cardinality=cardinality) == expected


def test_extra_label_values_match_the_aggregation():
    for metric, values in series.EXTRA_LABEL_COUNTERS.items():
        assert builders.EXTRA_LABEL_VALUES[METRICS[metric].extra_label] == len(values)
    assert {m.extra_label for m in METRICS.values() if m.extra_label} == set(builders.EXTRA_LABEL_VALUES)


@pytest.mark.parametrize(
    "spec",
    [
        {"aggregation": {"maxSeries": 5, "groupBy": ["client_workload", "server_workload", "server_port"]}},
        {"metrics": ["rtt", "resets"], "aggregation": {"maxSeries": 3, "groupBy": ["server_port"]}},
        {
            "metrics": ["connect_duration", "connect_failures"],
            "aggregation": {
                "maxSeries": 40,
                "groupBy": ["client_workload", "server_workload"],
                "histogramBuckets": {"connectDuration": [0.001, 1]},
            },
        },
    ],
    ids=["saturated", "two metrics", "under the cap"],
)
def test_predicted_series_bounds_what_an_agent_exports(spec):
    """The real aggregation and exposition, fed more flows than the cap allows: the samples on the
    monitor's path never exceed the prediction, and reach it exactly once the cap overflows."""
    from ipaddress import ip_address

    from flowmon_agent.aggregation.aggregator import Aggregator
    from flowmon_agent.export.collectors import render_monitor, text_exposition
    from flowmon_agent.kernel.counters import WIDTH, FlowCounters
    from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, Reporter
    from flowmon_agent.metadata import MetadataStore, Resolver
    from flowmon_contract.policy import compile_policy
    from tests.k8s_objects import namespace, node, owner, pod, rs

    store = MetadataStore()
    for obj in (
        namespace("shop"),
        node("n1", "192.0.2.1"),
        rs("shop", "web-1", "web"),
        rs("shop", "api-1", "api"),
        pod("shop", "web-1-a", "10.0.0.1", "n1", [owner("ReplicaSet", "web-1")]),
        pod("shop", "api-1-a", "10.0.0.2", "n1", [owner("ReplicaSet", "api-1")]),
    ):
        store.apply("ADDED", obj)
    mon = monitor("all", "flowmon-system", **spec)
    policy = compile_policy([mon])

    def busy() -> FlowCounters:  # every counter and histogram non-zero: every family has every row
        return FlowCounters([1] * WIDTH)  # opened == closed: no connection open now

    flows = {
        FlowKey(ip_address("10.0.0.1"), ip_address("10.0.0.2"), port, Reporter.CLIENT): busy()
        for port in range(1000, 1060)  # 60 server ports: more label sets than any cap above
    }
    view = Aggregator("n1", ["n1"]).build_view(
        FlowSnapshot(flows=flows, dropped={}, kernel_path="default", monotonic_time=0.0),
        policy,
        Resolver(store),
        0.0,
    )
    text = text_exposition(render_monitor(view.monitors[mon.key])).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    predicted = predicted_series(mon)
    assert 0 < len(samples) <= predicted
    if "server_port" in mon.spec.aggregation.group_by:  # 60 label sets: beyond every cap above
        assert len(samples) == predicted
    else:  # one workload pair: one label set per metric, far below the cap
        assert predicted_series(mon, cardinality=dict.fromkeys(mon.spec.aggregation.group_by, 1)) == len(
            samples
        )


@pytest.mark.parametrize(
    ("readers", "env"),
    [
        ([], {}),
        (
            ["monitoring/prometheus-k8s", "shop/prom"],
            {
                "FLOWMON_AGENT_TOKEN_REVIEW": "true",
                "FLOWMON_AGENT_TOKEN_REVIEW_READERS": json.dumps(
                    ["system:serviceaccount:monitoring:prometheus-k8s", "system:serviceaccount:shop:prom"]
                ),
            },
        ),
    ],
)
def test_token_review_readers_turn_token_review_on_in_the_agents(readers, env, monkeypatch):
    daemonset = builders.build_agent_daemonset(OperatorSettings(token_review_readers=readers), "h")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    got = {e["name"]: e["value"] for e in container["env"] if "TOKEN_REVIEW" in e["name"]}
    assert got == env
    for name, value in got.items():  # the agent reads them back as its settings
        monkeypatch.setenv(name, value)
    agent = AgentSettings()
    assert (agent.token_review, agent.token_review_readers) == (
        bool(readers),
        json.loads(env.get("FLOWMON_AGENT_TOKEN_REVIEW_READERS", "[]")),
    )


@pytest.mark.parametrize("bad", ["prometheus", "Mon/p", "a/b/c", "/p"])
def test_token_review_readers_are_namespace_slash_name(bad):
    with pytest.raises(ValueError):
        OperatorSettings(token_review_readers=[bad])


# cert-manager.io/v1 Certificate, as documented at https://cert-manager.io/docs/usage/certificate/ (there is
# no CRD schema in ../shared): spec.secretName and spec.issuerRef.name are required; these are the fields
# and values we set.
CERTIFICATE_SPEC_FIELDS = {
    "secretName",
    "secretTemplate",
    "commonName",
    "dnsNames",
    "duration",
    "renewBefore",
    "privateKey",
    "usages",
    "issuerRef",
}
CERTIFICATE_USAGES = {"server auth", "client auth", "digital signature", "key encipherment", "signing"}
GO_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"


@pytest.mark.parametrize(
    "issuer, kind, name",
    [("Issuer/flowmon-ca", "Issuer", "flowmon-ca"), ("ClusterIssuer/corp.ca", "ClusterIssuer", "corp.ca")],
)
def test_serving_certificate_for_cert_manager(issuer, kind, name):
    settings = OperatorSettings(cert_manager_issuer=issuer)
    cert = builders.build_serving_certificate(settings)
    assert (cert["apiVersion"], cert["kind"]) == ("cert-manager.io/v1", "Certificate")
    assert cert["metadata"]["namespace"] == settings.operator_namespace
    spec = cert["spec"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS
    # the Secret the DaemonSet mounts, the names scrapers and the push verify, from the chosen issuer
    assert spec["secretName"] == settings.serving_cert_secret_name
    (daemonset,) = [
        o
        for o in render_all(
            [FlowMonitor.model_validate({"metadata": {"name": "w", "namespace": "a"}})], settings
        )
        if o["kind"] == "DaemonSet"
    ]
    mounted = {
        v["secret"]["secretName"] for v in daemonset["spec"]["template"]["spec"]["volumes"] if "secret" in v
    }
    assert spec["secretName"] in mounted
    assert spec["dnsNames"] == settings.agent_dns_names
    assert settings.agent_service_dns in spec["dnsNames"]
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": kind, "name": name}
    assert "server auth" in spec["usages"] and set(spec["usages"]) <= CERTIFICATE_USAGES
    assert re.match(GO_DURATION, spec["duration"]) and re.match(GO_DURATION, spec["renewBefore"])
    hours = {k: int(spec[k].removesuffix("h")) for k in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]
    assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA", "Ed25519"}
    schemas._check_metadata(cert)


@pytest.mark.parametrize("issuer", ["Issuer", "Issuer/", "Secret/x", "ClusterIssuer/UPPER", "Issuer/a/b"])
def test_cert_manager_issuer_setting_is_checked(issuer):
    with pytest.raises(ValueError):
        OperatorSettings(cert_manager_issuer=issuer)


def test_without_cert_manager_there_is_no_certificate():
    assert OperatorSettings().cert_manager_issuer_ref is None
    with pytest.raises(ValueError):
        builders.build_serving_certificate(OperatorSettings())


def test_render_with_cert_manager_swaps_the_pki_secrets_for_a_certificate():
    settings = OperatorSettings(cert_manager_issuer="ClusterIssuer/corp")
    monitor = FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": "shop"}})
    issuer_ca = certs.generate_ca("corp")
    objects = render_all([monitor], settings, ca=issuer_ca, token_for=lambda _m: "t")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert ("Certificate", settings.serving_cert_secret_name) in kinds
    assert ("Secret", settings.ca_secret_name) not in kinds
    assert ("Secret", settings.serving_cert_secret_name) not in kinds
    (scrape,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["namespace"] == "shop"]
    assert base64.b64decode(scrape["data"][builders.CA_KEY]).decode() == issuer_ca.cert_pem
    for obj in objects:
        if obj["kind"] != "Certificate":
            schemas.validate_any(obj)
