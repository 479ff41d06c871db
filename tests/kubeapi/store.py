"""The emulator's state: objects, the global resourceVersion, watch history, and the API server's write rules.

Thread-safe (one lock): the HTTP server runs in its own thread, tests call the store directly from theirs.
Watchers live on an event loop and are fed through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import secrets
import string
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .apply import ApplyConflict, dotted, record_update
from .apply import apply as apply_config
from .errors import ApiError
from .lifecycle import (
    CRD_FINALIZER,
    FOREGROUND,
    NAMESPACE_FINALIZER,
    Controllers,
    blocked,
    qualified,
    terminating_namespace_error,
)
from .patching import PatchError, fields_match, json_patch, labels_match, merge_patch
from .rbac import BOOTSTRAP_CLUSTER_ROLES, Policy
from .resources import BUILTIN, CRD_TYPE, NAMESPACE_TYPE, ResourceType, types_from_crd

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"  # served as a merge patch (lists replaced)
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply with field ownership (apply.py)
HARNESS = "kubeapi-harness"  # the field manager of writes the test code makes directly


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{rtype.plural} "{name}" not found', {"name": name, "kind": rtype.plural}
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _without_times(obj: Mapping) -> dict:
    """For no-op detection: a write that changes nothing but managedFields times changes nothing."""
    managed = obj["metadata"].get("managedFields") or []
    entries = [{k: v for k, v in e.items() if k != "time"} for e in managed]
    return {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}


def _key(obj: Mapping) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return (meta.get("namespace") or "", meta["name"])


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    rkey: tuple[str, str]
    obj: dict
    old: dict | None = None


CLOSE_EXPIRED = "expired"  # sentinel: the stream ends with an ERROR 410 event
CLOSE_DROP = "drop"  # sentinel: the connection is cut (server going away)
CLOSE_END = "end"  # sentinel: the stream ends normally, as when its timeoutSeconds is over
BOOKMARK = "bookmark"  # sentinel (BOOKMARK, rv): a BOOKMARK event at the resourceVersion it was sent at


@dataclass(eq=False)
class Watcher:
    rtype: ResourceType
    namespace: str | None
    label_selector: str | None
    field_selector: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    owner: object = None  # the server that serves this watch (for dropping its streams on stop)
    bookmarks: bool = False  # the client sent allowWatchBookmarks=true

    def translate(self, event: Event) -> dict | None:
        """The event as this watcher sees it: selectors turn modifications into ADDED/DELETED."""
        if event.rkey != self.rtype.key:
            return None
        if self.namespace and event.obj["metadata"].get("namespace") != self.namespace:
            return None

        def selected(obj: Mapping | None) -> bool:
            return (
                obj is not None
                and labels_match(self.label_selector, obj)
                and fields_match(self.field_selector, obj)
            )

        now, before = selected(event.obj), selected(event.old)
        kind = event.type
        if kind == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
        elif not now:
            return None
        return {"type": kind, "object": event.obj}

    def push(self, item: object) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server went away
            return False
        return True


@dataclass
class Store(Controllers):
    types: dict[tuple[str, str, str], ResourceType] = field(default_factory=dict)
    objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = field(default_factory=dict)
    rv: int = 1
    history: list[Event] = field(default_factory=list)
    compacted_rv: int = 0
    watchers: set[Watcher] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Admission for the request the current thread serves (the HTTP server sets it; see `admitting`).
    request: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        for rtype in BUILTIN:
            self._register(rtype)
        for name in ("default", "kube-system", "kube-public"):
            self.create(NAMESPACE_TYPE, None, {"metadata": {"name": name}})
        cluster_roles = self.type_for("rbac.authorization.k8s.io/v1", "ClusterRole")
        for role in BOOTSTRAP_CLUSTER_ROLES:
            self.create(cluster_roles, None, role)

    # ---- RBAC -------------------------------------------------------------------------------------------
    def policy(self) -> Policy:
        """The RBAC objects now (the authorizer reads them on every request, as the real one's caches)."""
        with self.lock:

            def objects(plural: str) -> dict[tuple[str, str], dict]:
                return self._objects(self.resource("rbac.authorization.k8s.io", "v1", plural))

            return Policy(
                cluster_roles={name: obj for (_, name), obj in objects("clusterroles").items()},
                roles=dict(objects("roles")),
                cluster_role_bindings=list(objects("clusterrolebindings").values()),
                role_bindings=list(objects("rolebindings").values()),
            )

    # ---- resource types -------------------------------------------------------------------------------
    def _register(self, rtype: ResourceType) -> None:
        self.types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self.objects.setdefault(rtype.key, {})

    def resource(self, group: str, version: str, plural: str) -> ResourceType:
        try:
            return self.types[(group, version, plural)]
        except KeyError:
            gv = f"{group}/{version}" if group else version
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({gv} {plural})"
            ) from None

    def type_for(self, api_version: str, kind_or_plural: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        with self.lock:
            for rtype in self.types.values():
                if (rtype.group, rtype.version) == (group, version) and kind_or_plural in (
                    rtype.kind,
                    rtype.plural,
                ):
                    return rtype
        raise ApiError(404, "NotFound", f"no resource {kind_or_plural} in {api_version}")

    def group_versions(self) -> dict[str, list[str]]:
        """group → served versions (the core group is "")."""
        with self.lock:
            result: dict[str, list[str]] = {}
            for group, version, _ in sorted(self.types):
                if version not in result.setdefault(group, []):
                    result[group].append(version)
            return result

    def resources_in(self, group: str, version: str) -> list[ResourceType]:
        with self.lock:
            return [t for (g, v, _), t in sorted(self.types.items()) if (g, v) == (group, version)]

    # ---- reads ------------------------------------------------------------------------------------------
    def _objects(self, rtype: ResourceType) -> dict[tuple[str, str], dict]:
        return self.objects.setdefault(rtype.key, {})

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        with self.lock:
            obj = self._objects(rtype).get((namespace or "" if rtype.namespaced else "", name))
            if obj is None:
                raise _not_found(rtype, name)
            return copy.deepcopy(obj)

    def list(
        self,
        rtype: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict], int]:
        with self.lock:
            try:
                items = [
                    copy.deepcopy(obj)
                    for (ns, _), obj in sorted(self._objects(rtype).items())
                    if (not namespace or ns == namespace)
                    and labels_match(label_selector, obj)
                    and fields_match(field_selector, obj)
                ]
            except ValueError as exc:
                raise ApiError(400, "BadRequest", str(exc)) from exc
            return items, self.rv

    # ---- watches ----------------------------------------------------------------------------------------
    def watch(
        self,
        watcher: Watcher,
        resource_version: str | None,
        send_initial: bool = False,
    ) -> tuple[list[dict], int]:
        """Subscribe; return the backlog (history after the version, or synthetic ADDED for current state)
        and the resourceVersion it brings the watcher to.

        Raises ApiError(410) when the requested version is older than the compacted history.
        """
        with self.lock:
            since = int(resource_version) if resource_version not in (None, "", "0") else None
            if since is None or send_initial:
                items, _ = self.list(
                    watcher.rtype, watcher.namespace, watcher.label_selector, watcher.field_selector
                )
                backlog = [{"type": "ADDED", "object": item} for item in items]
            else:
                if since < self.compacted_rv:
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({self.compacted_rv})")
                events = (watcher.translate(e) for e in self.history if e.rv > since)
                backlog = [copy.deepcopy(e) for e in events if e is not None]
            self.watchers.add(watcher)
            return backlog, self.rv

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)

    def compact(self) -> int:
        """Forget all history: any watch that resumes from an older resourceVersion gets 410 Gone."""
        with self.lock:
            self.history.clear()
            self.compacted_rv = self.rv
            return self.rv

    def send_bookmarks(self) -> int:
        """A BOOKMARK at the current resourceVersion to every open watch that allows them (a real API
        server sends them about once a minute); returns how many."""
        with self.lock:
            chosen = [w for w in self.watchers if w.bookmarks]
            for watcher in chosen:  # the version now: later writes reach the stream after the bookmark
                watcher.push((BOOKMARK, self.rv))
            return len(chosen)

    def close_watches(self, how: str = CLOSE_EXPIRED, owner: object = None) -> int:
        """End open watch streams (all, or those of one server): with an ERROR 410 event, normally (as at
        their timeout), or by a cut."""
        with self.lock:
            chosen = [w for w in self.watchers if owner is None or w.owner is owner]
            for watcher in chosen:
                watcher.push(how)
                self.watchers.discard(watcher)
            return len(chosen)

    def _emit(self, kind: str, rtype: ResourceType, obj: dict, old: dict | None = None) -> None:
        event = Event(self.rv, kind, rtype.key, copy.deepcopy(obj), copy.deepcopy(old))
        self.history.append(event)
        for watcher in list(self.watchers):
            item = watcher.translate(event)
            if item is not None and not watcher.push(copy.deepcopy(item)):
                self.watchers.discard(watcher)

    # ---- writes -----------------------------------------------------------------------------------------
    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def create(
        self,
        rtype: ResourceType,
        namespace: str | None,
        body: Mapping,
        manager: str = HARNESS,
        managed_fields: list[dict] | None = None,  # an apply that creates: its own managedFields
    ) -> dict:
        with self.lock:
            obj = copy.deepcopy(dict(body))
            meta = obj.setdefault("metadata", {})
            if rtype.namespaced:
                namespace = namespace or meta.get("namespace")
                if not namespace:
                    raise ApiError(400, "BadRequest", "the namespace of the object must be set")
                if meta.get("namespace", namespace) != namespace:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
                if ("", namespace) not in self._objects(NAMESPACE_TYPE):
                    raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    raise ApiError(422, "Invalid", "name or generateName is required")
                alphabet = string.ascii_lowercase + string.digits
                meta["name"] = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
            self._admit_create(rtype, namespace, meta["name"])
            if _key(obj) in self._objects(rtype):
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{qualified(rtype)} "{meta["name"]}" already exists',
                    {"name": meta["name"], "kind": rtype.plural},
                )
            obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
            for managed in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(managed, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if rtype.custom and rtype.has_status:
                obj.pop("status", None)  # custom resources get status only through the subresource
            meta["managedFields"] = (
                managed_fields
                if managed_fields is not None
                else record_update(None, obj, manager, rtype.api_version, _now(), not rtype.custom)
            )
            if rtype is NAMESPACE_TYPE:
                obj.setdefault("status", {})["phase"] = "Active"
                obj.setdefault("spec", {}).setdefault("finalizers", [NAMESPACE_FINALIZER])
            if rtype.key == CRD_TYPE.key and CRD_FINALIZER not in (meta.get("finalizers") or []):
                meta["finalizers"] = [*(meta.get("finalizers") or []), CRD_FINALIZER]
            self._admit(rtype, None, obj)
            meta["resourceVersion"] = self._bump()
            if rtype.key == CRD_TYPE.key:
                obj = self._establish_crd(obj)
            self._objects(rtype)[_key(obj)] = obj
            self._emit("ADDED", rtype, obj)
            self._controllers(rtype)
            return copy.deepcopy(obj)

    @contextlib.contextmanager
    def admitting(self, admit: Callable[[ResourceType, dict | None, dict], None]) -> Iterator[None]:
        """Writes this thread makes meanwhile pass `admit(rtype, old, new)` first (None old: a create); it
        raises ApiError to refuse, like a validating admission plugin."""
        self.request.admit = admit
        try:
            yield
        finally:
            self.request.admit = None

    def _admit(self, rtype: ResourceType, old: dict | None, new: dict) -> None:
        admit = getattr(self.request, "admit", None)
        if admit is not None:
            admit(rtype, old, new)

    def _admit_create(self, rtype: ResourceType, namespace: str | None, name: str) -> None:
        """NamespaceLifecycle, and a CRD being deleted: no new content in what is going away."""
        if rtype.namespaced and namespace:
            ns = self._objects(NAMESPACE_TYPE).get(("", namespace))
            if ns is not None and ns["metadata"].get("deletionTimestamp"):
                raise terminating_namespace_error(rtype, name, namespace)
        if rtype.custom:
            crd = self._objects(CRD_TYPE).get(("", f"{rtype.plural}.{rtype.group}"))
            if crd is not None and crd["metadata"].get("deletionTimestamp"):
                message = "create not allowed while custom resource definition is terminating"
                raise ApiError(405, "MethodNotAllowed", message)

    def _establish_crd(self, crd: dict) -> dict:
        """Register the CRD's resources (they appear in discovery) and mark it Established."""
        spec = crd.get("spec", {})
        expected = f"{spec.get('names', {}).get('plural')}.{spec.get('group')}"
        if crd["metadata"]["name"] != expected:
            raise ApiError(
                422, "Invalid", f"metadata.name must be spec.names.plural+'.'+spec.group: {expected}"
            )
        for rtype in types_from_crd(crd):
            self._register(rtype)
        names = spec.get("names", {})
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "lastTransitionTime": _now(), "message": ""}
                for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
            ],
        }
        return crd

    def _update(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        mutate: Callable[[dict], dict],
        subresource: str | None = None,
        manager: str = HARNESS,
        applied: bool = False,  # mutate is an apply: it set managedFields itself
    ) -> dict:
        with self.lock:
            old = self.get(rtype, namespace, name)
            candidate = mutate(copy.deepcopy(old))
            if not isinstance(candidate, dict):
                raise ApiError(422, "Invalid", "the object must be a JSON object")
            new = self._merge_rules(rtype, old, candidate, subresource)
            self._admit(rtype, old, new)
            new["metadata"]["managedFields"] = (
                candidate.get("metadata", {}).get("managedFields")
                if applied
                else record_update(
                    old, new, manager, rtype.api_version, _now(), not rtype.custom, subresource or ""
                )
            )
            if _without_times(new) == _without_times(old):
                return old  # a no-op write changes nothing, not even the resourceVersion
            new["metadata"]["resourceVersion"] = self._bump()
            self._objects(rtype)[_key(new)] = new
            if rtype.key == CRD_TYPE.key:
                self._establish_crd(new)
            self._emit("MODIFIED", rtype, new, old)
            if new["metadata"].get("deletionTimestamp") and not blocked(rtype, new):
                self._remove(rtype, new)
            else:
                self._controllers(rtype)
            return copy.deepcopy(new)

    @staticmethod
    def _merge_rules(rtype: ResourceType, old: dict, candidate: dict, subresource: str | None) -> dict:
        """What the API server keeps of a write: status vs main endpoint, immutable and managed metadata."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            return new
        if subresource is not None:
            raise ApiError(404, "NotFound", f"subresource {subresource} is not served")
        new = candidate
        if rtype.has_status:  # the main endpoint ignores status when a status subresource exists
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        if meta.get("resourceVersion") not in (None, old_meta["resourceVersion"]):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.plural} "{old_meta["name"]}": '
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        for managed in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if managed in old_meta:
                meta[managed] = old_meta[managed]
            else:
                meta.pop(managed, None)
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    "metadata.finalizers: Forbidden: no new finalizers can be added "
                    "if the object is being deleted",
                )

        def payload(obj: Mapping) -> dict:
            return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

        if payload(new) != payload(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        return new

    def replace(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Mapping,
        subresource=None,
        manager: str = HARNESS,
    ) -> dict:
        body_name = body.get("metadata", {}).get("name")
        if body_name not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        mutate = lambda _old: copy.deepcopy(dict(body))  # noqa: E731
        return self._update(rtype, namespace, name, mutate, subresource, manager)

    def patch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str | None = None,
        manager: str = HARNESS,
        force: bool = False,
    ) -> dict:
        if content_type == APPLY_PATCH:
            return self._apply(rtype, namespace, name, patch, subresource, manager, force)

        def mutate(old: dict) -> dict:
            try:
                if content_type == JSON_PATCH:
                    return json_patch(old, patch)
                if content_type in (MERGE_PATCH, STRATEGIC_PATCH):
                    if not isinstance(patch, Mapping):
                        raise PatchError("a merge patch must be a JSON object")
                    return merge_patch(old, patch)
            except PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from exc
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")

        return self._update(rtype, namespace, name, mutate, subresource, manager)

    def _apply(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        config: Any,
        subresource: str | None,
        manager: str,
        force: bool,
    ) -> dict:
        """Server-side apply: creates when absent, else merges with field ownership (apply.py)."""
        if not isinstance(config, Mapping):
            raise ApiError(400, "BadRequest", "an apply configuration must be an object")
        if config.get("metadata", {}).get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        config = copy.deepcopy(dict(config))
        if subresource == "status":
            config = {"status": config.get("status") or {}}
        elif rtype.has_status:
            config.pop("status", None)  # the main resource ignores status, as for other writes

        def merged(old: dict | None) -> dict:
            try:
                return apply_config(
                    old,
                    config,
                    manager,
                    rtype.api_version,
                    _now(),
                    force=force,
                    builtin=not rtype.custom,
                    subresource=subresource or "",
                )
            except ApplyConflict as exc:
                causes = [
                    {
                        "type": "FieldManagerConflict",
                        "message": f'conflict with "{m}" using {v}',
                        "field": dotted(p),
                    }
                    for m, v, p in exc.conflicts
                ]
                raise ApiError(409, "Conflict", str(exc), {"causes": causes}) from exc

        with self.lock:
            if self._find(rtype, namespace, name) is None:
                if subresource is not None:
                    raise _not_found(rtype, name)
                body = merged(None)
                body.setdefault("metadata", {})["name"] = name
                return self.create(rtype, namespace, body, manager, body["metadata"].pop("managedFields"))
            return self._update(rtype, namespace, name, merged, subresource, manager, applied=True)

    def exists(self, rtype: ResourceType, namespace: str | None, name: str) -> bool:
        with self.lock:
            return self._find(rtype, namespace, name) is not None

    def _find(self, rtype: ResourceType, namespace: str | None, name: str) -> dict | None:
        return self._objects(rtype).get((namespace or "" if rtype.namespaced else "", name))

    def delete(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        preconditions: Mapping | None = None,
    ) -> dict:
        """Finalizers block removal: the object gets a deletionTimestamp and stays until they are gone."""
        with self.lock:
            obj = self.get(rtype, namespace, name)
            meta = obj["metadata"]
            for field_name in ("uid", "resourceVersion"):
                expected = (preconditions or {}).get(field_name)
                if expected is not None and expected != meta.get(field_name):
                    raise ApiError(409, "Conflict", f"Precondition failed: {field_name} mismatch")
            foreground = propagation == "Foreground" and FOREGROUND not in (meta.get("finalizers") or [])
            if foreground and self._dependents_of(meta["uid"]):
                meta["finalizers"] = [*(meta.get("finalizers") or []), FOREGROUND]
            if blocked(rtype, obj):
                if not meta.get("deletionTimestamp"):
                    old = self.get(rtype, namespace, name)
                    meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                    if rtype is NAMESPACE_TYPE:
                        obj.setdefault("status", {})["phase"] = "Terminating"
                    meta["resourceVersion"] = self._bump()
                    self._objects(rtype)[_key(obj)] = obj
                    self._emit("MODIFIED", rtype, obj, old)
                    self._controllers(rtype)
                return self._find(rtype, namespace, name) or obj
            self._remove(rtype, obj, orphan=propagation == "Orphan")
            return obj

    def _remove(self, rtype: ResourceType, obj: dict, orphan: bool = False) -> None:
        del self._objects(rtype)[_key(obj)]
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit("DELETED", rtype, obj)
        uid = obj["metadata"]["uid"]
        if rtype.key == CRD_TYPE.key:
            for served in types_from_crd(obj):
                self.types.pop((served.group, served.version, served.plural), None)
                self.objects.pop(served.key, None)
        if orphan:
            for dep_type, dependent in self._dependents_of(uid):
                refs = [r for r in dependent["metadata"]["ownerReferences"] if r.get("uid") != uid]
                self._update(
                    dep_type,
                    dependent["metadata"].get("namespace"),
                    dependent["metadata"]["name"],
                    lambda o, refs=refs: {**o, "metadata": {**o["metadata"], "ownerReferences": refs}},
                )
        else:
            self._controllers(rtype)
