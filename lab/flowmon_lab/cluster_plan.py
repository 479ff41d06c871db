"""A mini-cluster's declarative spec and its plan: every name and address, computed before anything is built.

Pure: `plan_cluster(spec, prefix)` gives pods (names, ReplicaSets, IPv4/IPv6 addresses) and Services
(ClusterIPs, endpoints); `flowmon_lab.minicluster` builds it, `flowmon_lab.cluster_objects` describes it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowmon_lab.network import default_subnets

GATEWAY_OFFSET = 254  # lab.Lab's host address: pods are .1 to .200, the node's bridge is .254
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for pod-template-hash
MAX_PODS = 200  # lab.Lab's limit, below the gateway's .254


# --- the declarative spec -----------------------------------------------------------------------


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSpec:
    """A logical node: pods are spread over nodes round-robin; all share the one bridge."""

    name: str
    zone: str = "zone-a"


@dataclass(frozen=True)
class DeploymentSpec:
    namespace: str
    name: str
    replicas: int = 2
    labels: Mapping[str, str] | None = None  # pod labels; default {"app": name}

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.labels) if self.labels is not None else {"app": self.name}


@dataclass(frozen=True)
class ServiceSpec:
    namespace: str
    name: str
    selector: Mapping[str, str]
    port: int
    target_port: int
    port_name: str = "tcp"
    protocol: str = "tcp"  # or "udp" (a DNS Service)


@dataclass(frozen=True)
class ClusterSpec:
    namespaces: Sequence[NamespaceSpec]
    deployments: Sequence[DeploymentSpec]
    services: Sequence[ServiceSpec] = ()
    nodes: Sequence[NodeSpec] = (NodeSpec("node-a"),)
    # None: derived from the instance prefix (lab.default_subnets), so that concurrent clusters seen by
    # one host-wide tracer rarely share addresses.
    pod_cidr: str | None = None
    pod_cidr6: str | None = None
    service_cidr: str | None = None


# --- the plan: every name and address, computed before anything is built -------------------------


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ip: str
    ip6: str
    labels: dict[str, str]
    node: str
    netns: str
    lab_name: str  # the lab's pod name: netns is `<prefix>-<lab_name>`
    deployment: str
    replicaset: str
    bridge_port: str  # the veth end on the bridge, in the node netns

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str
    port: int
    target_port: int
    port_name: str
    selector: dict[str, str]
    endpoints: tuple[Pod, ...]
    protocol: str = "tcp"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ClusterPlan:
    prefix: str
    spec: ClusterSpec
    node_netns: str
    gateway: str  # the bridge's address: every pod's default route
    pod_cidr: str
    pod_cidr6: str
    service_cidr: str
    pods: tuple[Pod, ...]
    services: tuple[Service, ...]


def pod_template_hash(namespace: str, deployment: str, labels: Mapping[str, str]) -> str:
    digest = hashlib.sha256(f"{namespace}/{deployment}/{sorted(labels.items())}".encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _pod_suffix(replicaset: str, index: int) -> str:
    digest = hashlib.sha256(f"{replicaset}/{index}".encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:5])


def _selected(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _default_service_cidr(prefix: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"services/{prefix}".encode()).digest()[:4], "big")
    return f"10.{128 + h % 64}.{(h >> 8) % 256}.0/24"


def plan_cluster(spec: ClusterSpec, prefix: str) -> ClusterPlan:
    """Pure: assign pod names, netns names, IPs, nodes and ClusterIPs."""
    known = {ns.name for ns in spec.namespaces}
    for item in (*spec.deployments, *spec.services):
        if item.namespace not in known:
            raise ValueError(f"{item.namespace}/{item.name}: namespace {item.namespace!r} is not declared")
    if not spec.nodes:
        raise ValueError("a cluster needs at least one node")
    default4, default6 = default_subnets(prefix)
    pod_net = ipaddress.IPv4Network(spec.pod_cidr or default4)
    pod_net6 = ipaddress.IPv6Network(spec.pod_cidr6 or default6)
    svc_net = ipaddress.IPv4Network(spec.service_cidr or _default_service_cidr(prefix))
    if pod_net.num_addresses < 256:
        raise ValueError(
            f"pod CIDR {pod_net} must be a /24 or larger (the node's bridge is .{GATEWAY_OFFSET})"
        )
    pods: list[Pod] = []
    for deployment in spec.deployments:
        labels = deployment.pod_labels
        template_hash = pod_template_hash(deployment.namespace, deployment.name, labels)
        replicaset = f"{deployment.name}-{template_hash}"
        for index in range(deployment.replicas):
            n = len(pods)
            if n >= MAX_PODS:
                raise ValueError(f"at most {MAX_PODS} pods per mini-cluster")
            lab_name = f"{deployment.namespace}-{deployment.name}-{index}"
            pods.append(
                Pod(
                    namespace=deployment.namespace,
                    name=f"{replicaset}-{_pod_suffix(replicaset, index)}",
                    ip=str(pod_net.network_address + n + 1),
                    ip6=str(pod_net6.network_address + n + 1),
                    labels={**labels, "pod-template-hash": template_hash},
                    node=spec.nodes[n % len(spec.nodes)].name,
                    netns=f"{prefix}-{lab_name}",
                    lab_name=lab_name,
                    deployment=deployment.name,
                    replicaset=replicaset,
                    bridge_port=f"v{n}",
                )
            )
    services: list[Service] = []
    for index, svc in enumerate(spec.services):
        endpoints = tuple(
            p for p in pods if p.namespace == svc.namespace and _selected(svc.selector, p.labels)
        )
        services.append(
            Service(
                namespace=svc.namespace,
                name=svc.name,
                cluster_ip=str(svc_net.network_address + 10 + index),
                port=svc.port,
                target_port=svc.target_port,
                port_name=svc.port_name,
                selector=dict(svc.selector),
                endpoints=endpoints,
                protocol=svc.protocol,
            )
        )
    return ClusterPlan(
        prefix=prefix,
        spec=spec,
        node_netns=f"{prefix}-sw",
        gateway=str(pod_net.network_address + GATEWAY_OFFSET),
        pod_cidr=str(pod_net),
        pod_cidr6=str(pod_net6),
        service_cidr=str(svc_net),
        pods=tuple(pods),
        services=tuple(services),
    )
