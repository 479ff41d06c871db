"""The HTTP face of the emulator: Kubernetes API paths on aiohttp, served from a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.tls_samples import make_pki
from tests.waiting import WAIT, wait_for

from . import paging
from .admission import OWNER_REFERENCES_PERMISSION_ENFORCEMENT, PLUGINS, owner_references_enforcement
from .authn import DISCOVERY as TOKENREVIEW_DISCOVERY
from .authn import TOKENREVIEW_PATH, Identity, Tokens
from .rbac import MASTERS, forbidden_message, resource_request
from .resources import CRD_TYPE, ResourceType, crd_body
from .store import APPLY_PATCH, BOOKMARK, CLOSE_DROP, CLOSE_END, CLOSE_EXPIRED, ApiError, Store, Watcher

SERVER_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-flowmon-kubeapi",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
TRUE = ("true", "1", "t")  # lower-cased; as Go's strconv.ParseBool (clients send True, true, 1)
IDENTITY = web.RequestKey("identity", Identity)
ADMIN = Identity("kubeapi-admin", "kubeapi-admin", (MASTERS, "system:authenticated"), ())


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _error(exc: ApiError) -> web.Response:
    return _json(exc.status(), exc.code)


class _Route:
    """A parsed resource path: /api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]] or /apis/G/V/..."""

    def __init__(self, store: Store, group: str, version: str, rest: list[str]):
        self.namespace: str | None = None
        if (
            len(rest) >= 3
            and rest[0] == "namespaces"
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            self.namespace, rest = rest[1], rest[2:]
        self.rtype: ResourceType = store.resource(group, version, rest[0])
        self.name: str | None = rest[1] if len(rest) > 1 else None
        self.sub: str | None = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (self.namespace and not self.rtype.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if self.sub == "finalize":
            self.sub = None
        if self.sub is not None and self.sub not in self.rtype.subresources:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({self.sub})")


class KubeAPI:
    """A Kubernetes API server emulator on 127.0.0.1 (random port) with a bearer token.

    Start/stop/start keeps the port and the data, like an API server that goes away and comes back.
    Test code can read and write objects directly (`create`, `get`, `patch`, ...), which goes through
    the same store and rules as HTTP requests and feeds the same watches.
    """

    def __init__(
        self,
        store: Store | None = None,
        token: str = "flowmon-kubeapi-token",
        host="127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,  # HTTPS, as clients in pods expect (tests/kubelet)
        tls_dir: Path | None = None,  # or HTTPS with a throwaway CA made there (`self.pki`)
        admission_plugins: Iterable[str] = (),  # as --enable-admission-plugins (admission.PLUGINS)
        continue_ttl: float = 300.0,  # seconds a list's continue token stays valid (etcd's compaction)
        clock: Callable[[], float] = time.monotonic,  # for continue tokens' age
    ):
        self.store = store or Store()
        unknown = set(admission_plugins) - PLUGINS
        if unknown:
            raise ValueError(f"unknown admission plugins: {sorted(unknown)}")
        self.admission_plugins = set(admission_plugins)  # may change while running
        self.continue_ttl, self.clock = continue_ttl, clock
        self.request_hooks: list[Callable[[str, str], None]] = []  # see on_request()
        self.ssl_context = ssl_context
        self.token = token
        self.host = host
        # HTTPS, as every real API server: a throwaway CA and a serving certificate for 127.0.0.1 there.
        self.pki = make_pki(tls_dir, "kubeapi") if tls_dir is not None else None
        if self.pki is not None:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(self.pki.cert_file, self.pki.key_file)
        self.port = 0
        self.requests: list[tuple[str, str]] = []  # (method, path_qs): what clients asked, for assertions
        self.tokens = Tokens()  # TokenReview: tokens tests registered (see authn)
        self.denials: list[tuple[str, str, str]] = []  # (method, path prefix, message): see deny()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def start(self) -> KubeAPI:
        if self.running:
            return self
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._listen())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="kubeapi", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the Kubernetes API emulator did not start")
        return self

    async def _listen(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        """Go away: open watch streams are cut, new connections are refused (data is kept)."""
        if not self.running or self._loop is None:
            return
        self.store.close_watches(CLOSE_DROP, owner=self)
        runner = self._runner
        asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(10)  # type: ignore[union-attr]
        self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kubeconfig(self, path: Path | str, namespace: str = "default", token: str | None = None) -> Path:
        """Write a kubeconfig for this server (token auth: the admin's, or `token`, e.g. a ServiceAccount's;
        its CA when on HTTPS) and return its path."""
        path = Path(path)
        cluster = {"server": self.url}
        if self.pki is not None:
            cluster["certificate-authority"] = str(self.pki.ca_file)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubeapi", "cluster": cluster}],
            "users": [{"name": "kubeapi", "user": {"token": token or self.token}}],
            "contexts": [
                {
                    "name": "kubeapi",
                    "context": {"cluster": "kubeapi", "user": "kubeapi", "namespace": namespace},
                }
            ],
            "current-context": "kubeapi",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- direct access for tests -----------------------------------------------------------------------
    def service_account_token(self, namespace: str, name: str, **kwargs: Any) -> str:
        """A new token that TokenReview (and this server) authenticates as that ServiceAccount."""
        return self.tokens.service_account(namespace, name, **kwargs)

    def rtype(self, api_version: str, kind: str) -> ResourceType:
        return self.store.type_for(api_version, kind)

    def create(self, obj: Mapping) -> dict:
        rtype = self.rtype(obj["apiVersion"], obj["kind"])
        return self.store.create(rtype, obj.get("metadata", {}).get("namespace"), obj)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict:
        return self.store.get(self.rtype(api_version, kind), namespace, name)

    def find(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """Like get, but None when absent."""
        try:
            return self.get(api_version, kind, name, namespace)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict]:
        return self.store.list(self.rtype(api_version, kind), namespace, label_selector)[0]

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Mapping,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict:
        """A merge patch (subresource="status" to write status)."""
        from .store import MERGE_PATCH

        rtype = self.rtype(api_version, kind)
        return self.store.patch(rtype, namespace, name, MERGE_PATCH, patch, subresource)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict:
        return self.store.delete(self.rtype(api_version, kind), namespace, name)

    def register_crd(self, group: str, kind: str, plural: str, **kwargs: Any) -> dict:
        """Create a minimal CRD: the resource appears in discovery and can be used right away."""
        return self.store.create(CRD_TYPE, None, crd_body(group, kind, plural, **kwargs))

    def compact(self) -> int:
        """Forget the watch history: resuming a watch from an older resourceVersion answers 410 Gone."""
        return self.store.compact()

    def pause_namespace_controller(self, paused: bool = True) -> None:
        """Paused, a deleted namespace stays Terminating with its content (as a real one does for a while:
        its controller is asynchronous) until `finalize_namespaces()`; e.g. for `kubectl delete -k`, which
        deletes a namespace and then the objects in it."""
        self.store.namespace_controller = not paused

    def finalize_namespaces(self) -> None:
        self.store.finalize_namespaces()

    def expire_watches(self) -> int:
        """Compact and end every open watch stream with an ERROR 410 event; returns how many."""
        self.store.compact()
        return self.store.close_watches(CLOSE_EXPIRED)

    def send_bookmarks(self) -> int:
        """A BOOKMARK at the current resourceVersion to every open watch that allows them."""
        return self.store.send_bookmarks()

    def end_watches(self) -> int:
        """End every open watch stream normally, as when its timeoutSeconds is over; returns how many."""
        return self.store.close_watches(CLOSE_END)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05) -> Any:
        return wait_for(predicate, timeout, interval)

    def deny(self, method: str, path_prefix: str, message: str) -> None:
        """Refuse requests like an admission webhook would: 403 for `method` on paths under the prefix."""
        self.denials.append((method, path_prefix, message))

    # ---- HTTP --------------------------------------------------------------------------------------------
    def on_request(self, hook: Callable[[str, str], None]) -> None:
        """Call hook(method, path_qs) before serving each request, in the server's thread: to make
        something happen at an exact point of a client's sequence (e.g. `compact()` before a continue)."""
        self.request_hooks.append(hook)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        for hook in list(self.request_hooks):
            hook(request.method, request.path_qs)
        identity = self._identity(request.headers.get("Authorization", ""))
        if identity is None:
            return _error(ApiError(401, "Unauthorized", "Unauthorized"))
        parts = [p for p in request.path.split("/") if p]
        access = resource_request(request.method, parts, request.query, identity.username, identity.groups)
        if access is not None and not self.store.policy().allows(access):
            details = {"name": access.name or "", "group": access.api_group, "kind": access.resource}
            return _error(ApiError(403, "Forbidden", forbidden_message(access), details))
        request[IDENTITY] = identity
        for method, prefix, message in self.denials:
            if request.method == method and request.path.startswith(prefix):
                return _error(ApiError(403, "Forbidden", f"admission webhook denied the request: {message}"))
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return _error(exc)
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(ApiError(400, "BadRequest", str(exc)))

    def _identity(self, header: str) -> Identity | None:
        """Who the bearer token is: the harness's own token is a cluster admin (system:masters)."""
        scheme, _, token = header.partition(" ")
        if not self.token or (scheme == "Bearer" and token == self.token):
            return ADMIN
        return self.tokens.identity(token) if scheme == "Bearer" else None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == TOKENREVIEW_PATH:  # create-only and never stored, like the real API
            if request.method != "POST":
                raise ApiError(405, "MethodNotAllowed", "tokenreviews support only create")
            return _json(self.tokens.review(await request.json()), 201)
        if request.method == "GET":
            if parts in (["version"], ["healthz"], ["livez"], ["readyz"]):
                return _json(SERVER_VERSION) if parts == ["version"] else web.Response(text="ok")
            if parts == ["api"]:
                return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            if parts == ["apis"]:
                return _json(self._group_list())
            if parts == ["api", "v1"]:
                return _json(self._resource_list("", "v1"))
            if len(parts) == 2 and parts[0] == "apis":
                return _json(self._group(parts[1]))
            if len(parts) == 3 and parts[0] == "apis":
                return _json(self._resource_list(parts[1], parts[2]))
        if len(parts) >= 3 and parts[:2] == ["api", "v1"]:
            route = _Route(self.store, "", "v1", parts[2:])
        elif len(parts) >= 4 and parts[0] == "apis":
            route = _Route(self.store, parts[1], parts[2], parts[3:])
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._serve(request, route)

    def _group(self, name: str) -> dict:
        versions = self._group_versions().get(name)
        if not versions or name == "":
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({name})")
        entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": name,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _group_list(self) -> dict:
        groups = [self._group(g) for g in self._group_versions() if g]
        for group in groups:
            del group["kind"], group["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _group_versions(self) -> dict[str, list[str]]:
        return {**self.store.group_versions(), TOKENREVIEW_PATH[1]: [TOKENREVIEW_PATH[2]]}

    def _resource_list(self, group: str, version: str) -> dict:
        if [group, version] == TOKENREVIEW_PATH[1:3]:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "/".join(TOKENREVIEW_PATH[1:3]),
                "resources": [TOKENREVIEW_DISCOVERY],
            }
        rtypes = self.store.resources_in(group, version)
        if not rtypes:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": rtypes[0].api_version,
            "resources": [entry for rtype in rtypes for entry in rtype.discovery_entries()],
        }

    async def _serve(self, request: web.Request, route: _Route) -> web.StreamResponse:
        q = request.query
        store, rtype = self.store, route.rtype
        if route.name is None:
            if request.method == "GET" and q.get("watch", "").lower() in TRUE:
                return await self._watch(request, route)
            if request.method == "GET":
                items, rv = store.list(rtype, route.namespace, q.get("labelSelector"), q.get("fieldSelector"))
                return _json(self._list_body(rtype, items, rv, q))
            if request.method == "POST":
                if rtype.namespaced and not route.namespace:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                manager = q.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]
                body = await request.json()
                with self._admission(request):
                    return _json(store.create(rtype, route.namespace, body, manager), 201)
            if request.method == "DELETE":
                items, rv = store.list(rtype, route.namespace, q.get("labelSelector"), q.get("fieldSelector"))
                for item in items:
                    with contextlib.suppress(ApiError):
                        store.delete(rtype, item["metadata"].get("namespace"), item["metadata"]["name"])
                return _json(self._list_body(rtype, items, rv, {}))
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")
        if rtype.namespaced and not route.namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if request.method == "GET":
            return _json(store.get(rtype, route.namespace, route.name))
        manager = q.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]
        if request.method == "PUT":
            body = await request.json()
            with self._admission(request):
                return _json(store.replace(rtype, route.namespace, route.name, body, route.sub, manager))
        if request.method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type == APPLY_PATCH and not q.get("fieldManager"):
                raise ApiError(400, "BadRequest", "fieldManager is required for apply requests")
            raw = await request.text()
            body = json.loads(raw) if raw.lstrip().startswith(("{", "[")) else yaml.safe_load(raw)
            force = q.get("force", "").lower() in TRUE
            with store.lock, self._admission(request):
                existed = store.exists(rtype, route.namespace, route.name)
                patched = store.patch(
                    rtype, route.namespace, route.name, content_type, body, route.sub, manager, force
                )
            return _json(patched, 200 if existed else 201)  # an apply that creates answers 201
        if request.method == "DELETE":
            raw = await request.text()
            options = json.loads(raw) if raw.strip() else {}
            propagation = q.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
            return _json(
                store.delete(rtype, route.namespace, route.name, propagation, options.get("preconditions"))
            )
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")

    @contextlib.contextmanager
    def _admission(self, request: web.Request) -> Iterator[None]:
        """The enabled admission plugins, as the request's user, around one (synchronous) store write."""
        if OWNER_REFERENCES_PERMISSION_ENFORCEMENT not in self.admission_plugins:
            yield
            return
        identity: Identity = request[IDENTITY]
        admit = owner_references_enforcement(
            identity.username, identity.groups, self.store.policy, self.store.type_for
        )
        with self.store.admitting(admit):
            yield

    def _list_body(self, rtype: ResourceType, items: list[dict], rv: int, q: Mapping) -> dict:
        """Paged with limit/continue (paging.py): expired tokens answer 410."""
        chunk, metadata = paging.page(
            items, rv, q, now=self.clock(), compacted_rv=self.store.compacted_rv, ttl=self.continue_ttl
        )
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": chunk,
        }

    async def _watch(self, request: web.Request, route: _Route) -> web.StreamResponse:
        q = request.query
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        watcher = Watcher(
            route.rtype, route.namespace, q.get("labelSelector"), q.get("fieldSelector"), loop, queue, self
        )
        watcher.bookmarks = q.get("allowWatchBookmarks", "").lower() in TRUE
        send_initial = q.get("sendInitialEvents", "").lower() in TRUE
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            backlog, backlog_rv = self.store.watch(watcher, q.get("resourceVersion"), send_initial)
        except ApiError as exc:
            if exc.code != 410:
                raise
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
            return response
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        deadline = None if timeout is None else loop.time() + timeout
        try:
            await response.prepare(request)
            lines = list(backlog)
            if send_initial:
                lines.append(self._bookmark(route.rtype, backlog_rv, initial_end=True))
            for line in lines:
                await response.write(json.dumps(line).encode() + b"\n")
            while deadline is None or loop.time() < deadline:
                if request.transport is None or request.transport.is_closing():
                    break
                wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - loop.time()))
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    continue
                if item == CLOSE_DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    break
                if item == CLOSE_END:
                    break
                if isinstance(item, tuple) and item[0] == BOOKMARK:
                    item = self._bookmark(route.rtype, item[1])
                elif item == CLOSE_EXPIRED:
                    error = ApiError(410, "Expired", "too old resource version (watch expired)")
                    await response.write(
                        json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n"
                    )
                    break
                await response.write(json.dumps(item).encode() + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    @staticmethod
    def _bookmark(rtype: ResourceType, resource_version: int, initial_end: bool = False) -> dict:
        metadata: dict = {"resourceVersion": str(resource_version)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": metadata},
        }
