"""Server-side apply and field ownership (metadata.managedFields), after sigs.k8s.io/structured-merge-diff.

No maintained Python implementation exists, so this is a small one for the objects flowmon writes. A field
is a path of FieldsV1 keys (`f:spec`, `k:{"name":"agent"}` for an item of an associative list, `v:"x"` for
a member of a set). Each manager (name, operation, subresource) owns a set of fields:

- An Update (create, PUT, merge/JSON patch) gives its manager the fields it changed and takes them from
  everyone else.
- An Apply merges the configuration into the object; a field another manager owns with a different value
  is a conflict (409) unless forced, which moves the field to the applier. The applier then owns exactly
  the fields it sent: one it owned before and no longer sends is removed from the object, unless another
  manager owns it too.

Limits (documented, not emulated): list types come from a table of built-in field names (containers, env,
ports, volumes, volumeMounts, conditions, ... by key; finalizers as a set); every other list, and every list
of a custom resource (whose CRD schema markers are not read), is atomic. Null values in an applied
configuration are not treated as deletions; there is no defaulting, so nothing is owned by defaulting.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

Path = tuple[str, ...]
MISSING: Any = object()

# metadata the server manages: never in anyone's field set
UNTRACKED_METADATA = frozenset(
    {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    }
)
# Associative lists of the built-in kinds flowmon writes (Pod templates, Services, conditions), by field.
MAP_LIST_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
}
PORT_KEYS = (("containerPort", "protocol"), ("port", "protocol"))  # container ports, Service ports
SET_LISTS = frozenset({"finalizers"})


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, str, Path]]):  # (manager, apiVersion, path)
        super().__init__(conflict_message(conflicts))
        self.conflicts = conflicts


def _list_keys(field: str | None, items: list, builtin: bool, in_metadata: bool) -> tuple[str, ...] | None:
    """The keys of an associative list, () for a set, None for an atomic list."""
    if in_metadata and field == "finalizers":
        return ()
    if in_metadata and field == "ownerReferences":
        return ("uid",)
    if not builtin or not items or not all(isinstance(i, Mapping) for i in items):
        return None
    if field == "ports":
        for keys in PORT_KEYS:
            if all(keys[0] in i for i in items):
                return keys
        return None
    keys = MAP_LIST_KEYS.get(field or "")
    return keys if keys and all(keys[0] in i for i in items) else None


def _item_key(item: Mapping, keys: tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item[k] for k in keys if k in item}, separators=(",", ":"), sort_keys=True)


def _set_key(value: Any) -> str:
    return "v:" + json.dumps(value, separators=(",", ":"))


def _walk(node: Any, prefix: Path, field: str | None, builtin: bool) -> Iterator[Path]:
    in_metadata = prefix[:1] == ("f:metadata",)
    if isinstance(node, Mapping):
        if not node and prefix:
            yield prefix
        for key, value in node.items():
            if prefix == () and key in ("apiVersion", "kind"):
                continue
            if prefix == ("f:metadata",) and key in UNTRACKED_METADATA:
                continue
            yield from _walk(value, (*prefix, f"f:{key}"), key, builtin)
    elif isinstance(node, list):
        keys = _list_keys(field, node, builtin, in_metadata)
        if keys is None:
            yield prefix
        elif keys == ():
            for value in node:
                yield (*prefix, _set_key(value))
        else:
            for item in node:
                item_path = (*prefix, _item_key(item, keys))
                yield item_path
                yield from _walk(item, item_path, None, builtin)
    else:
        yield prefix


def fieldset(obj: Mapping, builtin: bool = True) -> set[Path]:
    """Every field path of an object (server-managed metadata, apiVersion and kind left out)."""
    return set(_walk(obj, (), None, builtin))


def _child(node: Any, element: str) -> Any:
    kind, _, key = element.partition(":")
    if kind == "f":
        return node.get(key, MISSING) if isinstance(node, Mapping) else MISSING
    if not isinstance(node, list):
        return MISSING
    if kind == "v":
        value = json.loads(key)
        return value if value in node else MISSING
    wanted = json.loads(key)
    for item in node:
        if isinstance(item, Mapping) and all(item.get(k) == v for k, v in wanted.items()):
            return item
    return MISSING


def value_at(obj: Any, path: Path) -> Any:
    node = obj
    for element in path:
        node = _child(node, element)
        if node is MISSING:
            return MISSING
    return node


def _remove_at(obj: Any, path: Path) -> None:
    """Remove one field; maps and lists it leaves empty go too (nobody asked for them)."""
    parents = [obj]
    for element in path[:-1]:
        parents.append(_child(parents[-1], element))
        if parents[-1] is MISSING:
            return
    kind, _, key = path[-1].partition(":")
    parent = parents[-1]
    if kind == "f" and isinstance(parent, dict):
        parent.pop(key, None)
    elif isinstance(parent, list):
        target = _child(parent, path[-1])
        if target is not MISSING:
            parent.remove(target)
    for depth in range(len(path) - 1, 0, -1):
        node, holder = parents[depth], parents[depth - 1]
        if node in ({}, []) and path[depth - 1].startswith("f:") and isinstance(holder, dict):
            holder.pop(path[depth - 1][2:], None)
        else:
            break


def _merge(live: Any, config: Any, field: str | None, builtin: bool, in_metadata: bool) -> Any:
    if isinstance(config, Mapping) and isinstance(live, Mapping):
        merged = dict(live)
        for key, value in config.items():
            inside = in_metadata or key == "metadata"
            merged[key] = _merge(live.get(key, MISSING), value, key, builtin, inside)
        return merged
    if isinstance(config, list) and isinstance(live, list):
        keys = _list_keys(field, config or live, builtin, in_metadata)
        if keys == ():
            return live + [v for v in config if v not in live]
        if keys:
            merged_items = list(live)
            for item in config:
                match = _child(merged_items, _item_key(item, keys))
                if match is MISSING:
                    merged_items.append(copy.deepcopy(item))
                else:
                    merged_items[merged_items.index(match)] = _merge(match, item, None, builtin, in_metadata)
            return merged_items
    return copy.deepcopy(config)


# ---- managedFields ------------------------------------------------------------------------------------
def to_fields_v1(paths: set[Path]) -> dict:
    root: dict = {}
    for path in sorted(paths):
        node = root
        for element in path:
            node = node.setdefault(element, {})
    for path in paths:
        node = value_at_fields(root, path)
        if node:
            node["."] = {}
    return root


def value_at_fields(root: dict, path: Path) -> dict:
    node = root
    for element in path:
        node = node[element]
    return node


def from_fields_v1(node: Mapping, prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    if prefix and (not node or "." in node):
        paths.add(prefix)
    for key, child in node.items():
        if key != ".":
            paths |= from_fields_v1(child, (*prefix, key))
    return paths


def _entry_id(entry: Mapping) -> tuple[str, str, str]:
    return (entry.get("manager", ""), entry.get("operation", ""), entry.get("subresource", ""))


def _owners(obj: Mapping) -> dict[tuple[str, str, str], dict]:
    """(manager, operation, subresource) → {"apiVersion", "time", "fields"} from metadata.managedFields."""
    owners = {}
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        owners[_entry_id(entry)] = {
            "apiVersion": entry.get("apiVersion", ""),
            "time": entry.get("time"),
            "fields": from_fields_v1(entry.get("fieldsV1") or {}),
        }
    return owners


def _entries(owners: Mapping, old: Mapping, api_version: str, now: str) -> list[dict]:
    before = _owners(old)
    entries = []
    for (manager, operation, subresource), owned in owners.items():
        if not owned["fields"]:
            continue
        previous = before.get((manager, operation, subresource))
        unchanged = previous is not None and previous["fields"] == owned["fields"]
        entry = {
            "manager": manager,
            "operation": operation,
            "apiVersion": owned["apiVersion"] or api_version,
            "time": previous["time"] if unchanged and previous["time"] else now,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_fields_v1(owned["fields"]),
        }
        if subresource:
            entry["subresource"] = subresource
        entries.append(entry)
    return entries


def record_update(
    old: Mapping | None, new: dict, manager: str, api_version: str, now: str, builtin: bool, subresource=""
) -> list[dict]:
    """metadata.managedFields after a non-apply write by `manager` (a create when old is None)."""
    old = old or {}
    before, after = fieldset(old, builtin), fieldset(new, builtin)
    changed = {p for p in after if value_at(old, p) != value_at(new, p)}
    gone = before - after
    owners = _owners(old)
    for owned in owners.values():
        owned["fields"] = owned["fields"] - changed - gone
    mine = owners.setdefault((manager, "Update", subresource or ""), {"time": None, "fields": set()})
    mine["fields"] = (mine["fields"] | changed) - gone
    mine["apiVersion"] = api_version
    return _entries(owners, old, api_version, now)


def apply(
    live: Mapping | None,
    config: Mapping,
    manager: str,
    api_version: str,
    now: str,
    *,
    force: bool,
    builtin: bool,
    subresource: str = "",
) -> dict:
    """The object after `manager` applies `config` (live is None for a create), managedFields included.

    Raises ApplyConflict listing fields other managers own with other values (unless force)."""
    live = copy.deepcopy(dict(live or {}))
    applied = fieldset(config, builtin)
    owners = _owners(live)
    me = (manager, "Apply", subresource)
    conflicts = []
    for other, owned in owners.items():
        if other == me:
            continue
        for path in sorted(owned["fields"] & applied):
            current, wanted = value_at(live, path), value_at(config, path)
            if current is not MISSING and current != wanted and not path[-1].startswith("k:"):
                conflicts.append((other[0], owned["apiVersion"], path))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    for other, owned in owners.items():
        if other != me:
            owned["fields"] = owned["fields"] - {p for _, _, p in conflicts}
    merged = _merge(live, config, None, builtin, False)
    released = owners.get(me, {}).get("fields", set()) - applied
    kept = set().union(*(o["fields"] for k, o in owners.items() if k != me)) if owners else set()
    for path in sorted(released, key=len):  # a list item before its fields (they go with it)
        if not any(p[: len(path)] == path for p in kept | applied):
            _remove_at(merged, path)
    owners[me] = {"apiVersion": api_version, "time": None, "fields": applied}
    # A field the apply changed is taken from Update managers who no longer hold its value.
    for other, owned in owners.items():
        if other != me:
            owned["fields"] = {p for p in owned["fields"] if value_at(merged, p) == value_at(live, p)}
    merged.setdefault("metadata", {})["managedFields"] = _entries(owners, live, api_version, now)
    return merged


def dotted(path: Path) -> str:
    """A field path as the API server prints it: `.spec.template.spec.containers[name="agent"].image`."""
    return "".join(f".{e[2:]}" if e.startswith("f:") else f"[{e[2:]}]" for e in path)


def conflict_message(conflicts: list[tuple[str, str, Path]]) -> str:
    """kube-apiserver's wording: `Apply failed with 1 conflict: conflict with "m" using apps/v1: .spec.x`."""

    if len(conflicts) == 1:
        manager, api_version, path = conflicts[0]
        return f'Apply failed with 1 conflict: conflict with "{manager}" using {api_version}: {dotted(path)}'
    lines = [f"Apply failed with {len(conflicts)} conflicts:"]
    by_manager: dict[tuple[str, str], list[Path]] = {}
    for manager, api_version, path in conflicts:
        by_manager.setdefault((manager, api_version), []).append(path)
    for (manager, api_version), paths in by_manager.items():
        lines.append(f'conflicts with "{manager}" using {api_version}:')
        lines += [f"- {dotted(p)}" for p in paths]
    return "\n".join(lines)
