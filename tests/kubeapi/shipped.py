"""The RBAC flowmon ships, loaded into the emulator: tests run the operator and the agents with the
ServiceAccount tokens a cluster would give them, so a verb missing from manifests/ fails a test.

The objects come from `kubectl kustomize` on the repository's manifests (the install the docs give).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import yaml

from .server import KubeAPI
from .store import ApiError

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "flowmon-system"
OPERATOR_SERVICE_ACCOUNT = "flowmon-operator"
AGENT_SERVICE_ACCOUNT = "flowmon-agent"
IDENTITY_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")


@functools.cache
def kustomize(overlay: str = "") -> tuple[dict, ...]:
    """The objects `kubectl kustomize manifests/<overlay>` renders (cached per session)."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(rendered) if doc)


def install_rbac(api: KubeAPI, overlays: tuple[str, ...] = ("", "token-review")) -> None:
    """Create the namespaces, ServiceAccounts, roles and bindings of the shipped install (and overlays),
    as the cluster admin would with `kubectl apply -k`. Objects already there are left as they are."""
    for overlay in overlays:
        for obj in kustomize(overlay):
            if obj["kind"] in IDENTITY_KINDS:
                try:
                    api.create(obj)
                except ApiError as exc:
                    if exc.code != 409:
                        raise


def operator_token(api: KubeAPI) -> str:
    """A token of the operator's ServiceAccount (install_rbac gives it its shipped rights)."""
    return api.service_account_token(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)


def agent_token(api: KubeAPI) -> str:
    return api.service_account_token(OPERATOR_NAMESPACE, AGENT_SERVICE_ACCOUNT)
