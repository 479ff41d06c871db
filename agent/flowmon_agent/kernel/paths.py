"""Choose the kernel path: probe tracefs, then load the default program or the compat variant.

default: sock:sock_{send,recv}_length give exact bytes (Linux 6.3+).
compat:  only tracepoints present since 4.16; bytes from tcp:tcp_probe (see docs/kernel.md for limits).
Both are bpf/flowmon.c, selected with integer cflags; the compat variant can be deleted on its own.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel import preflight
from flowmon_agent.kernel.loader import BPFUnavailableError
from flowmon_agent.kernel.preflight import Cause

Tracepoint = tuple[str, str]

COMPAT_TRACEPOINTS: tuple[Tracepoint, ...] = (
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_probe"),
    ("tcp", "tcp_retransmit_skb"),
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset"),
)
DEFAULT_TRACEPOINTS: tuple[Tracepoint, ...] = (
    *COMPAT_TRACEPOINTS,
    ("sock", "sock_send_length"),
    ("sock", "sock_recv_length"),
)
SOURCE = "flowmon.c"


class KernelPathError(BPFUnavailableError):
    """Neither kernel path can run here; the message names what is missing and the kernel version."""


@dataclass(frozen=True, slots=True)
class KernelPath:
    name: str  # "default" or "compat"
    tracepoints: tuple[Tracepoint, ...]
    cflags: Mapping[str, int] = field(default_factory=dict)


def missing(tracepoints: tuple[Tracepoint, ...], exists: Callable[[str, str], bool]) -> list[str]:
    return [f"{c}:{e}" for c, e in tracepoints if not exists(c, e)]


def candidate_paths(
    *,
    force_compat: bool = False,
    raw: bool | None = None,
    exists: Callable[[str, str], bool] | None = None,
    raw_supported: Callable[[], bool] | None = None,
) -> tuple[list[KernelPath], list[str]]:
    """Paths to try, best first, and a line per path that cannot even be tried (pure given its probes).

    raw: use raw tracepoints for the hot sock_{send,recv}_length events (None: when the kernel has them).
    """
    exists = exists or bpf_loader.tracepoint_exists
    has_raw = (raw_supported or bpf_loader.raw_tracepoints_supported)()
    use_raw = has_raw if raw is None else (raw and has_raw)
    paths: list[KernelPath] = []
    reasons: list[str] = []
    if force_compat:
        reasons.append("default: not tried (compat forced)")
    elif gone := missing(DEFAULT_TRACEPOINTS, exists):
        reasons.append(f"default: missing tracepoints {', '.join(gone)}")
    else:
        flags = {"FLOWMON_COMPAT": 0, "FLOWMON_RAW": int(use_raw), "FLOWMON_RAW_RESET": int(has_raw)}
        paths.append(KernelPath("default", DEFAULT_TRACEPOINTS, flags))
    if gone := missing(COMPAT_TRACEPOINTS, exists):
        reasons.append(f"compat: missing tracepoints {', '.join(gone)}")
    else:
        flags = {"FLOWMON_COMPAT": 1, "FLOWMON_RAW": 0, "FLOWMON_RAW_RESET": int(has_raw)}
        paths.append(KernelPath("compat", COMPAT_TRACEPOINTS, flags))
    return paths, reasons


def load(
    *, force_compat: bool = False, raw: bool | None = None, sizes: Mapping[str, int] | None = None
) -> tuple[KernelPath, object]:
    """Load the best path that works: (path, bcc.BPF). Raises KernelPathError naming every cause."""
    bpf_loader.check_host()
    preflight.check_privileges()
    paths, reasons = candidate_paths(force_compat=force_compat, raw=raw)
    for path in paths:
        try:
            return path, bpf_loader.load_program(SOURCE, {**path.cflags, **(sizes or {})})
        except BPFUnavailableError as exc:
            reasons.append(f"{path.name}: {exc}")
    raise KernelPathError(
        f"no flowmon kernel path can run on kernel {platform.release()}: " + "; ".join(reasons),
        Cause.BPF_LOAD if paths else Cause.TRACEPOINT,
    )
