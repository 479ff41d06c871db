"""flowmon_kube: the one Kubernetes API client of flowmon, shared by the agent (metadata watcher,
TokenReview) and the operator (server-side apply, status, children).

HTTP on plain aiohttp (client.py says why it is not kubernetes_asyncio): the in-cluster service account
(`Connection`, `in_cluster`), a token file re-read on every request, TLS verified against the cluster's
CA, bodies as plain JSON dicts (no typed models: 20,000 pods must not become 20,000 object trees), errors
that carry the API's Status, and no body or token (Secrets, TokenReviews) ever in a log. Kubeconfig files
are the operator's business (flowmon_operator.kubeconfig, on kubernetes_asyncio's loader).

May import: `aiohttp` and the standard library; no other flowmon package (the agent and the operator
both import it, and they never import each other), and not kubernetes_asyncio (the agent image holds
only what the agent's packages import).
"""

from flowmon_kube.client import (
    ApiClient,
    Conflict,
    Gone,
    KubeError,
    NotFound,
    error,
    raise_for_status,
    read_json,
)
from flowmon_kube.connection import SERVICE_ACCOUNT, Connection, NotInCluster, in_cluster

__all__ = [
    "SERVICE_ACCOUNT",
    "ApiClient",
    "Conflict",
    "Connection",
    "Gone",
    "KubeError",
    "NotFound",
    "NotInCluster",
    "error",
    "in_cluster",
    "raise_for_status",
    "read_json",
]
