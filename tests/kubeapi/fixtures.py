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


@pytest.fixture
def kube_api_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    """The same on HTTPS (`kube_api_https.pki.ca_file` is its CA), as a real API server is."""
    api = KubeAPI(tls_dir=tmp_path_factory.mktemp("kubeapi-tls")).start()
    try:
        yield api
    finally:
        api.stop()
