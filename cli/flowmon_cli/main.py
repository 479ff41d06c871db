"""The `flowmon` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _not_yet(name: str) -> Handler:
    def run(_: argparse.Namespace) -> int:
        print(f"flowmon {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {}


def subcommand(name: str, help_text: str):
    """Register a function that adds its arguments to a subparser and returns the handler."""

    def register(build: Callable[[argparse.ArgumentParser], Handler]):
        SUBCOMMANDS[name] = (help_text, build)
        return build

    return register


for _name, _help in (
    ("agent", "run the node agent (standalone on this host, or in a cluster)"),
    ("operator", "run the kopf operator that reconciles FlowMonitors"),
    ("demo", "build a mini-cluster from network namespaces and show flowmon working"),
    ("top", "live terminal view of an agent's workload flows"),
    ("render", "print every object the operator would create for FlowMonitor files"),
    ("validate", "validate FlowMonitor files (exit 1 with file: field: message lines)"),
):
    subcommand(_name, _help)(lambda _parser, n=_name: _not_yet(n))


def build_parser() -> argparse.ArgumentParser:
    import flowmon_cli.commands  # noqa: F401  (registers the real subcommands over the placeholders)

    parser = argparse.ArgumentParser(
        prog="flowmon", description="Kubernetes network-flow monitoring with eBPF"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_text, build) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=build(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    # `python -m flowmon_cli.main` runs this file as __main__: delegate to the importable module, so
    # that command modules register into the same SUBCOMMANDS the parser reads.
    from flowmon_cli.main import main as _main

    sys.exit(_main())
