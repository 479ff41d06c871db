"""Shared fixtures, and the one marker for tests that need the host: `@pytest.mark.root`.

A test (or a module, through `pytestmark = pytest.mark.root`) that loads BPF programs or builds network
namespaces carries the marker; without root it FAILS at setup, before any fixture builds anything (never
skips). `-m "not root"` selects the tests that need nothing of the host; such tests run freely, the
others under `flock /work/netns.lock`.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.kubeapi.fixtures",  # the `kube_api` fixture: a Kubernetes API emulator
    "tests.kubelet.fixtures",  # the `images` fixture: flowmon/agent and flowmon/operator, built once
    "tests.demo_session",  # `running_demo`: one demo shared by the map and dashboard tests
]

ROOT_NEEDED = "this test needs root (BPF, network namespaces): run `make test` as root"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail(ROOT_NEEDED)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a fixture needing root (one that asks for `require_root`) carries the marker too,
    so `-m "not root"` and the failing setup hook see every test that needs the host."""
    for item in items:
        if "require_root" in getattr(item, "fixturenames", ()) and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def require_root() -> None:
    """For fixtures that build BPF or netns state: tests using them are marked `root` at collection."""
    if os.geteuid() != 0:
        pytest.fail(ROOT_NEEDED)
