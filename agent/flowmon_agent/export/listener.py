"""The agent's listening socket: connections are counted and capped before they cost anything.

Every pod in the cluster can reach the agent (hostNetwork), so the listener sheds load instead of dying:
a connection over the total cap or over its source address's cap is reset right after accept, before any
TLS state exists (asyncio gives every TLS connection a 256 KiB read buffer); the TLS handshake and then
each request head must arrive within `header_timeout`. Idle keep-alive connections are aiohttp's (its
`keepalive_timeout`). The HTTP protocol itself is aiohttp's: a `GuardedConnection` only stands in front
of it, passing every event through.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int = 128  # open at once, all sources together
    max_connections_per_source: int = 16  # open at once from one client IP address
    header_timeout: float = 10.0  # TLS handshake, then each request head, from its first byte


@dataclass
class HttpStats:
    """Counters the agent exports (flowmon_agent_http_*); plain ints, read at scrape time."""

    refused_capacity: int = 0  # connections reset: the total cap was reached
    refused_source: int = 0  # connections reset: their source address's cap was reached
    header_timeouts: int = 0
    handshake_failures: int = 0
    handler_timeouts: int = 0  # requests answered 503 after the handler's time limit
    bodies_refused: int = 0  # request bodies too large (413) or compressed (415)
    malformed_requests: int = 0  # requests that do not parse as HTTP (400)


class ConnectionGate:
    """The protocol factory for `loop.create_server`: admits, upgrades to TLS and times out connections.

    `handler_factory` makes the HTTP protocol of one connection (aiohttp's `AppRunner.server`);
    `tls_context` returns the live server context (None: plain HTTP), read per connection so that a
    certificate rotation applies to new connections only."""

    def __init__(
        self,
        handler_factory: Callable[[], asyncio.Protocol],
        limits: ListenerLimits,
        tls_context: Callable[[], ssl.SSLContext | None],
        stats: HttpStats,
    ) -> None:
        self._handler_factory, self.limits, self._tls_context = handler_factory, limits, tls_context
        self.stats = stats
        self.per_source: Counter[str] = Counter()
        self._handshakes: set[asyncio.Task] = set()

    @property
    def open(self) -> int:
        return self.per_source.total()

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    def admit(self, source: str) -> bool:
        if self.open >= self.limits.max_connections:
            self.stats.refused_capacity += 1
            return False
        if self.per_source[source] >= self.limits.max_connections_per_source:
            self.stats.refused_source += 1
            return False
        self.per_source[source] += 1
        return True

    def release(self, source: str) -> None:
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]

    def start_tls(self, connection: GuardedConnection, transport: asyncio.Transport) -> bool:
        context = self._tls_context()
        if context is None:
            return False
        task = asyncio.get_running_loop().create_task(connection.handshake(transport, context))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        return True

    def make_handler(self) -> asyncio.Protocol:
        return self._handler_factory()

    async def close(self) -> None:
        """Cancel handshakes in flight (stopping); established connections are aiohttp's to close."""
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)


def request_started(transport: asyncio.BaseTransport | None) -> Callable[[], None]:
    """Tell the connection behind `transport` that a whole request head arrived (its header timer
    stops); returns the callback for when the response is done (the next request's timer may start)."""
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, GuardedConnection):
        return lambda: None
    protocol.request_started()
    return protocol.request_finished


class GuardedConnection(asyncio.Protocol):
    """One connection: admission, TLS upgrade, header timer; then every event goes to aiohttp's handler."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._source: str | None = None  # set once admitted: released exactly once
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._handler: asyncio.Protocol | None = None
        self._in_request = False
        self._header_timer: asyncio.TimerHandle | None = None
        # Bytes decrypted in the same read as the end of the handshake arrive before start_tls returns.
        self._early: list[bytes] = []
        self._early_eof = False

    # ---- admission and TLS ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        if not self._gate.admit(source):
            transport.abort()  # a reset, right after accept: no TLS, no HTTP state
            return
        self._source, self._raw = source, transport
        if not self._gate.start_tls(self, transport):
            self._hand_over(transport)

    async def handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=self._gate.limits.header_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._gate.stats.handshake_failures += 1
            log.debug("TLS handshake failed: %s", type(exc).__name__)
            self._release()
            return
        if secure is None or raw.is_closing():
            self._release()
            return
        self._hand_over(secure)

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._handler = self._gate.make_handler()
        self._handler.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof:
            self.eof_received()
        self._arm_header_timer()

    def _release(self) -> None:
        self._cancel_header_timer()
        if self._source is not None:
            self._gate.release(self._source)
            self._source = None

    # ---- the header timer ----

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self._in_request:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self._gate.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        self._gate.stats.header_timeouts += 1
        if self._transport is not None:
            self._transport.abort()

    def request_started(self) -> None:
        self._in_request = True
        self._cancel_header_timer()

    def request_finished(self) -> None:
        self._in_request = False  # the idle time until the next request is aiohttp's keep-alive timeout

    # ---- passed through to aiohttp ----

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            if self._source is not None:  # admitted, TLS established, handler not attached yet
                self._early.append(data)
            return
        if not self._in_request and self._header_timer is None:
            self._arm_header_timer()  # the first bytes of a request head: it must be complete in time
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            self._early_eof = True
            return None
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._handler is not None:
            handler, self._handler = self._handler, None
            handler.connection_lost(exc)
