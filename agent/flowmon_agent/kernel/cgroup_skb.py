"""Cgroup-skb programs on the cgroup v2 root, linked with BPF links (bpf/dns.c, bpf/udp.c).

Every socket of the node belongs to a cgroup below the root, so one attachment sees every pod's packets,
whatever its network namespace. BPF links, not BPF_PROG_ATTACH: a link goes away with its file
descriptor, so an agent that dies, even by SIGKILL, leaves nothing attached behind (a prog-attach stays
on the cgroup until someone detaches it). Needs Linux 5.7+ (links on cgroups).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from flowmon_agent.kernel.preflight import BPFUnavailableError

_ATTACH_INGRESS, _ATTACH_EGRESS = 0, 1  # enum bpf_attach_type: BPF_CGROUP_INET_INGRESS, _EGRESS


def cgroup2_mounts(mounts_text: str) -> list[Path]:
    """Mount points of cgroup2 file systems in /proc/self/mounts text, in mount order."""
    out = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            out.append(Path(fields[1].replace("\\040", " ")))
    return out


def cgroup2_root() -> Path:
    """The cgroup v2 root: /sys/fs/cgroup on a pure cgroup2 node, /sys/fs/cgroup/unified on hybrid ones."""
    mounts = cgroup2_mounts(Path("/proc/self/mounts").read_text())
    if not mounts:
        raise BPFUnavailableError("no cgroup v2 file system is mounted (packet hooks attach to its root)")
    return min(mounts, key=lambda p: len(p.parts))  # the shallowest: a container may see nested ones


def attach_cgroup_skb(bpf, cgroup_fd: int, ingress: bytes, egress: bytes) -> list[int]:
    """Load the functions named `ingress` and `egress` as cgroup-skb programs and link them to the
    cgroup; the link fds (closing one detaches its program)."""
    from bcc import BPF, lib

    link_create = lib.bpf_link_create  # libbpf's, reached through libbcc's dependencies
    link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    link_create.restype = ctypes.c_int
    links: list[int] = []
    for name, attach_type in ((ingress, _ATTACH_INGRESS), (egress, _ATTACH_EGRESS)):
        prog = bpf.load_func(name, BPF.CGROUP_SKB)
        fd = link_create(prog.fd, cgroup_fd, attach_type, None)
        if fd < 0:
            for link in links:
                os.close(link)
            raise BPFUnavailableError(
                f"cannot attach {name.decode()} to the cgroup v2 root: {os.strerror(-fd)} "
                "(cgroup BPF links need Linux 5.7+)"
            )
        links.append(fd)
    return links


class CgroupSkbLinks:
    """An ingress/egress program pair of `bpf` linked to a cgroup (default: the v2 root) while attached."""

    def __init__(self, bpf, ingress: bytes, egress: bytes, cgroup: Path | None = None) -> None:
        self._bpf, self._names = bpf, (ingress, egress)
        self._cgroup_fd = os.open(cgroup or cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        self._links: list[int] = []

    @property
    def attached(self) -> bool:
        return bool(self._links)

    def attach(self, attached: bool = True) -> None:
        """Link (or unlink) the pair; nothing to do when it already is."""
        if attached and not self._links:
            self._links = attach_cgroup_skb(self._bpf, self._cgroup_fd, *self._names)
        elif not attached:
            for fd in self._links:
                os.close(fd)  # closing the link detaches the program
            self._links = []

    def close(self) -> None:
        self.attach(False)
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
