"""A static inventory: a YAML or JSON file of ordinary Kubernetes objects (standalone mode, tests).

Multi-document YAML, JSON, and `kind: List` / `PodList` as `kubectl get -o yaml|json` prints them.
A file that is not UTF-8, does not parse, or looks truncated (no document at all, an object without a
kind or a name) is refused as a whole: the caller keeps the metadata it had. An inventory that is
deliberately empty says so: `kind: List` with `items: []`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.documents import yaml_error_text


class InventoryError(ValueError):
    pass


def iter_objects(document: Any) -> Iterator[tuple[Mapping[str, Any], str | None]]:
    """Flatten one document into (object, kind); list items inherit the kind their list names."""
    if document is None:
        return
    if not isinstance(document, Mapping):
        raise InventoryError(f"expected a Kubernetes object, got {type(document).__name__}")
    kind = document.get("kind") or ""
    if kind.endswith("List") and isinstance(document.get("items"), list):
        item_kind = kind.removesuffix("List") or None
        for item in document["items"]:
            for obj, inner_kind in iter_objects(item):
                yield obj, inner_kind or item_kind
        return
    yield document, kind or None


def parse_inventory(text: str) -> list[tuple[Mapping[str, Any], str | None]]:
    try:
        documents = list(yaml.safe_load_all(text))  # JSON is YAML: one parser for both
    except yaml.YAMLError as exc:
        raise InventoryError(f"not valid YAML or JSON: {yaml_error_text(exc)}") from None
    if all(document is None for document in documents):
        raise InventoryError(
            "no Kubernetes object in it (empty or truncated); an empty inventory is `kind: List`, `items: []`"
        )
    objects = [pair for document in documents for pair in iter_objects(document)]
    for number, (obj, kind) in enumerate(objects, start=1):
        name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), Mapping) else None
        if not kind or not isinstance(name, str) or not name:
            raise InventoryError(f"object {number} has no kind or no metadata.name (truncated?)")
    return objects


def read_inventory(path: str | Path) -> list[tuple[Mapping[str, Any], str | None]]:
    """The objects of an inventory file (OSError when unreadable, InventoryError when unusable)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_inventory(text)


def load_inventory(path: str | Path, store: MetadataStore | None = None) -> MetadataStore:
    """Read the file into a store (a new one unless given) through the same path as watch events."""
    store = store if store is not None else MetadataStore()
    for obj, kind in read_inventory(path):
        store.apply("ADDED", obj, kind)
    return store
