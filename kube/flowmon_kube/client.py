"""A kubernetes_asyncio ApiClient for a Connection, and the API's answers as JSON dicts or errors.

Requests go through the library (`ApiClient.call_api`, the typed APIs, `watch.Watch`) with
`_preload_content=False`: the caller gets the raw response and reads it here as a plain dict. The
library would otherwise build typed model trees (costly for thousands of pods) and log whole response
bodies at DEBUG level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

from flowmon_kube.connection import Connection

# kubernetes_asyncio's REST layer logs every preloaded response body at DEBUG: Secrets and TokenReviews
# must never reach a log, whatever level an operator's --debug sets.
logging.getLogger("kubernetes_asyncio.client.rest").setLevel(logging.INFO)


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


def configuration(conn: Connection) -> Configuration:
    """The library's configuration for a connection. TLS is verified unless the kubeconfig itself said
    insecure-skip-tls-verify. A token file is re-read on every request (the library's own in-cluster
    loader re-reads it once a minute; rotated tokens should be used as soon as they are written)."""
    config = Configuration(host=conn.server.rstrip("/"))
    config.ssl_ca_cert, config.cert_file, config.key_file = conn.ca_path, conn.cert_path, conn.key_path
    config.verify_ssl = not conn.insecure
    if token := conn.bearer():
        config.api_key["BearerToken"] = f"Bearer {token}"
        if conn.token_file is not None:

            def reread(config: Configuration) -> None:
                if token := conn.bearer():
                    config.api_key["BearerToken"] = f"Bearer {token}"

            config.refresh_api_key_hook = reread
    return config


def api_client(conn: Connection) -> ApiClient:
    """One aiohttp session (call within a running loop; close it, or use `async with`)."""
    return ApiClient(configuration(conn))


async def call(
    client: ApiClient,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] | None = None,
) -> aiohttp.ClientResponse:
    """One request to a path through the library (auth, TLS, session); the raw response, unread.

    `timeout` is the library's: a total in seconds, or (connect, read between bytes) for streams.
    """
    return await client.call_api(
        path,
        method,
        query_params=list((query or {}).items()),
        header_params={"Accept": "application/json", "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=timeout,
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
