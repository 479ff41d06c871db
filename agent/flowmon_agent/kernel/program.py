"""bpf/flowmon.c loaded on the best kernel path: its maps, its fold and flush programs, the tcp_probe hook,
its sock_ops program.

BCC attaches the tracepoint programs as it loads them; tcp:tcp_probe (every received segment, the
costliest hook) is the one attached and detached at run time (rtt_sampler.py decides when). The sock_ops
program (every connection's srtt at close) is linked to the cgroup v2 root; where that cannot be done (no
cgroup2 mounted, a kernel without cgroup links) the program runs without it, and close samples come only
from tcp_probe's windows (`rtt_at_close` says which).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from flowmon_agent.kernel import cgroup
from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel import paths as kernel_paths
from flowmon_agent.kernel.maps import CLOSE_SLOTS, DEFAULT_SIZES, FLUSH_PER_RUN, FOLD_STEPS, MARK_WORD_SLOTS

TCP_PROBE = b"tcp:tcp_probe"
SOCKOPS = "flowmon_sockops"
log = logging.getLogger(__name__)


class RttAtClose(StrEnum):
    """Where a closing connection's srtt sample comes from."""

    SOCK_OPS = "sock_ops"  # every established connection (the sock_ops program on the cgroup v2 root)
    WINDOW = "window"  # only connections that received a segment while tcp_probe was attached


@dataclass(frozen=True, slots=True)
class Sizes:
    """The integer cflags that size the maps and bound the runs of the in-kernel programs."""

    cflags: Mapping[str, int]
    sock_slots: int
    fold_steps: int
    close_slots: int

    @classmethod
    def of(cls, sizes: Mapping[str, int] | None) -> Sizes:
        cflags = {**DEFAULT_SIZES, "FOLD_STEPS": FOLD_STEPS, **(sizes or {})}
        sock_slots, fold_steps = int(cflags["SOCK_MAX"]), int(cflags["FOLD_STEPS"])
        if sock_slots < 8 or sock_slots & (sock_slots - 1):
            raise ValueError(f"SOCK_MAX must be a power of two >= 8, not {sock_slots}")
        if fold_steps < 4:
            raise ValueError(f"FOLD_STEPS must be at least 4, not {fold_steps}")
        close_slots = int(cflags.get("CLOSE_SLOTS", CLOSE_SLOTS))
        if not 1 <= close_slots <= 64 or close_slots & (close_slots - 1):  # a bit each in one u64
            raise ValueError(f"CLOSE_SLOTS must be a power of two up to 64, not {close_slots}")
        return cls(cflags, sock_slots, fold_steps, close_slots)

    @property
    def mark_words(self) -> int:  # MARK_WORDS in the C
        return -(-self.sock_slots // MARK_WORD_SLOTS)

    @property
    def mark_groups(self) -> int:  # MARK_GROUPS in the C
        return -(-self.mark_words // MARK_WORD_SLOTS)

    @property
    def fold_runs_max(self) -> int:
        """A bound on the fold's runs per CPU: every run but the last takes FOLD_STEPS - 2 slots, words or
        groups."""
        return 2 + (self.sock_slots + self.mark_words + self.mark_groups) // (self.fold_steps - 2)

    @property
    def flush_runs_max(self) -> int:
        return 2 + self.close_slots // FLUSH_PER_RUN


class KernelProgram:
    """The loaded program. `fold_fd`/`flush_fd` are None on the compat path (no fold, no close copies)."""

    def __init__(
        self,
        *,
        force_compat: bool = False,
        raw: bool | None = None,
        sizes: Sizes,
        sockops: bool = True,
        cgroup_root: Path | None = None,
    ) -> None:
        """`sockops=False`: no sock_ops program (close samples from the windows only); `cgroup_root`: where
        to look for the cgroup v2 root (see cgroup.cgroup2_root)."""
        self.sizes = sizes
        # the bcc.BPF object: benches attach and detach its hooks themselves (under FlowTracer.lock)
        self.path, self.bpf = kernel_paths.load(force_compat=force_compat, raw=raw, sizes=sizes.cflags)
        self.kernel_path = self.path.name
        self.raw_tracepoints = bool(self.path.cflags.get("FLOWMON_RAW"))
        compat = self.kernel_path == "compat"
        # default path: live sockets' pending counters are folded into `flows`, and closes wait in
        # per-CPU copies of their flows, until user space runs these two before each read
        self.fold_fd = None if compat else bpf_loader.load_raw_tracepoint_program(self.bpf, "flowmon_fold")
        self.flush_fd = (
            None if compat else bpf_loader.load_raw_tracepoint_program(self.bpf, "flowmon_flush_closes")
        )
        self.probe_attached = True  # BCC attached tcp_probe with the others
        self._sockops: cgroup.CgroupLinks | None = None
        self._sockops_fd: int | None = None
        self._sockops_root: Path | None = None
        self.rtt_at_close = RttAtClose.WINDOW
        self.rtt_at_close_problem = "switched off" if not sockops else ""
        if sockops:
            self._link_sockops(cgroup_root)

    def _link_sockops(self, cgroup_root: Path | None) -> None:
        from bcc import BPF

        try:
            prog_fd = self.bpf.load_func(SOCKOPS.encode(), BPF.SOCK_OPS).fd
            self._sockops_root = cgroup.cgroup2_root(under=cgroup_root)
            self._sockops_fd = prog_fd
            self.link_sockops(True)
            self.rtt_at_close = RttAtClose.SOCK_OPS
        except Exception as exc:  # BCC raises plain Exceptions; the tracer runs on without it
            self.rtt_at_close_problem = str(exc)
            log.warning(
                "no srtt at close for every connection (%s): short connections get an RTT sample only "
                "when tcp_probe's sampling window is open",
                exc,
            )

    def table(self, name: str):  # -> bcc.table.TableBase
        """A map of the program by its name in bpf/flowmon.c (`flows`, `cfg`, `socks`, ...)."""
        return self.bpf[name.encode()]

    def attach_probe(self, attached: bool) -> None:
        if attached == self.probe_attached:
            return
        if attached:
            self.bpf.attach_tracepoint(tp=TCP_PROBE, fn_name=b"tracepoint__tcp__tcp_probe")
        else:
            self.bpf.detach_tracepoint(TCP_PROBE)
        self.probe_attached = attached

    @property
    def sockops_cgroup(self) -> Path | None:
        """The cgroup v2 root the sock_ops program links to (None where it cannot be linked)."""
        return self._sockops_root

    @property
    def sockops_linked(self) -> bool:
        """Whether the sock_ops program is linked to the cgroup v2 root now."""
        return self._sockops is not None

    def link_sockops(self, linked: bool) -> None:
        """Link or unlink the sock_ops program (benches switch it with the tracepoints); a no-op where it
        could not be linked at the start."""
        if linked and self._sockops is None and self._sockops_fd is not None:
            self._sockops = cgroup.CgroupLinks(
                [(self._sockops_fd, cgroup.ATTACH_SOCK_OPS, SOCKOPS)], self._sockops_root
            )
        elif not linked and self._sockops is not None:
            self._sockops.close()
            self._sockops = None

    def close(self) -> None:
        self.link_sockops(False)
        self.bpf.cleanup()
