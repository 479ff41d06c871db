"""UDP accounting and the DNS capture both on, in the overhead bench (bench/kernel_overhead.py): what one
cgroup-skb program per direction for both jobs costs every packet of the node against a program pair per
job (each walking the headers again).

Modes (not run by default; `--bpf-stats --modes udp-dns-apart,udp-dns`): `udp-dns`, the agent's shape,
UdpFlows and DnsCapture over one SkbHooks (kernel/skb_hooks.py: bpf/skb.c with both bodies); and
`udp-dns-apart`, each with a pair of its own (two programs per direction, as before 2026-12-06). Both read
UDP once a second and drain the DNS ring as the agent's poll does.
"""

from __future__ import annotations

import threading

from flowmon_agent.kernel.flows import KernelConfig

SKB_MODES = ("udp-dns", "udp-dns-apart")


def load_skb_mode(mode: str, loaded_mode):  # -> kernel_overhead.LoadedMode
    """udp-dns or udp-dns-apart, loaded detached; `bpf` holds every program of the mode (one pair or two)."""
    from flowmon_agent.dns.capture import DnsCapture, dns_cflags
    from flowmon_agent.dns.tracker import DnsTracker
    from flowmon_agent.kernel.skb_hooks import SkbHooks
    from flowmon_agent.kernel.udp_flows import UdpFlows, udp_cflags

    tracker = DnsTracker()
    hooks = None
    if mode == "udp-dns":
        hooks = SkbHooks(udp_cflags() | dns_cflags(tracker.latency_bounds))
    flows = UdpFlows(hooks)
    lock, stop = threading.Lock(), threading.Event()
    capture: list[DnsCapture] = []

    def poll_every_second() -> None:
        while not stop.wait(1.0):
            with lock:
                flows.read()
                for c in capture:
                    c.poll()

    class Programs:  # what kernel_overhead.program_stats names by: every program loaded now (one pair or two)
        @property
        def funcs(self) -> dict:  # named by job: each pair of `apart` names its programs skb_*
            jobs: dict[int, tuple[bytes, object]] = {id(flows.bpf): (b"udp", flows.bpf)}
            for c in capture:
                label = b"udp+dns" if id(c.bpf) in jobs else b"dns"
                jobs[id(c.bpf)] = (label, c.bpf)
            return {label + b":" + name: fn for label, b in jobs.values() for name, fn in b.funcs.items()}

    def on() -> None:
        with lock:
            flows.configure(KernelConfig(udp=True))
            capture.append(DnsCapture(tracker, hooks=hooks))

    def off() -> None:
        with lock:
            flows.configure(KernelConfig(udp=False))
            for c in capture:
                c.close()
            capture.clear()

    def close() -> None:
        stop.set()
        off()
        flows.close()
        if hooks is not None:
            hooks.close()

    loaded = loaded_mode(Programs(), on, off, close)
    threading.Thread(target=poll_every_second, daemon=True).start()
    return loaded
