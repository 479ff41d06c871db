"""`flowmon validate FILE...`: schema and semantic validation of FlowMonitor files, for CI pipelines.

Exit 0 when every file is valid; exit 1 with one `file: field.path: message` line per problem on
stderr. Directories stand for their *.yaml/*.yml files.

1. The FlowMonitor models in strict JSON mode (what the API server enforces: `maxSeries: "500"` is
   refused), plus what no schema sees: wrong kind or apiVersion, one namespace/name in two files.
2. Documents the models accept are then checked against the CRD's structural schema: crds/ of this
   checkout when present, or --crd FILE (e.g. the CRD installed in the cluster, which may be older).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmon_cli.main import Handler, subcommand
from flowmon_contract.documents import load_files


@subcommand("validate", "validate FlowMonitor files (exit 1 with file: field.path: message lines)")
def build(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("files", nargs="+", metavar="FILE", help="FlowMonitor YAML files or directories")
    parser.add_argument(
        "--crd", type=Path, metavar="FILE", help="check against this CRD (default: crds/ if present)"
    )
    parser.add_argument("--no-crd", action="store_true", help="skip the CRD schema check")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    return run


def run(args: argparse.Namespace) -> int:
    from flowmon_cli import crd_check

    loaded, problems = load_files(args.files)
    crd_path = None if args.no_crd else (args.crd or crd_check.default_crd())
    if crd_path is not None:
        try:
            crd = crd_check.load_crd(crd_path)
            for item in loaded:
                problems += crd_check.crd_problems(item.file, item.document, crd, crd_path.name)
        except crd_check.CRDError as exc:
            print(f"flowmon validate: {exc}", file=sys.stderr)
            return 1
        except ImportError:
            crd_path = None
            print("flowmon validate: CRD check skipped (the jsonschema package is missing)", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if not args.quiet:
        against = f" (models and {crd_path})" if crd_path else " (models)"
        for item in loaded:
            print(f"{item.file}: FlowMonitor {item.monitor.key} is valid{against}")
    return 0
