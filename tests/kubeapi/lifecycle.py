"""What kube-controller-manager and the API server's own controllers do after a write, run at once until
nothing changes: ClusterRole aggregation, the garbage collector (background and foreground), the namespace
controller (a deleted namespace is Terminating until its content is gone) and CRD cleanup (a deleted CRD
stays until its objects are gone). A mixin of Store: it works on the store's objects under its lock.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import ApiError
from .rbac import aggregated_rules
from .resources import CRD_TYPE, NAMESPACE_TYPE, ResourceType, types_from_crd

FOREGROUND = "foregroundDeletion"
NAMESPACE_FINALIZER = "kubernetes"  # spec.finalizers of every namespace: the namespace controller's
CRD_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
CONTROLLERS = "kube-controller-manager"  # the field manager of the controllers' writes
MAX_PASSES = 100


def qualified(rtype: ResourceType) -> str:
    """`secrets`, `daemonsets.apps`: how the API names a resource in messages."""
    return f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural


def blocked(rtype: ResourceType, obj: Mapping) -> bool:
    """Something still has to finish before the object may go."""
    if obj["metadata"].get("finalizers"):
        return True
    return rtype is NAMESPACE_TYPE and bool((obj.get("spec") or {}).get("finalizers"))


def _set_condition(obj: dict, condition: dict, now: str) -> bool:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    current = next((c for c in conditions if c["type"] == condition["type"]), None)
    if current and all(current.get(k) == v for k, v in condition.items()):
        return False
    if current:
        conditions.remove(current)
    conditions.append({**condition, "lastTransitionTime": now})
    return True


class Controllers:
    """Mixin: needs the Store's _objects, _update, delete, _remove, types and lock."""

    _reconciling = False
    # False: deleted namespaces stay Terminating with their content until `finalize_namespaces()` runs, as
    # when the real (asynchronous) namespace controller has not got to them yet.
    namespace_controller = True

    # Provided by Store.
    types: dict
    rv: int
    request: Any
    lock: Any
    _objects: Any
    _update: Any
    _remove: Any
    delete: Any
    type_for: Any
    resource: Any

    def _controllers(self, rtype: ResourceType | None = None) -> None:
        """Run every controller until a pass writes nothing (re-entrant writes join the running loop)."""
        if self._reconciling:
            return
        self._reconciling = True
        requester = getattr(self.request, "admit", None)
        self.request.admit = None  # the controllers write as themselves, not as the request's user
        try:
            for _ in range(MAX_PASSES):
                before = self.rv
                self._aggregate_cluster_roles()
                self._collect_garbage()
                self._delete_in_foreground()
                self._clean_up_crds()
                if self.namespace_controller:
                    self._finalize_namespaces()
                if self.rv == before:
                    return
        finally:
            self._reconciling = False
            self.request.admit = requester

    # ---- RBAC aggregation --------------------------------------------------------------------------------
    def _aggregate_cluster_roles(self) -> None:
        """Roles with an aggregationRule get the rules of the ClusterRoles their selectors match."""
        rtype = self.resource("rbac.authorization.k8s.io", "v1", "clusterroles")
        roles = list(self._objects(rtype).values())
        for role in roles:
            rules = aggregated_rules(role, roles)
            if rules is not None and rules != (role.get("rules") or []):
                name = role["metadata"]["name"]
                self._update(rtype, None, name, lambda o, r=rules: {**o, "rules": r}, manager=CONTROLLERS)

    # ---- garbage collector ---------------------------------------------------------------------------------
    def _all_objects(self) -> Iterator[tuple[ResourceType, dict]]:
        seen = set()
        for rtype in list(self.types.values()):
            if rtype.key in seen:
                continue
            seen.add(rtype.key)
            for obj in list(self._objects(rtype).values()):
                yield rtype, obj

    def _dependents_of(self, uid: str) -> list[tuple[ResourceType, dict]]:
        return [
            (rtype, obj)
            for rtype, obj in self._all_objects()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _owner_exists(self, ref: Mapping, dependent_namespace: str) -> bool:
        """Like the real GC: a namespaced owner is looked up in the dependent's own namespace."""
        try:
            owner_type = self.type_for(ref.get("apiVersion", ""), ref.get("kind", ""))
        except ApiError:  # an unknown kind: the owner cannot exist
            return False
        namespace = dependent_namespace if owner_type.namespaced else ""
        owner = self._objects(owner_type).get((namespace, ref.get("name", "")))
        return owner is not None and owner["metadata"]["uid"] == ref.get("uid")

    def _collect_garbage(self) -> None:
        """Background propagation: delete every object whose owners are all gone."""
        for rtype, obj in self._all_objects():
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            if not refs or meta.get("deletionTimestamp"):
                continue
            if not any(self._owner_exists(ref, meta.get("namespace") or "") for ref in refs):
                self._delete_quietly(rtype, meta.get("namespace"), meta["name"])

    def _delete_in_foreground(self) -> None:
        """An owner deleted with propagationPolicy=Foreground keeps its `foregroundDeletion` finalizer until
        no dependent with blockOwnerDeletion is left; its dependents are deleted first."""
        for rtype, owner in self._all_objects():
            meta = owner["metadata"]
            if not meta.get("deletionTimestamp") or FOREGROUND not in (meta.get("finalizers") or []):
                continue
            uid = meta["uid"]

            def blocking(dependent: Mapping, uid: str = uid) -> bool:
                refs = dependent["metadata"].get("ownerReferences") or []
                return any(r.get("uid") == uid and r.get("blockOwnerDeletion") for r in refs)

            for dep_type, dependent in self._dependents_of(uid):
                if not dependent["metadata"].get("deletionTimestamp"):
                    policy = "Foreground" if blocking(dependent) else "Background"
                    dep_meta = dependent["metadata"]
                    self._delete_quietly(dep_type, dep_meta.get("namespace"), dep_meta["name"], policy)
            if not any(blocking(d) for _, d in self._dependents_of(uid)):
                self._drop_finalizer(rtype, owner, FOREGROUND)

    def _delete_quietly(self, rtype: ResourceType, namespace: str | None, name: str, policy="Background"):
        try:
            self.delete(rtype, namespace, name, policy)
        except ApiError as exc:  # gone meanwhile: nothing to do
            if exc.code != 404:
                raise

    def _drop_finalizer(self, rtype: ResourceType, obj: Mapping, finalizer: str) -> None:
        meta = obj["metadata"]

        def without(o: dict) -> dict:
            o["metadata"]["finalizers"] = [f for f in o["metadata"].get("finalizers") or [] if f != finalizer]
            return o

        self._update(rtype, meta.get("namespace"), meta["name"], without, manager=CONTROLLERS)

    # ---- CRD cleanup ---------------------------------------------------------------------------------------
    def _clean_up_crds(self) -> None:
        for crd in list(self._objects(CRD_TYPE).values()):
            if not crd["metadata"].get("deletionTimestamp"):
                continue
            remaining = 0
            for served in types_from_crd(crd):
                for (namespace, obj_name), obj in list(self._objects(served).items()):
                    if not obj["metadata"].get("deletionTimestamp"):
                        self._delete_quietly(served, namespace or None, obj_name)
                remaining = len(self._objects(served))
            if remaining == 0 and CRD_FINALIZER in (crd["metadata"].get("finalizers") or []):
                self._drop_finalizer(CRD_TYPE, crd, CRD_FINALIZER)

    # ---- namespace controller ------------------------------------------------------------------------------
    def finalize_namespaces(self) -> None:
        """One run of the namespace controller (with namespace_controller off, the only ones)."""
        with self.lock:
            enabled, self.namespace_controller = self.namespace_controller, True
            try:
                self._controllers()
            finally:
                self.namespace_controller = enabled

    def _finalize_namespaces(self) -> None:
        for (_, name), namespace in list(self._objects(NAMESPACE_TYPE).items()):
            if not namespace["metadata"].get("deletionTimestamp"):
                continue
            remaining: dict[str, int] = {}
            finalizers: dict[str, int] = {}
            for rtype in list(self.types.values()):
                if not rtype.namespaced:
                    continue
                for (ns, obj_name), obj in list(self._objects(rtype).items()):
                    if ns != name:
                        continue
                    if not obj["metadata"].get("deletionTimestamp"):
                        self._delete_quietly(rtype, ns, obj_name)
                    if (ns, obj_name) in self._objects(rtype):
                        remaining[qualified(rtype)] = remaining.get(qualified(rtype), 0) + 1
                        for finalizer in (
                            self._objects(rtype)[(ns, obj_name)]["metadata"].get("finalizers") or []
                        ):
                            finalizers[finalizer] = finalizers.get(finalizer, 0) + 1
            if remaining:
                self._report_remaining(name, remaining, finalizers)
            else:
                self._update(
                    NAMESPACE_TYPE,
                    None,
                    name,
                    lambda o: {**o, "spec": {**(o.get("spec") or {}), "finalizers": []}},
                    subresource=None,
                    manager=CONTROLLERS,
                )

    def _report_remaining(self, name: str, remaining: Mapping[str, int], finalizers: Mapping[str, int]):
        """The conditions `kubectl describe namespace` shows for a namespace stuck in Terminating."""

        def report(o: dict) -> dict:
            o = copy.deepcopy(o)
            content = ", ".join(f"{r} has {n} resource instances" for r, n in sorted(remaining.items()))
            held = ", ".join(f"{f} in {n} resource instances" for f, n in sorted(finalizers.items()))
            now = o["metadata"]["deletionTimestamp"]
            _set_condition(
                o,
                {
                    "type": "NamespaceContentRemaining",
                    "status": "True",
                    "reason": "SomeResourcesRemain",
                    "message": f"Some resources are remaining: {content}",
                },
                now,
            )
            if held:
                _set_condition(
                    o,
                    {
                        "type": "NamespaceFinalizersRemaining",
                        "status": "True",
                        "reason": "SomeFinalizersRemain",
                        "message": f"Some content in the namespace has finalizers remaining: {held}",
                    },
                    now,
                )
            return o

        self._update(NAMESPACE_TYPE, None, name, report, subresource="status", manager=CONTROLLERS)


def terminating_namespace_error(rtype: ResourceType, name: str, namespace: str) -> ApiError:
    return ApiError(
        403,
        "Forbidden",
        f'{qualified(rtype)} "{name}" is forbidden: unable to create new content in namespace {namespace} '
        "because it is being terminated",
        {
            "name": name,
            "group": rtype.group,
            "kind": rtype.plural,
            "causes": [
                {
                    "reason": "NamespaceTerminating",
                    "message": f"namespace {namespace} is being terminated",
                    "field": "metadata.namespace",
                }
            ],
        },
    )
