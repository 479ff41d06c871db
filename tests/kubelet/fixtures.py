"""The images, built once per session by the project's own `make images` script (fast when cached)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.schemas import REPO


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """{"agent": tag, "operator": tag}: scripts/images.sh builds whatever changed. Fails (never skips)
    without root or podman: make setup installs podman."""
    if os.geteuid() != 0:
        pytest.fail("building and running the images needs root: run `make test` as root")
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: run `make setup` (scripts/apt-packages.txt, section images)")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "images.sh")], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-4000:]
    version = next(
        line.split('"')[1]
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if line.startswith("version")
    )
    return {name: f"flowmon/{name}:{version}" for name in ("agent", "operator")}
