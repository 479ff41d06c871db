"""A planned mini-cluster as the objects Kubernetes would hold: kube-proxy's nat rules and the inventory.

Pure: `kube_proxy_rules` writes the Service rules the way kube-proxy's iptables mode writes them
(KUBE-SERVICES → KUBE-SVC-* with `-m statistic` → KUBE-SEP-* DNAT); `inventory_objects` gives Namespace,
Node, Deployment, ReplicaSet, Pod, Service and EndpointSlice objects, what the standalone agent reads.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping, Sequence

from flowmon_lab.cluster_plan import HOSTNAME_LABEL, ZONE_LABEL, ClusterPlan, Service

# --- kube-proxy's iptables rules ------------------------------------------------------------------


def _chain(kind: str, text: str) -> str:
    """kube-proxy's chain names: base32 of a SHA-256, first 16 characters."""
    return f"KUBE-{kind}-" + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def kube_proxy_rules(services: Sequence[Service]) -> str:
    """Pure: the nat table as `iptables-restore --noflush` input, in kube-proxy's iptables-mode layout."""
    chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    for svc in services:
        port_name = f"{svc.namespace}/{svc.name}:{svc.port_name}"
        proto = svc.protocol
        svc_chain = _chain("SVC", port_name + proto)
        chains.append(svc_chain)
        rules.append(
            f"-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p {proto} -m comment --comment "
            f'"{port_name} cluster IP" -m {proto} --dport {svc.port} -j {svc_chain}'
        )
        count = len(svc.endpoints)
        for i, pod in enumerate(svc.endpoints):
            endpoint = f"{pod.ip}:{svc.target_port}"
            sep_chain = _chain("SEP", port_name + proto + endpoint)
            chains.append(sep_chain)
            # Rule i is reached only when rules 0..i-1 did not match: 1/(n-i) gives an even spread.
            statistic = (
                f" -m statistic --mode random --probability {1 / (count - i):0.11f}" if i < count - 1 else ""
            )
            rules.append(
                f'-A {svc_chain} -m comment --comment "{port_name} -> {endpoint}"{statistic} -j {sep_chain}'
            )
            rules.append(
                f'-A {sep_chain} -s {pod.ip}/32 -m comment --comment "{port_name}" -j KUBE-MARK-MASQ'
            )
            rules.append(
                f'-A {sep_chain} -p {proto} -m comment --comment "{port_name}" -m {proto} '
                f"-j DNAT --to-destination {endpoint}"
            )
    lines = ["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""]
    return "\n".join(lines)


# --- the static inventory -------------------------------------------------------------------------


def _uid(prefix: str, kind: str, namespace: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"flowmon-minicluster/{prefix}/{kind}/{namespace}/{name}"))


def _meta(plan: ClusterPlan, kind: str, name: str, namespace: str | None, labels: Mapping[str, str]) -> dict:
    meta: dict = {"name": name, "uid": _uid(plan.prefix, kind, namespace or "", name)}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


def _owner(plan: ClusterPlan, api_version: str, kind: str, namespace: str, name: str) -> dict:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": _uid(plan.prefix, kind, namespace, name),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def inventory_objects(plan: ClusterPlan) -> list[dict]:
    """Pure: the cluster as ordinary Kubernetes objects (what `kubectl get -o yaml` would show)."""
    objects: list[dict] = []
    for ns in plan.spec.namespaces:
        labels = {"kubernetes.io/metadata.name": ns.name, **ns.labels}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": _meta(plan, "Namespace", ns.name, None, labels),
            }
        )
    for node in plan.spec.nodes:
        labels = {HOSTNAME_LABEL: node.name, ZONE_LABEL: node.zone}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": _meta(plan, "Node", node.name, None, labels),
                "status": {"addresses": [{"type": "Hostname", "address": node.name}]},
            }
        )
    for dep in plan.spec.deployments:
        pods = [p for p in plan.pods if p.namespace == dep.namespace and p.deployment == dep.name]
        template_labels = pods[0].labels if pods else dep.pod_labels
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": _meta(plan, "Deployment", dep.name, dep.namespace, dep.pod_labels),
                "spec": {
                    "replicas": dep.replicas,
                    "selector": {"matchLabels": dep.pod_labels},
                    "template": {"metadata": {"labels": dep.pod_labels}},
                },
                "status": {"replicas": dep.replicas, "readyReplicas": dep.replicas},
            }
        )
        if not pods:
            continue
        rs_meta = _meta(plan, "ReplicaSet", pods[0].replicaset, dep.namespace, template_labels)
        rs_meta["ownerReferences"] = [_owner(plan, "apps/v1", "Deployment", dep.namespace, dep.name)]
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": rs_meta,
                "spec": {
                    "replicas": dep.replicas,
                    "selector": {"matchLabels": template_labels},
                    "template": {"metadata": {"labels": template_labels}},
                },
            }
        )
    for pod in plan.pods:
        meta = _meta(plan, "Pod", pod.name, pod.namespace, pod.labels)
        meta["ownerReferences"] = [_owner(plan, "apps/v1", "ReplicaSet", pod.namespace, pod.replicaset)]
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": {
                    "nodeName": pod.node,
                    "containers": [{"name": pod.deployment, "image": "flowmon/demo"}],
                },
                "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}, {"ip": pod.ip6}]},
            }
        )
    for svc in plan.services:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(plan, "Service", svc.name, svc.namespace, {}),
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": svc.cluster_ip,
                    "clusterIPs": [svc.cluster_ip],
                    "selector": svc.selector,
                    "ports": [
                        {
                            "name": svc.port_name,
                            "protocol": svc.protocol.upper(),
                            "port": svc.port,
                            "targetPort": svc.target_port,
                        }
                    ],
                },
            }
        )
        slice_meta = _meta(
            plan,
            "EndpointSlice",
            f"{svc.name}-abcde",
            svc.namespace,
            {"kubernetes.io/service-name": svc.name},
        )
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": slice_meta,
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": [p.ip],
                        "conditions": {"ready": True},
                        "nodeName": p.node,
                        "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name},
                    }
                    for p in svc.endpoints
                ],
                "ports": [{"name": svc.port_name, "protocol": svc.protocol.upper(), "port": svc.target_port}],
            }
        )
    return objects
