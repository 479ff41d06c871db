"""A small Kubernetes API server emulator for tests (kopf operators, watchers, the kubernetes client).

Usage (the `kube_api` fixture is available in every test module):

    def test_something(kube_api, tmp_path, monkeypatch):
        monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
        pod = kube_api.create({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": "web", "namespace": "team-a", "labels": {"app": "web"}},
                               "status": {"podIP": "10.0.0.5", "phase": "Running"}})
        kube_api.patch("v1", "Pod", "web", {"status": {"podIP": "10.0.0.6"}}, "team-a", subresource="status")
        kube_api.wait_for(lambda: kube_api.find("v1", "Pod", "web", "team-a") is None)

Any HTTP client pointed at `kube_api.url` with `Authorization: Bearer <kube_api.token>` (the kubeconfig
has both) talks the Kubernetes API:

- discovery: /version, /api, /api/v1, /apis, /apis/G, /apis/G/V; built-in core, apps, batch,
  discovery.k8s.io, coordination.k8s.io, events, rbac and apiextensions.k8s.io resources. Creating a
  CustomResourceDefinition (HTTP or `kube_api.register_crd(group, kind, plural)`) makes its resource
  appear in discovery and become usable, with a status subresource when the CRD declares one.
- list (resourceVersion, labelSelector, fieldSelector on any dotted path, limit/continue), get, create
  (generateName, uid, creationTimestamp, generation, resourceVersion; the namespace must exist),
  replace (409 on a stale resourceVersion), delete, deletecollection.
- watch (`?watch=true&resourceVersion=N`): JSON lines ADDED/MODIFIED/DELETED from the history after N,
  or the current state as ADDED without a version; selectors turn modifications into ADDED/DELETED as
  objects enter or leave the selection; sendInitialEvents ends the initial state with a BOOKMARK;
  timeoutSeconds. A version older than the history (after `kube_api.compact()`) answers an ERROR event
  with code 410; `kube_api.expire_watches()` also ends open streams that way. With allowWatchBookmarks,
  `kube_api.send_bookmarks()` sends a BOOKMARK at the current resourceVersion (a real server does so
  about once a minute); `kube_api.end_watches()` ends open streams normally, as their timeout would.
- patch: merge, strategic-merge (served as merge: lists are replaced), JSON patch (a failed `test`
  answers 422), and server-side apply (apply.py): metadata.managedFields per field manager (`fieldManager`,
  else the User-Agent's product), a field a manager stops applying is removed unless another owns it,
  another manager's field with a different value is a 409 conflict (real wording, causes) unless `force`;
  an apply that creates answers 201. Lists of built-in kinds merge by key (containers, env, ports, ...);
  custom resources' lists are atomic (CRD list markers are not read).
- status subresource: writes to the main endpoint keep status, writes to /status change only status;
  generation increases only when something outside metadata and status changes. Custom resources lose
  status on create; built-in objects keep it (there is no kubelet or controller here to fill it in).
- deletion (lifecycle.py, the controllers run at once after every write): finalizers keep an object with
  a deletionTimestamp until they are removed (no new finalizers may be added then); Background deletes
  dependents whose owners are all gone (a namespaced owner is looked up in the dependent's namespace),
  Foreground keeps the owner (finalizer `foregroundDeletion`) until its blockOwnerDeletion dependents are
  gone, Orphan removes the owner reference. A deleted namespace is Terminating (spec.finalizers
  `kubernetes`): its content is deleted, conditions name what remains and which finalizers hold it, new
  content is refused with the real 403 (also for the admin), and it goes once empty
  (`kube_api.pause_namespace_controller()` keeps it Terminating with its content until
  `kube_api.finalize_namespaces()`, as the real asynchronous controller does for a while). A deleted CRD waits
  for its objects (finalizer `customresourcecleanup.apiextensions.k8s.io`; creates answer 405 meanwhile).
- `kube_api.stop()` / `kube_api.start()`: the API goes away (open watches are cut, connections refused)
  and comes back on the same port with the same data.
- authentication.k8s.io/v1 `tokenreviews` (create only, in discovery): tokens registered with
  `kube_api.service_account_token(namespace, name)` (or `kube_api.tokens.register(token, username)`) are
  reviewed as authenticated `system:serviceaccount:<ns>:<name>` when the requested audiences match;
  anything else as not authenticated. Registered tokens also authenticate requests to the emulator.
- RBAC (rbac.py), always on: the harness's `kube_api.token` is system:masters; any other token gets only
  what stored Roles/ClusterRoles grant through bindings (verbs, resources and `x/subresource`,
  resourceNames, wildcards; aggregated ClusterRoles such as the built-in admin/edit/view, filled by the
  aggregation controller). Denials answer 403 with kube-apiserver's wording. `tests.kubeapi.shipped`
  installs the RBAC `kubectl kustomize manifests/...` renders and hands out the operator's and agent's
  ServiceAccount tokens (`operator_kubeconfig` for operator tests).
- admission: `KubeAPI(admission_plugins={"OwnerReferencesPermissionEnforcement"})` (or add to
  `kube_api.admission_plugins`): changing ownerReferences needs `delete` on the object, setting
  blockOwnerDeletion needs `update` on the owner's `finalizers` (403, real wording).
- list paging (paging.py): continue tokens expire after `continue_ttl` seconds on `kube_api.clock`, or when
  `compact()` passed their resourceVersion: 410 Expired with the real message and a fresh token.
  `kube_api.on_request(hook)` runs hook(method, path_qs) before each request (to compact between pages).
- `kube_api.deny(method, path_prefix, message)`: refuse such requests with 403, as an admission webhook
  (a policy engine) would.
- For assertions: `kube_api.find(...)` (None when absent), `kube_api.list(...)`, `kube_api.requests`
  (every (method, path?query) served), `kube_api.store.rv` (the current resourceVersion: unchanged means
  nothing was written), `kube_api.wait_for(predicate, timeout)`.

Not emulated: schema validation and defaulting from a CRD's openAPIV3Schema, other admission plugins,
RBAC escalation checks, workload controllers (no pods appear for a Deployment or DaemonSet: tests create
them), consistent snapshots for later list pages. TLS is optional:
`KubeAPI(tls_dir=...)` (fixture `kube_api_https`) serves HTTPS with a throwaway CA (`kube_api.pki`).
"""

from .resources import ResourceType, crd_body
from .server import KubeAPI
from .store import ApiError, Store

__all__ = ["ApiError", "KubeAPI", "ResourceType", "Store", "crd_body"]
