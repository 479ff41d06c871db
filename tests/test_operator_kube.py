"""The operator's API client (flowmon_operator.kube, on flowmon_kube) against the Kubernetes API emulator,
over HTTPS verified against the emulator's CA, as against a real API server."""

from __future__ import annotations

import aiohttp
import pytest
import yaml

from flowmon_kube import Connection, in_cluster
from flowmon_operator.kube import Conflict, KubeClient, KubeError, Ref, load_connection
from tests.kubeapi.shipped import install_rbac, operator_token
from tests.schemas import FLOWMON_CRD

CM = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "c", "namespace": "default"},
    "data": {"a": "1"},
}


@pytest.fixture
def kube_api(kube_api_https):
    return kube_api_https


@pytest.fixture
def connection(kube_api, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    return load_connection()


def test_connection_comes_from_the_kubeconfig_named_at_call_time(kube_api, connection):
    assert connection.server == kube_api.url
    assert connection.bearer() == kube_api.token
    assert connection.ca_path == str(kube_api.pki.ca_file) and not connection.insecure
    assert kube_api.token not in repr(connection)


@pytest.mark.asyncio
async def test_the_kubeconfig_loads_inside_a_running_loop_too(kube_api, connection):
    """kopf's startup handler calls load_connection() in its loop; the library's loader is a coroutine."""
    assert load_connection() == connection


@pytest.mark.asyncio
async def test_in_cluster_service_account_with_a_rotating_token(kube_api, tmp_path, monkeypatch):
    """A pod's credentials: host and port from the environment, the CA and the token from the service
    account folder; the token file is read again on every request (projected tokens rotate)."""
    install_rbac(kube_api)
    first, second = operator_token(kube_api), operator_token(kube_api)
    (tmp_path / "token").write_text(first)
    (tmp_path / "ca.crt").write_text(kube_api.pki.ca_file.read_text())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube_api.port))
    conn = in_cluster(tmp_path)
    assert conn.server == kube_api.url and conn.token_file == tmp_path / "token"
    async with KubeClient(conn) as kube:
        assert await kube.list("Pod", "flowmon-system") == []  # the operator's ServiceAccount may
        kube_api.tokens.revoke(first)
        (tmp_path / "token").write_text(second)
        assert await kube.list("Pod", "flowmon-system") == []


@pytest.mark.asyncio
async def test_a_server_the_ca_did_not_sign_is_refused(kube_api):
    async with KubeClient(Connection(server=kube_api.url, token=kube_api.token)) as kube:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await kube.get("Namespace", "default")


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
