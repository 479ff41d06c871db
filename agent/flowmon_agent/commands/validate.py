"""`flowmon validate FILE...`: schema and semantic validation of FlowMonitor files, for CI pipelines.

Exit 0 when every file is valid; exit 1 with one `file: field.path: message` line per problem on
stderr. Directories stand for their *.yaml/*.yml files. Validation is the FlowMonitor models in strict
JSON mode, which is what the API server enforces with the CRD (crds/ is generated from these models and
the operator's drift tests hold the two equal), plus what no schema sees: duplicate namespace/name
across files, wrong kind or apiVersion.
"""

from __future__ import annotations

import argparse
import sys

from flowmon_agent.cli import Handler, subcommand
from flowmon_agent.manifests import load_files


@subcommand("validate", "validate FlowMonitor files (exit 1 with file: field.path: message lines)")
def build(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("files", nargs="+", metavar="FILE", help="FlowMonitor YAML files or directories")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    return run


def run(args: argparse.Namespace) -> int:
    loaded, problems = load_files(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if not args.quiet:
        for item in loaded:
            print(f"{item.file}: FlowMonitor {item.monitor.key} is valid")
    return 0
