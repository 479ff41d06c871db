"""The IP→name table: which name a client asked for when an answer gave it an address.

Entries are kept per (client, address) and expire with the record's TTL (capped). A lookup for one
client prefers that client's own answer; without one, the node-wide answer is used only when every
client that holds a live entry for the address learned the same name (one address serving several
names, as on a CDN, stays unnamed rather than named wrongly). Bounded: when full, the oldest entry is
evicted and counted.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 8192
DEFAULT_MAX_TTL_S = 86_400.0  # a record claiming a longer TTL is kept a day


@dataclass(frozen=True, slots=True)
class NameTableStats:
    entries: int
    evicted: int  # entries pushed out by newer ones while the table was full
    expired: int


class NameTable:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock, self._max_entries, self._max_ttl_s = clock, max_entries, max_ttl_s
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # oldest first
        self._clients_of: dict[str, set[str]] = {}  # address -> clients holding an entry for it
        self._deadlines: list[tuple[float, str, str]] = []  # (expires, client, address), a min-heap
        self._evicted = self._expired = 0
        self.generation = 0  # grows whenever an entry appears, changes its name or goes (not on refresh)

    def learn(self, client: str, address: str, name: str, ttl_s: float) -> None:
        expires = self._clock() + min(max(ttl_s, 0.0), self._max_ttl_s)
        key = (client, address)
        known = self._entries.get(key)
        if known is not None:
            self._entries.move_to_end(key)
        elif len(self._entries) >= self._max_entries:
            (old_client, old_address), _ = self._entries.popitem(last=False)
            self._forget_index(old_client, old_address)
            self._evicted += 1
        if known is None or known[0] != name:  # a refresh of the same name changes no label
            self.generation += 1
        self._entries[key] = (name, expires)
        self._clients_of.setdefault(address, set()).add(client)
        heapq.heappush(self._deadlines, (expires, client, address))
        if len(self._deadlines) > 2 * self._max_entries:  # refreshed entries leave stale deadlines behind
            self._deadlines = [(e, c, a) for (c, a), (_, e) in self._entries.items()]
            heapq.heapify(self._deadlines)

    def name_of(self, address: str, client: str | None = None) -> str | None:
        """The name `client` (or, without a client entry, every client alike) learned for `address`."""
        now = self._clock()
        if client is not None:
            own = self._entries.get((client, address))
            if own is not None and own[1] > now:
                return own[0]
        names = {
            entry[0]
            for holder in self._clients_of.get(address, ())
            if (entry := self._entries.get((holder, address))) is not None and entry[1] > now
        }
        return names.pop() if len(names) == 1 else None

    def addresses(self, limit: int) -> list[str]:
        """Up to `limit` addresses with a live name, the most recently learned first: what the kernel's
        map of named peers would hold (docs/dns.md, "Names on folded flows")."""
        now, out, seen = self._clock(), [], set()
        for (_, address), (_, expires) in reversed(self._entries.items()):
            if len(out) >= limit:
                break
            if expires > now and address not in seen:
                seen.add(address)
                out.append(address)
        return out

    def expire(self) -> int:
        """Drop entries whose TTL has run out; how many went. Work is bounded by what expired."""
        now, gone = self._clock(), 0
        while self._deadlines and self._deadlines[0][0] <= now:
            expires, client, address = heapq.heappop(self._deadlines)
            entry = self._entries.get((client, address))
            if entry is not None and entry[1] == expires:  # else refreshed or evicted since
                del self._entries[(client, address)]
                self._forget_index(client, address)
                gone += 1
        self._expired += gone
        self.generation += 1 if gone else 0
        return gone

    def stats(self) -> NameTableStats:
        return NameTableStats(entries=len(self._entries), evicted=self._evicted, expired=self._expired)

    def _forget_index(self, client: str, address: str) -> None:
        holders = self._clients_of.get(address)
        if holders is not None:
            holders.discard(client)
            if not holders:
                del self._clients_of[address]
