"""FlowMonitor files against a CRD's structural schema: the committed CRD agrees with the models; an
older CRD (as a cluster may still have installed) refuses what it does not know, with field paths."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowmon_cli import crd_check
from flowmon_contract.documents import load_files

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "crds" / crd_check.CRD_FILE


def spec_schema(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@pytest.fixture
def older_crd(tmp_path: Path) -> Path:
    """The committed CRD as an older release might have had it: fewer metrics, a lower series cap."""
    crd = yaml.safe_load(COMMITTED.read_text())
    spec = spec_schema(crd)
    spec["properties"]["metrics"]["items"]["enum"].remove("resets")
    spec["properties"]["aggregation"]["properties"]["maxSeries"]["maximum"] = 1500
    path = tmp_path / "cluster-crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    return path


def test_examples_pass_the_committed_crd() -> None:
    loaded, problems = load_files([ROOT / "examples"])
    crd = crd_check.load_crd(COMMITTED)
    assert problems == []
    assert [p for item in loaded for p in crd_check.crd_problems(item.file, item.document, crd, "crd")] == []


def test_an_older_crd_refuses_what_it_does_not_know(older_crd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "validate", "--crd", str(older_crd), "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "examples/service-map.yaml: spec.aggregation.maxSeries: 2000 is greater than the maximum of 1500 "
        "(CRD cluster-crd.yaml)",
        "examples/team-namespace.yaml: spec.metrics[9]: 'resets' is not one of ['sent_bytes', "
        "'received_bytes', 'connections_opened', 'connections_closed', 'connections_active', "
        "'connect_failures', 'connect_duration', 'rtt', 'retransmits', 'udp_sent_bytes', "
        "'udp_received_bytes', 'udp_sent_datagrams', 'udp_received_datagrams', 'dns_requests', "
        "'dns_latency'] (CRD cluster-crd.yaml)",
    ]


def test_validate_uses_crds_of_the_checkout_by_default_and_no_crd_skips() -> None:
    run = [sys.executable, "-m", "flowmon_cli.main", "validate"]
    default = subprocess.run([*run, "examples/cost-by-zone.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert default.returncode == 0
    assert default.stdout.strip().endswith(f"is valid (models and crds/{crd_check.CRD_FILE})")
    skipped = subprocess.run(
        [*run, "--no-crd", "examples/cost-by-zone.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert skipped.stdout.strip().endswith("is valid (models)")


def test_a_file_that_is_not_the_crd_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\n")
    done = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "validate", "--crd", str(other), "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "not the FlowMonitor CustomResourceDefinition" in done.stderr


def test_an_unserved_version_is_named() -> None:
    crd = yaml.safe_load(COMMITTED.read_text())
    problems = crd_check.crd_problems(
        "f.yaml", {"apiVersion": "flowmon.io/v9", "kind": "FlowMonitor"}, crd, "c"
    )
    assert [str(p) for p in problems] == ["f.yaml: apiVersion: c serves no version flowmon.io/v9"]


@pytest.mark.parametrize(
    ("openapi", "json_schema"),
    [
        ({"type": "string", "nullable": True}, {"anyOf": [{"type": "string"}, {"type": "null"}]}),
        ({"x-kubernetes-int-or-string": True}, {"anyOf": [{"type": "integer"}, {"type": "string"}]}),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "exclusiveMinimum": True}},
            },
            {
                "type": "object",
                "properties": {"a": {"type": "integer", "exclusiveMinimum": 0}},
                "additionalProperties": False,
            },
        ),
        (
            {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
            {"type": "object", "properties": {}},
        ),
        (
            {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        ),
        ({"type": "object", "x-kubernetes-validations": [{"rule": "true"}]}, {"type": "object"}),
    ],
)
def test_openapi_to_json_schema(openapi: dict, json_schema: dict) -> None:
    before = copy.deepcopy(openapi)
    assert crd_check.to_json_schema(openapi) == json_schema
    assert openapi == before
