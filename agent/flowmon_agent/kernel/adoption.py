"""Adopt TCP connections that were open before the agent started, in every network namespace.

`discover()` finds them; `Adoptions` hands them to the kernel (map `adopt`), which starts measuring each
one at its first received segment, and ends the adoption window. /proc/net/tcp* is read per namespace:
through a process living in it (/proc/PID/net/tcp) or, for named namespaces without a process, from a
thread that enters it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from flowmon_agent import netns
from flowmon_agent.kernel.flows import IPAddress, Reporter
from flowmon_agent.kernel.maps import ROLE_CLIENT, ROLE_SERVER, encode_tuple

TCP_ESTABLISHED, TCP_LISTEN = 0x01, 0x0A


@dataclass(frozen=True, slots=True)
class ExistingConnection:
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    role: Reporter


def _addr(hex_addr: str) -> IPAddress:
    raw = bytes.fromhex(hex_addr)
    # /proc prints each 32-bit word in host (little-endian) order
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(swapped) == 4:
        return IPv4Address(swapped)
    ip6 = IPv6Address(swapped)
    return ip6.ipv4_mapped or ip6


def _endpoint(field: str) -> tuple[IPAddress, int]:
    addr, port = field.split(":")
    return _addr(addr), int(port, 16)


def parse_proc_tcp(text: str) -> tuple[list[tuple[IPAddress, int, IPAddress, int]], set[int]]:
    """(established connections as (local, lport, remote, rport), listening ports) of one table."""
    established: list[tuple[IPAddress, int, IPAddress, int]] = []
    listening: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        state = int(fields[3], 16)
        local, lport = _endpoint(fields[1])
        if state == TCP_LISTEN:
            listening.add(lport)
        elif state == TCP_ESTABLISHED:
            remote, rport = _endpoint(fields[2])
            established.append((local, lport, remote, rport))
    return established, listening


EPHEMERAL_PORTS = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range


def ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return EPHEMERAL_PORTS


def classify(tables: Iterable[str], ephemeral: tuple[int, int] = EPHEMERAL_PORTS) -> list[ExistingConnection]:
    """One namespace's tcp and tcp6 tables. The server end is the one whose local port has a listener;
    without one (the listener closed), the end whose port is outside the ephemeral range while the
    peer's is inside it."""
    established: list[tuple[IPAddress, int, IPAddress, int]] = []
    listening: set[int] = set()
    for text in tables:
        est, lis = parse_proc_tcp(text)
        established += est
        listening |= lis
    low, high = ephemeral

    def role(lport: int, rport: int) -> Reporter:
        if lport in listening or (not low <= lport <= high and low <= rport <= high):
            return Reporter.SERVER
        return Reporter.CLIENT

    return [ExistingConnection(lo, lp, re, rp, role(lp, rp)) for lo, lp, re, rp in established]


def _netns_key(entry: Path) -> tuple[str, int]:
    """A process's network namespace, as an inode: of /proc/PID/ns/net, or — where that needs ptrace
    access the agent lacks in a pod (no CAP_SYS_PTRACE: only processes whose capabilities are a subset of
    its own pass) — of /proc/PID/net/tcp, which procfs keeps once per namespace and anyone may stat."""
    try:
        return "ns", os.stat(entry / "ns" / "net").st_ino
    except PermissionError:
        return "tcp", os.stat(entry / "net" / "tcp").st_ino


def namespace_readers() -> dict[tuple[str, int], list[tuple[str, Path]]]:
    """Each network namespace -> the ways to read it: ("named", /run/netns/NAME) first (it stays while
    named), then ("pid", /proc/PID/net) for each process living in it (any of them may exit meanwhile)."""
    found: dict[tuple[str, int], list[tuple[str, Path]]] = {}
    if netns.NETNS_RUN_DIR.is_dir():
        for entry in netns.NETNS_RUN_DIR.iterdir():
            with contextlib.suppress(OSError):
                found.setdefault(("ns", os.stat(entry).st_ino), []).append(("named", entry))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.setdefault(_netns_key(entry), []).append(("pid", entry / "net"))
    return found


def _read_tables(kind: str, path: Path) -> list[str]:
    """The namespace's tcp and tcp6 tables; empty when it cannot be read this way (gone meanwhile)."""

    def read(base: Path) -> list[str]:
        out = []
        for name in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                out.append((base / name).read_text())
        return out

    if kind == "pid":
        return read(path)
    try:
        with netns.entered(path):
            return read(Path("/proc/thread-self/net"))
    except OSError:
        return []


def discover() -> Iterator[ExistingConnection]:
    """Every established TCP connection on this host, across network namespaces, each once (a namespace
    known by both kinds of key is read twice)."""
    ephemeral, seen = ephemeral_ports(), set()
    for ways in namespace_readers().values():
        # the first way that reads: a process that exited between the listing and the read gives nothing
        tables = next((t for kind, path in ways if (t := _read_tables(kind, path))), [])
        for connection in classify(tables, ephemeral):
            if connection not in seen:
                seen.add(connection)
                yield connection


def adopt_key(c: ExistingConnection) -> bytes:
    return encode_tuple(c.local, c.local_port, c.remote, c.remote_port)


class Adoptions:
    """The kernel's `adopt` map over one adoption window: connections wait there until their first
    received segment adopts them; the window ends when it expires or nothing waits any more."""

    def __init__(
        self,
        table,
        set_adopting: Callable[[bool], None],
        *,
        recheck_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table, self._set_adopting, self._clock = table, set_adopting, clock
        self._recheck_s, self._checked_at, self._until = recheck_s, 0.0, 0.0
        self.dropped = 0  # connections the full map could not take: they stay unmeasured

    @property
    def adopting(self) -> bool:
        """Whether pre-existing connections are still waiting for their first received segment."""
        return bool(self._until)

    def adopt(self, conns: Iterable[ExistingConnection], *, window_s: float = 300.0) -> int:
        n = 0
        for c in conns:
            role = ROLE_SERVER if c.role == Reporter.SERVER else ROLE_CLIENT
            try:
                self._table[self._table.Key.from_buffer_copy(adopt_key(c))] = ctypes.c_uint8(role)
            except Exception:  # map full: this one stays unmeasured
                self.dropped += 1
                continue
            n += 1
        if n:
            self._checked_at = self._clock()
            self._until = self._checked_at + window_s
            self._set_adopting(True)
        return n

    def expire(self) -> bool:
        """Run each poll; True when the window just ended."""
        if not self._until:
            return False
        now = self._clock()
        if now - self._checked_at >= self._recheck_s:
            self._checked_at = now
            self._forget_closed()
        if now <= self._until and len(self._table) > 0:
            return False
        self._set_adopting(False)
        self._table.clear()
        self._until = 0.0
        return True

    def _forget_closed(self) -> None:
        """Connections that closed before a received segment adopted them would keep tcp_probe attached
        for the whole adoption window: their entries go once /proc no longer lists them."""
        alive = {adopt_key(c) for c in discover()}
        for key in list(self._table.keys()):
            if bytes(key) not in alive:
                with contextlib.suppress(KeyError):  # adopted meanwhile
                    del self._table[key]
