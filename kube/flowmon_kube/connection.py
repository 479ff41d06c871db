"""Where the Kubernetes API is and how to authenticate: a plain `Connection`, which kopf's login and the
clients of this package share.

In a pod it is the service account (`in_cluster`: the API's address from KUBERNETES_SERVICE_HOST/PORT, the
token and CA files), read here without any library. A kubeconfig (every flavour: client certificates,
tokens, exec plugins, OIDC) is read by the operator with kubernetes_asyncio's loader
(flowmon_operator.kubeconfig): only the operator and the CLI need one, and the agent image must not carry
that library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class NotInCluster(Exception):
    """No service account here: not in a pod, or one without an API token."""


@dataclass(frozen=True)
class Connection:
    """Where the API is and how to authenticate (the subset kopf's ConnectionInfo also carries)."""

    server: str
    token: str | None = field(default=None, repr=False)  # never printed
    token_file: Path | None = None  # projected tokens rotate: re-read per request
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False

    def bearer(self) -> str | None:
        if self.token_file is not None and self.token_file.exists():
            return self.token_file.read_text().strip()
        return self.token


def in_cluster(service_account: Path = SERVICE_ACCOUNT) -> Connection:
    """The pod's service account; NotInCluster outside a pod."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise NotInCluster("KUBERNETES_SERVICE_HOST/PORT are not set")
    token, ca = service_account / "token", service_account / "ca.crt"
    if not token.is_file() or not token.read_text().strip():
        raise NotInCluster(f"no service account token in {token}")
    if not ca.is_file():
        raise NotInCluster(f"no cluster CA in {ca}")
    host = f"[{host}]" if ":" in host else host  # an IPv6 service address
    return Connection(server=f"https://{host}:{port}", token_file=token, ca_path=str(ca))
