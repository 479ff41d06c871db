"""Resource types the emulator serves: the built-in ones and those that CRDs register."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    namespaced: bool
    subresources: tuple[str, ...] = ("status",)
    short_names: tuple[str, ...] = ()
    custom: bool = False  # registered by a CRD: status is dropped on create, as for real custom resources

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> tuple[str, str]:
        """Objects are stored per group and plural (one storage version per resource)."""
        return (self.group, self.plural)

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def discovery_entries(self) -> list[dict]:
        """The entries of an APIResourceList for this resource and its subresources."""
        main = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        subs = [
            {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }
            for sub in self.subresources
        ]
        return [main, *subs]


def _core(kind: str, plural: str, namespaced: bool = True, *, status: bool = True, short=()) -> ResourceType:
    return ResourceType("", "v1", kind, plural, namespaced, ("status",) if status else (), tuple(short))


def _grouped(group: str, kind: str, plural: str, namespaced: bool = True, *, status=True, short=()):
    return ResourceType(group, "v1", kind, plural, namespaced, ("status",) if status else (), tuple(short))


BUILTIN: tuple[ResourceType, ...] = (
    _core("Namespace", "namespaces", namespaced=False, short=("ns",)),
    _core("Node", "nodes", namespaced=False, short=("no",)),
    _core("Pod", "pods", short=("po",)),
    _core("Service", "services", short=("svc",)),
    _core("Endpoints", "endpoints", status=False, short=("ep",)),
    _core("ConfigMap", "configmaps", status=False, short=("cm",)),
    _core("Secret", "secrets", status=False),
    _core("ServiceAccount", "serviceaccounts", status=False, short=("sa",)),
    _core("Event", "events", status=False, short=("ev",)),
    _grouped("apps", "Deployment", "deployments", short=("deploy",)),
    _grouped("apps", "ReplicaSet", "replicasets", short=("rs",)),
    _grouped("apps", "DaemonSet", "daemonsets", short=("ds",)),
    _grouped("apps", "StatefulSet", "statefulsets", short=("sts",)),
    _grouped("batch", "Job", "jobs"),
    _grouped("discovery.k8s.io", "EndpointSlice", "endpointslices", status=False),
    _grouped("coordination.k8s.io", "Lease", "leases", status=False),
    _grouped("events.k8s.io", "Event", "events", status=False, short=("ev",)),
    _grouped("apiextensions.k8s.io", "CustomResourceDefinition", "customresourcedefinitions", False),
    _grouped("rbac.authorization.k8s.io", "Role", "roles", status=False),
    _grouped("rbac.authorization.k8s.io", "RoleBinding", "rolebindings", status=False),
    _grouped("rbac.authorization.k8s.io", "ClusterRole", "clusterroles", False, status=False),
    _grouped("rbac.authorization.k8s.io", "ClusterRoleBinding", "clusterrolebindings", False, status=False),
)

CRD_TYPE = next(r for r in BUILTIN if r.kind == "CustomResourceDefinition")
NAMESPACE_TYPE = next(r for r in BUILTIN if r.kind == "Namespace")


def types_from_crd(crd: Mapping) -> list[ResourceType]:
    """Pure: the resource types a CustomResourceDefinition object serves (one per served version)."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    namespaced = spec.get("scope", "Namespaced") == "Namespaced"
    types = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        subresources = tuple(sorted(version.get("subresources", {}) or {}))
        types.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                kind=names["kind"],
                plural=names["plural"],
                namespaced=namespaced,
                subresources=subresources,
                short_names=tuple(names.get("shortNames", [])),
                custom=True,
            )
        )
    return types


def crd_body(
    group: str,
    kind: str,
    plural: str,
    *,
    version: str = "v1",
    namespaced: bool = True,
    status_subresource: bool = True,
    short_names: Iterable[str] = (),
) -> dict:
    """A minimal CustomResourceDefinition object (no schema validation happens in the emulator)."""
    version_entry: dict = {
        "name": version,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
    if status_subresource:
        version_entry["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced" if namespaced else "Cluster",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
                "shortNames": list(short_names),
            },
            "versions": [version_entry],
        },
    }
