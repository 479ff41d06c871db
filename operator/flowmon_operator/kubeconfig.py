"""The operator's credentials: the pod's service account (flowmon_kube.in_cluster), else a kubeconfig read
by kubernetes_asyncio's loader, so that every kubeconfig flavour (client certificates, tokens, exec
plugins, OIDC) works.

The library lives here and not in flowmon_kube: the agent imports flowmon_kube, runs only in a pod, and
must not carry the library (+38 MB RSS per node at import, +50 MB of image).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import load_kube_config

from flowmon_kube import Connection, NotInCluster, in_cluster


def load_connection() -> Connection:
    """In-cluster service account, else the kubeconfig named by $KUBECONFIG (or ~/.kube/config)."""
    try:
        return in_cluster()
    except NotInCluster:
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
