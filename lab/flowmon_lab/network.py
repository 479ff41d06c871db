"""A network-namespace lab: "pods" on a bridge, with IPv4 and IPv6, for tests, benchmarks and the demo.

Layout for prefix P: a switch namespace `P-sw` holding bridge `br0`, and one namespace `P-<pod>` per pod
whose `eth0` is a veth into the bridge. Nothing is added to the host's namespace, so the lab's private
addresses (10.a.b.0/24 and fd00::/8, derived from the prefix unless given; pods get .1 to .200, .254 is
left for a gateway in the switch namespace) never reach the host's routes. Every name carries the
caller's prefix, so concurrent users never collide, and `cleanup_prefix(P)` removes whatever a crashed
run left behind.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from flowmon_agent import netns

T = TypeVar("T")
CMD_TIMEOUT_S = 30.0


class LabError(RuntimeError):
    """A lab command failed; the message holds the command and its stderr."""


@dataclass(frozen=True, slots=True)
class Pod:
    name: str  # the pod's short name; the namespace is `netns`
    netns: str
    ipv4: IPv4Address
    ipv6: IPv6Address

    def ip(self, family: int) -> str:
        return str(self.ipv4 if family == socket.AF_INET else self.ipv6)


def default_subnets(prefix: str) -> tuple[IPv4Network, IPv6Network]:
    """Stable per-prefix subnets, so two labs with different prefixes rarely share one."""
    h = int.from_bytes(hashlib.sha256(prefix.encode()).digest()[:4], "big")
    v4 = IPv4Network(f"10.{64 + h % 64}.{(h >> 8) % 256}.0/24")
    v6 = IPv6Network(f"fd00:f1:{(h >> 16) % 65536:x}::/64")
    return v4, v6


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S, **kw: Any):
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def lab_namespaces(prefix: str) -> list[str]:
    if not netns.NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in netns.NETNS_RUN_DIR.iterdir() if p.name.startswith(f"{prefix}-"))


def cleanup_prefix(prefix: str) -> None:
    """Remove every namespace named after prefix (idempotent; safe after a crash)."""
    for name in lab_namespaces(prefix):
        _run(["ip", "netns", "del", name], check=False)


class Lab:
    """Build with `with Lab("fk", ["a", "b"]) as lab:`; everything is removed on exit, even on failure."""

    def __init__(
        self,
        prefix: str,
        pods: int | Sequence[str] = 2,
        *,
        subnet4: str | None = None,
        subnet6: str | None = None,
    ) -> None:
        if not prefix or len(prefix) > 10 or not prefix.replace("-", "").isalnum():
            raise ValueError(f"lab prefix must be 1-10 letters/digits, got {prefix!r}")
        names = [f"p{i}" for i in range(pods)] if isinstance(pods, int) else list(pods)
        if len(names) > 200:
            raise ValueError("at most 200 pods per lab")
        d4, d6 = default_subnets(prefix)
        self.subnet4 = IPv4Network(subnet4) if subnet4 else d4
        self.subnet6 = IPv6Network(subnet6) if subnet6 else d6
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.pods = [
            Pod(
                n, f"{prefix}-{n}", self.subnet4.network_address + i + 1, self.subnet6.network_address + i + 1
            )
            for i, n in enumerate(names)
        ]
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.cleanup()

    def start(self) -> None:
        cleanup_prefix(self.prefix)  # leftovers of a crashed run with the same prefix
        sw = self.switch
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "set", "lo", "up"])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i, pod in enumerate(self.pods):
            ns = pod.netns
            _run(["ip", "netns", "add", ns])
            _run(
                ["ip", "-n", sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns]
            )
            _run(["ip", "-n", sw, "link", "set", f"v{i}", "master", "br0", "up"])
            self.sysctl(pod, "net.ipv6.conf.all.disable_ipv6", 0)
            self.sysctl(pod, "net.ipv6.conf.default.disable_ipv6", 0)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            addr4 = f"{pod.ipv4}/{self.subnet4.prefixlen}"
            addr6 = f"{pod.ipv6}/{self.subnet6.prefixlen}"
            _run(["ip", "-n", ns, "addr", "add", addr4, "dev", "eth0"])
            _run(["ip", "-n", ns, "-6", "addr", "add", addr6, "dev", "eth0", "nodad"])  # no DAD delay

    def cleanup(self) -> None:
        """Stop processes started here, then delete the namespaces (their links and rules go with them)."""
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        cleanup_prefix(self.prefix)

    # --- running things inside a pod ------------------------------------------------------------------
    def run(self, pod: Pod, argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S):
        """Run a command inside the pod's namespace and wait for it (bounded by timeout)."""
        return _run(["ip", "netns", "exec", pod.netns, *argv], check=check, timeout=timeout)

    def popen(self, pod: Pod, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a background command in the pod; it is killed (with its process group) at cleanup."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], start_new_session=True, **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    @contextmanager
    def inside(self, pod: Pod) -> Iterator[None]:
        """The calling thread runs inside the pod's namespace for the body (sockets made here stay there)."""
        with netns.entered(netns.named_path(pod.netns)):
            yield

    def socket(self, pod: Pod, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with self.inside(pod):
            return socket.socket(family, kind)

    def call(self, pod: Pod, fn: Callable[..., T], *args: Any) -> T:
        """Call a Python function with the current thread inside the pod's namespace."""
        with self.inside(pod):
            return fn(*args)

    def sysctl(self, pod: Pod, key: str, value: int | str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        with self.inside(pod), open(path, "w") as f:
            f.write(str(value))

    def iptables(self, pod: Pod, *args: str, ipv6: bool = False, check: bool = True) -> None:
        self.run(pod, ["ip6tables" if ipv6 else "iptables", "-w", "5", *args], check=check)

    def tc(self, pod: Pod, *args: str) -> None:
        self.run(pod, ["tc", *args])

    def snmp(self, pod: Pod) -> dict[str, int]:
        """The pod's TCP MIB counters (e.g. RetransSegs, OutRsts) from /proc/net/snmp, read inside it."""
        with self.inside(pod), open("/proc/thread-self/net/snmp") as f:
            return parse_snmp(f.read(), "Tcp")


def parse_snmp(text: str, proto: str) -> dict[str, int]:
    """`Tcp: names...` / `Tcp: values...` line pairs of /proc/net/snmp into a dict."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith(f"{proto}:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=False)}
