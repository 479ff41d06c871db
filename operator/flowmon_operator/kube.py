"""The operator's I/O edge to the Kubernetes API: kind-by-name calls on flowmon_kube's client (kopf is not
a client).

Credentials come from the in-cluster service account, else from the kubeconfig ($KUBECONFIG read at call
time): `load_connection` (flowmon_operator.kubeconfig), shared with kopf's login. Children are written
with server-side apply (one field manager, forced): idempotent, creates when absent, and leaves fields
other managers own alone.

Hand-written on purpose: the table of ten kinds and their paths (`Ref`, `KINDS`). kubernetes_asyncio's
typed APIs would need one method name per kind and verb (CustomObjectsApi only covers custom resources), and
its DynamicClient finds paths by discovery: requests at start, a cache file on a read-only root file
system, and a missing CRD reported by discovery instead of as the 404 the reconciler expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowmon_kube import (
    ApiClient,
    Conflict,
    Connection,
    KubeError,
    NotFound,
    read_json,
)
from flowmon_operator.kubeconfig import load_connection

__all__ = ["KINDS", "Conflict", "Connection", "KubeClient", "KubeError", "NotFound", "Ref", "load_connection"]

FIELD_MANAGER = "flowmon-operator"


@dataclass(frozen=True)
class Ref:
    """Where objects of one kind live in the API."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        root = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        parts = [root]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        parts += [p for p in (name, sub) if p]
        return "/".join(parts)


KINDS: dict[str, Ref] = {
    "ConfigMap": Ref("v1", "configmaps"),
    "Secret": Ref("v1", "secrets"),
    "Service": Ref("v1", "services"),
    "Pod": Ref("v1", "pods"),
    "Namespace": Ref("v1", "namespaces", namespaced=False),
    "DaemonSet": Ref("apps/v1", "daemonsets"),
    "ServiceMonitor": Ref("monitoring.coreos.com/v1", "servicemonitors"),
    "PrometheusRule": Ref("monitoring.coreos.com/v1", "prometheusrules"),
    "Certificate": Ref("cert-manager.io/v1", "certificates"),
    "FlowMonitor": Ref("flowmon.io/v1alpha1", "flowmonitors"),
}


class KubeClient:
    """Async; one session (flowmon_kube's ApiClient). Use as `async with KubeClient(conn) as kube:` or call
    close()."""

    def __init__(self, conn: Connection, *, timeout: float = 15.0):
        self.conn = conn
        self._timeout = timeout
        self._api = ApiClient(conn)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict:
        response = await self._api.request(
            method, path, query=params, body=body, content_type=content_type, timeout=self._timeout
        )
        return await read_json(response)

    async def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name))
        except NotFound:
            return None

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict]:
        params = {"labelSelector": label_selector} if label_selector else None
        document = await self.request("GET", KINDS[kind].path(namespace), params=params)
        return document.get("items", [])

    async def create(self, obj: Mapping) -> dict:
        meta = obj["metadata"]
        return await self.request("POST", KINDS[obj["kind"]].path(meta.get("namespace")), body=obj)

    async def apply(self, obj: Mapping) -> dict:
        """Server-side apply as the operator's field manager (forced: our fields are ours)."""
        meta = obj["metadata"]
        return await self.request(
            "PATCH",
            KINDS[obj["kind"]].path(meta.get("namespace"), meta["name"]),
            body=obj,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    async def patch_status(self, kind: str, name: str, namespace: str | None, status: Mapping) -> dict | None:
        """Merge-patch the status subresource; None when the object is gone."""
        try:
            return await self.request(
                "PATCH",
                KINDS[kind].path(namespace, name, "status"),
                body={"status": status},
                content_type="application/merge-patch+json",
            )
        except NotFound:
            return None

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete with background propagation; False when it was already gone."""
        try:
            await self.request(
                "DELETE",
                KINDS[kind].path(namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except NotFound:
            return False
        return True
