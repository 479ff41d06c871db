"""`flowmon operator`: the kopf operator (flowmon_operator.main)."""

from __future__ import annotations

import argparse

from flowmon_cli.main import Handler, subcommand


@subcommand("operator", "run the kopf operator that reconciles FlowMonitors")
def build(parser: argparse.ArgumentParser) -> Handler:
    from flowmon_operator import main

    main.add_arguments(parser)
    return main.run
