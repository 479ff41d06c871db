"""flowmon_kube: the one Kubernetes API client of flowmon, shared by the agent (metadata watcher,
TokenReview) and the operator (server-side apply, status, children).

It is a thin layer over the maintained `kubernetes_asyncio` library, which does configuration (in-cluster
service account, every kubeconfig flavour), authentication, TLS, the HTTP session, typed API calls and
watch streams. This package adds only what flowmon decides once for all three clients: where credentials
come from (`Connection`), that a token file is re-read on every request, that bodies are plain JSON
dicts (no typed models: 20,000 pods must not become 20,000 object trees), that errors carry the API's
Status, and that no response body (Secrets, TokenReviews) ever reaches a log.

May import: `kubernetes_asyncio`, `aiohttp` and the standard library; no other flowmon package (the
agent and the operator both import it, and they never import each other).
"""

from flowmon_kube.client import (
    Conflict,
    Gone,
    KubeError,
    NotFound,
    api_client,
    call,
    configuration,
    error,
    raise_for_status,
    read_json,
)
from flowmon_kube.connection import SERVICE_ACCOUNT, Connection, in_cluster, load_connection

__all__ = [
    "SERVICE_ACCOUNT",
    "Conflict",
    "Connection",
    "Gone",
    "KubeError",
    "NotFound",
    "api_client",
    "call",
    "configuration",
    "error",
    "in_cluster",
    "load_connection",
    "raise_for_status",
    "read_json",
]
