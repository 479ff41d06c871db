"""Cgroup-skb program pairs on the cgroup v2 root (bpf/skb.c: UDP and DNS), linked with BPF links.

Where the root is and how links are made: kernel/cgroup.py (shared with the tracer's sock_ops program,
so that all three attach to the same configured root).
"""

from __future__ import annotations

import os
from pathlib import Path

from flowmon_agent.kernel.cgroup import ATTACH_INET_EGRESS, ATTACH_INET_INGRESS, cgroup2_root, link


def attach_cgroup_skb(bpf, cgroup_fd: int, ingress: bytes, egress: bytes) -> list[int]:
    """Load the functions named `ingress` and `egress` as cgroup-skb programs and link them to the
    cgroup; the link fds (closing one detaches its program)."""
    from bcc import BPF

    links: list[int] = []
    try:
        for name, attach_type in ((ingress, ATTACH_INET_INGRESS), (egress, ATTACH_INET_EGRESS)):
            links.append(link(bpf.load_func(name, BPF.CGROUP_SKB).fd, cgroup_fd, attach_type, name.decode()))
    except BaseException:
        for fd in links:
            os.close(fd)
        raise
    return links


class CgroupSkbLinks:
    """An ingress/egress program pair of `bpf` linked to the cgroup v2 root while attached. `cgroup_root`:
    where that root is mounted (at or below, cgroup.cgroup2_root's `under`); default the shallowest mount."""

    def __init__(self, bpf, ingress: bytes, egress: bytes, cgroup_root: Path | None = None) -> None:
        self._bpf, self._names = bpf, (ingress, egress)
        self.cgroup = cgroup2_root(under=cgroup_root)
        self._cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
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
