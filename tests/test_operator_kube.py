"""The operator's API client (flowmon_operator.kube) against the Kubernetes API emulator."""

from __future__ import annotations

import pytest
import yaml

from flowmon_operator.kube import Conflict, KubeClient, KubeError, Ref, load_connection
from tests.schemas import FLOWMON_CRD

CM = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "c", "namespace": "default"},
    "data": {"a": "1"},
}


@pytest.fixture
def connection(kube_api, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    return load_connection()


def test_connection_comes_from_the_kubeconfig_named_at_call_time(kube_api, connection):
    assert connection.server == kube_api.url
    assert connection.bearer() == kube_api.token


@pytest.mark.parametrize(
    ("ref", "args", "path"),
    [
        (Ref("v1", "pods"), ("ns", "p", "status"), "/api/v1/namespaces/ns/pods/p/status"),
        (Ref("v1", "pods"), (None,), "/api/v1/pods"),
        (Ref("apps/v1", "daemonsets"), ("ns", "d"), "/apis/apps/v1/namespaces/ns/daemonsets/d"),
        (Ref("v1", "namespaces", namespaced=False), ("ignored", "team"), "/api/v1/namespaces/team"),
    ],
)
def test_paths(ref, args, path):
    assert ref.path(*args) == path


@pytest.mark.asyncio
async def test_apply_creates_then_updates_and_keeps_other_fields(kube_api, connection):
    async with KubeClient(connection) as kube:
        assert await kube.get("ConfigMap", "c", "default") is None
        created = await kube.apply(CM)
        kube_api.patch("v1", "ConfigMap", "c", {"metadata": {"labels": {"team": "x"}}}, "default")
        again = await kube.apply(CM)
        assert (
            again["metadata"]["resourceVersion"]
            == kube_api.get("v1", "ConfigMap", "c", "default")["metadata"]["resourceVersion"]
        )
        updated = await kube.apply({**CM, "data": {"a": "2"}})
        assert updated["data"] == {"a": "2"} and updated["metadata"]["labels"] == {"team": "x"}
        assert updated["metadata"]["uid"] == created["metadata"]["uid"]
        assert any("fieldManager=flowmon-operator" in path for _, path in kube_api.requests)


@pytest.mark.asyncio
async def test_create_list_delete_and_errors(kube_api, connection):
    async with KubeClient(connection) as kube:
        await kube.create({**CM, "metadata": {**CM["metadata"], "labels": {"k": "v"}}})
        with pytest.raises(Conflict):
            await kube.create(CM)
        assert [c["metadata"]["name"] for c in await kube.list("ConfigMap", "default", "k=v")] == ["c"]
        assert await kube.list("ConfigMap", "default", "k=other") == []
        assert await kube.delete("ConfigMap", "c", "default") is True
        assert await kube.delete("ConfigMap", "c", "default") is False
        with pytest.raises(KubeError) as info:
            await kube.create({**CM, "metadata": {"name": "c", "namespace": "nowhere"}})
        assert info.value.status == 404


@pytest.mark.asyncio
async def test_patch_status_writes_only_status(kube_api, connection):
    kube_api.create(yaml.safe_load(FLOWMON_CRD.read_text()))
    kube_api.create(
        {
            "apiVersion": "flowmon.io/v1alpha1",
            "kind": "FlowMonitor",
            "metadata": {"name": "m", "namespace": "default"},
        }
    )
    async with KubeClient(connection) as kube:
        patched = await kube.patch_status("FlowMonitor", "m", "default", {"predictedSeries": 5})
        assert patched["status"] == {"predictedSeries": 5} and patched["metadata"]["generation"] == 1
        assert await kube.patch_status("FlowMonitor", "gone", "default", {"predictedSeries": 5}) is None


@pytest.mark.asyncio
async def test_an_unreachable_api_raises(kube_api, connection):
    kube_api.stop()
    async with KubeClient(connection, timeout=2) as kube:
        with pytest.raises(OSError):
            await kube.get("ConfigMap", "c", "default")
