"""The cgroup v2 root and BPF links to it, shared by the programs that attach there (the cgroup-skb
pairs of DNS capture and UDP flows, in cgroup_skb.py; the tracer's sock_ops program): one discovery, one
configured root (FLOWMON_AGENT_CGROUP_ROOT) for all three.

Every socket of the node belongs to a cgroup below the root, whatever its network namespace, so one
attachment there sees every pod. Programs are attached with BPF links, not BPF_PROG_ATTACH: a link goes
away with its file descriptor, so an agent that dies, even by SIGKILL, leaves nothing attached behind.
Links on cgroups need Linux 5.7+, and CAP_NET_ADMIN (which the agent has) besides CAP_BPF.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

from flowmon_agent.kernel.preflight import BPFUnavailableError

# enum bpf_attach_type
ATTACH_INET_INGRESS, ATTACH_INET_EGRESS, ATTACH_SOCK_OPS = 0, 1, 3
MOUNTS = Path("/proc/self/mounts")


def cgroup2_mounts(mounts_text: str) -> list[Path]:
    """Mount points of cgroup2 file systems in /proc/self/mounts text, in mount order."""
    out = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            out.append(Path(fields[1].replace("\\040", " ")))
    return out


def cgroup2_root(mounts_text: str | None = None, *, under: Path | None = None) -> Path:
    """The cgroup v2 root: /sys/fs/cgroup on a pure cgroup2 node, /sys/fs/cgroup/unified on hybrid ones.
    `under`: only mounts at or below this directory (the agent's pod mounts the host's /sys/fs/cgroup
    there: its own /sys/fs/cgroup is its cgroup namespace, a subtree that sees none of the other pods).
    Raises BPFUnavailableError when none is mounted."""
    mounts = cgroup2_mounts(MOUNTS.read_text() if mounts_text is None else mounts_text)
    if under is not None:
        mounts = [m for m in mounts if m == under or under in m.parents]
    if not mounts:
        where = f" at or below {under}" if under is not None else ""
        raise BPFUnavailableError(f"no cgroup v2 file system is mounted{where} (in /proc/self/mounts)")
    return min(mounts, key=lambda p: len(p.parts))  # the shallowest: a container may see nested ones


def link(prog_fd: int, cgroup_fd: int, attach_type: int, name: str) -> int:
    """Link a loaded program to a cgroup (an open directory fd); the link's fd (closing it detaches)."""
    from bcc import lib

    link_create = lib.bpf_link_create  # libbpf's, reached through libbcc's dependencies
    link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    link_create.restype = ctypes.c_int
    fd = link_create(prog_fd, cgroup_fd, attach_type, None)
    if fd < 0:
        raise BPFUnavailableError(
            f"cannot attach {name} to the cgroup v2 root: {os.strerror(-fd)} "
            "(cgroup BPF links need Linux 5.7+ and CAP_NET_ADMIN)"
        )
    return fd


class CgroupLinks:
    """Programs linked to a cgroup (by default the v2 root) for as long as this object is open:
    `CgroupLinks([(prog_fd, attach_type, name), ...])`; close() detaches them all."""

    def __init__(self, programs: Iterable[tuple[int, int, str]], cgroup: Path | None = None) -> None:
        self.cgroup = cgroup or cgroup2_root()
        self.links: list[int] = []
        self._fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog_fd, attach_type, name in programs:
                self.links.append(link(prog_fd, self._fd, attach_type, name))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.links:
            os.close(fd)  # closing the link detaches the program
        self.links = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CgroupLinks:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
