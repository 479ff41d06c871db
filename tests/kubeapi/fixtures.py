"""pytest fixtures for the Kubernetes API emulator (exported to all tests through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import KubeAPI


@pytest.fixture
def kube_api() -> Iterator[KubeAPI]:
    """A fresh, running emulator per test (namespaces default, kube-system, kube-public exist)."""
    api = KubeAPI().start()
    try:
        yield api
    finally:
        api.stop()
