"""The Kubernetes API emulator speaks the API the way clients rely on: over real HTTP, from another thread."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from tests.kubeapi import KubeAPI
from tests.kubeapi.patching import json_patch, merge_patch, parse_label_selector

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"}}
PODS = "/api/v1/namespaces/default/pods"


def call(api: KubeAPI, method: str, path: str, body=None, content_type="application/json", token=None):
    """One HTTP request; returns (status, decoded JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api.url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token or api.token}")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def watch(api: KubeAPI, path: str, count: int, timeout_seconds: int = 3) -> list[dict]:
    """Read up to `count` watch events (the stream ends after timeoutSeconds)."""
    sep = "&" if "?" in path else "?"
    request = urllib.request.Request(f"{api.url}{path}{sep}watch=true&timeoutSeconds={timeout_seconds}")
    request.add_header("Authorization", f"Bearer {api.token}")
    events = []
    with urllib.request.urlopen(request, timeout=timeout_seconds + 5) as response:
        for line in response:
            events.append(json.loads(line))
            if len(events) == count:
                break
    return events


def test_rejects_requests_without_the_token(kube_api):
    status, body = call(kube_api, "GET", "/api/v1/namespaces", token="wrong")
    assert (status, body["reason"]) == (401, "Unauthorized")


def test_create_fills_metadata_and_generate_name(kube_api):
    status, pod = call(kube_api, "POST", PODS, {"metadata": {"generateName": "web-"}})
    assert status == 201
    meta = pod["metadata"]
    assert meta["name"].startswith("web-") and len(meta["name"]) == len("web-") + 5
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    assert call(kube_api, "POST", PODS, {"metadata": {"name": meta["name"]}})[0] == 409
    assert call(kube_api, "POST", "/api/v1/namespaces/nowhere/pods", {"metadata": {"name": "x"}})[0] == 404


def test_list_filters_by_label_and_field_selector(kube_api):
    for name, app, node in (("a", "web", "n1"), ("b", "web", "n2"), ("c", "db", "n1")):
        kube_api.create(
            {
                **POD,
                "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
                "spec": {"nodeName": node},
            }
        )

    def names(query: str) -> list[str]:
        status, body = call(kube_api, "GET", f"{PODS}?{query}")
        assert status == 200 and body["kind"] == "PodList"
        return [item["metadata"]["name"] for item in body["items"]]

    assert names("labelSelector=app%3Dweb") == ["a", "b"]
    assert names("labelSelector=app+in+(db,x)") == ["c"]
    assert names("fieldSelector=spec.nodeName%3Dn1") == ["a", "c"]
    assert names("labelSelector=app!%3Ddb&fieldSelector=metadata.name!%3Da") == ["b"]
    first = call(kube_api, "GET", f"{PODS}?limit=2")[1]
    rest = call(kube_api, "GET", f"{PODS}?limit=2&continue={first['metadata']['continue']}")[1]
    assert [i["metadata"]["name"] for i in first["items"] + rest["items"]] == ["a", "b", "c"]
    assert "continue" not in rest["metadata"]


def test_watch_resumes_from_a_resource_version_and_sees_every_change(kube_api):
    created = kube_api.create(POD)
    since = created["metadata"]["resourceVersion"]
    kube_api.patch("v1", "Pod", "web", {"metadata": {"labels": {"v": "2"}}}, "default")
    kube_api.delete("v1", "Pod", "web", "default")
    events = watch(kube_api, f"{PODS}?resourceVersion={since}", count=2)
    assert [(e["type"], e["object"]["metadata"].get("labels")) for e in events] == [
        ("MODIFIED", {"v": "2"}),
        ("DELETED", {"v": "2"}),
    ]
    # Without a version: the current state as ADDED, then live events.
    kube_api.create(POD)
    assert [e["type"] for e in watch(kube_api, PODS, count=1)] == ["ADDED"]


def test_watch_with_a_selector_sees_objects_enter_and_leave(kube_api):
    since = kube_api.create(POD)["metadata"]["resourceVersion"]
    kube_api.patch("v1", "Pod", "web", {"metadata": {"labels": {"app": "web"}}}, "default")
    kube_api.patch("v1", "Pod", "web", {"metadata": {"labels": {"app": None}}}, "default")
    events = watch(kube_api, f"{PODS}?resourceVersion={since}&labelSelector=app%3Dweb", count=2)
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_too_old_resource_version_answers_410_after_compaction(kube_api):
    since = kube_api.create(POD)["metadata"]["resourceVersion"]
    kube_api.patch("v1", "Pod", "web", {"metadata": {"labels": {"v": "2"}}}, "default")
    kube_api.compact()
    (event,) = watch(kube_api, f"{PODS}?resourceVersion={since}", count=5)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    # Resuming from the compaction point itself is fine.
    current = call(kube_api, "GET", PODS)[1]["metadata"]["resourceVersion"]
    kube_api.delete("v1", "Pod", "web", "default")
    assert [e["type"] for e in watch(kube_api, f"{PODS}?resourceVersion={current}", count=1)] == ["DELETED"]


def test_finalizers_block_deletion_until_removed(kube_api):
    kube_api.create({**POD, "metadata": {**POD["metadata"], "finalizers": ["example.io/keep"]}})
    status, pod = call(kube_api, "DELETE", f"{PODS}/web")
    assert status == 200 and pod["metadata"]["deletionTimestamp"]
    assert kube_api.get("v1", "Pod", "web", "default")["metadata"]["deletionTimestamp"]
    status, body = call(
        kube_api,
        "PATCH",
        f"{PODS}/web",
        {"metadata": {"finalizers": ["example.io/new"]}},
        "application/merge-patch+json",
    )
    assert status == 422, body
    call(kube_api, "PATCH", f"{PODS}/web", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert kube_api.find("v1", "Pod", "web", "default") is None


def test_status_subresource_and_generation(kube_api):
    kube_api.register_crd("example.io", "Widget", "widgets")
    path = "/apis/example.io/v1/namespaces/default/widgets"
    status, widget = call(
        kube_api, "POST", path, {"metadata": {"name": "w"}, "spec": {"size": 1}, "status": {"ignored": True}}
    )
    assert status == 201 and "status" not in widget and widget["metadata"]["generation"] == 1
    merge = "application/merge-patch+json"
    _, widget = call(
        kube_api, "PATCH", f"{path}/w/status", {"status": {"ready": True}, "spec": {"size": 9}}, merge
    )
    assert widget["status"] == {"ready": True} and widget["spec"] == {"size": 1}
    assert widget["metadata"]["generation"] == 1
    _, widget = call(kube_api, "PATCH", f"{path}/w", {"spec": {"size": 2}, "status": {"ready": False}}, merge)
    assert widget["spec"] == {"size": 2} and widget["status"] == {"ready": True}
    assert widget["metadata"]["generation"] == 2
    _, widget = call(kube_api, "PATCH", f"{path}/w", {"metadata": {"labels": {"a": "b"}}}, merge)
    assert widget["metadata"]["generation"] == 2
    # A no-op write keeps the resourceVersion (no event, no churn).
    _, again = call(kube_api, "PATCH", f"{path}/w", {"metadata": {"labels": {"a": "b"}}}, merge)
    assert again["metadata"]["resourceVersion"] == widget["metadata"]["resourceVersion"]


def test_replace_with_a_stale_resource_version_conflicts(kube_api):
    pod = kube_api.create(POD)
    kube_api.patch("v1", "Pod", "web", {"metadata": {"labels": {"v": "2"}}}, "default")
    status, body = call(kube_api, "PUT", f"{PODS}/web", pod)
    assert (status, body["reason"]) == (409, "Conflict")


def test_json_patch_test_operation_guards_the_write(kube_api):
    pod = kube_api.create(POD)
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "stale"},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    assert call(kube_api, "PATCH", f"{PODS}/web", ops, "application/json-patch+json")[0] == 422
    ops[0]["value"] = pod["metadata"]["resourceVersion"]
    status, patched = call(kube_api, "PATCH", f"{PODS}/web", ops, "application/json-patch+json")
    assert status == 200 and patched["metadata"]["labels"] == {"a": "b"}


def test_server_side_apply_creates_then_merges(kube_api):
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": "default"},
        "data": {"a": "1"},
    }
    path = "/api/v1/namespaces/default/configmaps/c?fieldManager=test&force=true"
    assert call(kube_api, "PATCH", path, cm, "application/apply-patch+yaml")[0] == 201  # created
    kube_api.patch("v1", "ConfigMap", "c", {"metadata": {"annotations": {"other": "x"}}}, "default")
    cm["data"] = {"a": "2"}
    _, merged = call(kube_api, "PATCH", path, cm, "application/apply-patch+yaml")
    assert merged["data"] == {"a": "2"} and merged["metadata"]["annotations"] == {"other": "x"}


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(kube_api):
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    owner = kube_api.create(
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs", "namespace": "default"}}
    )
    ref = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": owner["metadata"]["uid"]}
    kube_api.create({**POD, "metadata": {"name": "child", "namespace": "default", "ownerReferences": [ref]}})
    kube_api.create(
        {
            **POD,
            "metadata": {
                "name": "kept",
                "namespace": "default",
                "finalizers": ["x/y"],
                "ownerReferences": [ref],
            },
        }
    )
    # A namespaced owner is looked up in the dependent's namespace: a cross-namespace reference dangles.
    kube_api.create({**POD, "metadata": {"name": "cross", "namespace": "other", "ownerReferences": [ref]}})
    assert kube_api.find("v1", "Pod", "cross", "other") is None
    assert kube_api.find("v1", "Pod", "child", "default") is not None
    kube_api.delete("apps/v1", "ReplicaSet", "rs", "default")
    assert kube_api.find("v1", "Pod", "child", "default") is None
    assert kube_api.get("v1", "Pod", "kept", "default")["metadata"]["deletionTimestamp"]


def test_orphan_propagation_keeps_dependents(kube_api):
    owner = kube_api.create(
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs", "namespace": "default"}}
    )
    ref = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": owner["metadata"]["uid"]}
    kube_api.create({**POD, "metadata": {"name": "child", "namespace": "default", "ownerReferences": [ref]}})
    call(kube_api, "DELETE", "/apis/apps/v1/namespaces/default/replicasets/rs?propagationPolicy=Orphan")
    assert kube_api.get("v1", "Pod", "child", "default")["metadata"]["ownerReferences"] == []


def test_crd_appears_in_discovery_and_goes_with_its_objects(kube_api):
    assert call(kube_api, "GET", "/apis/example.io/v1")[0] == 404
    kube_api.register_crd("example.io", "Gadget", "gadgets", namespaced=False, short_names=("gd",))
    groups = {g["name"]: g for g in call(kube_api, "GET", "/apis")[1]["groups"]}
    assert groups["example.io"]["preferredVersion"]["version"] == "v1"
    resources = {r["name"]: r for r in call(kube_api, "GET", "/apis/example.io/v1")[1]["resources"]}
    assert resources["gadgets"]["namespaced"] is False and resources["gadgets"]["shortNames"] == ["gd"]
    assert "gadgets/status" in resources
    crd = kube_api.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "gadgets.example.io")
    assert {c["type"] for c in crd["status"]["conditions"]} == {"Established", "NamesAccepted"}
    assert call(kube_api, "POST", "/apis/example.io/v1/gadgets", {"metadata": {"name": "g"}})[0] == 201
    assert len(call(kube_api, "GET", "/apis/example.io/v1/gadgets")[1]["items"]) == 1
    kube_api.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", "gadgets.example.io")
    assert call(kube_api, "GET", "/apis/example.io/v1/gadgets")[0] == 404


def test_deleting_a_namespace_deletes_its_objects(kube_api):
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    kube_api.create({**POD, "metadata": {"name": "p", "namespace": "team"}})
    kube_api.delete("v1", "Namespace", "team")
    assert kube_api.list("v1", "Pod", "team") == []


def test_stop_cuts_watches_and_start_serves_the_same_data_on_the_same_port(kube_api):
    kube_api.create(POD)
    port = kube_api.port
    kube_api.stop()
    with pytest.raises(urllib.error.URLError):
        call(kube_api, "GET", PODS)
    kube_api.start()
    assert kube_api.port == port
    assert [i["metadata"]["name"] for i in call(kube_api, "GET", PODS)[1]["items"]] == ["web"]


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1, "b": {"c": 2}}, {"b": {"c": None, "d": 3}}, {"a": 1, "b": {"d": 3}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ],
)
def test_merge_patch(target, patch, expected):
    assert merge_patch(target, patch) == expected


def test_json_patch_operations():
    doc = {"a": [1, 2], "b": {"c": 1}}
    ops = [
        {"op": "add", "path": "/a/1", "value": 9},
        {"op": "remove", "path": "/b/c"},
        {"op": "replace", "path": "/a/0", "value": 0},
        {"op": "copy", "from": "/a", "path": "/d"},
        {"op": "move", "from": "/d", "path": "/b/e"},
    ]
    assert json_patch(doc, ops) == {"a": [0, 9, 2], "b": {"e": [0, 9, 2]}}
    assert doc == {"a": [1, 2], "b": {"c": 1}}


def test_label_selector_parsing():
    selector = parse_label_selector("a=b,c!=d,e in (x, y),f notin (z),g,!h")
    ops = [(e.key, e.operator, e.values) for e in selector.match_expressions]
    assert ops == [
        ("a", "In", ["b"]),
        ("c", "NotIn", ["d"]),
        ("e", "In", ["x", "y"]),
        ("f", "NotIn", ["z"]),
        ("g", "Exists", []),
        ("h", "DoesNotExist", []),
    ]


def test_send_initial_events_ends_the_initial_state_with_a_bookmark(kube_api):
    kube_api.create(POD)
    events = watch(kube_api, f"{PODS}?sendInitialEvents=true&allowWatchBookmarks=true", count=2)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    bookmark = events[1]["object"]["metadata"]
    assert bookmark["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(bookmark["resourceVersion"]) >= int(events[0]["object"]["metadata"]["resourceVersion"])


def test_bookmarks_go_to_watches_that_allow_them_and_streams_end_normally(kube_api):
    """Bookmarks carry the current resourceVersion, also when the watched kind did not change; a stream
    ended as by its timeout closes without an ERROR event."""
    results: dict[str, list[dict]] = {}

    def read(name: str, query: str) -> None:
        results[name] = watch(kube_api, f"{PODS}?resourceVersion={kube_api.store.rv}{query}", 10, 30)

    threads = [
        threading.Thread(target=read, args=("bookmarks", "&allowWatchBookmarks=True")),
        threading.Thread(target=read, args=("plain", "")),
    ]
    for thread in threads:
        thread.start()
    kube_api.wait_for(lambda: len(kube_api.store.watchers) == 2)
    kube_api.create({**POD, "kind": "ConfigMap", "metadata": {**POD["metadata"], "name": "c"}})
    assert kube_api.send_bookmarks() == 1
    assert kube_api.end_watches() == 2
    for thread in threads:
        thread.join(10)
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in results["bookmarks"]] == [
        ("BOOKMARK", str(kube_api.store.rv))
    ]
    assert results["plain"] == []


def test_the_official_kubernetes_client_works_against_it(kube_api, tmp_path):
    """The `kubernetes` package (strict pydantic models) lists, watches, patches and reads custom objects."""
    import kubernetes

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kube_api.kubeconfig(tmp_path / "kubeconfig")), client_configuration=config
    )
    with kubernetes.client.ApiClient(config) as client:
        core = kubernetes.client.CoreV1Api(client)
        assert kubernetes.client.VersionApi(client).get_code().git_version.startswith("v1.30")
        core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": "p", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        )
        listed = core.list_namespaced_pod("default", label_selector="app=web")
        assert [p.metadata.name for p in listed.items] == ["p"]
        core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"v": "2"}}})
        stream = kubernetes.watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=2,
        )
        event = next(iter(stream))
        assert (event["type"], event["object"].metadata.labels) == ("MODIFIED", {"app": "web", "v": "2"})
        kube_api.register_crd("example.io", "Widget", "widgets")
        custom = kubernetes.client.CustomObjectsApi(client)
        custom.create_namespaced_custom_object(
            "example.io",
            "v1",
            "default",
            "widgets",
            {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"a": 1}},
        )
        assert custom.get_namespaced_custom_object("example.io", "v1", "default", "widgets", "w")["spec"] == {
            "a": 1
        }
        core.delete_namespaced_pod("p", "default")
        assert core.list_namespaced_pod("default").items == []


TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


def review_body(token: str, audiences=()) -> dict:
    spec = {"token": token, **({"audiences": list(audiences)} if audiences else {})}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}


def test_token_reviews_answer_for_registered_service_account_tokens(kube_api):
    token = kube_api.service_account_token("shop", "prometheus", audiences=["flowmon"])
    status, answer = call(kube_api, "POST", TOKENREVIEWS, review_body(token))
    assert status == 201 and answer["kind"] == "TokenReview"
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == "system:serviceaccount:shop:prometheus"
    assert "system:serviceaccounts:shop" in answer["status"]["user"]["groups"]
    assert answer["status"]["audiences"] == ["flowmon"]
    assert (
        call(kube_api, "POST", TOKENREVIEWS, review_body(token, ["other"]))[1]["status"].get("authenticated")
        is None
    )
    unknown = call(kube_api, "POST", TOKENREVIEWS, review_body("forged"))[1]["status"]
    assert not unknown.get("authenticated") and unknown["error"]
    # A registered token authenticates to the API (403 without RBAC, not 401); a revoked one does not.
    assert call(kube_api, "GET", "/api/v1/namespaces", token=token)[0] == 403
    kube_api.tokens.revoke(token)
    assert call(kube_api, "GET", "/api/v1/namespaces", token=token)[0] == 401
    assert call(kube_api, "POST", TOKENREVIEWS, review_body(token))[1]["status"].get("authenticated") is None


def test_token_reviews_are_create_only_validated_and_discoverable(kube_api):
    assert call(kube_api, "GET", TOKENREVIEWS)[0] == 405
    assert call(kube_api, "POST", TOKENREVIEWS, {"kind": "Pod"})[0] == 400
    assert call(kube_api, "POST", TOKENREVIEWS, review_body(""))[0] == 422
    groups = {g["name"] for g in call(kube_api, "GET", "/apis")[1]["groups"]}
    assert "authentication.k8s.io" in groups
    resources = call(kube_api, "GET", "/apis/authentication.k8s.io/v1")[1]["resources"]
    assert [(r["name"], r["verbs"]) for r in resources] == [("tokenreviews", ["create"])]


RBAC = "rbac.authorization.k8s.io/v1"


def role(kind: str, name: str, rules: list[dict], namespace: str | None = None, labels=None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {}), "labels": labels or {}}
    return {"apiVersion": RBAC, "kind": kind, "metadata": meta, "rules": rules}


def binding(
    kind: str, name: str, role_kind: str, role_name: str, sa: tuple[str, str], namespace=None
) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {
        "apiVersion": RBAC,
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "namespace": sa[0], "name": sa[1]}],
    }


def test_rbac_grants_exactly_the_bound_verbs_resources_names_and_namespaces(kube_api):
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    token = kube_api.service_account_token("shop", "robot")
    secrets = "/api/v1/namespaces/shop/secrets"
    status, body = call(kube_api, "GET", secrets, token=token)
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'secrets is forbidden: User "system:serviceaccount:shop:robot" cannot list resource "secrets" '
        'in API group "" in the namespace "shop"'
    )
    kube_api.create(
        role(
            "Role",
            "one-secret",
            [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "verbs": ["get", "patch"],
                    "resourceNames": ["mine"],
                }
            ],
            "shop",
        )
    )
    kube_api.create(binding("RoleBinding", "robot", "Role", "one-secret", ("shop", "robot"), "shop"))
    kube_api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": "shop"}})
    assert call(kube_api, "GET", f"{secrets}/mine", token=token)[0] == 200
    status, body = call(kube_api, "GET", f"{secrets}/other", token=token)
    assert status == 403 and body["message"].startswith('secrets "other" is forbidden: User')
    assert call(kube_api, "GET", secrets, token=token)[0] == 403  # resourceNames never grant list
    assert call(kube_api, "POST", secrets, {"metadata": {"name": "new"}}, token=token)[0] == 403
    assert call(kube_api, "GET", "/api/v1/namespaces/default/secrets/mine", token=token)[0] == 403
    status, body = call(kube_api, "GET", "/api/v1/nodes", token=token)
    assert status == 403 and body["message"].endswith('in API group "" at the cluster scope')
    # Discovery is open to every authenticated user; the admin token is system:masters.
    assert call(kube_api, "GET", "/api/v1", token=token)[0] == 200
    assert call(kube_api, "GET", "/api/v1/nodes")[0] == 200


def test_rbac_subresources_and_aggregated_cluster_roles(kube_api):
    kube_api.register_crd("flowmon.io", "FlowMonitor", "flowmonitors")
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    path = "/apis/flowmon.io/v1/namespaces/shop/flowmonitors"
    kube_api.create(
        {
            "apiVersion": "flowmon.io/v1",
            "kind": "FlowMonitor",
            "metadata": {"name": "web", "namespace": "shop"},
        }
    )
    token = kube_api.service_account_token("shop", "admin")
    # The namespace admin: the built-in `admin` ClusterRole, bound in one namespace, aggregates what the
    # labelled ClusterRoles grant (here: FlowMonitors, not their status).
    kube_api.create(binding("RoleBinding", "admins", "ClusterRole", "admin", ("shop", "admin"), "shop"))
    assert call(kube_api, "GET", path, token=token)[0] == 403
    kube_api.create(
        role(
            "ClusterRole",
            "fm-edit",
            [{"apiGroups": ["flowmon.io"], "resources": ["flowmonitors"], "verbs": ["get", "list", "patch"]}],
            labels={"rbac.authorization.k8s.io/aggregate-to-admin": "true"},
        )
    )
    assert kube_api.get(RBAC, "ClusterRole", "admin")["rules"][0]["resources"] == ["flowmonitors"]
    assert call(kube_api, "GET", path, token=token)[0] == 200
    status, body = call(
        kube_api,
        "PATCH",
        f"{path}/web/status",
        {"status": {"ok": True}},
        "application/merge-patch+json",
        token=token,
    )
    assert (
        status == 403
        and 'cannot patch resource "flowmonitors/status" in API group "flowmon.io"' in (body["message"])
    )
    assert body["message"].startswith('flowmonitors.flowmon.io "web" is forbidden')
    assert call(kube_api, "GET", "/apis/flowmon.io/v1/namespaces/default/flowmonitors", token=token)[0] == 403
    # Another labelled role joins the aggregate at once; removing it takes its rules away again.
    kube_api.create(
        role(
            "ClusterRole",
            "fm-status",
            [{"apiGroups": ["flowmon.io"], "resources": ["flowmonitors/status"], "verbs": ["patch"]}],
            labels={"rbac.authorization.k8s.io/aggregate-to-admin": "true"},
        )
    )
    assert (
        call(
            kube_api,
            "PATCH",
            f"{path}/web/status",
            {"status": {"ok": True}},
            "application/merge-patch+json",
            token=token,
        )[0]
        == 200
    )
    kube_api.delete(RBAC, "ClusterRole", "fm-status")
    assert (
        call(
            kube_api,
            "PATCH",
            f"{path}/web/status",
            {"status": {"ok": False}},
            "application/merge-patch+json",
            token=token,
        )[0]
        == 403
    )


def test_the_shipped_rbac_lets_the_agent_read_metadata_and_nothing_else(kube_api):
    from tests.kubeapi.shipped import agent_token, install_rbac

    install_rbac(kube_api)
    token = agent_token(kube_api)
    for path in (
        "/api/v1/pods?watch=false",
        "/api/v1/nodes",
        "/apis/apps/v1/replicasets",
        "/api/v1/services",
    ):
        assert call(kube_api, "GET", path, token=token)[0] == 200, path
    assert call(kube_api, "GET", "/api/v1/secrets", token=token)[0] == 403
    assert call(kube_api, "DELETE", "/api/v1/namespaces/default/pods/x", token=token)[0] == 403


APPLY = "application/apply-patch+yaml"


def apply_as(api: KubeAPI, manager: str, obj: dict, path: str, force: bool = False):
    query = f"?fieldManager={manager}" + ("&force=true" if force else "")
    return call(api, "PATCH", path + query, obj, APPLY)


def test_server_side_apply_owns_fields_per_manager_and_prunes_what_a_manager_stops_sending(kube_api):
    path = "/api/v1/namespaces/default/configmaps/c"
    first = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "labels": {"app": "x"}},
        "data": {"a": "1", "b": "1"},
    }
    status, created = apply_as(kube_api, "operator", first, path)
    assert status == 201
    (entry,) = created["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == ("operator", "Apply", "FieldsV1")
    assert entry["fieldsV1"] == {"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}
    # Someone else adds a field with an ordinary patch: it is theirs, and survives the operator's applies.
    status, patched = call(
        kube_api,
        "PATCH",
        path + "?fieldManager=kubectl-edit",
        {"data": {"c": "3"}},
        "application/merge-patch+json",
    )
    assert status == 200
    edit = [e for e in patched["metadata"]["managedFields"] if e["manager"] == "kubectl-edit"]
    assert edit[0]["operation"] == "Update" and edit[0]["fieldsV1"] == {"f:data": {"f:c": {}}}
    rv = patched["metadata"]["resourceVersion"]
    # The same configuration again: nothing changes, not even the resourceVersion.
    assert apply_as(kube_api, "operator", first, path)[1]["metadata"]["resourceVersion"] == rv
    # The operator stops sending `b` and the label: they disappear; `c` (another manager's) stays.
    second = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "2"}}
    status, after = apply_as(kube_api, "operator", second, path)
    assert status == 200
    assert after["data"] == {"a": "2", "c": "3"} and "labels" not in after["metadata"]
    assert call(kube_api, "PATCH", path, second, APPLY)[0] == 400  # an apply names its field manager


def test_server_side_apply_conflicts_between_managers_unless_forced(kube_api):
    path = "/api/v1/namespaces/default/configmaps/c"
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "b": "1"}}
    apply_as(kube_api, "one", cm, path)
    # The same values: shared ownership, no conflict.
    assert apply_as(kube_api, "two", {**cm, "data": {"a": "1"}}, path)[0] == 200
    status, body = apply_as(kube_api, "two", {**cm, "data": {"a": "9", "b": "9"}}, path)
    assert (status, body["reason"]) == (409, "Conflict")
    assert body["message"].startswith(
        'Apply failed with 2 conflicts:\nconflicts with "one" using v1:\n- .data.a'
    )
    assert [c["field"] for c in body["details"]["causes"]] == [".data.a", ".data.b"]
    status, body = apply_as(kube_api, "two", {**cm, "data": {"b": "9"}}, path)
    assert body["message"] == 'Apply failed with 1 conflict: conflict with "one" using v1: .data.b'
    status, forced = apply_as(kube_api, "two", {**cm, "data": {"a": "1", "b": "9"}}, path, force=True)
    assert status == 200 and forced["data"] == {"a": "1", "b": "9"}
    owners = {e["manager"]: e["fieldsV1"] for e in forced["metadata"]["managedFields"]}
    assert owners == {"one": {"f:data": {"f:a": {}}}, "two": {"f:data": {"f:a": {}, "f:b": {}}}}
    # `a` is shared: when one manager lets go, the other keeps it (and its value).
    assert apply_as(kube_api, "one", {**cm, "data": {}}, path)[1]["data"] == {"a": "1", "b": "9"}


def test_server_side_apply_merges_associative_lists_by_key(kube_api):
    path = "/apis/apps/v1/namespaces/default/daemonsets/agent"

    def daemonset(*containers: dict) -> dict:
        return {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {"template": {"spec": {"containers": list(containers)}}},
        }

    assert apply_as(kube_api, "operator", daemonset({"name": "agent", "image": "a:1"}), path)[0] in (200, 201)
    sidecar = {"name": "sidecar", "image": "s:1"}
    assert apply_as(kube_api, "mesh", daemonset(sidecar), path)[0] == 200
    status, body = apply_as(kube_api, "operator", daemonset({"name": "agent", "image": "a:2"}), path)
    containers = body["spec"]["template"]["spec"]["containers"]
    assert status == 200 and containers == [{"name": "agent", "image": "a:2"}, sidecar]
    assert apply_as(kube_api, "mesh", daemonset(), path)[1]["spec"]["template"]["spec"]["containers"] == [
        {"name": "agent", "image": "a:2"}
    ]
    status, body = apply_as(kube_api, "mesh", daemonset({"name": "agent", "image": "evil"}), path)
    assert status == 409 and '.spec.template.spec.containers[{"name":"agent"}].image' in body["message"]


def test_a_deleted_namespace_terminates_refuses_new_content_and_goes_when_its_finalizers_are_done(kube_api):
    kube_api.register_crd("example.io", "Gadget", "gadgets")
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    assert kube_api.get("v1", "Namespace", "team")["spec"]["finalizers"] == ["kubernetes"]
    kube_api.create({**POD, "metadata": {"name": "plain", "namespace": "team"}})
    gadget = {
        "apiVersion": "example.io/v1",
        "kind": "Gadget",
        "metadata": {"name": "g", "namespace": "team", "finalizers": ["example.io/cleanup"]},
    }
    kube_api.create(gadget)
    status, namespace = call(kube_api, "DELETE", "/api/v1/namespaces/team")
    assert status == 200 and namespace["status"]["phase"] == "Terminating"
    assert kube_api.find("v1", "Pod", "plain", "team") is None  # content without finalizers: gone at once
    assert kube_api.get("example.io/v1", "Gadget", "g", "team")["metadata"]["deletionTimestamp"]
    conditions = {c["type"]: c for c in kube_api.get("v1", "Namespace", "team")["status"]["conditions"]}
    assert conditions["NamespaceContentRemaining"]["message"] == (
        "Some resources are remaining: gadgets.example.io has 1 resource instances"
    )
    assert conditions["NamespaceFinalizersRemaining"]["message"] == (
        "Some content in the namespace has finalizers remaining: example.io/cleanup in 1 resource instances"
    )
    # No new content while it terminates, from anyone, whichever way it is written.
    status, body = call(kube_api, "POST", "/api/v1/namespaces/team/configmaps", {"metadata": {"name": "c"}})
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'configmaps "c" is forbidden: '
        "unable to create new content in namespace team because it is being terminated"
    )
    assert body["details"]["causes"][0]["reason"] == "NamespaceTerminating"
    apply_path = "/apis/apps/v1/namespaces/team/daemonsets/d?fieldManager=x"
    status, body = call(kube_api, "PATCH", apply_path, {"apiVersion": "apps/v1", "kind": "DaemonSet"}, APPLY)
    assert status == 403 and body["message"].startswith('daemonsets.apps "d" is forbidden: unable to create')
    # Updates are still allowed: removing the last finalizer lets the namespace go.
    kube_api.patch("example.io/v1", "Gadget", "g", {"metadata": {"finalizers": None}}, "team")
    assert kube_api.find("v1", "Namespace", "team") is None
    assert call(kube_api, "POST", "/api/v1/namespaces/team/configmaps", {"metadata": {"name": "c"}})[0] == 404
    # With the namespace controller paused (it is asynchronous on a real server), the content stays a while.
    kube_api.pause_namespace_controller()
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}})
    kube_api.create({**POD, "metadata": {"name": "p", "namespace": "late"}})
    kube_api.delete("v1", "Namespace", "late")
    assert kube_api.get("v1", "Namespace", "late")["status"]["phase"] == "Terminating"
    assert call(kube_api, "DELETE", "/api/v1/namespaces/late/pods/p")[0] == 200
    kube_api.create({**POD, "metadata": {"name": "q", "namespace": "default"}})  # other writes: no effect
    assert kube_api.find("v1", "Namespace", "late") is not None
    kube_api.finalize_namespaces()
    assert kube_api.find("v1", "Namespace", "late") is None


def test_a_deleted_crd_waits_for_its_objects_finalizers(kube_api):
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.example.io"
    kube_api.register_crd("example.io", "Gadget", "gadgets")
    kube_api.create(
        {
            "apiVersion": "example.io/v1",
            "kind": "Gadget",
            "metadata": {"name": "g", "namespace": "default", "finalizers": ["example.io/x"]},
        }
    )
    assert call(kube_api, "DELETE", crd_path)[1]["metadata"]["deletionTimestamp"]
    assert kube_api.get("example.io/v1", "Gadget", "g", "default")["metadata"]["deletionTimestamp"]
    status, body = call(
        kube_api, "POST", "/apis/example.io/v1/namespaces/default/gadgets", {"metadata": {"name": "new"}}
    )
    assert (
        status == 405
        and body["message"] == "create not allowed while custom resource definition is terminating"
    )
    kube_api.patch("example.io/v1", "Gadget", "g", {"metadata": {"finalizers": None}}, "default")
    assert call(kube_api, "GET", crd_path)[0] == 404
    assert call(kube_api, "GET", "/apis/example.io/v1/gadgets")[0] == 404


def test_foreground_deletion_keeps_the_owner_until_blocking_dependents_are_gone(kube_api):
    owner = kube_api.create(
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs", "namespace": "default"}}
    )
    ref = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "name": "rs",
        "uid": owner["metadata"]["uid"],
        "blockOwnerDeletion": True,
    }
    kube_api.create(
        {
            **POD,
            "metadata": {
                "name": "held",
                "namespace": "default",
                "ownerReferences": [ref],
                "finalizers": ["example.io/x"],
            },
        }
    )
    kube_api.create(
        {
            **POD,
            "metadata": {
                "name": "free",
                "namespace": "default",
                "ownerReferences": [{**ref, "blockOwnerDeletion": False}],
            },
        }
    )
    status, body = call(
        kube_api,
        "DELETE",
        "/apis/apps/v1/namespaces/default/replicasets/rs",
        {"propagationPolicy": "Foreground"},
    )
    assert status == 200 and body["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert kube_api.find("v1", "Pod", "free", "default") is None
    assert kube_api.get("v1", "Pod", "held", "default")["metadata"]["deletionTimestamp"]
    assert kube_api.get("apps/v1", "ReplicaSet", "rs", "default")["metadata"]["deletionTimestamp"]
    kube_api.patch("v1", "Pod", "held", {"metadata": {"finalizers": None}}, "default")
    assert kube_api.find("apps/v1", "ReplicaSet", "rs", "default") is None


def test_block_owner_deletion_needs_the_owners_finalizers_when_the_plugin_is_on(kube_api):
    kube_api.register_crd("example.io", "Gadget", "gadgets")
    owner = kube_api.create(
        {"apiVersion": "example.io/v1", "kind": "Gadget", "metadata": {"name": "g", "namespace": "default"}}
    )
    ref = {
        "apiVersion": "example.io/v1",
        "kind": "Gadget",
        "name": "g",
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    token = kube_api.service_account_token("default", "robot")
    kube_api.create(
        role(
            "Role",
            "cm",
            [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch", "get"]}],
            "default",
        )
    )
    kube_api.create(binding("RoleBinding", "cm", "Role", "cm", ("default", "robot"), "default"))
    configmaps = "/api/v1/namespaces/default/configmaps"

    def child(name: str, refs: list[dict]) -> dict:
        return {"metadata": {"name": name, "ownerReferences": refs}}

    # Off (the default, as on most clusters): anyone who may create the child may block its owner.
    assert call(kube_api, "POST", configmaps, child("a", [ref]), token=token)[0] == 201
    kube_api.admission_plugins.add("OwnerReferencesPermissionEnforcement")
    status, body = call(kube_api, "POST", configmaps, child("b", [ref]), token=token)
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'configmaps "b" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a '
        "resource you can't set finalizers on: , <nil>"
    )
    # Without blockOwnerDeletion a create may name the owner; changing references later needs `delete`.
    assert (
        call(kube_api, "POST", configmaps, child("c", [{**ref, "blockOwnerDeletion": False}]), token=token)[0]
        == 201
    )
    status, body = call(
        kube_api,
        "PATCH",
        f"{configmaps}/c",
        {"metadata": {"ownerReferences": []}},
        "application/merge-patch+json",
        token=token,
    )
    assert (
        status == 403 and "cannot set an ownerRef on a resource you can't delete: , <nil>" in body["message"]
    )
    # An apply is judged the same way; `update` on gadgets/finalizers is what it takes.
    apply_body = {"apiVersion": "v1", "kind": "ConfigMap", **child("d", [ref])}
    assert (
        call(kube_api, "PATCH", f"{configmaps}/d?fieldManager=robot", apply_body, APPLY, token=token)[0]
        == 403
    )
    kube_api.create(
        role(
            "Role",
            "fin",
            [
                {
                    "apiGroups": ["example.io"],
                    "resources": ["gadgets/finalizers"],
                    "verbs": ["update"],
                    "resourceNames": ["g"],
                }
            ],
            "default",
        )
    )
    kube_api.create(binding("RoleBinding", "fin", "Role", "fin", ("default", "robot"), "default"))
    assert (
        call(kube_api, "PATCH", f"{configmaps}/d?fieldManager=robot", apply_body, APPLY, token=token)[0]
        == 201
    )
    # The harness's own token is system:masters: never refused.
    assert call(kube_api, "POST", configmaps, child("e", [ref]))[0] == 201


def test_continue_tokens_expire_with_age_or_compaction_and_answer_410_with_a_fresh_token(kube_api):
    now = [1000.0]
    kube_api.clock, kube_api.continue_ttl = (lambda: now[0]), 60.0
    for name in ("a", "b", "c", "d"):
        kube_api.create({**POD, "metadata": {"name": name, "namespace": "default"}})
    first = call(kube_api, "GET", f"{PODS}?limit=1")[1]
    assert first["metadata"]["remainingItemCount"] == 3
    now[0] += 30  # young enough: the next page, and its token keeps the list's age
    second = call(kube_api, "GET", f"{PODS}?limit=1&continue={first['metadata']['continue']}")[1]
    assert [i["metadata"]["name"] for i in second["items"]] == ["b"]
    now[0] += 31
    status, body = call(kube_api, "GET", f"{PODS}?limit=1&continue={second['metadata']['continue']}")
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)
    assert body["message"].startswith(
        "The provided continue parameter is too old to display a consistent list"
    )
    # The token in the answer finishes the list from the latest state.
    rest = call(kube_api, "GET", f"{PODS}?continue={body['metadata']['continue']}")[1]
    assert [i["metadata"]["name"] for i in rest["items"]] == ["c", "d"]
    # Compaction past the list's resourceVersion expires a token at any age.
    fresh = call(kube_api, "GET", f"{PODS}?limit=2")[1]["metadata"]["continue"]
    kube_api.patch("v1", "Pod", "a", {"metadata": {"labels": {"v": "2"}}}, "default")
    kube_api.compact()
    assert call(kube_api, "GET", f"{PODS}?limit=2&continue={fresh}")[0] == 410
    assert call(kube_api, "GET", f"{PODS}?limit=2&continue=garbage")[0] == 400


def test_kubectl_server_side_apply_of_the_shipped_manifests_is_idempotent(kube_api_https, tmp_path):
    """The real client: `kubectl apply --server-side -k manifests/` (HTTPS: kubectl sends no token over
    plain HTTP; --validate=false: the emulator serves no OpenAPI documents), twice."""
    import subprocess

    kubeconfig = kube_api_https.kubeconfig(tmp_path / "kubeconfig")

    def kubectl(*args: str) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    kubectl("apply", "--server-side", "--validate=false", "-k", "manifests/")
    version = kube_api_https.store.rv
    kubectl("apply", "--server-side", "--validate=false", "-k", "manifests/")
    assert kube_api_https.store.rv == version  # nothing changed, nothing written
    operator = kube_api_https.get("apps/v1", "Deployment", "flowmon-operator", "flowmon-system")
    assert [(e["manager"], e["operation"]) for e in operator["metadata"]["managedFields"]] == [
        ("kubectl", "Apply")
    ]
