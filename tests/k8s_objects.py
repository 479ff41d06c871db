"""Builders of ordinary Kubernetes objects (as the API server or kubectl gives them) for tests."""

from __future__ import annotations


def owner(kind: str, name: str, controller: bool = True, uid: str | None = None) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": name,
        "uid": uid or f"u-{name}",
        "controller": controller,
    }


def pod(ns: str, name: str, ip: str | None, node: str = "n1", owners=(), labels=None, **extra) -> dict:
    status = {"phase": extra.pop("phase", "Running")}
    if ip:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels or {}, "ownerReferences": list(owners)},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}], **extra},
        "status": status,
    }


def rs(ns: str, name: str, deployment: str | None) -> dict:
    owners = [owner("Deployment", deployment)] if deployment else []
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"namespace": ns, "name": name, "ownerReferences": owners},
    }


def job(ns: str, name: str, cronjob: str | None) -> dict:
    owners = [owner("CronJob", cronjob)] if cronjob else []
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"namespace": ns, "name": name, "ownerReferences": owners},
    }


def node(name: str, ip: str, zone: str = "") -> dict:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    addresses = [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": addresses},
    }


def service(ns: str, name: str, ips: list[str], ports=(80,)) -> dict:
    spec = {"clusterIP": ips[0] if ips else "None", "clusterIPs": ips, "ports": [{"port": p} for p in ports]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec}


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
