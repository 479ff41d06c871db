"""The Kubernetes watcher against the API emulator: paged list, watch, resume, 410 relist, API gone."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_agent.metadata.watcher import KubeWatcher
from tests.k8s_objects import namespace, node, owner, pod, rs, service
from tests.kubeapi.shipped import agent_token, install_rbac
from tests.waiting import wait_for


def workload_of(resolver: Resolver, ip: str) -> tuple[str, str]:
    ep = resolver.endpoint(ip_address(ip))
    return ep.workload, ep.kind


@pytest.fixture
def watched(kube_api_https):
    kube_api = kube_api_https  # HTTPS, verified against the cluster CA
    for obj in [
        namespace("shop", env="prod"),
        node("n1", "192.0.2.1", "zone-a"),
        service("shop", "web", ["10.96.0.10"]),
    ]:
        kube_api.create(obj)
    # The emulator collects garbage: owners must exist and be named by their real uid.
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"namespace": "shop", "name": "web"},
    }
    dep_uid = kube_api.create(deployment)["metadata"]["uid"]
    replicaset = rs("shop", "web-6b7c", "web")
    replicaset["metadata"]["ownerReferences"][0]["uid"] = dep_uid
    uid = kube_api.create(replicaset)["metadata"]["uid"]
    for i in range(2, 9):
        labels = {"app": "web"}
        kube_api.create(
            pod(
                "shop",
                f"web-6b7c-{i}",
                f"10.244.0.{i}",
                "n1",
                [owner("ReplicaSet", "web-6b7c", uid=uid)],
                labels,
            )
        )
    store = MetadataStore(deleted_pod_grace_seconds=0.2)
    watcher = KubeWatcher(
        store,
        kube_api.url,
        token=kube_api.token,
        ca_file=kube_api.pki.ca_file,
        page_size=3,
        retry_seconds=(0.05, 0.2),
        watch_timeout_seconds=30,
    ).start()
    try:
        assert watcher.wait_synced(10)
        yield kube_api, watcher, Resolver(store)
    finally:
        watcher.stop()


def test_list_in_pages_then_watch_changes(watched) -> None:
    kube_api, watcher, resolver = watched
    assert len(resolver.store.pods()) == 7  # three pages of three
    assert workload_of(resolver, "10.244.0.5") == ("web", "deployment")
    assert resolver.endpoint(ip_address("10.244.0.5")).zone == "zone-a"
    assert resolver.service(ip_address("10.96.0.10"), 80).name == "web"
    assert resolver.store.namespace_labels("shop") == {"env": "prod"}
    wait_for(lambda: watcher.age_seconds() == 0)
    # ADDED, MODIFIED (a new IP), DELETED.
    kube_api.create(pod("shop", "solo", "10.244.0.50", "n1"))
    wait_for(lambda: workload_of(resolver, "10.244.0.50") == ("solo", "pod"))
    kube_api.patch(
        "v1",
        "Pod",
        "solo",
        {"status": {"podIP": "10.244.0.51", "podIPs": [{"ip": "10.244.0.51"}]}},
        "shop",
        subresource="status",
    )
    wait_for(lambda: workload_of(resolver, "10.244.0.51") == ("solo", "pod"))
    kube_api.delete("v1", "Pod", "web-6b7c-2", "shop")
    wait_for(lambda: all(p.name != "web-6b7c-2" for p in resolver.store.pods()))
    wait_for(lambda: resolver.endpoint(ip_address("10.244.0.2")).kind == "external")  # after its grace
    assert watcher.relists == 0


def test_api_gone_keeps_metadata_ages_then_resumes_or_relists(watched) -> None:
    kube_api, watcher, resolver = watched
    wait_for(lambda: watcher.age_seconds() == 0)
    kube_api.stop()
    wait_for(lambda: watcher.age_seconds() >= 1.0)  # saying how old the metadata is...
    assert workload_of(resolver, "10.244.0.3") == ("web", "deployment")  # ...and still attributing with it
    # Changes made while the watcher could not see them; the history is then compacted, so resuming
    # from the old resourceVersion answers 410 and the watcher must relist to learn of them.
    kube_api.delete("v1", "Pod", "web-6b7c-3", "shop")
    kube_api.create(pod("shop", "late", "10.244.0.60", "n1"))
    kube_api.compact()
    kube_api.start()
    wait_for(lambda: workload_of(resolver, "10.244.0.60") == ("late", "pod"))
    wait_for(lambda: all(p.name != "web-6b7c-3" for p in resolver.store.pods()))
    assert watcher.relists >= 1
    wait_for(lambda: watcher.age_seconds() == 0)


def test_resume_without_relist_and_410_on_open_watch(watched) -> None:
    kube_api, watcher, resolver = watched
    wait_for(lambda: watcher.age_seconds() == 0)
    kube_api.stop()
    kube_api.start()  # same data, history kept: the watches resume from their resourceVersion
    kube_api.create(pod("shop", "after", "10.244.0.70", "n1"))
    wait_for(lambda: workload_of(resolver, "10.244.0.70") == ("after", "pod"))
    assert watcher.relists == 0
    # Open watches told their version expired (ERROR 410): relist.
    kube_api.compact()
    kube_api.expire_watches()
    wait_for(lambda: watcher.relists >= 1)
    kube_api.create(pod("shop", "later", "10.244.0.71", "n1"))
    wait_for(lambda: workload_of(resolver, "10.244.0.71") == ("later", "pod"))


def test_a_watch_resumes_from_its_last_bookmark(watched) -> None:
    """Writes to kinds the agent does not watch move the resourceVersion on; a bookmark tells the watches,
    so that after the history is compacted and the streams end (as at their timeout) every watch resumes
    from the bookmark's version instead of answering 410 and relisting."""
    kube_api, watcher, resolver = watched
    wait_for(lambda: watcher.age_seconds() == 0)
    for i in range(3):
        kube_api.create(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "shop"}}
        )
    bookmarked = kube_api.compact()
    assert kube_api.send_bookmarks() == len(watcher.resources)
    kube_api.end_watches()
    kube_api.create(pod("shop", "after", "10.244.0.80", "n1"))
    wait_for(lambda: workload_of(resolver, "10.244.0.80") == ("after", "pod"))
    resumed = [p for _, p in kube_api.requests if "watch=" in p and f"resourceVersion={bookmarked}" in p]
    assert len(resumed) >= len(watcher.resources)
    assert watcher.relists == 0


def test_https_with_a_ca_and_a_rotating_service_account_token(kube_api_https, tmp_path, caplog) -> None:
    """In-cluster style: TLS verified against the cluster CA, the token re-read from its file (projected
    tokens rotate) on every request."""
    from flowmon_agent.metadata.watcher import RESOURCES

    kube_api = kube_api_https
    pods = [r for r in RESOURCES if r.kind == "Pod"]
    install_rbac(kube_api)
    first, second = agent_token(kube_api), agent_token(kube_api)
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    kube_api.create(namespace("shop"))
    for name, ip in (("a", "10.244.0.2"), ("b", "10.244.0.3")):
        kube_api.create(pod("shop", name, ip))
    store = MetadataStore()
    watcher = KubeWatcher(
        store,
        kube_api.url,
        token_file=token_file,
        ca_file=kube_api.pki.ca_file,
        resources=pods,
        retry_seconds=(0.05, 0.1),
    ).start()
    try:
        assert watcher.wait_synced(10)
        assert {p.name for p in store.pods()} == {"a", "b"}
        # The token rotates: the old one is refused from now on; the watch ends (as at its timeout) and
        # comes back with the new one.
        kube_api.tokens.revoke(first)
        token_file.write_text(second + "\n")
        kube_api.end_watches()
        kube_api.create(pod("shop", "c", "10.244.0.4"))
        wait_for(lambda: "c" in {p.name for p in store.pods()})
        # A server whose certificate the CA did not sign is refused.
        other = KubeWatcher(MetadataStore(), kube_api.url, token=kube_api.token, resources=pods)
        other.start()
        wait_for(lambda: any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records))
        assert not other.synced
        other.stop()
    finally:
        watcher.stop()


def test_an_expired_continue_token_mid_list_restarts_the_list(kube_api) -> None:
    """A write, then compaction, between two pages of the first list: the next page answers 410 Expired;
    the watcher lists again from the first page (a consistent list), ends up with every pod, then watches."""
    from flowmon_agent.metadata.watcher import RESOURCES

    pods = [r for r in RESOURCES if r.kind == "Pod"]
    install_rbac(kube_api)
    kube_api.create(namespace("shop"))
    for i in range(2, 9):
        kube_api.create(pod("shop", f"p{i}", f"10.244.0.{i}"))
    expired: list[str] = []

    def compact_before_the_first_continue(method: str, path: str) -> None:
        if method == "GET" and "continue=" in path and not expired:
            expired.append(path)
            kube_api.create(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w", "namespace": "shop"}}
            )
            kube_api.compact()  # past the list's resourceVersion

    kube_api.on_request(compact_before_the_first_continue)
    store = MetadataStore()
    watcher = KubeWatcher(
        store,
        kube_api.url,
        token=agent_token(kube_api),
        resources=pods,
        page_size=3,
        retry_seconds=(0.05, 0.1),
    ).start()
    try:
        assert watcher.wait_synced(10)
        assert {p.name for p in store.pods()} == {f"p{i}" for i in range(2, 9)}
        lists = [p for m, p in kube_api.requests if m == "GET" and "/pods?" in p and "watch=" not in p]
        first_pages = [p for p in lists if "continue=" not in p]
        assert len(expired) == 1 and len(first_pages) == 2  # listed again from the start, once
        kube_api.create(pod("shop", "late", "10.244.0.60"))
        wait_for(lambda: "late" in {p.name for p in store.pods()})
    finally:
        watcher.stop()
