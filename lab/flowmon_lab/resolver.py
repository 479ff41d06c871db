"""A real DNS server (Debian's dnsmasq) in a lab pod, for tests, benchmarks and the demo.

`resolver_argv` is pure: the command line for one resolver serving a local zone (names with A and AAAA
records, every other name in it NXDOMAIN), TXT records, and forwarding the rest to `upstream` (or
refusing it when there is none). With `dnssec=True` it validates what it forwards against the root trust
anchor Debian ships: an upstream that cannot prove a chain of trust makes it answer SERVFAIL, the way a
validating resolver really fails.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowmon_lab.network import Lab, LabError, Pod

TRUST_ANCHORS = "/usr/share/dnsmasq-base/trust-anchors.conf"


@dataclass(frozen=True)
class ResolverConfig:
    local_zone: str | None = None  # answered here only: unknown names in it are NXDOMAIN
    hosts: Mapping[str, Sequence[str]] = field(default_factory=dict)  # name -> IPv4 and/or IPv6 addresses
    txt: Mapping[str, Sequence[str]] = field(default_factory=dict)  # name -> strings (<= 255 chars each)
    ttl_s: int = 30  # TTL of the local answers
    upstream: str | None = None  # where other names go; None: refused
    dnssec: bool = False


def resolver_argv(pod: Pod, config: ResolverConfig) -> list[str]:
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",  # nothing from the host's /etc/dnsmasq.conf
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--user=root",
        "--group=root",
        "--bind-interfaces",
        f"--listen-address={pod.ipv4}",
        f"--listen-address={pod.ipv6}",
        f"--local-ttl={int(config.ttl_s)}",
    ]
    if config.local_zone:
        argv.append(f"--local=/{config.local_zone}/")
    for name, addresses in config.hosts.items():
        v4 = [a for a in addresses if ":" not in a][:1]
        v6 = [a for a in addresses if ":" in a][:1]
        argv.append("--host-record=" + ",".join([name, *v4, *v6]))
    for name, strings in config.txt.items():
        argv.append("--txt-record=" + ",".join([name, *(f'"{s}"' for s in strings)]))
    if config.upstream:
        argv.append(f"--server={config.upstream}")
    if config.dnssec:
        argv += ["--dnssec", f"--conf-file={TRUST_ANCHORS}"]
    return argv


def start_resolver(lab: Lab, pod: Pod, config: ResolverConfig, timeout_s: float = 10.0):
    """Start dnsmasq in the pod (stopped at lab cleanup) and return once it answers on UDP port 53."""
    if shutil.which("dnsmasq") is None:
        raise LabError("dnsmasq is not installed (Debian package dnsmasq-base; make setup installs it)")
    proc = lab.popen(pod, resolver_argv(pod, config), stderr=subprocess.PIPE)
    probe = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ready\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout_s
    with lab.socket(pod, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"dnsmasq exited ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
            sock.sendto(probe, (str(pod.ipv4), 53))
            try:
                sock.recv(512)
                return proc
            except TimeoutError:
                continue
    raise LabError(f"dnsmasq in {pod.netns} did not answer within {timeout_s} s")
