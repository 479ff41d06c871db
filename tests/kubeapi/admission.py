"""Admission plugins of kube-apiserver that the emulator can enable (`KubeAPI(admission_plugins=...)`, as
`--enable-admission-plugins`). NamespaceLifecycle is always on (store.py).

OwnerReferencesPermissionEnforcement (OpenShift and hardened clusters enable it): changing an object's
ownerReferences needs `delete` on the object (not on create), and setting `blockOwnerDeletion: true` on a
reference needs `update` on the owner's `finalizers` subresource. Refused with 403 and the real wording
(`...: , <nil>` is how the authorizer's empty reason and nil error print).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .errors import ApiError
from .lifecycle import qualified
from .rbac import Policy, Request
from .resources import ResourceType

OWNER_REFERENCES_PERMISSION_ENFORCEMENT = "OwnerReferencesPermissionEnforcement"
PLUGINS = frozenset({OWNER_REFERENCES_PERMISSION_ENFORCEMENT})


def _forbidden(rtype: ResourceType, obj: Mapping, reason: str) -> ApiError:
    name = obj["metadata"].get("name", "")
    return ApiError(
        403,
        "Forbidden",
        f'{qualified(rtype)} "{name}" is forbidden: {reason}: , <nil>',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def owner_references_enforcement(
    user: str,
    groups: tuple[str, ...],
    policy: Callable[[], Policy],
    type_for: Callable[[str, str], ResourceType],
) -> Callable[[ResourceType, dict | None, dict], None]:
    """The plugin for one request's user: `admit(rtype, old, new)` raises ApiError(403) to refuse."""

    def admit(rtype: ResourceType, old: dict | None, new: dict) -> None:
        old_refs = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
        new_refs = new["metadata"].get("ownerReferences") or []
        if old_refs == new_refs:
            return
        namespace = new["metadata"].get("namespace")
        name = new["metadata"].get("name")
        rules = policy()
        if old is not None:  # who could have not created it may set owners on create
            delete = Request(user, groups, "delete", rtype.group, rtype.plural, None, namespace, name)
            if not rules.allows(delete):
                raise _forbidden(rtype, new, "cannot set an ownerRef on a resource you can't delete")
        blocking_before = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion")}
        for ref in new_refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in blocking_before:
                continue
            try:
                owner = type_for(ref.get("apiVersion", ""), ref.get("kind", ""))
            except ApiError as exc:
                reason = (
                    "cannot set blockOwnerDeletion in this case because cannot find RESTMapping for "
                    f"APIVersion {ref.get('apiVersion')} Kind {ref.get('kind')}: {exc.message}"
                )
                raise _forbidden(rtype, new, reason) from exc
            update = Request(
                user, groups, "update", owner.group, owner.plural, "finalizers", namespace, ref.get("name")
            )
            if not rules.allows(update):
                reason = (
                    "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set "
                    "finalizers on"
                )
                raise _forbidden(rtype, new, reason)

    return admit
