"""The IP→name table: which name a client asked for when an answer gave it an address.

Entries are kept per (client, address) and expire with the record's TTL (capped). A lookup for one
client prefers that client's own answer; without one, the node-wide answer is used only when every
client that holds a live entry for the address learned the same name (one address serving several
names, as on a CDN, stays unnamed rather than named wrongly). Bounded: when full, the oldest entry is
evicted and counted.

Sources: the kernel hands an answer over once per TTL (bpf/dns.c, `dns_answers`) and must hand it over
again as soon as this table no longer holds what it taught. So an entry remembers the answers (opaque
`source` keys) that taught or refreshed it, at most SOURCES_PER_ENTRY; when the entry goes (expired by
this table's clock, evicted, renamed) its sources are queued for `take_forgotten`, which the capture
drains into deletes of the kernel's keys each poll. The queue is bounded: past FORGOTTEN_MAX it is
dropped and `take_forgotten` says "everything" instead.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 8192
DEFAULT_MAX_TTL_S = 86_400.0  # a record claiming a longer TTL is kept a day
SOURCES_PER_ENTRY = 4  # answers remembered per entry (round-robin answers share addresses)
FORGOTTEN_MAX = 65_536  # sources queued for the kernel between two drains


@dataclass(frozen=True, slots=True)
class Forgotten:
    """Sources whose answers this table no longer fully holds; `everything`: the queue overflowed."""

    sources: list[Hashable]
    everything: bool = False


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
        self._sources: dict[tuple[str, str], tuple[Hashable, ...]] = {}  # answers that taught an entry
        self._forgotten: list[Hashable] = []
        self._forgot_everything = False
        self._evicted = self._expired = 0
        self.generation = 0  # grows whenever an entry appears, changes its name or goes (not on refresh)

    def learn(
        self, client: str, address: str, name: str, ttl_s: float, source: Hashable | None = None
    ) -> None:
        """`source`: the kernel's key of the answer that taught it (None: no key)."""
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
            self.release(*self._sources.pop(key, ()))  # what taught the old name no longer holds
        if source is not None:
            sources = self._sources.get(key, ())
            if source not in sources:
                sources = (*sources, source)
                if len(sources) > SOURCES_PER_ENTRY:
                    self.release(sources[0])
                    sources = sources[1:]
                self._sources[key] = sources
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

    def release(self, *sources: Hashable) -> None:
        """Queue sources for the kernel to forget (their next answer is handed over again)."""
        if self._forgot_everything:
            return
        self._forgotten.extend(sources)
        if len(self._forgotten) > FORGOTTEN_MAX:
            self._forgotten, self._forgot_everything = [], True

    def take_forgotten(self) -> Forgotten:
        """What was released since the last call (and empty the queue)."""
        out = Forgotten(self._forgotten, self._forgot_everything)
        self._forgotten, self._forgot_everything = [], False
        return out

    def stats(self) -> NameTableStats:
        return NameTableStats(entries=len(self._entries), evicted=self._evicted, expired=self._expired)

    def _forget_index(self, client: str, address: str) -> None:
        self.release(*self._sources.pop((client, address), ()))
        holders = self._clients_of.get(address)
        if holders is not None:
            holders.discard(client)
            if not holders:
                del self._clients_of[address]
