"""Load BCC programs from bpf/*.c, with one clear error when the host cannot run BPF."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

BPF_DIR = Path(os.environ.get("FLOWMON_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


class BPFUnavailableError(RuntimeError):
    """BPF programs cannot be loaded on this host; the message names the cause."""


def tracefs_root() -> Path:
    for root in TRACEFS_CANDIDATES:
        if (root / "events").is_dir():
            return root
    raise BPFUnavailableError(
        "tracefs is not mounted: run `mount -t tracefs nodev /sys/kernel/tracing` (make setup does this)"
    )


def tracepoint_exists(category: str, event: str) -> bool:
    try:
        return (tracefs_root() / "events" / category / event).is_dir()
    except BPFUnavailableError:
        return False


def check_host() -> None:
    """Raise BPFUnavailableError naming the first missing prerequisite."""
    if os.geteuid() != 0:
        raise BPFUnavailableError(
            f"loading BPF needs root (or CAP_BPF+CAP_PERFMON+CAP_SYS_RESOURCE); running as uid {os.geteuid()}"
        )
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise BPFUnavailableError(f"kernel {platform.release()} has no BTF (/sys/kernel/btf/vmlinux missing)")
    if kernel_headers() is None:
        build = Path("/lib/modules") / platform.release() / "build"
        raise BPFUnavailableError(
            f"no kernel headers for kernel {platform.release()}: not at {build}, not in $BCC_KERNEL_SOURCE, "
            "no /sys/kernel/kheaders.tar.xz (install the kernel's headers; make setup links Debian's "
            "linux-headers-amd64 when the host has none)"
        )
    tracefs_root()


def kernel_headers() -> Path | None:
    """Where BCC will find headers, in BCC's own order of preference; None when nowhere."""
    explicit = os.environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        return Path(explicit) if Path(explicit).is_dir() else None
    build = Path("/lib/modules") / platform.release() / "build"
    if build.is_dir():  # follows the symlink: a dangling link is no headers
        return build
    kheaders = Path("/sys/kernel/kheaders.tar.xz")  # CONFIG_IKHEADERS: BCC unpacks it itself
    return kheaders if kheaders.is_file() else None


def load_program(source_name: str, cflags: Mapping[str, int] | None = None):  # -> bcc.BPF
    """Compile bpf/<source_name> with integer-only defines (never user strings) and return the BPF object."""
    check_host()
    try:
        from bcc import BPF
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise BPFUnavailableError(
            "the bcc Python module is missing: install Debian's python3-bpfcc (make setup)"
        ) from exc
    path = BPF_DIR / source_name
    if not path.is_file():
        raise BPFUnavailableError(f"BPF source {path} not found (set FLOWMON_BPF_DIR)")
    flags = [f"-D{name}={int(value)}" for name, value in (cflags or {}).items()]
    try:
        return BPF(src_file=str(path).encode(), cflags=flags)
    except Exception as exc:
        raise BPFUnavailableError(f"BCC could not compile or load {path.name}: {exc}") from exc


def raw_tracepoints_supported() -> bool:
    """Raw tracepoints (BPF_RAW_TRACEPOINT_OPEN, Linux 4.17+): cheaper, but args are the raw TP_PROTO."""
    try:
        from bcc import BPF
    except ImportError:  # pragma: no cover - depends on the host
        return False
    return bool(BPF.support_raw_tracepoint())


def tracepoint_fields(category: str, event: str) -> set[str]:
    """Field names of a classic tracepoint, from its tracefs format file (empty when absent)."""
    try:
        text = (tracefs_root() / "events" / category / event / "format").read_text()
    except (OSError, BPFUnavailableError):
        return set()
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:") : line.index(";")]
            names.add(decl.split()[-1].split("[")[0])
    return names
