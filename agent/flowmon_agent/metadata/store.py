"""The metadata store: slim records plus the indexes attribution needs (IP → pod / node / Service).

Fed by events (ADDED/MODIFIED/DELETED) from a watch or a static inventory; thread-safe, because
a watcher thread writes while the agent loop reads. A deleted pod's IPs keep resolving for a grace
period: the last bytes of a connection are counted after the pod object is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flowmon_agent.metadata.records import (
    EMPTY_LABELS,
    KINDS,
    IPAddress,
    IPNetwork,
    Labels,
    NamespaceRecord,
    NodeRecord,
    OwnerRecord,
    PodRecord,
    Record,
    ServiceRecord,
    parse_object,
    record_key,
)

DEFAULT_DELETED_POD_GRACE_SECONDS = 60.0
# A pod's controller kind → the kind of the controller's controller that names the workload.
OWNER_CHAIN = {"ReplicaSet": "Deployment", "Job": "CronJob"}


class MetadataStore:
    def __init__(
        self,
        *,
        deleted_pod_grace_seconds: float = DEFAULT_DELETED_POD_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grace = deleted_pod_grace_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._by_kind: dict[str, dict[tuple[str, str], Record]] = {kind: {} for kind in KINDS}
        self._pod_by_ip: dict[IPAddress, PodRecord] = {}
        self._deleted_pods: dict[IPAddress, tuple[PodRecord, float]] = {}  # ip → (pod, expiry)
        self._node_by_ip: dict[IPAddress, NodeRecord] = {}
        self._service_by_ip: dict[IPAddress, ServiceRecord] = {}
        self._next_expiry = float("inf")
        self.generation = 0  # bumped on every change: lets readers cache derived data

    # --- writes -------------------------------------------------------------------------------

    def apply(self, event_type: str, obj: Mapping[str, Any], kind: str | None = None) -> None:
        """Apply one watch-style event to a raw Kubernetes object (ignored kinds are dropped)."""
        record = parse_object(obj, kind)
        if record is None:
            return
        if event_type == "DELETED":
            self.delete(record)
        elif event_type in ("ADDED", "MODIFIED"):
            self.upsert(record)

    def upsert(self, record: Record) -> None:
        kind, namespace, name = record_key(record)
        with self._lock:
            old = self._by_kind[kind].get((namespace, name))
            if old == record:
                return
            if old is not None:
                self._unindex(old, deleted=False)
            self._by_kind[kind][(namespace, name)] = record
            self._index(record)
            self.generation += 1

    def delete(self, record: Record) -> None:
        kind, namespace, name = record_key(record)
        with self._lock:
            old = self._by_kind[kind].pop((namespace, name), None)
            if old is not None:
                self._unindex(old, deleted=True)
                self.generation += 1

    def replace(self, kind: str, records: Iterable[Record]) -> None:
        """A relist: the records are now all that exists of this kind."""
        with self._lock:
            fresh = {record_key(r)[1:]: r for r in records}
            for key in [k for k in self._by_kind[kind] if k not in fresh]:
                self.delete(self._by_kind[kind][key])
            for record in fresh.values():
                self.upsert(record)

    def replace_all(self, objects: Iterable[tuple[Mapping[str, Any], str]]) -> None:
        """A relist of every kind at once ((object, kind) pairs, as an inventory parses): kinds with no
        object left end up empty."""
        by_kind: dict[str, list[Record]] = {kind: [] for kind in KINDS}
        for obj, kind in objects:
            record = parse_object(obj, kind)
            if record is not None:
                by_kind[record_key(record)[0]].append(record)
        for kind, records in by_kind.items():
            self.replace(kind, records)

    def _index(self, record: Record) -> None:
        match record:
            case PodRecord():
                for ip in record.ips:
                    self._pod_by_ip[ip] = record
                    self._deleted_pods.pop(ip, None)
            case NodeRecord():
                for ip in record.addresses:
                    self._node_by_ip[ip] = record
            case ServiceRecord():
                for ip in record.cluster_ips:
                    self._service_by_ip[ip] = record

    def _unindex(self, record: Record, *, deleted: bool) -> None:
        index: dict[IPAddress, Any]
        match record:
            case PodRecord():
                index, ips = self._pod_by_ip, record.ips
            case NodeRecord():
                index, ips = self._node_by_ip, record.addresses
            case ServiceRecord():
                index, ips = self._service_by_ip, record.cluster_ips
            case _:
                return
        for ip in ips:
            if index.get(ip) is record:
                del index[ip]
                if deleted and isinstance(record, PodRecord):
                    expiry = self._clock() + self._grace
                    self._deleted_pods[ip] = (record, expiry)
                    self._next_expiry = min(self._next_expiry, expiry)

    def current_generation(self) -> int:
        """The generation after dropping deleted pods whose grace period ended (a change too)."""
        if self._clock() >= self._next_expiry:
            with self._lock:
                now = self._clock()
                expired = [ip for ip, (_, expiry) in self._deleted_pods.items() if expiry <= now]
                for ip in expired:
                    del self._deleted_pods[ip]
                self._next_expiry = min((e for _, e in self._deleted_pods.values()), default=float("inf"))
                self.generation += 1
        return self.generation

    # --- reads --------------------------------------------------------------------------------

    def pod_by_ip(self, ip: IPAddress) -> PodRecord | None:
        with self._lock:
            pod = self._pod_by_ip.get(ip)
            if pod is not None:
                return pod
            gone = self._deleted_pods.get(ip)
            return gone[0] if gone is not None and gone[1] > self._clock() else None

    def node_by_ip(self, ip: IPAddress) -> NodeRecord | None:
        return self._node_by_ip.get(ip)

    def service_by_ip(self, ip: IPAddress) -> ServiceRecord | None:
        return self._service_by_ip.get(ip)

    def service_ips(self) -> set[IPAddress]:
        with self._lock:
            return set(self._service_by_ip)

    def cluster_addresses(self) -> tuple[set[IPAddress], list[IPNetwork]]:
        """Every address that is the cluster's (pods, pods deleted within the grace period, nodes,
        Services) and the nodes' pod CIDRs: what a flow's peer must be in to stay exact."""
        with self._lock:
            ips = {*self._pod_by_ip, *self._deleted_pods, *self._node_by_ip, *self._service_by_ip}
            nodes: list[NodeRecord] = self.records("Node")  # type: ignore[assignment]
            return ips, [cidr for node in nodes for cidr in node.pod_cidrs]

    def records(self, kind: str) -> list[Record]:
        with self._lock:
            return list(self._by_kind[kind].values())

    def pods(self) -> list[PodRecord]:
        return self.records("Pod")  # type: ignore[return-value]

    def node(self, name: str) -> NodeRecord | None:
        return self._by_kind["Node"].get(("", name))  # type: ignore[return-value]

    def node_names(self) -> set[str]:
        with self._lock:
            return {name for _, name in self._by_kind["Node"]}

    def namespace_labels(self, namespace: str) -> Labels:
        record = self._by_kind["Namespace"].get(("", namespace))
        return record.labels if isinstance(record, NamespaceRecord) else EMPTY_LABELS

    def workload(self, pod: PodRecord) -> tuple[str, str]:
        """(workload name, kind in lower case) through the owner chain; a bare pod is its own workload."""
        owner = pod.owner
        if owner is None:
            return pod.name, "pod"
        parent_kind = OWNER_CHAIN.get(owner.kind)
        if parent_kind is None:  # StatefulSet, DaemonSet, or a custom controller
            return owner.name, owner.kind.lower()
        parent = self._by_kind[owner.kind].get((pod.namespace, owner.name))
        if isinstance(parent, OwnerRecord):
            if parent.owner is not None and parent.owner.kind == parent_kind:
                return parent.owner.name, parent_kind.lower()
            return owner.name, owner.kind.lower()
        # The ReplicaSet is not known (yet): its name is the Deployment's plus the pod-template-hash.
        suffix = "-" + pod.labels.get("pod-template-hash", "\0")
        if owner.kind == "ReplicaSet" and owner.name.endswith(suffix):
            return owner.name[: -len(suffix)], "deployment"
        return owner.name, owner.kind.lower()
