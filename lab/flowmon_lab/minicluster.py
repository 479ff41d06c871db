"""A declarative mini-cluster on one host, built from network namespaces.

Built on `lab.Lab`: its switch netns (`<prefix>-sw`) is the node; it holds the bridge (the pod network,
with the pods' gateway address) and the Service rules, written the way kube-proxy's iptables mode writes
them (KUBE-SERVICES → KUBE-SVC-* with `-m statistic` → KUBE-SEP-* DNAT). Each pod is a lab netns with a
veth on that bridge, IPv4 and IPv6. `inventory()` describes it as ordinary Kubernetes objects
(Namespace, Node, Deployment, ReplicaSet, Pod, Service, EndpointSlice), which is what the standalone
agent's metadata loader reads. Nothing touches the host's own network namespace: every interface, rule
and process lives in a netns named `<prefix>-...`, so deleting those namespaces (and killing the
processes inside them) removes everything, even after a crash (`cleanup(prefix)`).

Planning (names, addresses, rules, objects) is pure; only `MiniCluster` does I/O.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from flowmon_lab import network as lab
from flowmon_lab.network import default_subnets

BRIDGE = "br0"  # lab.Lab's bridge in its switch netns
GATEWAY_OFFSET = 254  # lab.Lab's host address: pods are .1 to .200, the node's bridge is .254
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for pod-template-hash
_PR_SET_PDEATHSIG = 1
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
        svc_chain = _chain("SVC", port_name + "tcp")
        chains.append(svc_chain)
        rules.append(
            f"-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p tcp -m comment --comment "
            f'"{port_name} cluster IP" -m tcp --dport {svc.port} -j {svc_chain}'
        )
        count = len(svc.endpoints)
        for i, pod in enumerate(svc.endpoints):
            endpoint = f"{pod.ip}:{svc.target_port}"
            sep_chain = _chain("SEP", port_name + "tcp" + endpoint)
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
                f'-A {sep_chain} -p tcp -m comment --comment "{port_name}" -m tcp '
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
                            "protocol": "TCP",
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
                "ports": [{"name": svc.port_name, "protocol": "TCP", "port": svc.target_port}],
            }
        )
    return objects


# --- I/O: building, running things inside pods, tearing down ---------------------------------------


class MiniClusterError(RuntimeError):
    """The mini-cluster could not be built; the message names the step and the command's error."""


def set_parent_death_signal() -> None:
    # A child must not outlive a demo or test that was killed: the kernel sends SIGKILL when we die.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def list_netns(prefix: str) -> list[str]:
    """Network namespaces that belong to the instance `prefix` (named `<prefix>-...`)."""
    return lab.lab_namespaces(prefix)


def netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def _kill_all(pids: Sequence[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.05)


def cleanup(prefix: str) -> list[str]:
    """Kill every process inside the netns named `<prefix>-...`, then remove them; returns their names.

    Safe at any time, e.g. after a crash: it only needs the prefix. (lab.cleanup_prefix removes the
    namespaces; processes started by someone else inside them would keep them alive, so they go first.)"""
    names = list_netns(prefix)
    pids = sorted({pid for name in names for pid in netns_pids(name)} - {os.getpid()})
    _kill_all(pids)
    lab.cleanup_prefix(prefix)
    return names


def new_prefix(base: str = "fmc") -> str:
    return f"{base}{secrets.token_hex(3)}"


class MiniCluster:
    """Builds a `ClusterSpec` on this host. Use as a context manager; teardown is idempotent.

    >>> with MiniCluster(spec) as cluster:
    ...     cluster.exec(cluster.pods_of("shop", "web")[0], ["true"])
    """

    def __init__(self, spec: ClusterSpec, prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        self.plan = plan_cluster(spec, self.prefix)
        self.lab = lab.Lab(
            self.prefix,
            [p.lab_name for p in self.plan.pods],
            subnet4=self.plan.pod_cidr,
            subnet6=self.plan.pod_cidr6,
        )

    # -- queries
    @property
    def pods(self) -> tuple[Pod, ...]:
        return self.plan.pods

    @property
    def services(self) -> tuple[Service, ...]:
        return self.plan.services

    @property
    def node_netns(self) -> str:
        return self.plan.node_netns

    @property
    def netns_names(self) -> list[str]:
        return [self.plan.node_netns, *(p.netns for p in self.plan.pods)]

    def pods_of(self, namespace: str, deployment: str) -> list[Pod]:
        pods = [p for p in self.plan.pods if p.namespace == namespace and p.deployment == deployment]
        if not pods:
            raise KeyError(f"no deployment {namespace}/{deployment}")
        return pods

    def service(self, namespace: str, name: str) -> Service:
        for svc in self.plan.services:
            if svc.namespace == namespace and svc.name == name:
                return svc
        raise KeyError(f"no service {namespace}/{name}")

    def inventory(self) -> list[dict]:
        return inventory_objects(self.plan)

    # -- lifecycle
    def __enter__(self) -> MiniCluster:
        self.build()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        """Create everything; on any failure, remove what was created and raise MiniClusterError."""
        if os.geteuid() != 0:
            raise MiniClusterError("building network namespaces needs root")
        cleanup(self.prefix)  # leftovers of a crashed run with the same prefix
        try:
            self.lab.start()
            self._setup_node()
            for pod in self.plan.pods:
                self._run(pod.netns, ["ip", "route", "add", "default", "via", self.plan.gateway])
        except lab.LabError as exc:
            self.teardown()
            raise MiniClusterError(str(exc)) from None
        except BaseException:
            self.teardown()
            raise

    def _setup_node(self) -> None:
        node, prefix_len = self.node_netns, self.plan.pod_cidr.split("/")[1]
        self._run(node, ["ip", "addr", "add", f"{self.plan.gateway}/{prefix_len}", "dev", BRIDGE])
        # Bridged frames go through iptables (br_netfilter): the reply from a Service backend to a pod
        # on the same bridge must be un-DNATed by conntrack, exactly as on a kubenet node.
        self._run(
            node,
            [
                "sysctl", "-q",
                "-w", "net.ipv4.ip_forward=1",
                "-w", "net.bridge.bridge-nf-call-iptables=1",
                "-w", "net.ipv4.conf.all.send_redirects=0",
                "-w", f"net.ipv4.conf.{BRIDGE}.send_redirects=0",
            ],
        )  # fmt: skip
        for pod in self.plan.pods:
            # A pod reaching its own Service may be DNATed back to itself (kube-proxy masquerades that).
            self._run(node, ["ip", "link", "set", pod.bridge_port, "type", "bridge_slave", "hairpin", "on"])
        self._run(
            node, ["iptables-restore", "-w", "5", "--noflush"], input=kube_proxy_rules(self.plan.services)
        )

    def _run(self, netns: str, argv: Sequence[str], *, input: str | None = None) -> None:
        done = self.exec(netns, argv, check=False, input=input)
        if done.returncode != 0:
            raise MiniClusterError(f"`{' '.join(argv)}` in {netns} failed: {done.stderr.strip()}")

    def teardown(self) -> None:
        self.lab.cleanup()  # the processes it started (process groups), then the namespaces
        cleanup(self.prefix)  # anything else still running inside them

    # -- running things inside a pod (or the node)
    def exec(
        self,
        target: Pod | str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a pod (or a netns by name) and wait for it (bounded by `timeout`)."""
        netns = target.netns if isinstance(target, Pod) else target
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def spawn(self, pod: Pod, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a long-running process inside a pod; teardown stops it, and it dies with its parent."""
        return self.lab.popen(
            self.lab.pod(pod.lab_name), argv, preexec_fn=set_parent_death_signal, **popen_kwargs
        )

    def iptables(self, pod: Pod, *args: str) -> None:
        """Add rules in a pod's own netns, e.g. a lossy link: they vanish with it."""
        self.lab.iptables(self.lab.pod(pod.lab_name), *args)
