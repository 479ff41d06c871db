"""The RBAC flowmon ships, loaded into the emulator: tests run the operator and the agents with the
ServiceAccount tokens a cluster would give them, so a verb missing from manifests/ fails a test.

The objects come from `kubectl kustomize` on the repository's manifests (the install the docs give).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import yaml

from .admission import OWNER_REFERENCES_PERMISSION_ENFORCEMENT
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


# The operator tests run the operator as its ServiceAccount with the shipped RBAC (a verb missing from
# manifests/ fails them). False runs it with the harness's admin token instead: only to tell an RBAC gap
# from another failure while manifests/ is being changed.
OPERATOR_AS_SERVICE_ACCOUNT = True
# With OwnerReferencesPermissionEnforcement on (OpenShift, hardened clusters), every child the operator
# writes with `blockOwnerDeletion: true` would need `update` on flowmonitors/finalizers; the operator sets
# no blockOwnerDeletion (docs/operator.md), so every operator test runs with the plugin on.
OWNER_REFERENCES_ENFORCED_FOR_OPERATOR = True


def operator_kubeconfig(
    api: KubeAPI, path: Path, overlays: tuple[str, ...] = ("",), admission_plugins: tuple[str, ...] = ()
) -> Path:
    """The kubeconfig the operator under test uses: its ServiceAccount's token after the shipped RBAC (of
    the base and the overlays named, e.g. "cert-manager") is installed, or the admin's (see
    OPERATOR_AS_SERVICE_ACCOUNT)."""
    if not OPERATOR_AS_SERVICE_ACCOUNT:
        return api.kubeconfig(path)
    install_rbac(api, overlays)
    api.admission_plugins.update(admission_plugins)
    if OWNER_REFERENCES_ENFORCED_FOR_OPERATOR:
        api.admission_plugins.add(OWNER_REFERENCES_PERMISSION_ENFORCEMENT)
    return api.kubeconfig(path, token=operator_token(api))
