"""The whole `flowmon agent` in a bench child whose BPF programs attach and detach on command.

`flowmon agent` runs for days; a bench that starts it around each measurement also measures its start
(a BPF compile: seconds of clang CPU, ~300 MB allocated and returned). This runs the same command, the
same code path (`flowmon_agent.main.serve`: default monitor, host metadata, aggregation, conntrack, the
exporter), with one change: its tracer's hooks follow `on`/`off` lines on stdin, like the floor and flowmon
modes, so the agent can be measured in its steady state, seconds apart from no tracer at all. Its own
polls keep running while it is off; the bench freezes the process (SIGSTOP) for that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import replace

from flowmon_agent import runner
from flowmon_agent.main import serve
from flowmon_cli.main import build_parser


def run_steady_agent(toggles) -> int:
    """Child process: `flowmon agent` as the bare command runs it; prints `ready` once its tracer is
    loaded and detached, then obeys `on`/`off` lines (answering `ok`) until stdin closes, then stops as
    on SIGTERM. `toggles(bpf, skip, program)` gives (on, off) for the tracer's hooks."""
    logging.basicConfig(level=logging.WARNING)
    loaded = threading.Event()
    hooks: list = []
    real_tracer = runner.default_tracer

    def toggleable_tracer(settings, *args, **kwargs):
        tracer = real_tracer(settings, *args, **kwargs)
        # tcp_probe follows the tracer's own srtt window, switched through the configuration's `rtt`: the
        # agent's policy turns it on, but only while the hooks are attached
        hooks_on, hooks_off = toggles(
            tracer.program.bpf, skip=frozenset({b"tcp:tcp_probe"}), program=tracer.program
        )

        wanted = [True]  # what the agent's policy asks for; applied only while attached
        attached = [False]
        configure = tracer.configure

        def agent_configures(config) -> None:
            with tracer.lock:
                wanted[0] = config.rtt
                configure(replace(config, rtt=config.rtt and attached[0]))

        tracer.configure = agent_configures

        def on() -> None:
            with tracer.lock:
                attached[0] = True
                hooks_on()
                configure(replace(tracer.config, rtt=wanted[0]))

        def off() -> None:
            with tracer.lock:
                attached[0] = False
                hooks_off()
                configure(replace(tracer.config, rtt=False))

        off()
        hooks[:] = [on, off]
        loaded.set()
        return tracer

    def obey() -> None:
        loaded.wait()
        print("ready", flush=True)
        for line in sys.stdin:
            hooks[0 if line.strip() == "on" else 1]()
            print("ok", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # stdin closed: stop as the agent stops

    runner.default_tracer = toggleable_tracer  # make_agent imports it when it builds the agent
    threading.Thread(target=obey, daemon=True).start()
    # where it listens: FLOWMON_AGENT_LISTEN_HOST/PORT, from the bench
    args = build_parser().parse_args(["agent", "--log-level", "WARNING", "--no-auth"])
    return asyncio.run(serve(args))
