"""Shared fixtures. Tests that need root or BPF fail (never skip) when the host lacks them."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.kubeapi.fixtures",  # the `kube_api` fixture: a Kubernetes API emulator
    "tests.kubelet.fixtures",  # the `images` fixture: flowmon/agent and flowmon/operator, built once
    "tests.demo_session",  # `running_demo`: one demo shared by the map and dashboard tests
]


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (BPF, network namespaces): run `make test` as root")
