"""`flowmon agent`: the node agent (flowmon_agent.main), standalone or as the DaemonSet runs it."""

from __future__ import annotations

import argparse

from flowmon_cli.main import Handler, subcommand


@subcommand("agent", "run the node agent (standalone on this host, or in a cluster)")
def build(parser: argparse.ArgumentParser) -> Handler:
    from flowmon_agent import main

    main.add_arguments(parser)
    return main.run
