"""Where the Kubernetes API is and how to authenticate: the pod's service account, else a kubeconfig.

Both are read by kubernetes_asyncio's own loaders, so that every kubeconfig flavour (client certificates,
tokens, exec plugins, OIDC) works; the result is a plain `Connection`, which kopf's login and the
clients of this package share.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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
    """The pod's service account; ConfigException outside a pod."""
    config = Configuration()
    load_incluster_config(
        client_configuration=config,
        token_filename=str(service_account / "token"),
        cert_filename=str(service_account / "ca.crt"),
    )
    return Connection(server=config.host, token_file=service_account / "token", ca_path=config.ssl_ca_cert)


def load_connection() -> Connection:
    """In-cluster service account, else the kubeconfig named by $KUBECONFIG (or ~/.kube/config)."""
    try:
        return in_cluster()
    except ConfigException:
        pass
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    config = Configuration()
    # The library's kubeconfig loader is a coroutine (exec plugins and OIDC refreshes are async I/O). It
    # runs on a loop of its own in a worker thread, so that plain callers and callers inside a running
    # loop (kopf's startup handler) both get a Connection.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(
            lambda: asyncio.run(
                load_kube_config(config_file=path, client_configuration=config, persist_config=False)
            )
        ).result()
    scheme, _, token = (config.api_key.get("BearerToken") or "").partition(" ")
    return Connection(
        server=config.host,
        token=token if scheme == "Bearer" and token else None,
        ca_path=config.ssl_ca_cert,
        cert_path=config.cert_file,
        key_path=config.key_file,
        insecure=not config.verify_ssl,
    )
