"""`flowmon validate` and `flowmon render`: exit codes, `file: field.path: message` lines, golden output.

Golden files live in tests/golden/; regenerate with FLOWMON_UPDATE_GOLDEN=1 after a deliberate change
and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowmon_cli import main as cli
from flowmon_contract import documents as manifests
from flowmon_contract.policy import AgentPolicy

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
INVALID = sorted((GOLDEN / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def flowmon(*args: str, settings: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, from the repository root (paths in messages are relative to it); only the
    given operator settings (FLOWMON_* variables) apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWMON_")} | (settings or {})
    return subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FLOWMON_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: review, then FLOWMON_UPDATE_GOLDEN=1"


# --- validate ----------------------------------------------------------------------------------------


def test_examples_are_valid_and_validate_exits_0() -> None:
    done = flowmon("validate", "examples")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == len(EXAMPLES) == 4


def test_invalid_files_exit_1_with_one_line_per_problem_golden() -> None:
    rel = [str(p.relative_to(ROOT)) for p in INVALID]
    done = flowmon("validate", "examples/team-namespace.yaml", *rel)
    assert done.returncode == 1
    assert done.stdout == ""
    check_golden("validate-invalid.txt", done.stderr)


@pytest.mark.parametrize(
    ("file", "path", "fragment"),
    [
        ("bad-fields.yaml", "spec.metrics[1]", "Input should be 'sent_bytes'"),
        ("bad-fields.yaml", "spec.aggregation.maxSeries", "greater than or equal to 1"),
        ("bad-fields.yaml", "spec.aggregation.seriesTTL", "should match pattern"),
        ("bad-fields.yaml", "spec.scrape.intervall", "Extra inputs are not permitted"),
        ("bad-fields.yaml", "spec.selection.networks[0].cidr", "host bits set: the network is 203.0.113.0"),
        ("bad-fields.yaml", "spec.alerting.isolation", "unknown environment 'prod'"),
        ("semantic.yaml", "spec.selection.namespaces", "both included and excluded: payments"),
        ("semantic.yaml", "spec.aggregation.histogramBuckets", "strictly ascending"),
        ("not-a-monitor.yaml[0]", "kind", "expected FlowMonitor, got 'Deployment'"),
        ("not-a-monitor.yaml[1]", "apiVersion", "expected flowmon.io/v1alpha1, got 'flowmon.io/v1'"),
        ("not-a-monitor.yaml[1]", "metadata.name", "Field required"),
        ("broken-yaml.yaml", "(document)", "not valid YAML: line 4, column 1"),
        ("strict-types.yaml", "spec.aggregation.maxSeries", "Input should be a valid integer"),
        ("strict-types.yaml", "spec.alerting.enabled", "Input should be a valid boolean"),
    ],
)
def test_each_problem_is_file_field_path_message(file: str, path: str, fragment: str) -> None:
    _, problems = manifests.load_files(INVALID)
    lines = [str(p) for p in problems]
    prefix = f"{GOLDEN / 'invalid' / file}: {path}: "
    assert any(line.startswith(prefix) and fragment in line for line in lines), lines


def test_duplicates_across_files_name_both() -> None:
    dup = GOLDEN / "invalid" / "duplicate.yaml"
    _, problems = manifests.load_files([ROOT / "examples" / "team-namespace.yaml", dup])
    assert [str(p) for p in problems] == [
        f"{dup}: metadata.name: FlowMonitor shop/shop-flows is also defined in "
        f"{ROOT / 'examples' / 'team-namespace.yaml'}"
    ]


def test_unreadable_file_and_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n---\n")
    _, problems = manifests.load_files([tmp_path / "missing.yaml", empty])
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'missing.yaml'}: (document): cannot read: No such file or directory",
        f"{empty}: (document): no FlowMonitor in this file",
    ]


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("spec", "metrics", 1), "spec.metrics[1]"),
        (
            ("spec", "selection", "networks", 0, "cidr", "lax-or-strict[lax=function-plain[x()]]"),
            "spec.selection.networks[0].cidr",
        ),
        (
            ("spec", "selection", "podSelector", "matchLabels", "app.kubernetes.io/name"),
            "spec.selection.podSelector.matchLabels.app.kubernetes.io/name",
        ),
        ((), ""),
    ],
)
def test_field_path(loc: tuple, expected: str) -> None:
    assert manifests.field_path(loc) == expected


def test_validate_in_process_returns_exit_codes(capsys) -> None:
    assert cli.main(["validate", "-q", str(ROOT / "examples")]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["validate", str(GOLDEN / "invalid" / "semantic.yaml")]) == 1


# --- render ------------------------------------------------------------------------------------------


def test_render_examples_golden_and_deterministic() -> None:
    first, second = flowmon("render", "examples"), flowmon("render", "examples")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # placeholders, not fresh keys and tokens
    check_golden("render-examples.yaml", first.stdout)


def test_render_output_is_what_the_operator_needs() -> None:
    objects = list(yaml.safe_load_all(flowmon("render", "examples").stdout))
    kinds = [o["kind"] for o in objects]
    assert kinds.count("ServiceMonitor") == 4 and kinds.count("DaemonSet") == 1
    # One PrometheusRule per monitor with alerting enabled (cost-by-zone disables it).
    rules = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "PrometheusRule")
    assert rules == ["flowmon-environment-isolation", "flowmon-service-map", "flowmon-shop-flows"]
    # The ConfigMap carries the compiled policy of exactly these monitors, valid for the agent.
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    policy = AgentPolicy.model_validate_json(next(iter(config_map["data"].values())))
    assert [m.key for m in policy.monitors] == [
        "flowmon-system/cost-by-zone",
        "flowmon-system/environment-isolation",
        "flowmon-system/service-map",
        "shop/shop-flows",
    ]
    assert config_map["metadata"]["annotations"]["flowmon.io/policy-hash"] == policy.hash
    # No generated secret material leaks into the output: only placeholders.
    assert "BEGIN" not in yaml.safe_dump_all(objects)


def test_render_with_cert_manager_renders_a_certificate_instead_of_the_pki_secrets() -> None:
    done = flowmon("render", "examples", settings={"FLOWMON_CERT_MANAGER_ISSUER": "Issuer/flowmon-ca"})
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    (certificate,) = [o for o in objects if o["kind"] == "Certificate"]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["issuerRef"] == {
        "group": "cert-manager.io",
        "kind": "Issuer",
        "name": "flowmon-ca",
    }
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert not names & {"flowmon-ca", certificate["spec"]["secretName"]}
    plain = list(yaml.safe_load_all(flowmon("render", "examples").stdout))
    assert [o for o in plain if o["kind"] == "Certificate"] == []
    assert [o for o in objects if o["kind"] != "Certificate"] == [
        o
        for o in plain
        if (o["kind"], o["metadata"]["name"])
        not in {("Secret", "flowmon-ca"), ("Secret", "flowmon-agent-tls")}
    ]


def test_render_refuses_invalid_files_like_validate() -> None:
    done = flowmon("render", "tests/golden/invalid/semantic.yaml")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("tests/golden/invalid/semantic.yaml: spec.")
