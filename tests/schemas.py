"""Schema validation for tests: would a Kubernetes API server (with these CRDs installed) accept an object?

- Built-in kinds: the `kubernetes-validate` package's strict schemas of the oldest and the newest
  Kubernetes minor flowmon supports (SUPPORTED_VERSIONS): an object must pass both.
- Custom resources (ServiceMonitor, PrometheusRule from ../shared/schemas, FlowMonitor from crds/): the
  CRD's openAPIV3Schema, applied the way the API server does: structural defaults first, then the schema
  (unknown fields rejected, as kubectl's default strict field validation does), list-type uniqueness, and
  the `x-kubernetes-validations` CEL rules evaluated with cel-python plus the Kubernetes CEL library
  functions our rules use.

Public helpers: validate_k8s(obj), validate_prometheus_operator(obj), validate_any(obj),
custom_resource_errors(obj, crd), apply_defaults(schema, value).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import celpy.celtypes as ct
import jsonschema
import kubernetes_validate
import yaml

from flowmon_cli.crd_check import served_schema, to_json_schema

# The supported Kubernetes range (docs/operator.md): every object validates against both ends.
SUPPORTED_VERSIONS = ("1.30", "1.37")
K8S_VERSION = SUPPORTED_VERSIONS[0]
REPO = Path(__file__).resolve().parents[1]
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
FLOWMON_CRD = REPO / "crds" / "flowmonitors.flowmon.io.yaml"
Schema = dict[str, Any]


class SchemaError(AssertionError):
    """The object would be rejected; the message lists every reason with its path."""


# --- built-in kinds ---------------------------------------------------------------------------------------
def validate_k8s(obj: dict, versions: tuple[str, ...] = SUPPORTED_VERSIONS) -> None:
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise SchemaError(
                f"Kubernetes {version}: {obj['kind']}/{obj['metadata'].get('name')}: {path}: {exc.message}"
            ) from None
    _check_metadata(obj)


@functools.cache
def _k8s_definitions(version: str = K8S_VERSION) -> Schema:
    import importlib.resources
    import json

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((root / f"v{version}.0-local-strict" / "_definitions.json").read_text())


def _check_metadata(obj: dict) -> None:
    """Object names, label keys and values as the API server checks them (the JSON schemas cannot)."""
    meta = obj.get("metadata", {})
    name = meta.get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        raise SchemaError(f"{obj['kind']}: metadata.name {name!r} is not a DNS subdomain")
    for key, value in {**meta.get("labels", {})}.items():
        if not re.fullmatch(r"([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key):
            raise SchemaError(f"{obj['kind']}/{name}: label key {key!r} is invalid")
        if not re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?", value):
            raise SchemaError(f"{obj['kind']}/{name}: label value {value!r} is invalid")


# --- custom resources ---------------------------------------------------------------------------------------
@functools.cache
def load_crd(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prometheus_operator_crd(kind: str) -> dict:
    for path in sorted(SHARED_SCHEMAS.glob("monitoring.coreos.com_*.yaml")):
        crd = load_crd(path)
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise SchemaError(f"no Prometheus Operator CRD for kind {kind} in {SHARED_SCHEMAS}")


def validate_prometheus_operator(obj: dict) -> None:
    """A ServiceMonitor, PrometheusRule or PodMonitor against the CRDs in ../shared/schemas."""
    _raise(obj, custom_resource_errors(obj, prometheus_operator_crd(obj["kind"])))


def validate_flowmonitor(obj: dict) -> None:
    _raise(obj, custom_resource_errors(obj, load_crd(FLOWMON_CRD)))


def validate_any(obj: dict) -> None:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    if group == "monitoring.coreos.com":
        validate_prometheus_operator(obj)
    elif group == "flowmon.io":
        validate_flowmonitor(obj)
    else:
        validate_k8s(obj)


def _raise(obj: dict, errors: list[str]) -> None:
    if errors:
        name = obj.get("metadata", {}).get("name")
        raise SchemaError(f"{obj.get('kind')}/{name}: " + "; ".join(errors))


def version_schema(crd: dict, api_version: str) -> Schema:
    schema = served_schema(crd, api_version)
    if schema is None:
        raise SchemaError(f"CRD {crd['metadata']['name']} serves no version {api_version}")
    return schema


def custom_resource_errors(obj: dict, crd: dict) -> list[str]:
    """Every reason the API server would reject `obj` (empty when it would accept it)."""
    schema = version_schema(crd, obj.get("apiVersion", ""))
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"kind {obj.get('kind')} is not {crd['spec']['names']['kind']}"]
    try:
        _check_metadata(obj)
    except SchemaError as exc:
        return [str(exc)]
    doc = apply_defaults(schema, copy.deepcopy(obj))
    validator = jsonschema.Draft202012Validator(to_json_schema(schema), format_checker=_FORMATS)
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    errors += list(_structural_errors(schema, doc, ""))
    if not errors:  # the API server runs CEL on schema-valid data only
        errors += list(_cel_errors(schema, doc, ""))
    return errors


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


_FORMATS = jsonschema.FormatChecker(())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: missing fields get their default, recursively."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name, item in value.items():
            sub = props.get(name) or (
                schema["additionalProperties"]
                if isinstance(schema.get("additionalProperties"), dict)
                else None
            )
            if sub is not None:
                value[name] = apply_defaults(sub, item)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _children(schema: Schema, value: Any, path: str) -> Iterator[tuple[Schema, Any, str]]:
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = schema.get("properties", {}).get(name) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield sub, item, f"{path}.{name}" if path else name
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield schema["items"], item, f"{path}[{i}]"


def _structural_errors(schema: Schema, value: Any, path: str) -> Iterator[str]:
    """x-kubernetes-list-type: map: items unique by their keys (JSON Schema cannot say this)."""
    if schema.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
        if len(set(seen)) != len(seen):
            yield f"{path or '<root>'}: duplicate entries for key {keys}"
    for sub, item, sub_path in _children(schema, value, path):
        yield from _structural_errors(sub, item, sub_path)


def _to_cel(schema: Schema, value: Any):
    """JSON -> CEL values typed by the schema, as the API server does (a `number` 1 is the double 1.0)."""
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        fallback = extra if isinstance(extra, dict) else {}
        return ct.MapType(
            {
                ct.StringType(k): _to_cel(schema.get("properties", {}).get(k, fallback), v)
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        return ct.ListType([_to_cel(schema.get("items", {}), v) for v in value])
    if schema.get("type") == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return ct.DoubleType(float(value))
    return celpy.json_to_cel(value)


def _cel_errors(schema: Schema, value: Any, path: str) -> Iterator[str]:
    for rule in schema.get("x-kubernetes-validations", []):
        if not _cel_holds(rule["rule"], _to_cel(schema, value)):
            yield f"{path or '<root>'}: {rule.get('message', rule['rule'])}"
    for sub, item, sub_path in _children(schema, value, path):
        yield from _cel_errors(sub, item, sub_path)


# --- CEL: cel-python plus the Kubernetes library functions our rules use ---------------------------------
def _find(text, pattern):
    match = re.search(str(pattern), str(text))
    return ct.StringType(match.group(0) if match else "")


def _replace(text, old, new):
    return ct.StringType(str(text).replace(str(old), str(new)))


def _is_sorted(items):
    return ct.BoolType(all(a <= b for a, b in zip(items, list(items)[1:], strict=False)))


def _is_cidr(text):
    # Kubernetes: netip.ParsePrefix, "address/bits" only (host bits allowed, no netmask form)
    try:
        ipaddress.ip_interface(str(text))
    except ValueError:
        return ct.BoolType(False)
    return ct.BoolType(bool(re.fullmatch(r"[0-9A-Fa-f:.]+/[0-9]{1,3}", str(text))))


def _cidr(text):
    return ct.StringType(str(ipaddress.ip_interface(str(text))))


def _masked(prefix):
    return ct.StringType(str(ipaddress.ip_interface(str(prefix)).network))


CEL_FUNCTIONS = {
    "find": _find,
    "replace": _replace,
    "isSorted": _is_sorted,
    "isCIDR": _is_cidr,
    "cidr": _cidr,
    "masked": _masked,
}


@functools.cache
def _cel_program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=CEL_FUNCTIONS)


def _cel_holds(rule: str, value: Any) -> bool:
    result = _cel_program(rule).evaluate({"self": value})
    if isinstance(result, Exception):  # cel-python returns evaluation errors as values
        return False
    return bool(result)
