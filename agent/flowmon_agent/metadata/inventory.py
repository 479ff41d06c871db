"""A static inventory: a YAML or JSON file of ordinary Kubernetes objects (standalone mode, tests).

Multi-document YAML, JSON, and `kind: List` / `PodList` as `kubectl get -o yaml|json` prints them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from flowmon_agent.metadata.store import MetadataStore


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
        raise InventoryError(f"not valid YAML or JSON: {exc}") from exc
    return [pair for document in documents for pair in iter_objects(document)]


def load_inventory(path: str | Path, store: MetadataStore | None = None) -> MetadataStore:
    """Read the file into a store (a new one unless given) through the same path as watch events."""
    store = store if store is not None else MetadataStore()
    for obj, kind in parse_inventory(Path(path).read_text()):
        store.apply("ADDED", obj, kind)
    return store
