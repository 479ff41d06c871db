"""The layout holds: packages import only what their docstrings allow, modules stay small, and
docs/ARCHITECTURE.md shows the tree that is really there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "flowmon_contract": REPO / "contract" / "flowmon_contract",
    "flowmon_agent": REPO / "agent" / "flowmon_agent",
    "flowmon_operator": REPO / "operator" / "flowmon_operator",
    "flowmon_cli": REPO / "cli" / "flowmon_cli",
    "flowmon_lab": REPO / "lab" / "flowmon_lab",
    "flowmon_kube": REPO / "kube" / "flowmon_kube",
}
# Which flowmon packages each may import (its own always). The lab composes everything; nothing imports it
# but the CLI's `demo`, inside the handler (the images do not install the lab).
MAY_IMPORT = {
    "flowmon_contract": set(),
    "flowmon_kube": set(),
    "flowmon_agent": {"flowmon_contract", "flowmon_kube"},
    "flowmon_operator": {"flowmon_contract", "flowmon_kube"},
    "flowmon_cli": {"flowmon_contract", "flowmon_kube", "flowmon_agent", "flowmon_operator", "flowmon_lab"},
    "flowmon_lab": {"flowmon_contract", "flowmon_kube", "flowmon_agent", "flowmon_operator", "flowmon_cli"},
}
MAX_LINES = 500


def modules(package: str) -> list[Path]:
    return sorted(PACKAGES[package].rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n in PACKAGES}


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_they_may(package: str) -> None:
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) - MAY_IMPORT[package] - {package})
        for path in modules(package)
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_only_the_cli_imports_the_lab_and_only_inside_the_demo_handler() -> None:
    for package in ("flowmon_contract", "flowmon_agent", "flowmon_operator"):
        assert all("flowmon_lab" not in imported_packages(p) for p in modules(package))
    top_level = [
        p
        for p in modules("flowmon_cli")
        for node in ast.parse(p.read_text()).body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flowmon_lab")
    ]
    assert top_level == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_product_module_over_500_lines(package: str) -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in modules(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_it_is_and_what_it_may_import(package: str) -> None:
    for init in PACKAGES[package].rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, init.relative_to(REPO)
    top = ast.get_docstring(ast.parse((PACKAGES[package] / "__init__.py").read_text())) or ""
    assert "import" in top, f"{package}/__init__.py does not say what it may import"


def test_architecture_doc_shows_the_real_tree() -> None:
    """Every module appears in the doc's table by its package path (flowmon_agent/kernel/loader.py), and
    the doc names no module that is gone."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    shown = set(re.findall(r"\b(flowmon_[a-z]+(?:/[a-z_]+)*\.py)\b", text))
    real = {
        f"{name}/{p.relative_to(root).as_posix()}"
        for name, root in PACKAGES.items()
        for p in root.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert sorted(real - shown) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(shown - real) == [], "docs/ARCHITECTURE.md names modules that do not exist"
