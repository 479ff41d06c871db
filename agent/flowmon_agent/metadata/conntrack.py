"""Undo Service NAT: ask conntrack (netlink, via pyroute2) where a connection to a ClusterIP really went.

A client's socket has the ClusterIP as its peer; kube-proxy's DNAT rewrote the destination to a
backend pod, and conntrack remembers it: the entry's reply tuple comes *from* the backend. The tracer
keeps connections to Service IPs apart (`FlowKey.client_port != 0`), so each is looked up once, by its
exact original tuple, and the answer is cached for as long as the connection's flow exists.

Lookups run inside the poll, so a broken conntrack socket (its network namespace deleted, netlink
errors) must not fail every poll: the sockets are dropped and reopened after a jittered backoff
(supervision.Restarts, counted as the task `conntrack`); meanwhile the answers already known still
apply and new per-connection flows wait, unresolved.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable
from ipaddress import ip_address

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from flowmon_agent.kernel.flows import FlowKey, IPAddress
from flowmon_agent.supervision import Restarts

Backend = tuple[IPAddress, int]
MAX_ATTEMPTS = 3  # a connection whose entry is gone (closed long ago) is not asked about forever
# One lookup costs ~0.4 ms of CPU (pyroute2 parsing): bound the work per poll; the rest waits a poll
# (entries outlive their connection by minutes in TIME_WAIT).
MAX_LOOKUPS_PER_POLL = 1000


def reply_source(reply: dict) -> Backend:
    """(ip, port) the reply tuple comes from: the backend, as a decoded CTA_TUPLE_REPLY attribute."""
    attrs = dict(reply["attrs"])
    ip_attrs = dict(attrs["CTA_TUPLE_IP"]["attrs"])
    proto_attrs = dict(attrs["CTA_TUPLE_PROTO"]["attrs"])
    source = ip_attrs.get("CTA_IP_V4_SRC") or ip_attrs["CTA_IP_V6_SRC"]
    return ip_address(source), int(proto_attrs["CTA_PROTO_SRC_PORT"])


class ConntrackNat:
    """Conntrack lookups in one network namespace (None: the agent's own, i.e. the node's)."""

    def __init__(
        self,
        netns: str | None = None,
        *,
        max_lookups_per_poll: int = MAX_LOOKUPS_PER_POLL,
        restarts: Restarts | None = None,
    ) -> None:
        self.netns = netns
        self.max_lookups_per_poll = max_lookups_per_poll
        self.restarts = restarts or Restarts()
        self._failures = 0  # consecutive failed rounds: the backoff's exponent
        self._retry_at: float | None = None  # no lookups before this (restarts' clock)
        self._sockets: dict[int, Conntrack] = {}
        self._known: dict[FlowKey, Backend] = {}
        self._misses: dict[FlowKey, int] = {}

    def _socket(self, family: int) -> Conntrack:
        ct = self._sockets.get(family)
        if ct is None:
            kwargs = {"netns": self.netns, "flags": 0} if self.netns else {}  # flags=0: never create it
            ct = self._sockets[family] = Conntrack(nfgen_family=family, **kwargs)
        return ct

    def lookup(
        self, client_ip: IPAddress, client_port: int, server_ip: IPAddress, server_port: int
    ) -> Backend | None:
        """The backend of one TCP connection, or None when conntrack has no entry for it; raises when
        conntrack cannot be asked (OSError, NetlinkError other than "no such entry")."""
        family = socket.AF_INET if client_ip.version == 4 else socket.AF_INET6
        orig = NFCTAttrTuple(
            family=family,
            saddr=str(client_ip),
            daddr=str(server_ip),
            proto=socket.IPPROTO_TCP,
            sport=client_port,
            dport=server_port,
        )
        try:
            entry = self._socket(family).entry("get", tuple_orig=orig)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise
            return None
        return reply_source(entry.get_attr("CTA_TUPLE_REPLY")) if entry is not None else None

    def backends(self, keys: Iterable[FlowKey]) -> dict[FlowKey, Backend]:
        """Backends of the per-connection flows among `keys`; answers are kept while their flow lives."""
        known: dict[FlowKey, Backend] = {}
        misses: dict[FlowKey, int] = {}
        budget = self.max_lookups_per_poll if self._may_ask() else 0
        for key in keys:
            if not key.client_port:
                continue
            backend = self._known.get(key)
            attempts = self._misses.get(key, 0)
            if backend is None and attempts < MAX_ATTEMPTS and budget > 0:
                budget -= 1
                try:
                    backend = self.lookup(key.client_ip, key.client_port, key.server_ip, key.server_port)
                except Exception as exc:  # no answer about this key: not a miss, and no more asking
                    self._failed(exc)
                    budget = 0
                else:
                    self._failures = 0
                    attempts += backend is None
            if backend is not None:
                known[key] = backend
            elif attempts:
                misses[key] = attempts
        self._known, self._misses = known, misses
        return dict(known)

    def _may_ask(self) -> bool:
        if self._retry_at is None or self.restarts.now() >= self._retry_at:
            self._retry_at = None
            return True
        return False

    def _failed(self, exc: Exception) -> None:
        """Drop the sockets (reopened at the next lookup) and wait a backoff before asking again."""
        with contextlib.suppress(Exception):  # a broken socket may fail to close too
            self.close()
        self._failures += 1
        self._retry_at = self.restarts.deadline("conntrack", exc, self._failures)

    def close(self) -> None:
        for ct in self._sockets.values():
            ct.close()
        self._sockets.clear()

    def __enter__(self) -> ConntrackNat:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
