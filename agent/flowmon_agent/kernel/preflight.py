"""Before compiling anything: can this process load and attach the BPF programs? If not, say exactly why.

Each failure is one line naming its cause — a missing capability, a seccomp profile that denies a system
call, a kernel too old, no tracefs — and carries a distinct exit code (`Cause`), so that `kubectl describe
pod` shows the reason and the code without reading logs. The probes call the system calls with arguments
the kernel rejects only after the capability and seccomp checks: the answer (EPERM or not) tells which
layer said no, and nothing is created.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import re
import sys
from enum import IntEnum
from pathlib import Path

TERMINATION_LOG = Path(os.environ.get("FLOWMON_TERMINATION_LOG", "/dev/termination-log"))


class Cause(IntEnum):
    """The agent's exit code per cause of a failed start (images/agent-entrypoint.sh uses HEADERS)."""

    CAPABILITY = 10  # a capability the agent needs is not in its effective set
    SECCOMP = 11  # the seccomp profile denies bpf() or perf_event_open()
    TRACEPOINT = 12  # tracefs not mounted, or tracepoints the programs attach to are missing
    HEADERS = 13  # no kernel header tree BCC can compile against
    KERNEL = 14  # the kernel is too old, or lacks BTF
    BPF_LOAD = 15  # BCC could not compile, or the kernel refused to load or attach, the programs


class BPFUnavailableError(RuntimeError):
    """BPF programs cannot be loaded or attached here; str() is the one line that says why, `cause` the
    exit code."""

    def __init__(self, message: str, cause: Cause = Cause.BPF_LOAD) -> None:
        super().__init__(message)
        self.cause = cause


# Capability numbers (linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYSLOG, CAP_PERFMON, CAP_BPF = 12, 21, 34, 38, 39
CAP_NAMES = {CAP_NET_ADMIN: "NET_ADMIN", CAP_SYS_ADMIN: "SYS_ADMIN", CAP_PERFMON: "PERFMON", CAP_BPF: "BPF"}
# CAP_BPF and CAP_PERFMON exist from 5.8 (before, all of this needs CAP_SYS_ADMIN); from 5.11 BPF memory is
# charged to the cgroup, not to RLIMIT_MEMLOCK (before, the maps need CAP_SYS_RESOURCE to raise it).
MIN_KERNEL = (5, 11)

_SYSCALLS = {  # (bpf, perf_event_open)
    "x86_64": (321, 298),
    "aarch64": (280, 241),
}
_libc = ctypes.CDLL(None, use_errno=True)


def _status(field: str, text: str | None = None) -> str:
    text = Path("/proc/self/status").read_text() if text is None else text
    match = re.search(rf"^{field}:\s*(\S+)", text, re.MULTILINE)
    return match[1] if match else ""


def effective_capabilities(status: str | None = None) -> set[int]:
    mask = int(_status("CapEff", status) or "0", 16)
    return {bit for bit in range(64) if mask >> bit & 1}


def seccomp_filtered(status: str | None = None) -> bool:
    return _status("Seccomp", status) == "2"  # 2: a filter (a profile) is in place


def kernel_version(release: str | None = None) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _errno_of(number: int, *args: int) -> int:
    """Call a system call; 0 if it succeeded (then closes the fd it returned), else its errno."""
    fd = _libc.syscall(number, *[ctypes.c_long(a) for a in args])
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


def bpf_denied_by_seccomp() -> bool:
    """bpf(BPF_MAP_CREATE) with an empty attribute: with CAP_BPF the kernel says EINVAL; EPERM then means a
    seccomp profile answered for the kernel (the default profiles return EPERM)."""
    nr = _SYSCALLS.get(platform.machine(), (None, None))[0]
    return nr is not None and _errno_of(nr, 0, 0, 0) == errno.EPERM


def perf_event_open_denied_by_seccomp() -> bool:
    """perf_event_open(NULL, ...): the kernel says EFAULT before any permission check, so EPERM is seccomp."""
    nr = _SYSCALLS.get(platform.machine(), (None, None))[1]
    return nr is not None and _errno_of(nr, 0, 0, -1, -1, 0) == errno.EPERM


class _ProgLoadAttr(ctypes.Structure):  # the head of union bpf_attr for BPF_PROG_LOAD
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
    ]


class _RawTracepointAttr(ctypes.Structure):  # BPF_RAW_TRACEPOINT_OPEN
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


_BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN, _BPF_PROG_TYPE_RAW_TRACEPOINT = 5, 17, 17
_RETURN_ZERO = bytes.fromhex("b7000000000000009500000000000000")  # r0 = 0; exit


def raw_tracepoint_attaches(tracepoint: str) -> bool:
    """Whether a raw-tracepoint program attaches to `tracepoint` here: loads `return 0`, attaches it and
    lets both go at once. Unlike BCC's support_raw_tracepoint() this needs no /proc/kallsyms addresses,
    which are zeros without CAP_SYSLOG."""
    nr = _SYSCALLS.get(platform.machine(), (None, None))[0]
    if nr is None:
        return False
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    license_ = ctypes.create_string_buffer(b"GPL")
    load = _ProgLoadAttr(
        prog_type=_BPF_PROG_TYPE_RAW_TRACEPOINT,
        insn_cnt=len(_RETURN_ZERO) // 8,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(license_),
    )
    prog = _libc.syscall(nr, _BPF_PROG_LOAD, ctypes.byref(load), ctypes.sizeof(load))
    if prog < 0:
        return False
    try:
        name = ctypes.create_string_buffer(tracepoint.encode())
        attach = _RawTracepointAttr(name=ctypes.addressof(name), prog_fd=prog)
        link = _libc.syscall(nr, _BPF_RAW_TRACEPOINT_OPEN, ctypes.byref(attach), ctypes.sizeof(attach))
        if link < 0:
            return False
        os.close(link)
        return True
    finally:
        os.close(prog)


def check_privileges(
    caps: set[int] | None = None, release: str | None = None, filtered: bool | None = None
) -> None:
    """Raise BPFUnavailableError naming the first missing privilege for loading and attaching the programs."""
    caps = effective_capabilities() if caps is None else caps
    version = kernel_version(release)
    admin = CAP_SYS_ADMIN in caps
    if version < MIN_KERNEL and not admin:
        raise BPFUnavailableError(
            f"kernel {release or platform.release()} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}: its BPF "
            "maps count against RLIMIT_MEMLOCK (CAP_SYS_RESOURCE) and before 5.8 loading BPF needs "
            "CAP_SYS_ADMIN; the agent is given neither",
            Cause.KERNEL,
        )
    if not admin:
        missing = [f"CAP_{CAP_NAMES[c]}" for c in (CAP_BPF, CAP_PERFMON) if c not in caps]
        if missing:
            raise BPFUnavailableError(
                f"missing capability {' and '.join(missing)}: add {', '.join(m[4:] for m in missing)} to the "
                "container's securityContext.capabilities.add",
                Cause.CAPABILITY,
            )
    filtered = seccomp_filtered() if filtered is None else filtered
    if filtered:
        probes = (("bpf", bpf_denied_by_seccomp), ("perf_event_open", perf_event_open_denied_by_seccomp))
        denied = [name for name, probe in probes if probe()]
        if denied:
            raise BPFUnavailableError(
                f"the seccomp profile denies {' and '.join(f'{n}()' for n in denied)} (EPERM with the "
                "capabilities present): use the agent's Localhost profile flowmon/agent.json (the runtime's "
                "default with bpf and perf_event_open), or a runtime whose default allows them to "
                "CAP_BPF/CAP_PERFMON (containerd >= 1.6.9, Docker >= 23)",
                Cause.SECCOMP,
            )


def report(failure: BPFUnavailableError) -> int:
    """Print the failure's line and write it as the container's termination message; its exit code."""
    line = f"flowmon agent: {failure}"
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # not in a container: the log line is enough
        TERMINATION_LOG.write_text(line + "\n")
    return int(failure.cause)
