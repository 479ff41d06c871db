"""`flowmon operator` (also `python -m flowmon_operator`): run the kopf operator (flowmon_operator.handlers).

Settings (namespaces of the agents, image, ports, timer period...) come from FLOWMON_* environment
variables (flowmon_operator.settings); the flags here choose what to watch and how much to log.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="serve FlowMonitors in this namespace only (repeatable)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="serve FlowMonitors in every namespace (default)"
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate replicas through kopf peering NAME (default: standalone, one replica)",
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every reconciliation step")
    parser.add_argument("--debug", action="store_true", help="log kopf's internals and API calls too")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    import kopf

    from flowmon_operator.handlers import operator
    from flowmon_operator.kube import load_connection
    from flowmon_operator.settings import OperatorSettings

    try:  # fail fast and clearly instead of kopf retrying the login every minute
        load_connection()
    except Exception as exc:  # the kubernetes package's config errors have no common base
        print(
            f"flowmon operator: no Kubernetes API credentials (in-cluster or kubeconfig): {exc}",
            file=sys.stderr,
        )
        return 1
    kopf.configure(verbose=args.verbose, debug=args.debug)
    try:
        asyncio.run(
            operator(
                OperatorSettings(),
                namespaces=args.namespace,
                peering_name=args.peering,
                liveness_endpoint=args.liveness,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flowmon_operator`: what the operator image runs (the same as `flowmon operator`)."""
    parser = argparse.ArgumentParser(prog="flowmon operator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
