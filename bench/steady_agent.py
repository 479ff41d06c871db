"""The whole `flowmon agent` in a bench child whose BPF programs attach and detach on command.

`flowmon agent` runs for days; a bench that starts it around each measurement also measures its start
(a BPF compile: seconds of clang CPU, ~300 MB allocated and returned). This runs the same command, the
same code path (`flowmon_agent.main.serve`: default monitor, host metadata, aggregation, conntrack, the
exporter), with one change: its tracer's hooks follow `on`/`off` lines on stdin, like the floor and flowmon
modes, so the agent can be measured in its steady state, seconds apart from no tracer at all. Its own
polls keep running while it is off; the bench freezes the process (SIGSTOP) for that.

`udp_dns=True` (agent-udp-dns): the same with a monitor that exports UDP and DNS metrics too
(bench/udp_dns_modes.py), so its UDP job follows the switch with the tracer's hooks, and its DNS capture
is made at each switch-on and closed at each switch-off (over the program pair the agent loaded once), in
the agent's own poll thread (the switch waits for that poll).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from bench.udp_dns_modes import SwitchedDns, udp_dns_monitor
from flowmon_agent import runner
from flowmon_agent.main import serve
from flowmon_cli.main import build_parser

SWITCH_TIMEOUT_S = 30.0  # for the agent's next poll to make or close the DNS capture


def run_steady_agent(toggles, udp_dns: bool = False) -> int:
    """Child process: `flowmon agent` as the bare command runs it; prints `ready` once its tracer is
    loaded and detached, then obeys `on`/`off` lines (answering `ok`) until stdin closes, then stops as
    on SIGTERM. `toggles(bpf, skip, program)` gives (on, off) for the tracer's hooks. `udp_dns`: with a
    monitor of UDP and DNS metrics, and the DNS capture switched too."""
    logging.basicConfig(level=logging.WARNING)
    loaded = threading.Event()
    hooks: list = []
    real_tracer = runner.default_tracer
    dns: list[SwitchedDns] = []  # made by the agent's DnsLifecycle at its first poll
    dns_made = threading.Event()
    if not udp_dns:
        dns_made.set()

    def toggleable_tracer(settings, *args, **kwargs):
        tracer = real_tracer(settings, *args, **kwargs)
        # tcp_probe follows the tracer's own srtt window, switched through the configuration's `rtt`: the
        # agent's policy turns it on, but only while the hooks are attached
        hooks_on, hooks_off = toggles(
            tracer.program.bpf, skip=frozenset({b"tcp:tcp_probe"}), program=tracer.program
        )

        # what the agent's policy asks for (srtt, UDP); applied only while attached
        wanted = {"rtt": True, "udp": tracer.config.udp}
        attached = [False]
        configure = tracer.configure

        def agent_configures(config) -> None:
            with tracer.lock:
                wanted.update(rtt=config.rtt, udp=config.udp)
                configure(replace(config, rtt=config.rtt and attached[0], udp=config.udp and attached[0]))

        tracer.configure = agent_configures

        def on() -> None:
            with tracer.lock:
                attached[0] = True
                hooks_on()
                configure(replace(tracer.config, **wanted))

        def off() -> None:
            with tracer.lock:
                attached[0] = False
                hooks_off()
                configure(replace(tracer.config, rtt=False, udp=False))

        off()
        hooks[:] = [on, off]
        loaded.set()
        return tracer

    real_dns_capture = runner.default_dns_capture

    def switched_dns_capture(settings, tracker, **kwargs) -> SwitchedDns:  # kwargs: the shared skb pair
        switched = SwitchedDns(tracker, functools.partial(real_dns_capture, settings, **kwargs))
        dns[:] = [switched]
        dns_made.set()
        return switched

    def switch_dns(on: bool) -> None:
        if dns:
            dns[0].want(on)
            if not dns[0].applied.wait(SWITCH_TIMEOUT_S):
                raise RuntimeError(f"the agent did not switch its DNS capture {'on' if on else 'off'}")

    def obey() -> None:
        loaded.wait()
        dns_made.wait()
        print("ready", flush=True)
        for line in sys.stdin:
            on = line.strip() == "on"
            hooks[0 if on else 1]()
            switch_dns(on)
            print("ok", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # stdin closed: stop as the agent stops

    runner.default_tracer = toggleable_tracer  # make_agent imports it when it builds the agent
    runner.default_dns_capture = switched_dns_capture  # the Agent's DnsLifecycle makes it
    threading.Thread(target=obey, daemon=True).start()
    # where it listens: FLOWMON_AGENT_LISTEN_HOST/PORT, from the bench
    argv = ["agent", "--log-level", "WARNING", "--no-auth"]
    with tempfile.TemporaryDirectory(prefix="fkb-agent-") as tmp:
        if udp_dns:  # JSON is YAML
            monitor = Path(tmp) / "udp-dns.yaml"
            monitor.write_text(json.dumps(udp_dns_monitor()))
            argv += ["--monitor", str(monitor)]
        return asyncio.run(serve(build_parser().parse_args(argv)))
