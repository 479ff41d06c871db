"""IP → who: the endpoint a flow's address belongs to (pod, node, named network or external)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowmon_agent.metadata.records import EMPTY_LABELS, IPAddress, IPNetwork, Labels, ServiceRecord
from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.spec import NamedNetwork

KIND_NODE = "node"
KIND_EXTERNAL = "external"
KIND_SERVICE = "service"  # a Service IP whose backend conntrack could not tell
NON_POD_KINDS = frozenset({KIND_NODE, KIND_EXTERNAL, KIND_SERVICE})
_CACHE_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class Endpoint:
    namespace: str
    workload: str
    kind: str  # deployment, statefulset, daemonset, cronjob, job, replicaset, pod, node, external, service
    pod: str = ""
    node: str = ""
    zone: str = ""
    labels: Labels = field(default_factory=lambda: EMPTY_LABELS, compare=False, hash=False)

    @property
    def is_pod(self) -> bool:
        return self.kind not in NON_POD_KINDS


EXTERNAL = Endpoint(namespace="", workload=KIND_EXTERNAL, kind=KIND_EXTERNAL)


def name_network(ip: IPAddress | IPNetwork, networks: Sequence[NamedNetwork]) -> str | None:
    """The most specific named network holding the address, or all of a network (a peer the kernel
    folded: FlowKey.peer_network)."""
    if isinstance(ip, IPAddress):
        holding = [n for n in networks if ip.version == n.cidr.version and ip in n.cidr]  # type: ignore[operator]
    else:
        holding = [n for n in networks if ip.version == n.cidr.version and n.cidr.supernet_of(ip)]  # type: ignore[arg-type]
    return max(holding, key=lambda n: n.cidr.prefixlen).name if holding else None


class Resolver:
    """Resolves through a store; results are cached until the store changes."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._cache: dict[IPAddress, Endpoint] = {}
        self._generation = -1

    def endpoint(self, ip: IPAddress, networks: Sequence[NamedNetwork] = ()) -> Endpoint:
        generation = self.store.current_generation()
        if self._generation != generation or len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
            self._generation = generation
        found = self._cache.get(ip)
        if found is None:
            found = self._cache[ip] = self._resolve(ip)
        if found is EXTERNAL and networks:
            name = name_network(ip, networks)
            if name is not None:
                return Endpoint(namespace="", workload=name, kind=KIND_EXTERNAL)
        return found

    def _resolve(self, ip: IPAddress) -> Endpoint:
        store = self.store
        node = store.node_by_ip(ip)
        if node is not None:
            return Endpoint(namespace="", workload=node.name, kind=KIND_NODE, node=node.name, zone=node.zone)
        pod = store.pod_by_ip(ip)
        if pod is not None:
            workload, kind = store.workload(pod)
            node_record = store.node(pod.node)
            return Endpoint(
                namespace=pod.namespace,
                workload=workload,
                kind=kind,
                pod=pod.name,
                node=pod.node,
                zone=node_record.zone if node_record else "",
                labels=pod.labels,
            )
        service = store.service_by_ip(ip)
        if service is not None:
            return service_endpoint(service)
        return EXTERNAL

    def service(self, ip: IPAddress, port: int) -> ServiceRecord | None:
        """The Service whose ClusterIP and port this is (port 0: any port)."""
        service = self.store.service_by_ip(ip)
        if service is None or (port and service.ports and port not in service.ports):
            return None
        return service


def service_endpoint(service: ServiceRecord) -> Endpoint:
    return Endpoint(namespace=service.namespace, workload=service.name, kind=KIND_SERVICE)
