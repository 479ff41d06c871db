"""Keeps a MetadataStore in step with the Kubernetes API: list, then watch, per resource, on flowmon_kube's
client (one aiohttp session, the service account's token and the cluster's CA).

- Lists in pages (`limit`/`continue`) and parses each page into slim records at once: 20,000 full pod
  objects are never held in memory together.
- Watches resume from the last resourceVersion after a dropped connection; a 410 Gone (the version is
  too old) relists, which also removes what was deleted meanwhile.
- When the API goes away, the store keeps its last content (attribution goes on) and `age_seconds()`
  grows: how long the metadata has not been known to be current (`flowmon_agent_metadata_age_seconds`).
- Each resource is followed by its own supervised task: an unexpected exception (a bug, an object the
  parser did not foresee) restarts that resource alone, with a relist, after a jittered backoff
  (supervision.Restarts); the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from flowmon_agent.metadata.records import parse_object
from flowmon_agent.metadata.store import MetadataStore
from flowmon_agent.supervision import Restarts
from flowmon_kube import (
    ApiClient,
    Connection,
    Gone,
    KubeError,
    error,
    in_cluster,
    raise_for_status,
    read_json,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    path: str  # the collection's URL path, all namespaces


RESOURCES = (
    Resource("Namespace", "/api/v1/namespaces"),
    Resource("Node", "/api/v1/nodes"),
    Resource("ReplicaSet", "/apis/apps/v1/replicasets"),
    Resource("Job", "/apis/batch/v1/jobs"),
    Resource("Service", "/api/v1/services"),
    Resource("Pod", "/api/v1/pods"),
)


class KubeWatcher:
    def __init__(
        self,
        store: MetadataStore,
        base_url: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        page_size: int = 500,
        watch_timeout_seconds: int = 300,
        retry_seconds: tuple[float, float] = (0.5, 10.0),
        resources: Sequence[Resource] = RESOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self._connection = Connection(
            server=self.base_url,
            token=token,
            token_file=Path(token_file) if token_file else None,  # re-read: projected tokens rotate
            ca_path=str(ca_file) if ca_file else None,
        )
        self.page_size = page_size
        self.watch_timeout_seconds = watch_timeout_seconds
        self.retry_seconds = retry_seconds
        self.resources = tuple(resources)
        self._clock = clock
        self._started = clock()
        self._listed: set[str] = set()
        self._connected: set[str] = set()
        self._last_contact: dict[str, float] = {}
        self.relists = 0  # lists after the first, e.g. on 410 Gone
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._synced = threading.Event()
        self._restarts = Restarts()

    @classmethod
    def in_cluster(cls, store: MetadataStore, **kwargs: Any) -> KubeWatcher:
        """Configured from the pod's service account, as every in-cluster client is."""
        conn = in_cluster()
        return cls(store, conn.server, token_file=conn.token_file, ca_file=conn.ca_path, **kwargs)

    # --- freshness ------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Every resource has been listed at least once."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def age_seconds(self) -> float:
        """How long the metadata has not been known to be current: 0 while every watch is connected;
        otherwise the time since the oldest resource last heard from the API (since start if never)."""
        now = self._clock()
        age = 0.0
        for resource in self.resources:
            kind = resource.kind
            if kind not in self._connected:
                age = max(age, now - self._last_contact.get(kind, self._started))
        return age

    def _contact(self, kind: str) -> None:
        self._last_contact[kind] = self._clock()

    # --- HTTP -----------------------------------------------------------------------------------

    def _timeout(self) -> tuple[float, float]:
        """(connect, read): a watch that stays silent past its own timeout is a dead connection."""
        return (10.0, self.watch_timeout_seconds + 30.0)

    async def list_resource(self, client: ApiClient, resource: Resource) -> str:
        """List page by page into the store (as one replace); returns the version to watch from.

        That is the first page's resourceVersion: the API serves every page from that snapshot, and a
        server that does not (pages shifting under writes) still has its later changes replayed by the
        watch. Items seen twice are harmless.
        """
        records = []
        params: dict[str, Any] = {"limit": str(self.page_size)}
        version: str | None = None
        while True:
            page = await read_json(
                await client.request("GET", resource.path, query=params, timeout=self._timeout())
            )
            for item in page.get("items") or []:
                record = parse_object(item, resource.kind)
                if record is not None:
                    records.append(record)
            meta = page.get("metadata") or {}
            if version is None:
                version = str(meta.get("resourceVersion") or "")
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        self.store.replace(resource.kind, records)
        log.debug("%s: listed %d at resourceVersion %s", resource.kind, len(records), version)
        if resource.kind in self._listed:
            self.relists += 1
        self._listed.add(resource.kind)
        self._contact(resource.kind)
        if len(self._listed) == len(self.resources):
            self._synced.set()
        return version or ""

    async def watch_resource(self, client: ApiClient, resource: Resource, version: str) -> str:
        """Apply watch events until the server ends the stream; returns the last resourceVersion (bookmarks
        included).

        The stream is JSON lines, one event each, on the watcher's one session; once the server has
        answered 200 the stream is open, and age_seconds() is 0 from then on, before any event.
        """
        query = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout_seconds),
        }
        response = await client.request("GET", resource.path, query=query, timeout=self._timeout())
        await raise_for_status(response)  # 410 Gone: relist
        self._connected.add(resource.kind)
        log.debug("%s: watching from resourceVersion %s", resource.kind, version)
        try:
            async with response:
                while line := await response.content.readline():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":  # 410 when the version fell out of the history meanwhile
                        raise error(int(obj.get("code") or 0), obj)
                    if kind != "BOOKMARK":
                        self.store.apply(kind, obj, resource.kind)
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        finally:
            self._connected.discard(resource.kind)
            self._contact(resource.kind)
        return version

    async def _follow(self, client: ApiClient, resource: Resource) -> None:
        version: str | None = None
        delay = self.retry_seconds[0]
        while True:
            try:
                if version is None:
                    version = await self.list_resource(client, resource)
                started = self._clock()
                version = await self.watch_resource(client, resource, version)
                if self._clock() - started < 1.0:  # a server ending watches at once: do not spin
                    await asyncio.sleep(self.retry_seconds[0])
                delay = self.retry_seconds[0]
            except Gone:
                log.info("%s: resourceVersion too old, relisting", resource.kind)
                version = None
            except (TimeoutError, aiohttp.ClientError, KubeError, OSError, ValueError) as exc:
                log.warning("%s: %s; retrying in %.1fs with the last metadata", resource.kind, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_seconds[1])

    async def run(self) -> None:
        """Follow every resource until cancelled; each restarts alone after an unexpected error."""
        async with ApiClient(self._connection) as client:
            follows = {r.kind: functools.partial(self._follow, client, r) for r in self.resources}
            await asyncio.gather(
                *(self._restarts.supervise(f"kube-watch/{kind}", f) for kind, f in follows.items())
            )

    # --- as a background thread ------------------------------------------------------------------

    def start(self, restarts: Restarts | None = None) -> KubeWatcher:
        """Run in a thread of its own; `restarts` (the agent's) counts and paces restarts."""
        if restarts is not None:
            self._restarts = restarts
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._task = loop.create_task(self.run())
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
            loop.close()

        self._thread = threading.Thread(target=main, name="kube-watcher", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
