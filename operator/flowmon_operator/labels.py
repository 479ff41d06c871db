"""How the operator marks what it owns: labels and owner references.

Every object the operator creates carries OWNER_LABELS; a monitor's objects also carry the monitor's
namespace and name (for people and tools: `kubectl get ... -l flowmon.io/monitor-name=web`). A monitor's
children live in its namespace and are owned by it: the garbage collector removes them with it. Pure;
imports only the contract.
"""

from __future__ import annotations

from collections.abc import Mapping

from flowmon_contract.spec import API_GROUP, API_VERSION, KIND, FlowMonitor

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "flowmon-operator"
PART_OF_LABEL = "app.kubernetes.io/part-of"
OWNER_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, PART_OF_LABEL: "flowmon"}
MONITOR_NAMESPACE_LABEL = "flowmon.io/monitor-namespace"
MONITOR_NAME_LABEL = "flowmon.io/monitor-name"


def managed_labels(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Labels of every object the operator creates; `extra` never overrides the ownership labels."""
    return {**(extra or {}), **OWNER_LABELS}


def monitor_labels(monitor: FlowMonitor, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Labels of the objects that belong to one monitor (found by these for cleanup)."""
    return managed_labels(extra) | {
        MONITOR_NAMESPACE_LABEL: monitor.metadata.namespace,
        MONITOR_NAME_LABEL: monitor.metadata.name,
    }


def owner_reference(monitor: FlowMonitor) -> dict:
    """The FlowMonitor as controller owner: garbage collection removes its same-namespace children.

    No `blockOwnerDeletion`: it only makes a foreground deletion of the monitor wait for its children,
    which nothing here needs, and under the OwnerReferencesPermissionEnforcement admission plugin
    (OpenShift, hardened clusters) setting it requires `update` on `flowmonitors/finalizers` — a grant
    that would also let the operator block any FlowMonitor's deletion. Background garbage collection
    removes the children either way."""
    if not monitor.metadata.uid:
        raise ValueError(f"FlowMonitor {monitor.key} has no metadata.uid: it must come from the API server")
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": monitor.metadata.name,
        "uid": monitor.metadata.uid,
        "controller": True,
    }


def owned_by(monitor: FlowMonitor) -> dict:
    """metadata.ownerReferences for a child in the monitor's namespace. Offline renders (`flowmon render`)
    have no uid: they get none, never a made-up uid (the garbage collector would delete the child)."""
    return {"ownerReferences": [owner_reference(monitor)]} if monitor.metadata.uid else {}
