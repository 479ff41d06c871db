"""The operator's I/O edge to the Kubernetes API: a small async client on aiohttp (kopf is not a client).

Credentials come from the in-cluster service account, else from the kubeconfig ($KUBECONFIG read at call
time), both loaded by the `kubernetes` package so that every kubeconfig flavour works. Children are
written with server-side apply (one field manager, forced): idempotent, creates when absent, and leaves
fields other managers own alone.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

FIELD_MANAGER = "flowmon-operator"
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class Connection:
    """Where the API is and how to authenticate (the subset kopf's ConnectionInfo also carries)."""

    server: str
    token: str | None = None
    token_file: Path | None = None  # in-cluster tokens rotate: re-read per request
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False

    def bearer(self) -> str | None:
        if self.token_file is not None and self.token_file.exists():
            return self.token_file.read_text().strip()
        return self.token


def load_connection() -> Connection:
    """In-cluster service account, else the kubeconfig named by $KUBECONFIG (or ~/.kube/config)."""
    import kubernetes.client
    import kubernetes.config

    config = kubernetes.client.Configuration()
    token_file = None
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
        token_file = SERVICE_ACCOUNT_TOKEN
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    token = header.split(" ", 1)[-1] if header else None
    return Connection(
        server=config.host,
        token=token,
        token_file=token_file,
        ca_path=config.ssl_ca_cert,
        cert_path=config.cert_file,
        key_path=config.key_file,
        insecure=not config.verify_ssl,
    )


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


class KubeError(Exception):
    """A non-2xx answer, with the API's Status reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


def _ssl_context(conn: Connection) -> ssl.SSLContext | bool:
    if not conn.server.startswith("https"):
        return False
    if conn.insecure:
        return False
    context = ssl.create_default_context(cafile=conn.ca_path)
    if conn.cert_path and conn.key_path:
        context.load_cert_chain(conn.cert_path, conn.key_path)
    return context


class KubeClient:
    """Async; one aiohttp session. Use as `async with KubeClient(conn) as kube:` or call close()."""

    def __init__(self, conn: Connection, *, timeout: float = 15.0):
        self.conn = conn
        self._ssl = _ssl_context(conn)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token := self.conn.bearer():
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        url = self.conn.server.rstrip("/") + path
        async with self._session.request(
            method, url, data=data, params=params, headers=headers, ssl=self._ssl
        ) as response:
            text = await response.text()
            document = json.loads(text) if text.strip().startswith("{") else {}
            if response.status >= 400:
                error = {404: NotFound, 409: Conflict}.get(response.status, KubeError)
                raise error(response.status, document.get("reason", ""), document.get("message", text))
            return document

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
