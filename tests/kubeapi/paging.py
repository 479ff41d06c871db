"""List chunking (limit/continue) the way kube-apiserver with etcd serves it.

A continue token is opaque to clients; here it is base64 JSON of the list's resourceVersion, the key the
next page starts after, and when it was issued. It expires like a real one: when the store was compacted
past its resourceVersion (`KubeAPI.compact()`), or when it is older than the server's `continue_ttl`
(etcd compacts every five minutes by default) on the server's clock. Pages after the first show the
current state (the emulator keeps no snapshots). An expired token answers 410 Expired
with the real message and a fresh token that finishes the list from the latest state (inconsistently).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping

from .errors import ApiError

EXPIRED_MESSAGE = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - objects "
    "that were created, modified, or deleted between the time the first chunk was returned and now may show "
    "up in the list."
)


def encode(rv: int, start_after: tuple[str, str], issued: float) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(start_after), "issued": issued})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode(token: str) -> tuple[int, tuple[str, str], float]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(data["rv"]), (str(data["start"][0]), str(data["start"][1])), float(data["issued"])
    except (binascii.Error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ApiError(400, "BadRequest", f"continue key is not valid: {exc}") from exc


def page(
    items: list[dict],
    rv: int,
    query: Mapping[str, str],
    *,
    now: float,
    compacted_rv: int,
    ttl: float,
) -> tuple[list[dict], dict]:
    """(the page, its ListMeta) for a list request; items sorted by (namespace, name)."""
    limit = int(query.get("limit") or 0)
    start_after: tuple[str, str] | None = None
    issued = now
    if query.get("continue"):
        token_rv, start_after, issued = decode(query["continue"])
        if token_rv < compacted_rv or now - issued > ttl:
            fresh = encode(rv, start_after, now)
            raise ApiError(410, "Expired", EXPIRED_MESSAGE, metadata={"continue": fresh})
        rv = token_rv
    if start_after is not None:
        items = [i for i in items if _key(i) > start_after]
    chunk = items[:limit] if limit else items
    meta: dict = {"resourceVersion": str(rv)}
    if limit and len(items) > limit:
        meta["continue"] = encode(rv, _key(chunk[-1]), issued)  # the whole list keeps its first page's age
        meta["remainingItemCount"] = len(items) - limit
    return chunk, meta


def _key(item: Mapping) -> tuple[str, str]:
    meta = item["metadata"]
    return (meta.get("namespace") or "", meta["name"])
