"""FlowMonitor documents against a CRD's structural schema, as the API server would check them.

`flowmon validate` runs this after the models accepted a document, against crds/ of this checkout or the
CRD given with --crd (e.g. the one installed in the cluster: `kubectl get crd flowmonitors.flowmon.io -o
yaml`). The committed CRD is generated from the same models, so it agrees with them; an older CRD in a
cluster may not, and this is where that shows before a GitOps sync fails. The structural schema (types,
bounds, patterns, enums, unknown fields) is checked with jsonschema; the CEL rules are not evaluated here
(they restate the models' cross-field validators, which already ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flowmon_contract.documents import Problem, field_path
from flowmon_contract.spec import API_GROUP, KIND, PLURAL

CRD_FILE = f"{PLURAL}.{API_GROUP}.yaml"
Schema = dict[str, Any]


class CRDError(ValueError):
    """The file is not a usable FlowMonitor CRD."""


def default_crd(start: Path | None = None) -> Path | None:
    """crds/<CRD_FILE> in the current directory or the checkout this module runs from, if present."""
    for root in (start or Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / "crds" / CRD_FILE
        if candidate.is_file():
            return candidate.relative_to(Path.cwd()) if candidate.is_relative_to(Path.cwd()) else candidate
    return None


def load_crd(path: Path) -> dict:
    try:
        crd = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CRDError(f"{path}: cannot read the CRD: {exc}") from None
    names = (crd or {}).get("spec", {}).get("names", {}) if isinstance(crd, dict) else {}
    if (
        not isinstance(crd, dict)
        or crd.get("kind") != "CustomResourceDefinition"
        or names.get("kind") != KIND
    ):
        raise CRDError(f"{path}: not the {KIND} CustomResourceDefinition")
    return crd


def served_schema(crd: dict, api_version: str) -> Schema | None:
    """The openAPIV3Schema of the served version named in apiVersion (group/version); None if not served."""
    group, _, version = api_version.partition("/")
    if group != crd["spec"].get("group"):
        return None
    for entry in crd["spec"].get("versions", []):
        if entry.get("name") == version and entry.get("served", True):
            return entry.get("schema", {}).get("openAPIV3Schema")
    return None


def to_json_schema(node: Schema) -> Schema:
    """Pure: Kubernetes' OpenAPI v3 structural schema → JSON Schema 2020-12.

    Unknown fields are errors (kubectl's strict field validation, the models' extra="forbid"); `nullable`
    admits null; `x-kubernetes-*` extensions are dropped except int-or-string and set semantics."""
    out: Schema = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = to_json_schema(value)
        elif (
            key == "nullable"
            or key.startswith("x-kubernetes-")
            or key in ("exclusiveMinimum", "exclusiveMaximum")
        ):
            continue
        else:
            out[key] = value
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(flag) is True and bound in out:  # OpenAPI 3.0's boolean form
            out[flag] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not preserve
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def crd_problems(file: str, document: dict, crd: dict, crd_name: str) -> list[Problem]:
    """Why the API server with this CRD would refuse the document (empty when it would accept it).
    Raises ImportError when jsonschema is not installed."""
    import jsonschema

    schema = served_schema(crd, str(document.get("apiVersion", "")))
    if schema is None:
        return [Problem(file, "apiVersion", f"{crd_name} serves no version {document.get('apiVersion')}")]
    checked = {k: v for k, v in document.items() if k != "metadata"}  # the API server owns metadata's schema
    root = to_json_schema(schema)
    root.get("properties", {}).pop("metadata", None)
    root.get("properties", {}).pop("status", None)
    validator = jsonschema.Draft202012Validator(root)
    return [
        Problem(file, field_path(error.absolute_path), f"{error.message} (CRD {crd_name})")
        for error in sorted(validator.iter_errors(checked), key=lambda e: list(map(str, e.absolute_path)))
    ]
