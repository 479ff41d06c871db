"""HTTP to the Kubernetes API on plain aiohttp, and the API's answers as JSON dicts or errors.

Hand-written on purpose (the house prefers a library): `kubernetes_asyncio` did this part before and cost
the agent, on every node, +38 MB RSS at import (87 MB vs 49 MB after `import flowmon_agent.runner`: it
loads every typed model) and +50 MB of image; the agent needs none of its typed models, only
authenticated JSON requests and watch streams, which are a few lines on the aiohttp it already uses.
What is written here: the request (path, query, JSON body), TLS verified against the cluster's CA, the
bearer token read again from its file on every request (projected tokens rotate), and errors mapped from
the API's Status. No request or response body and no token is ever logged.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

from flowmon_kube.connection import Connection


class KubeError(Exception):
    """A non-2xx answer, with the API's Status reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    """410: a resourceVersion or continue token too old to serve: list again."""


ERRORS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone}


def error(status: int, document: object, text: str = "") -> KubeError:
    """The exception for a Status object (or any other answer) with this HTTP or Status code."""
    found = document if isinstance(document, dict) else {}
    message = found.get("message") or text[:200]
    return ERRORS.get(status, KubeError)(status, found.get("reason", ""), message)


def tls_context(conn: Connection) -> ssl.SSLContext | bool:
    """Verified against the connection's CA (the system's when it names none); a client certificate when
    the kubeconfig has one; no verification only when the kubeconfig said insecure-skip-tls-verify."""
    if not conn.server.startswith("https:"):
        return False
    if conn.insecure:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=conn.ca_path)
    if conn.cert_path and conn.key_path:
        context.load_cert_chain(conn.cert_path, conn.key_path)
    return context


def timeout_of(timeout: float | tuple[float, float] | None) -> aiohttp.ClientTimeout:
    """A total in seconds, or (connect, read between bytes) for streams; None: no limit."""
    if isinstance(timeout, tuple):
        return aiohttp.ClientTimeout(total=None, connect=timeout[0], sock_read=timeout[1])
    return aiohttp.ClientTimeout(total=timeout)


class ApiClient:
    """One aiohttp session to one API server. The session is opened on the first request, so that the
    client can be built outside a running loop; close it, or use `async with`."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._server = conn.server.rstrip("/")
        self._tls = tls_context(conn)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, content_type: str) -> dict[str, str]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token := self.conn.bearer():  # read again each time: a rotated token is used at once
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> aiohttp.ClientResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._tls))
        return await self._session.request(
            method,
            self._server + path,
            params=dict(query or {}),
            data=None if body is None else json.dumps(body),  # JSON is YAML too (server-side apply)
            headers=self.headers(content_type),
            timeout=timeout_of(timeout),
        )


async def read_json(response: aiohttp.ClientResponse) -> dict:
    """The body of a response as a dict (released); the API's error for a non-2xx status."""
    async with response:
        text = await response.text()
    document = json.loads(text) if text.lstrip().startswith("{") else {}
    if response.status >= 300:
        raise error(response.status, document, text)
    return document


async def raise_for_status(response: aiohttp.ClientResponse) -> None:
    """The API's error for a non-2xx response (read and released then); a 2xx one is left unread."""
    if response.status >= 300:
        await read_json(response)
