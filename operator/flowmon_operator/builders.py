"""Pure builders: settings + FlowMonitors + policy → the Kubernetes objects the operator creates.

Dicts in, dicts out, no I/O: the kopf handlers create/patch what these return, `flowmon render` prints
it, tests validate it against the Kubernetes and Prometheus Operator schemas.

Shared objects (one set for all monitors, in the operator namespace): the agent DaemonSet, its Service,
the policy ConfigMap, and the CA / serving-certificate / admin-token Secrets. Per monitor, in the
monitor's namespace: a ServiceMonitor and a scrape-token Secret, both owned by the FlowMonitor. Objects
in other namespaces cannot carry ownerReferences to a FlowMonitor; every object carries the managed-by
label and, per monitor, the monitor's namespace/name labels, so the handlers can find and delete them.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping

from flowmon_contract.metrics import (
    DNS_LATENCY_BUCKETS,
    DNS_QTYPE_VALUES,
    DNS_RCODE_VALUES,
    METRICS,
    FamilyType,
)
from flowmon_contract.policy import AgentPolicy, canonical_json, policy_hash
from flowmon_contract.spec import DNS_METRICS, Dimension, FlowMonitor, Metric
from flowmon_operator.labels import managed_labels, monitor_labels, owned_by
from flowmon_operator.pki import KeyPair
from flowmon_operator.rules import monitor_relabeling
from flowmon_operator.settings import OperatorSettings

POLICY_HASH_ANNOTATION = "flowmon.io/policy-hash"

POLICY_FILE = "policy.json"
PORT_NAME = "https"
# Where the agent container finds its inputs (the agent reads them via FLOWMON_AGENT_* settings).
POLICY_DIR = "/etc/flowmon/policy"
TLS_DIR = "/etc/flowmon/tls"
ADMIN_DIR = "/etc/flowmon/admin"
ADMIN_TOKEN_KEY = "token"
SCRAPE_TOKEN_KEY = "token"
CA_KEY = "ca.crt"


# --- names ---------------------------------------------------------------------------------------------
def scrape_secret_name(settings: OperatorSettings, monitor: FlowMonitor) -> str:
    return f"{settings.scrape_secret_prefix}{monitor.metadata.name}"


def service_monitor_name(settings: OperatorSettings, monitor: FlowMonitor) -> str:
    return f"{settings.service_monitor_prefix}{monitor.metadata.name}"


def metrics_path(monitor: FlowMonitor) -> str:
    return f"/metrics/{monitor.metadata.namespace}/{monitor.metadata.name}"


def _meta(name: str, namespace: str, labels: dict, **extra) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels, **extra}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- the agent DaemonSet ---------------------------------------------------------------------------------
# Capabilities the agent needs, and nothing else — measured by running the image under runc with each
# one taken away (docs/operator.md, "Least privilege"); Linux >= 5.11 (CAP_BPF/CAP_PERFMON from 5.8, BPF
# memory charged to the cgroup rather than RLIMIT_MEMLOCK from 5.11):
AGENT_CAPABILITIES = (
    "BPF",  # bpf(): load the tracepoint programs, create and read the flow maps
    "PERFMON",  # perf_event_open() to attach to tracepoints; tracing programs' kernel memory reads
    "NET_ADMIN",  # conntrack netlink dumps of the host netns: undo Service NAT (ClusterIP -> backend)
)
# Not granted: SYS_ADMIN (tracepoints need only BPF+PERFMON; tracefs files are root-owned and the agent
# runs as uid 0, so plain DAC reads them), SYSLOG (raw tracepoints are found by attaching one, not in
# /proc/kallsyms), SYS_RESOURCE (no RLIMIT_MEMLOCK for BPF maps since 5.11), SYS_MODULE (no `modprobe
# kheaders`: the image carries a generic header tree), SYS_PTRACE (IPs, not PIDs, attribute flows).

HOST_MOUNTS = (
    # (volume name, host path, mount path): all read-only. BTF is not needed (the programs read only
    # tracepoint arguments; measured: they load with /sys/kernel/btf hidden).
    ("tracefs", "/sys/kernel/tracing", "/sys/kernel/tracing"),  # tracepoint ids for attachment
    ("modules", "/lib/modules", "/lib/modules"),  # the node's own headers, used when complete
    ("usr-src", "/usr/src", "/usr/src"),  # where distributions put the headers `build` links to
)
# Kubelet reads Localhost seccomp profiles relative to its seccomp directory.
SECCOMP_PROFILE = "flowmon/agent.json"
SECCOMP_MOUNT = "/host/seccomp"  # where the init container sees the node's kubelet_seccomp_dir
# /sys/fs/bpf is not mounted: the agent pins nothing, its maps live and die with the process.


def _probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": PORT_NAME, "scheme": "HTTPS"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _from_field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _agent_env(settings: OperatorSettings) -> list[dict]:
    token_review = []
    if settings.token_review_readers:  # the agents' RBAC must then allow tokenreviews: create
        token_review = [
            {"name": "FLOWMON_AGENT_TOKEN_REVIEW", "value": "true"},
            {
                "name": "FLOWMON_AGENT_TOKEN_REVIEW_READERS",
                "value": json.dumps(settings.token_review_usernames),
            },
        ]
    return [
        _from_field("NODE_NAME", "spec.nodeName"),
        _from_field("POD_IP", "status.podIP"),
        {"name": "FLOWMON_AGENT_NODE_NAME", "value": "$(NODE_NAME)"},
        # With hostNetwork the pod IP is the node's IP: listen there, not on every host interface.
        {"name": "FLOWMON_AGENT_LISTEN_HOST", "value": "$(POD_IP)"},
        {"name": "FLOWMON_AGENT_LISTEN_PORT", "value": str(settings.agent_port)},
        {"name": "FLOWMON_AGENT_POLICY_FILE", "value": f"{POLICY_DIR}/{POLICY_FILE}"},
        {"name": "FLOWMON_AGENT_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"},
        {"name": "FLOWMON_AGENT_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"},
        {"name": "FLOWMON_AGENT_ADMIN_TOKEN_FILE", "value": f"{ADMIN_DIR}/{ADMIN_TOKEN_KEY}"},
        *token_review,
    ]


def _agent_volumes(settings: OperatorSettings) -> tuple[list[dict], list[dict]]:
    volumes = [
        # The whole directory, never subPath: kubelet then refreshes the file when the ConfigMap changes.
        {"name": "policy", "configMap": {"name": settings.configmap_name}},
        {"name": "tls", "secret": {"secretName": settings.serving_cert_secret_name, "defaultMode": 0o400}},
        {"name": "admin", "secret": {"secretName": settings.admin_token_secret_name, "defaultMode": 0o400}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},  # BCC's scratch files; the root fs is read-only
    ]
    mounts = [
        {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "admin", "mountPath": ADMIN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for name, host, path in HOST_MOUNTS:
        volumes.append({"name": name, "hostPath": {"path": host}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def _agent_seccomp(settings: OperatorSettings) -> dict:
    """Most runtimes' default profiles (CRI-O's, podman's, containerd's before 1.6.9) allow bpf() and
    perf_event_open() only to CAP_SYS_ADMIN; the Localhost profile is that default plus those two."""
    if settings.agent_seccomp == "Localhost":
        return {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}
    return {"type": settings.agent_seccomp}


def _seccomp_installer(settings: OperatorSettings) -> dict:
    """The init container that puts the agent's seccomp profile (carried in the agent image) where kubelet
    looks for it, before kubelet creates the agent container with it. No capabilities: uid 0 owns the
    directory; it writes nothing else."""
    return {
        "name": "seccomp-profile",
        "image": settings.agent_image,
        "imagePullPolicy": settings.agent_image_pull_policy,
        "command": ["/usr/local/bin/flowmon-install-seccomp-profile", SECCOMP_MOUNT],
        "volumeMounts": [{"name": "seccomp", "mountPath": SECCOMP_MOUNT}],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def build_agent_daemonset(settings: OperatorSettings, policy_hash: str) -> dict:
    """The one agent DaemonSet shared by every FlowMonitor. `policy_hash` is recorded on the DaemonSet
    only, never on the pod template: policy changes are pushed to running agents, not rolled out."""
    volumes, mounts = _agent_volumes(settings)
    container = {
        "name": "agent",
        "image": settings.agent_image,
        "imagePullPolicy": settings.agent_image_pull_policy,
        # no args: the image's entrypoint runs `python -m flowmon_agent`, configured by the variables below
        "env": _agent_env(settings),
        "ports": [{"name": PORT_NAME, "containerPort": settings.agent_port, "protocol": "TCP"}],
        "resources": settings.resources.model_dump(),
        # BCC compiles the program at start (seconds to a minute on a busy node): liveness waits for it.
        "startupProbe": _probe("/healthz", period=5, failures=36),
        "livenessProbe": _probe("/healthz", period=20, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "volumeMounts": mounts,
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            # uid 0 with every capability dropped but the three above: Kubernetes grants no ambient
            # capabilities, so a non-root process could not use them.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"drop": ["ALL"], "add": list(AGENT_CAPABILITIES)},
            "seccompProfile": _agent_seccomp(settings),
        },
        # The agent writes its one-line start failure there; FallbackToLogs covers a crash before it.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "serviceAccountName": settings.agent_service_account,
        # hostNetwork: conntrack (Service NAT) is read from the host's network namespace, host-network
        # pods and node addresses are seen as such, and Prometheus scrapes each node's agent at node IP.
        "hostNetwork": True,
        # hostPID: at start the agent adopts connections opened before it (long-lived pools, gRPC) by
        # reading /proc/<pid>/net/tcp of a process in each pod's network namespace; tracepoints need no
        # hostPID. Off (settings.agent_host_pid) means only connections opened later are measured.
        "hostPID": settings.agent_host_pid,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "tolerations": list(settings.tolerations),
        "nodeSelector": dict(settings.node_selector),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.agent_seccomp == "Localhost":
        pod_spec["initContainers"] = [_seccomp_installer(settings)]
        volumes.append(
            {
                "name": "seccomp",
                "hostPath": {"path": settings.kubelet_seccomp_dir, "type": "DirectoryOrCreate"},
            }
        )
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    labels = managed_labels(settings.agent_labels)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(
            settings.daemonset_name,
            settings.operator_namespace,
            labels,
            annotations={POLICY_HASH_ANNOTATION: policy_hash},
        ),
        "spec": {
            "selector": {"matchLabels": dict(settings.agent_labels)},
            "updateStrategy": {
                "type": "RollingUpdate",
                # maxSurge 0: with hostNetwork two agents cannot share a node's port.
                "rollingUpdate": {"maxUnavailable": settings.max_unavailable, "maxSurge": 0},
            },
            "minReadySeconds": 5,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"kubectl.kubernetes.io/default-container": "agent"},
                },
                "spec": pod_spec,
            },
        },
    }


def build_agent_service(settings: OperatorSettings) -> dict:
    """Headless: it exists for discovery (ServiceMonitors, the operator's push), each agent is a target."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            settings.agent_service_name, settings.operator_namespace, managed_labels(settings.agent_labels)
        ),
        "spec": {
            "clusterIP": "None",
            "selector": dict(settings.agent_labels),
            "ports": [
                {"name": PORT_NAME, "port": settings.agent_port, "targetPort": PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def build_policy_configmap(settings: OperatorSettings, policy: AgentPolicy) -> dict:
    """The compiled policy of all monitors: what an agent loads at start (pushes update it at run time)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            settings.configmap_name,
            settings.operator_namespace,
            managed_labels(),
            annotations={POLICY_HASH_ANNOTATION: policy_hash(policy)},
        ),
        "data": {POLICY_FILE: canonical_json(policy)},
    }


# --- Secrets ------------------------------------------------------------------------------------------
def _tls_secret(name: str, namespace: str, pair: KeyPair, ca_pem: str | None = None) -> dict:
    data = {"tls.crt": _b64(pair.cert_pem), "tls.key": _b64(pair.key_pem)}
    if ca_pem is not None:
        data[CA_KEY] = _b64(ca_pem)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, namespace, managed_labels()),
        "type": "kubernetes.io/tls",
        "data": data,
    }


def build_ca_secret(settings: OperatorSettings, ca: KeyPair) -> dict:
    return _tls_secret(settings.ca_secret_name, settings.operator_namespace, ca)


def build_serving_cert_secret(settings: OperatorSettings, cert: KeyPair, ca_pem: str) -> dict:
    return _tls_secret(settings.serving_cert_secret_name, settings.operator_namespace, cert, ca_pem)


CERTIFICATE_API_VERSION = "cert-manager.io/v1"


def build_serving_certificate(settings: OperatorSettings) -> dict:
    """cert-manager's Certificate for the agents' serving certificate: it writes tls.crt, tls.key and ca.crt
    into the Secret the DaemonSet already mounts. ECDSA P-256 as certs.py; server auth only."""
    issuer_ref = settings.cert_manager_issuer_ref
    if issuer_ref is None:
        raise ValueError("cert_manager_issuer is not set: the operator issues the certificate itself")
    name = settings.serving_cert_secret_name
    return {
        "apiVersion": CERTIFICATE_API_VERSION,
        "kind": "Certificate",
        "metadata": _meta(name, settings.operator_namespace, managed_labels()),
        "spec": {
            "secretName": name,
            "secretTemplate": {"labels": managed_labels()},
            "commonName": settings.agent_service_dns,
            "dnsNames": settings.agent_dns_names,
            "duration": settings.cert_manager_duration,
            "renewBefore": settings.cert_manager_renew_before,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["server auth", "digital signature"],
            "issuerRef": issuer_ref,
        },
    }


def build_admin_token_secret(settings: OperatorSettings, token: str) -> dict:
    """The token the operator uses to push policy (the agent mounts it; only the operator reads it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(settings.admin_token_secret_name, settings.operator_namespace, managed_labels()),
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: _b64(token)},
    }


def build_scrape_secret(settings: OperatorSettings, monitor: FlowMonitor, token: str, ca_pem: str) -> dict:
    """In the monitor's namespace: the token its ServiceMonitor sends, and the CA that verifies agents.
    Only the token's SHA-256 goes into the policy."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(
            scrape_secret_name(settings, monitor),
            monitor.metadata.namespace,
            monitor_labels(monitor),
            **owned_by(monitor),
        ),
        "type": "Opaque",
        "data": {SCRAPE_TOKEN_KEY: _b64(token), CA_KEY: _b64(ca_pem)},
    }


# --- ServiceMonitor -----------------------------------------------------------------------------------
def build_service_monitor(settings: OperatorSettings, monitor: FlowMonitor, scrape_secret_name: str) -> dict:
    """Scrapes this monitor's path on every agent, over HTTPS, with the monitor's own token."""
    scrape = monitor.spec.scrape
    endpoint = {
        "port": PORT_NAME,
        "scheme": "https",
        "path": metrics_path(monitor),
        "interval": scrape.interval,
        "authorization": {
            "type": "Bearer",
            "credentials": {"name": scrape_secret_name, "key": SCRAPE_TOKEN_KEY},
        },
        "tlsConfig": {
            "ca": {"secret": {"name": scrape_secret_name, "key": CA_KEY}},
            "serverName": settings.agent_service_dns,
        },
        "honorLabels": False,
        "relabelings": [
            # The reporting agent's node; `instance` stays the node IP:port.
            {
                "action": "replace",
                "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                "targetLabel": "node",
            },
            monitor_relabeling(monitor),  # flowmon_monitor="<ns>/<name>": the alert rules select by it
        ],
    }
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(
            service_monitor_name(settings, monitor),
            monitor.metadata.namespace,
            monitor_labels(monitor, scrape.service_monitor_labels),
            **owned_by(monitor),
        ),
        "spec": {
            "selector": {"matchLabels": dict(settings.agent_labels)},
            "namespaceSelector": {"matchNames": [settings.operator_namespace]},
            "endpoints": [endpoint],
        },
    }


def build_shared_objects(settings: OperatorSettings, policy: AgentPolicy) -> list[dict]:
    """What exists once while any monitor exists: the policy ConfigMap, the agent Service and DaemonSet
    (in creation order). The CA, serving-certificate and admin-token Secrets are created by the handlers
    (their contents are generated once and kept), with the build_*_secret functions above."""
    return [
        build_policy_configmap(settings, policy),
        build_agent_service(settings),
        build_agent_daemonset(settings, policy_hash(policy)),
    ]


# --- predicted series -----------------------------------------------------------------------------------
# How many values each metric's extra label takes (the aggregation's `reason`/`direction` values).
EXTRA_LABEL_VALUES = {"reason": 2, "direction": 2}


def predicted_dns_series(metric: Metric, monitor: FlowMonitor, label_sets: int) -> int:
    """DNS families: maxSeries label sets each (flowmon_agent.aggregation.dns_series), plus the rows past
    the cap, whose groupBy labels fold into __overflow__ but keep rcode, qtype and qname_suffix."""
    cap = monitor.spec.aggregation.max_series
    if metric == Metric.DNS_LATENCY:
        return (min(label_sets, cap) + 1) * (len(DNS_LATENCY_BUCKETS) + 3)
    suffixes = len(monitor.spec.dns.qname_suffixes)
    extra = DNS_RCODE_VALUES * DNS_QTYPE_VALUES * (suffixes + 1 if suffixes else 1)
    return min(label_sets * extra, cap) + extra


def predicted_series(monitor: FlowMonitor, *, cardinality: Mapping[Dimension, int] | None = None) -> int:
    """An upper bound of the samples one agent exports on this monitor's path (one scrape target).

    Per allow-listed metric:  label_sets x extra_label_values x samples_per_series, where
    - label_sets = maxSeries + 1 (the __overflow__ series), or the product of the groupBy dimensions'
      known cardinalities when every dimension's is given and the product stays within maxSeries
      (then nothing overflows);
    - extra_label_values = 2 for connect_failures (reason), retransmits and resets (direction), else 1;
    - samples_per_series = 1 for counters and gauges, len(buckets) + 3 for histograms (the buckets,
      +Inf, _sum and _count).
    A Prometheus scraping N agents stores at most N times this many series for the monitor.
    """
    aggregation = monitor.spec.aggregation
    label_sets = aggregation.max_series + 1
    known = cardinality or {}
    if all(dim in known for dim in aggregation.group_by):
        product = math.prod(known[dim] for dim in aggregation.group_by)
        if product <= aggregation.max_series:
            label_sets = product
    buckets = aggregation.histogram_buckets
    histogram_bounds = {"rtt": len(buckets.rtt), "connect_duration": len(buckets.connect_duration)}
    total = 0
    for metric in monitor.spec.metrics:
        if metric in DNS_METRICS:
            total += predicted_dns_series(metric, monitor, label_sets)
            continue
        info = METRICS[metric]
        extra = EXTRA_LABEL_VALUES[info.extra_label] if info.extra_label else 1
        samples = histogram_bounds[metric] + 3 if info.type == FamilyType.HISTOGRAM else 1
        total += label_sets * extra * samples
    return total
