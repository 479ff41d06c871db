"""Load BCC programs from bpf/*.c, with one clear error when the host cannot run BPF."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from flowmon_agent.kernel.preflight import BPFUnavailableError, Cause, raw_tracepoint_attaches

BPF_DIR = Path(os.environ.get("FLOWMON_BPF_DIR", Path(__file__).resolve().parents[3] / "bpf"))
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def tracefs_root() -> Path:
    for root in TRACEFS_CANDIDATES:
        if (root / "events").is_dir():
            return root
    raise BPFUnavailableError(
        "tracefs is not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing: run `mount -t tracefs "
        "nodev /sys/kernel/tracing` on the host (make setup does this), and mount it into the container",
        Cause.TRACEPOINT,
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
            f"loading BPF needs uid 0 with CAP_BPF and CAP_PERFMON; running as uid {os.geteuid()}",
            Cause.CAPABILITY,
        )
    # No BTF check: the programs read only tracepoint arguments (measured: they load without BTF).
    if kernel_headers() is None:
        build = Path("/lib/modules") / platform.release() / "build"
        raise BPFUnavailableError(
            f"no kernel headers for kernel {platform.release()}: not at {build}, not in $BCC_KERNEL_SOURCE, "
            "no /sys/kernel/kheaders.tar.xz (install the kernel's headers; make setup links Debian's "
            "linux-headers-amd64 when the host has none)",
            Cause.HEADERS,
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
    return load_sources([source_name], cflags)


def load_sources(source_names: Sequence[str], cflags: Mapping[str, int] | None = None):  # -> bcc.BPF
    """Compile bpf/<name>s as one source text, in order (BCC rewrites map calls only in the main text, not
    in #included files: bpf/skb.c); integer-only defines, as load_program."""
    check_host()
    try:
        from bcc import BPF
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise BPFUnavailableError(
            "the bcc Python module is missing: install Debian's python3-bpfcc (make setup)"
        ) from exc
    paths = [BPF_DIR / name for name in source_names]
    for path in paths:
        if not path.is_file():
            raise BPFUnavailableError(f"BPF source {path} not found (set FLOWMON_BPF_DIR)")
    flags = [f"-I{BPF_DIR}"]  # shared headers (bpf/*.h): BCC compiles a copy elsewhere
    flags += [f"-D{name}={int(value)}" for name, value in (cflags or {}).items()]
    names = "+".join(path.name for path in paths)
    try:
        if len(paths) == 1:
            return BPF(src_file=str(paths[0]).encode(), cflags=flags)
        # #line: the compiler's messages name each file and its own line numbers
        text = "".join(f'#line 1 "{path.name}"\n{path.read_text()}\n' for path in paths)
        return BPF(text=text.encode(), cflags=flags)
    except Exception as exc:
        raise BPFUnavailableError(f"BCC could not compile or load {names}: {exc}") from exc


def raw_tracepoints_supported() -> bool:
    """Raw tracepoints (BPF_RAW_TRACEPOINT_OPEN, Linux 4.17+): cheaper, but args are the raw TP_PROTO.
    Found by attaching one, not by BCC's look into /proc/kallsyms (all zeros without CAP_SYSLOG)."""
    return raw_tracepoint_attaches("tcp_send_reset")


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


# BPF_PROG_TEST_RUN for a raw-tracepoint program: run it once, now, on this CPU or a given one, with
# `args` as its arguments (Linux 5.10+). The bcc module has no binding for it; the syscall is small.
_BPF_PROG_TEST_RUN = 10
_BPF_F_TEST_RUN_ON_CPU = 1
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_BPF_SYSCALL = _SYS_BPF.get(platform.machine())  # looked up once: the fold runs it on every poll


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def load_raw_tracepoint_program(bpf, name: str) -> int:
    """Load (not attach) a raw-tracepoint program of a compiled BPF object, for test runs; its fd."""
    from bcc import BPF

    return int(bpf.load_func(name.encode(), BPF.RAW_TRACEPOINT).fd)


def run_raw_tracepoint_program(prog_fd: int, args: Sequence[int], cpu: int | None = None) -> int:
    """Run a loaded raw-tracepoint program with these u64 arguments, on `cpu` if given (the kernel
    interrupts that CPU to run it there); returns its return value."""
    ctx = (ctypes.c_uint64 * max(len(args), 1))(*args)
    attr = _TestRunAttr(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(ctx), ctx_in=ctypes.addressof(ctx))
    if cpu is not None:
        attr.flags, attr.cpu = _BPF_F_TEST_RUN_ON_CPU, cpu
    if _BPF_SYSCALL is None:
        raise BPFUnavailableError(f"no bpf syscall number known for {platform.machine()}")
    if _libc.syscall(_BPF_SYSCALL, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return int(attr.retval)


class PercpuWords:
    """Keys first .. first + count - 1 of a per-CPU u64 array: which CPUs hold a non-zero value, read in
    one BPF_MAP_LOOKUP_BATCH into buffers allocated once (None where the kernel has no batch lookups)."""

    def __init__(self, table, first: int, count: int) -> None:
        self.fd, self.ncpus, self.first, self.count = table.map_fd, table.total_cpu, first, count
        self._keys = (ctypes.c_uint32 * count)()
        self._values = (ctypes.c_uint64 * (count * self.ncpus))()  # per key, one value per possible CPU

    def cpus_with_any(self) -> list[int] | None:
        from bcc import lib

        # a batch starts after the key it is given: first - 1 (None: from key 0)
        after = ctypes.c_uint32(self.first - 1) if self.first else None
        next_key, n = ctypes.c_uint32(0), ctypes.c_uint32(self.count)
        res = lib.bpf_lookup_batch(
            self.fd,
            ctypes.byref(after) if after is not None else None,
            ctypes.byref(next_key),
            self._keys,
            self._values,
            ctypes.byref(n),
        )
        if (res != 0 and ctypes.get_errno() != errno.ENOENT) or n.value != self.count:
            return None
        values, ncpus = self._values, self.ncpus
        return [cpu for cpu in range(ncpus) if any(values[cpu::ncpus])]


class MapReader:
    """Every entry of a BPF hash map, read with BPF_MAP_LOOKUP_BATCH into buffers allocated once.

    BCC's `items_lookup_batch()` allocates and zeroes room for max_entries on every call: 10.7 MB for the
    flow map, twice a second, whose page faults and unmapping the machine's other CPUs (the workloads
    the agent watches) felt. Here the buffers hold `chunk` entries and grow only when one hash bucket
    holds more (ENOSPC). Kernels without batch operations (< 5.6) fall back to one lookup per entry."""

    def __init__(self, table, chunk: int = 1024) -> None:
        self.table = table
        self._key_size, self._value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        self._batch = True
        self._alloc(min(chunk, table.max_entries))

    def _alloc(self, n: int) -> None:
        self.chunk = n  # entries the buffers hold
        self._keys = ctypes.create_string_buffer(self._key_size * n)
        self._values = ctypes.create_string_buffer(self._value_size * n)

    def items(self) -> list[tuple[bytes, bytes]]:
        if self._batch:
            try:
                return self._batched()
            except _BatchUnsupported:
                self._batch = False
        return [(bytes(k), bytes(v)) for k, v in self.table.items()]

    def _batched(self) -> list[tuple[bytes, bytes]]:
        from bcc import lib  # imported here: this module must load on hosts without BCC

        out: list[tuple[bytes, bytes]] = []
        token, next_token, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        ks, vs = self._key_size, self._value_size
        while True:
            count.value = self.chunk
            res = lib.bpf_lookup_batch(
                self.table.map_fd,
                None if first else ctypes.byref(token),
                ctypes.byref(next_token),
                self._keys,
                self._values,
                ctypes.byref(count),
            )
            err = ctypes.get_errno() if res != 0 else 0
            n = count.value
            if n:
                keys, values = self._keys.raw[: n * ks], self._values.raw[: n * vs]
                out += [(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]) for i in range(n)]
            if res == 0:
                token.value, first = next_token.value, False
                continue
            if err == errno.ENOENT:  # the end of the map (this call's entries were still copied)
                return out
            if err == errno.ENOSPC and n == 0 and self.chunk < self.table.max_entries:
                self._alloc(min(self.chunk * 2, self.table.max_entries))  # one bucket holds more
                continue
            if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and first and not out:
                raise _BatchUnsupported
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")


class _BatchUnsupported(Exception):
    pass
