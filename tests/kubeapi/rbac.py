"""RBAC the way kube-apiserver's authorizer and ClusterRole aggregation controller apply it (pure functions).

A request is allowed when a rule of a Role bound in the request's namespace, or of a ClusterRole bound
cluster-wide (ClusterRoleBinding) or in the namespace (RoleBinding), matches its verb, API group, resource
(`plural` or `plural/subresource`) and, when the rule names some, the object's name. Members of
`system:masters` pass without a rule, as on a real server. Denied requests get the real 403 wording.

Not emulated: non-resource URLs (discovery, /version, /healthz are open to every authenticated user, as the
bootstrap `system:discovery` role makes them), `impersonate`/`escalate`/`bind` checks on RBAC writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flowmon_contract.selectors import LabelSelector, selector_matches

MASTERS = "system:masters"
RBAC_GROUP = "rbac.authorization.k8s.io"

# The built-in roles namespace admins get; their rules come from ClusterRoles with these labels.
BOOTSTRAP_CLUSTER_ROLES: tuple[dict, ...] = (
    {
        "metadata": {"name": "cluster-admin"},
        "rules": [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    },
    *(
        {
            "metadata": {"name": name},
            "aggregationRule": {
                "clusterRoleSelectors": [{"matchLabels": {f"{RBAC_GROUP}/aggregate-to-{name}": "true"}}]
            },
            "rules": [],
        }
        for name in ("admin", "edit", "view")
    ),
)


@dataclass(frozen=True)
class Request:
    """The attributes RBAC decides on (kube-apiserver's authorizer.Attributes for resource requests)."""

    user: str
    groups: tuple[str, ...]
    verb: str
    api_group: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None

    @property
    def qualified_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def _has(values: Iterable[str], wanted: str) -> bool:
    values = list(values or [])
    return "*" in values or wanted in values


def rule_allows(rule: Mapping, request: Request) -> bool:
    """One PolicyRule against one request (wildcards, `plural/*` subresource wildcards, resourceNames)."""
    if not _has(rule.get("verbs"), request.verb) or not _has(rule.get("apiGroups"), request.api_group):
        return False
    resources = rule.get("resources") or []
    wanted = request.qualified_resource
    matched = "*" in resources or wanted in resources
    if request.subresource and f"*/{request.subresource}" in resources:
        matched = True
    if not matched:
        return False
    names = rule.get("resourceNames") or []
    return not names or (request.name is not None and request.name in names)


def _subject_matches(subject: Mapping, request: Request, binding_namespace: str | None) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == request.user
    if kind == "Group":
        return name in request.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return request.user == f"system:serviceaccount:{namespace}:{name}"
    return False


def aggregated_rules(role: Mapping, cluster_roles: Iterable[Mapping]) -> list[dict] | None:
    """The rules the aggregation controller writes into a ClusterRole with an aggregationRule (None without
    one): those of every other ClusterRole one of its selectors matches, without duplicates."""
    selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors")
    if selectors is None:
        return None
    parsed = [LabelSelector.model_validate(s or {}) for s in selectors]
    rules: list[dict] = []
    for other in sorted(cluster_roles, key=lambda r: r["metadata"]["name"]):
        if other["metadata"]["name"] == role["metadata"]["name"]:
            continue
        labels = other["metadata"].get("labels") or {}
        if any(selector_matches(s, labels) for s in parsed):
            rules += [r for r in other.get("rules") or [] if r not in rules]
    return rules


@dataclass(frozen=True)
class Policy:
    """The RBAC objects stored in the cluster at one moment."""

    cluster_roles: Mapping[str, Mapping]
    roles: Mapping[tuple[str, str], Mapping]  # (namespace, name)
    cluster_role_bindings: Iterable[Mapping]
    role_bindings: Iterable[Mapping]

    def _role_rules(self, ref: Mapping, namespace: str | None) -> list[Mapping]:
        if ref.get("kind") == "ClusterRole":
            role = self.cluster_roles.get(ref.get("name", ""))
        else:
            role = self.roles.get((namespace or "", ref.get("name", "")))
        return list((role or {}).get("rules") or [])

    def allows(self, request: Request) -> bool:
        if MASTERS in request.groups:
            return True
        for binding in self.cluster_role_bindings:
            if any(_subject_matches(s, request, None) for s in binding.get("subjects") or []) and any(
                rule_allows(r, request) for r in self._role_rules(binding.get("roleRef", {}), None)
            ):
                return True
        if request.namespace is None:
            return False
        for binding in self.role_bindings:
            namespace = binding["metadata"].get("namespace")
            if namespace != request.namespace:
                continue
            if any(_subject_matches(s, request, namespace) for s in binding.get("subjects") or []):
                rules = self._role_rules(binding.get("roleRef", {}), namespace)
                if any(rule_allows(r, request) for r in rules):
                    return True
        return False


def forbidden_message(request: Request) -> str:
    """kube-apiserver's wording, e.g. `secrets "x" is forbidden: User "u" cannot get resource "secrets" in
    API group "" in the namespace "shop"`."""
    what = f"{request.resource}.{request.api_group}" if request.api_group else request.resource
    subject = f'{what} "{request.name}"' if request.name else what
    scope = f'in the namespace "{request.namespace}"' if request.namespace else "at the cluster scope"
    return (
        f'{subject} is forbidden: User "{request.user}" cannot {request.verb} resource '
        f'"{request.qualified_resource}" in API group "{request.api_group}" {scope}'
    )


def resource_request(
    method: str, parts: list[str], query: Mapping[str, str], user: str, groups: Iterable[str]
) -> Request | None:
    """The RBAC attributes of an HTTP request on a resource path (None for discovery and other paths),
    as kube-apiserver's RequestInfo resolver derives them."""
    if len(parts) >= 3 and parts[:2] == ["api", "v1"]:
        api_group, rest = "", parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        api_group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    namespace_subresource = len(rest) == 3 and rest[2] in ("status", "finalize")  # of a Namespace itself
    if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    resource, name, subresource = rest[0], (rest[1:2] or [None])[0], (rest[2:3] or [None])[0]
    if resource == "namespaces" and name:
        namespace = name  # a namespace is authorized as inside itself
    if name is None:
        selected = [
            r.split("=", 1)[1].lstrip("=")
            for r in (query.get("fieldSelector") or "").split(",")
            if r.replace(" ", "").startswith("metadata.name=")
        ]
        name = selected[0] if selected else None  # list/watch of one object, by field selector
        watching = query.get("watch", "").lower() in ("true", "1", "t")
        verb = {"GET": "watch" if watching else "list", "POST": "create", "DELETE": "deletecollection"}
    else:
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    verb_name = verb.get(method, method.lower())
    return Request(user, tuple(groups), verb_name, api_group, resource, subresource, namespace, name)
