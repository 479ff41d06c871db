"""`flowmon demo`: the whole product on this machine from network namespaces (flowmon_lab.demo)."""

from __future__ import annotations

import argparse

from flowmon_cli.main import Handler, subcommand


@subcommand("demo", "build a mini-cluster from network namespaces and show flowmon working")
def build(parser: argparse.ArgumentParser) -> Handler:
    try:
        from flowmon_lab.demo import main
    except ImportError:  # the images install no lab: say so instead of failing every other subcommand
        return lambda _args: print("flowmon demo: needs the flowmon_lab package (a source checkout)") or 2
    main.add_arguments(parser)
    return main.run
