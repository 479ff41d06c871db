"""Every network namespace of this host and its addresses: what the bare standalone agent names.

A monitor sees flows with a pod at one end, and count-once needs both local ends to be known as local.
So the bare `flowmon agent` represents each network namespace of this host as a pod (flowmon_agent.main.s
host_objects): the host's own namespace as `host/<hostname>`, each other one (named ones from
`ip netns`, containers' through their processes' /proc/PID/ns/net) as `host/<name>`. Flows between
containers, and between a container and an outside address, are then visible and counted once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from pathlib import Path

from flowmon_agent.metadata import MetadataStore
from flowmon_agent.netns import NETNS_RUN_DIR

IP_TIMEOUT_S = 5.0


def parse_ip_addr_json(text: str) -> list[str]:
    """Addresses out of `ip -j addr show`."""
    return [
        a["local"] for link in json.loads(text or "[]") for a in link.get("addr_info", []) if "local" in a
    ]


def own_addresses(addresses: Iterable[str]) -> list[str]:
    """Pure: a netns's addresses that name it. Loopback and link-local addresses are the same in every
    namespace (127.0.0.1, fe80::… per link), so they cannot tell one from another."""
    out = []
    for text in addresses:
        ip = ip_address(text.split("%", 1)[0])
        if not (ip.is_loopback or ip.is_link_local):
            out.append(text)
    return out


def pod_name(text: str) -> str:
    """Pure: a DNS-label-like name (lowercase letters, digits, '-'; at most 63)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "netns"


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:  # a process that exited, a namespace being deleted, no permission
        return None


def _candidates(run_dir: Path, proc: Path) -> list[tuple[Path, Callable[[], str]]]:
    """(path, its name when needed): named namespaces first, then every process's."""
    named = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    pids = sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

    def command_name(pid: Path) -> Callable[[], str]:
        return lambda: f"{(pid / 'comm').read_text().strip()}-{pid.name}"

    return [
        *((p, (lambda name=p.name: name)) for p in named),
        *((pid / "ns" / "net", command_name(pid)) for pid in pids),
    ]


def namespace_inodes(run_dir: Path = NETNS_RUN_DIR, proc: Path = Path("/proc")) -> frozenset[int]:
    """Which network namespaces exist, to notice one appearing or going. Run every second, so plain
    os calls on strings: a process's namespace link names its inode ("net:[4026531840]"), which
    readlink gets for half what stat costs, and pathlib would double that again."""
    inodes: set[int] = set()
    if run_dir.is_dir():  # named namespaces are bind mounts, not links
        inodes.update(i for i in map(_inode, run_dir.iterdir()) if i is not None)
    root = str(proc)
    for pid in os.listdir(root):
        if pid.isdigit():
            try:
                link = os.readlink(f"{root}/{pid}/ns/net")
            except OSError:  # exited, or no permission
                continue
            inodes.add(int(link[link.index("[") + 1 : -1]))
    return frozenset(inodes)


def network_namespaces(run_dir: Path = NETNS_RUN_DIR, proc: Path = Path("/proc")) -> list[tuple[str, Path]]:
    """(name, path) of every network namespace but the caller's, once each: named ones first (their
    name), then those only processes hold (`<command>-<pid>` of the first process found in it)."""
    seen = {_inode(proc / "self" / "ns" / "net")}
    found: list[tuple[str, Path]] = []
    for path, name in _candidates(run_dir, proc):
        inode = _inode(path)
        if inode is None or inode in seen:
            continue
        try:
            found.append((pod_name(name()), path))
        except OSError:  # the process exited meanwhile
            continue
        seen.add(inode)
    return found


def addresses_of(path: Path | None = None) -> list[str]:
    """The addresses in that namespace (None: the caller's), read with `ip -j addr show` (nsenter)."""
    argv = ["ip", "-j", "addr", "show"]
    if path is not None:
        argv = ["nsenter", f"--net={path}", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_ip_addr_json(done.stdout) if done.returncode == 0 else []


def namespace_addresses() -> dict[str, list[str]]:
    """Every other network namespace's own addresses, by pod name (namespaces without any are left out)."""
    out: dict[str, list[str]] = {}
    for name, path in network_namespaces():
        addresses = own_addresses(addresses_of(path))
        if addresses:
            out.setdefault(name, addresses)
    return out


class HostMetadata:
    """The bare agent's metadata: `build(namespace addresses)` gives this host's objects; `refresh()`
    re-reads them into the store when a network namespace appeared or went (a container started or
    stopped), and is cheap otherwise. Addresses changed inside an existing namespace wait for the next
    namespace change."""

    def __init__(self, store: MetadataStore, build: Callable[[dict[str, list[str]]], list[dict]]) -> None:
        self.store, self.build = store, build
        self._seen: frozenset[int] | None = None

    def refresh(self) -> bool:
        seen = namespace_inodes()
        if seen == self._seen:
            return False
        self._seen = seen
        self.store.replace_all((obj, obj["kind"]) for obj in self.build(namespace_addresses()))
        return True
