"""Pure document operations the API server performs: merge patch, JSON patch, label and field selectors."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from flowmon_contract.selectors import LabelSelector, selector_matches


class PatchError(ValueError):
    """A patch that cannot be applied (the API answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; a new document, the inputs are untouched."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return copy.deepcopy(result)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as exc:
            raise PatchError(f"path not found: /{'/'.join(parts)}") from exc
    return node, parts[-1]


def _get(doc: Any, path: str) -> Any:
    node = doc
    for part in _pointer(path):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchError(f"path not found: {path}") from exc
    return node


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            index = int(last)
            if not 0 <= index <= len(parent):
                raise PatchError(f"index out of range: {path}")
            parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise PatchError(f"cannot add at {path}")
    return doc


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    parent, last = _parent(doc, parts)
    try:
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise PatchError(f"path not found: {path}") from exc
    return doc


def json_patch(target: Any, operations: list[Mapping]) -> Any:
    """RFC 6902 JSON patch; a failed `test` or a missing path raises PatchError."""
    doc = copy.deepcopy(target)
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _add(_remove(doc, path), path, copy.deepcopy(op.get("value"))) if path else op["value"]
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(doc, op["from"]))
            if kind == "move":
                doc = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"test failed at {path}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


_SET_REQUIREMENT = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_REQUIREMENT = re.compile(r"^\s*([^\s!=,()]+)\s*(==|=|!=)\s*([^\s!=,()]*)\s*$")


def _split_requirements(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str) -> LabelSelector:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` → the structured selector the agent also uses."""
    expressions = []
    for requirement in _split_requirements(text or ""):
        if eq := _EQ_REQUIREMENT.match(requirement):
            key, op, value = eq.groups()
            operator = "NotIn" if op == "!=" else "In"
            expressions.append({"key": key, "operator": operator, "values": [value]})
            continue
        match = _SET_REQUIREMENT.match(requirement)
        if not match:
            raise ValueError(f"unable to parse requirement: {requirement!r}")
        negated, key, set_op, values = match.groups()
        if set_op:
            values_list = [v.strip() for v in values.split(",") if v.strip()]
            expressions.append(
                {"key": key, "operator": "In" if set_op == "in" else "NotIn", "values": values_list}
            )
        else:
            expressions.append({"key": key, "operator": "DoesNotExist" if negated else "Exists"})
    return LabelSelector.model_validate({"matchExpressions": expressions})


def labels_match(text: str | None, obj: Mapping) -> bool:
    if not text:
        return True
    return selector_matches(parse_label_selector(text), obj.get("metadata", {}).get("labels") or {})


def _field_value(obj: Mapping, dotted: str) -> str:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return "" if node is None else str(node)


def fields_match(text: str | None, obj: Mapping) -> bool:
    """Field selectors: `metadata.name=x,spec.nodeName!=y` (any dotted path, = == != only)."""
    for requirement in _split_requirements(text or ""):
        match = _EQ_REQUIREMENT.match(requirement)
        if not match:
            raise ValueError(f"unable to parse field selector requirement: {requirement!r}")
        path, op, value = match.groups()
        if (_field_value(obj, path) == value) == (op == "!="):
            return False
    return True
