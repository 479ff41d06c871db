"""Slim metadata records parsed from Kubernetes objects: only the fields flow attribution needs.

One parser for every source (static inventory, list, watch), so both paths agree. Label maps and
strings are interned: thousands of pods of one ReplicaSet share one label dict.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
TERMINAL_PHASES = ("Succeeded", "Failed")  # their IPs may already belong to another pod


class Labels(dict[str, str]):
    """A label map shared between records; never mutate one after interning."""

    __slots__ = ("__weakref__",)


_LABELS: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], Labels] = weakref.WeakValueDictionary()
EMPTY_LABELS = Labels()


def intern_labels(labels: Mapping[str, str] | None) -> Labels:
    if not labels:
        return EMPTY_LABELS
    key = tuple(sorted((sys.intern(str(k)), sys.intern(str(v))) for k, v in labels.items()))
    found = _LABELS.get(key)
    if found is None:
        found = Labels(key)
        _LABELS[key] = found
    return found


def _s(value: Any) -> str:
    return sys.intern(str(value)) if value else ""


@dataclass(frozen=True, slots=True)
class OwnerRef:
    kind: str  # Kubernetes kind, e.g. ReplicaSet
    name: str


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    node: str
    labels: Labels
    ips: tuple[IPAddress, ...]  # empty for host-network and finished pods: their IPs are not theirs
    owner: OwnerRef | None


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """A ReplicaSet or Job: only its own controller matters (Deployment, CronJob)."""

    kind: str
    namespace: str
    name: str
    owner: OwnerRef | None


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ips: tuple[IPAddress, ...]
    ports: frozenset[int]  # TCP service ports


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    addresses: tuple[IPAddress, ...]
    zone: str
    pod_cidrs: tuple[IPNetwork, ...] = ()  # spec.podCIDRs: where its pods' addresses come from


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    labels: Labels


Record = PodRecord | OwnerRecord | ServiceRecord | NodeRecord | NamespaceRecord
# What a store keys records by: (kind, namespace, name); cluster-scoped kinds have namespace "".
RecordKey = tuple[str, str, str]

OWNER_KINDS = ("ReplicaSet", "Job")
KINDS = ("Namespace", "Node", "Pod", "Service", *OWNER_KINDS)


def record_key(record: Record) -> RecordKey:
    match record:
        case PodRecord():
            return ("Pod", record.namespace, record.name)
        case OwnerRecord():
            return (record.kind, record.namespace, record.name)
        case ServiceRecord():
            return ("Service", record.namespace, record.name)
        case NodeRecord():
            return ("Node", "", record.name)
        case NamespaceRecord():
            return ("Namespace", "", record.name)
    raise TypeError(f"not a record: {record!r}")


def _ips(values: Any) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for value in values:
        try:
            addr = ip_address(value)
        except ValueError:
            continue
        if addr not in out:
            out.append(addr)
    return tuple(out)


def _networks(values: Any) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for value in values:
        try:
            out.append(ip_network(value, strict=False))
        except (TypeError, ValueError):
            continue
    return tuple(out)


def _controller(meta: Mapping[str, Any]) -> OwnerRef | None:
    refs = meta.get("ownerReferences") or []
    chosen = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not chosen or not chosen.get("kind") or not chosen.get("name"):
        return None
    return OwnerRef(_s(chosen["kind"]), _s(chosen["name"]))


def _pod(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> PodRecord:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    ips: tuple[IPAddress, ...] = ()
    if not spec.get("hostNetwork") and status.get("phase") not in TERMINAL_PHASES:
        listed = [entry.get("ip") for entry in status.get("podIPs") or []]
        ips = _ips(listed or ([status["podIP"]] if status.get("podIP") else []))
    return PodRecord(
        namespace=_s(meta.get("namespace") or "default"),
        name=_s(meta.get("name")),
        node=_s(spec.get("nodeName")),
        labels=intern_labels(meta.get("labels")),
        ips=ips,
        owner=_controller(meta),
    )


def _service(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> ServiceRecord:
    spec = obj.get("spec") or {}
    listed = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    ips = () if spec.get("type") == "ExternalName" else _ips(ip for ip in listed if ip != "None")
    ports = frozenset(
        int(p["port"]) for p in spec.get("ports") or [] if p.get("port") and p.get("protocol", "TCP") == "TCP"
    )
    return ServiceRecord(_s(meta.get("namespace") or "default"), _s(meta.get("name")), ips, ports)


def _node(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> NodeRecord:
    labels = meta.get("labels") or {}
    addresses = (obj.get("status") or {}).get("addresses") or []
    spec = obj.get("spec") or {}
    return NodeRecord(
        name=_s(meta.get("name")),
        addresses=_ips(a.get("address") for a in addresses if a.get("type") in NODE_ADDRESS_TYPES),
        zone=_s(next((labels[k] for k in ZONE_LABELS if labels.get(k)), "")),
        pod_cidrs=_networks(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])),
    )


def parse_object(obj: Mapping[str, Any], kind: str | None = None) -> Record | None:
    """One Kubernetes object (as JSON/YAML gives it) → its slim record; None for kinds flowmon ignores.

    `kind` is needed for items of API list responses, which omit it.
    """
    kind = kind or obj.get("kind")
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        return None
    match kind:
        case "Pod":
            return _pod(obj, meta)
        case "Service":
            return _service(obj, meta)
        case "Node":
            return _node(obj, meta)
        case "Namespace":
            return NamespaceRecord(_s(meta["name"]), intern_labels(meta.get("labels")))
        case "ReplicaSet" | "Job":
            return OwnerRecord(
                kind, _s(meta.get("namespace") or "default"), _s(meta["name"]), _controller(meta)
            )
    return None
