"""The FlowMonitor CRD, generated from the pydantic spec so `kubectl explain` and validation cannot drift.

pydantic's JSON schema is converted to a structural openAPIV3Schema: $refs inlined, Optional[...] as
`nullable`, maps with key patterns as `additionalProperties` plus a CEL rule on the keys, pydantic's
cross-field validators restated as CEL `x-kubernetes-validations` (the table RULES below), uniqueness as
`x-kubernetes-list-type`. Unknown fields are pruned by the API server (rejected under kubectl's default
strict field validation), the structural equivalent of pydantic's extra="forbid".

Regenerate the committed file with: python -m flowmon_operator.crd > crds/flowmonitors.flowmon.io.yaml
Works on Kubernetes >= 1.30: the rules use only CEL libraries that 1.30 accepts in a CRD (the IP/CIDR
library needs 1.31, so a network's syntax is a regular expression here and its host bits are checked by
the operator, which reports them in the monitor's status).
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema

from flowmon_contract.alerting import RESERVED_LABELS
from flowmon_contract.model_base import DURATION_PATTERN
from flowmon_contract.spec import (
    API_GROUP,
    API_VERSION,
    CIDR_MAX_LENGTH,
    KIND,
    PLURAL,
    SCRAPE_INTERVAL_SECONDS,
    SERIES_TTL_SECONDS,
    FlowMonitorSpec,
)

CRD_NAME = f"{PLURAL}.{API_GROUP}"
Schema = dict[str, Any]
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# --- status: written by the operator; a model so that handlers and the CRD share one definition -------
class Condition(BaseModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: Literal["Ready", "PolicyApplied", "Degraded", "Scraped"] = Field(
        description="Ready: the monitor's objects exist and its policy runs; PolicyApplied: every ready "
        "agent runs the current policy; Degraded: something works only partly (see reason); Scraped: a "
        "Prometheus has read the monitor's path recently, as the agents saw it."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="A CamelCase reason, e.g. InvalidSpec, AgentsOutOfSync.",
    )
    message: str = Field(
        default="", max_length=32768, description="Human-readable details, e.g. the invalid field path."
    )
    last_transition_time: str = Field(
        alias="lastTransitionTime",
        json_schema_extra={"format": "date-time"},
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", ge=0, description="The generation this condition is about."
    )


class AgentCounts(BaseModel):
    """How many agents run this monitor's current policy."""

    desired: int = Field(ge=0, description="Agent pods the DaemonSet wants (one per eligible node).")
    ready: int = Field(ge=0, description="Agent pods that are ready.")
    in_sync: int = Field(
        alias="inSync", ge=0, description="Ready agents that report the current policy hash."
    )
    summary: str = Field(default="", max_length=32, description='"inSync/desired", for the Agents column.')


class FlowMonitorStatus(BaseModel):
    """Observed state, written by the operator (kopf may keep its own bookkeeping here too)."""

    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", ge=0, description="The spec generation last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=8,
        description="Ready, PolicyApplied, Degraded, Scraped.",
    )
    agents: AgentCounts | None = Field(default=None, description="Agents running this monitor's policy.")
    predicted_series: int | None = Field(
        default=None,
        alias="predictedSeries",
        ge=0,
        description="Upper bound of the series one agent exports for this monitor (see docs/operator.md).",
    )
    policy_hash: str | None = Field(
        default=None,
        alias="policyHash",
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the compiled agent policy that holds this generation of the monitor.",
    )


def agent_counts(desired: int, ready: int, in_sync: int) -> dict:
    """status.agents, with the summary the Agents printer column shows."""
    return AgentCounts(
        desired=desired, ready=ready, inSync=in_sync, summary=f"{in_sync}/{desired}"
    ).model_dump(by_alias=True)


# --- pydantic JSON schema with default_factory values -------------------------------------------------
class _FactoryDefaults(GenerateJsonSchema):
    """pydantic leaves default_factory out of JSON schemas; a CRD needs those defaults."""

    def get_default_value(self, schema):  # type: ignore[override]
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)


def model_schema(model: type[BaseModel]) -> Schema:
    return model.model_json_schema(by_alias=True, schema_generator=_FactoryDefaults)


# --- the cross-field rules, restated in CEL -------------------------------------------------------------
def _cel_duration_seconds(expr: str) -> str:
    """CEL for the seconds of a duration string already matching DURATION_PATTERN (Go's duration()
    knows no days)."""
    terms = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        part = f"{expr}.find('[0-9]+{unit}')"
        terms.append(f"({part} == '' ? 0 : int({part}.replace('{unit}', '')) * {factor})")
    return " + ".join(terms)


def _duration_between(bounds: tuple[int, int], text: str) -> dict:
    low, high = bounds
    rule = f"[{_cel_duration_seconds('self')}].all(s, {low} <= s && s <= {high})"
    return {"rule": rule, "message": f"must be a duration between {text}"}


# IPv4 in dotted quads with /0-32, or an IPv6-looking address with /0-128. Exact IPv6 syntax and host bits
# are the operator's check (pydantic's NamedNetwork), reported as Ready=False naming the field.
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CIDR_SYNTAX = (
    rf"^({_OCTET}\.){{3}}{_OCTET}/(3[0-2]|[12]?[0-9])$"
    r"|^[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,7}/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$"
)


def _cel_string(text: str) -> str:
    """A CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# (definition, field or None for the object itself) -> validation rules. Each mirrors one pydantic check.
RULES: dict[tuple[str, str | None], list[dict]] = {
    ("NamespaceFilter", None): [
        {
            "rule": "!has(self.include) || !has(self.exclude) || self.include.all(n, !(n in self.exclude))",
            "message": "a namespace may not be both included and excluded",
        }
    ],
    ("SelectorRequirement", None): [
        {
            "rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            "message": "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
        }
    ],
    ("NamedNetwork", "cidr"): [
        {
            "rule": f"self.matches({_cel_string(CIDR_SYNTAX)})",
            "message": "must be a network in prefix notation, e.g. 203.0.113.0/24 or 2001:db8::/32",
        }
    ],
    ("HistogramBuckets", "rtt"): [{"rule": "self.isSorted()", "message": "buckets must be ascending"}],
    ("HistogramBuckets", "connectDuration"): [
        {"rule": "self.isSorted()", "message": "buckets must be ascending"}
    ],
    ("Aggregation", "seriesTTL"): [_duration_between(SERIES_TTL_SECONDS, "10s and 24h")],
    ("Scrape", "interval"): [_duration_between(SCRAPE_INTERVAL_SECONDS, "1s and 1h")],
    ("AlertingSpec", "labels"): [
        {
            "rule": f"self.all(k, !k.matches({_cel_string(RESERVED_LABELS.pattern)}))",
            "message": "alert labels may not override the pair labels or alertname",
        }
    ],
    ("IsolationAlerting", None): [
        {
            "rule": "!has(self.forbidden) || self.forbidden.all(p, has(self.environments) && "
            "self.environments.exists(e, e.name == p.from) && self.environments.exists(e, e.name == p.to))",
            "message": "forbidden pairs may name only environments listed in environments",
        }
    ],
}
# Lists whose items must be unique (pydantic checks it; the API server does with listType set/map).
LIST_TYPES: dict[tuple[str, str], dict] = {
    ("FlowMonitorSpec", "metrics"): {"x-kubernetes-list-type": "set"},
    ("Aggregation", "groupBy"): {"x-kubernetes-list-type": "set"},
    ("HistogramBuckets", "rtt"): {"x-kubernetes-list-type": "set"},
    ("HistogramBuckets", "connectDuration"): {"x-kubernetes-list-type": "set"},
    ("IsolationAlerting", "environments"): {
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    },
}
_CIDR_FORMATS = {"ipv4network", "ipv6network"}


# --- JSON schema -> structural openAPIV3Schema ----------------------------------------------------------
class _Converter:
    def __init__(self, defs: dict[str, Schema]):
        self.defs = defs

    def convert(self, node: Schema, owner: str | None = None, field: str | None = None) -> Schema:
        """Convert one JSON-schema node; owner/field name where it sits, for the RULES table."""
        node = dict(node)
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            target = self.convert(self.defs[name], owner=name)
            target.update({k: v for k, v in node.items() if k in ("description", "default")})
            return self._finish(target, owner, field)
        if "anyOf" in node:
            return self._finish(self._any_of(node), owner, field)
        out: Schema = {}
        for key in ("description", "type", "format", "enum", "pattern", "default"):
            if key in node:
                out[key] = node[key]
        for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties"):
            if key in node:
                out[key] = node[key]
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if key in node:  # JSON Schema 2020 number -> OpenAPI 3.0 boolean
                out[bound] = node[key]
                out[key] = True
        if "enum" in node and node.get("type") == "string" and "maxLength" not in node:
            out["maxLength"] = max(len(v) for v in node["enum"])  # bounded for CEL's cost estimate
        if "items" in node:
            out["items"] = self.convert(node["items"])
        if node.get("type") == "object":
            self._object(node, out, owner)
        return self._finish(out, owner, field)

    def _object(self, node: Schema, out: Schema, owner: str | None) -> None:
        if "properties" in node:
            out["properties"] = {
                name: self._with_extras(self.convert(prop, owner=None, field=name), owner, name)
                for name, prop in node["properties"].items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
        if "patternProperties" in node:  # dict[Key, Value]: structural schemas have no patternProperties
            ((pattern, value),) = node["patternProperties"].items()
            out["additionalProperties"] = self.convert(value)
            max_key = node.get("propertyNames", {}).get("maxLength")
            size = f"size(k) <= {max_key} && " if max_key else ""
            out.setdefault("x-kubernetes-validations", []).append(
                {
                    "rule": f"self.all(k, {size}k.matches({_cel_string(pattern)}))",
                    "message": f"keys must match {pattern}",
                }
            )
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self.convert(node["additionalProperties"])

    def _with_extras(self, schema: Schema, owner: str | None, name: str) -> Schema:
        """The field's list type and its rules from the tables, after any rules of its own."""
        if owner is None:
            return schema
        schema |= LIST_TYPES.get((owner, name), {})
        rules = copy.deepcopy(RULES.get((owner, name), []))
        if rules:
            schema["x-kubernetes-validations"] = schema.get("x-kubernetes-validations", []) + rules
        return schema

    def _any_of(self, node: Schema) -> Schema:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(node["anyOf"])
        if len(branches) == 1:
            out = self.convert(branches[0])
        elif {b.get("format") for b in branches} == _CIDR_FORMATS:
            out = {"type": "string", "maxLength": CIDR_MAX_LENGTH}
        else:
            raise ValueError(f"no structural equivalent for anyOf {node['anyOf']}")
        for key in ("description", "default"):
            if key in node:
                out[key] = node[key]
        if nullable:
            out["nullable"] = True
            if out.get("default") is None:
                out.pop("default", None)
        return out

    def _finish(self, out: Schema, owner: str | None, field: str | None) -> Schema:
        if isinstance(out.get("default"), dict):
            out["default"] = {}  # nested defaults fill the object in, as pydantic's default_factory does
        if owner and field is None and (owner, None) in RULES:
            rules = out.setdefault("x-kubernetes-validations", [])
            for rule in RULES[(owner, None)]:
                if rule not in rules:
                    rules.append(copy.deepcopy(rule))
        return out


def structural_schema(model: type[BaseModel]) -> Schema:
    """The model's JSON schema as a structural openAPIV3Schema."""
    schema = model_schema(model)
    root = {k: v for k, v in schema.items() if k != "$defs"}
    return _Converter(schema.get("$defs", {})).convert(root, owner=model.__name__)


def _condition_column(name: str, field: str, priority: int = 0) -> dict:
    column = {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="Ready")].{field}',
        "description": f"The Ready condition's {field}.",
    }
    return column | ({"priority": priority} if priority else {})


def build_crd() -> dict:
    """The CustomResourceDefinition for FlowMonitor (pure, deterministic)."""
    spec = structural_schema(FlowMonitorSpec)
    spec["default"] = {}
    status = structural_schema(FlowMonitorStatus)
    status["x-kubernetes-preserve-unknown-fields"] = True  # kopf's handler results and progress
    status["properties"]["conditions"] |= {
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    }
    schema = {
        "type": "object",
        "description": "A FlowMonitor asks flowmon's eBPF agents for TCP flow metrics between workloads: "
        "which flows, which metrics, how aggregated, how Prometheus scrapes them and which alerts apply.",
        "properties": {
            "apiVersion": {"type": "string", "description": "The versioned schema of this object."},
            "kind": {"type": "string", "description": "FlowMonitor."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                # The name becomes a label value (flowmon.io/monitor-name) and part of child names.
                "rule": f"size(self.metadata.name) <= 63 && self.metadata.name.matches('{DNS_LABEL}')",
                "message": "metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-'",
            }
        ],
    }
    version = {
        "name": API_VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": schema},
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            _condition_column("Ready", "status"),
            {
                "name": "Agents",
                "type": "string",
                "jsonPath": ".status.agents.summary",
                "description": "Agents running the current policy / agents desired.",
            },
            {
                "name": "Series",
                "type": "integer",
                "jsonPath": ".status.predictedSeries",
                "description": "Predicted upper bound of series per agent.",
            },
            _condition_column("Reason", "reason", priority=1),
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "flowmon", "app.kubernetes.io/part-of": "flowmon"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["fm"],
                "categories": ["flowmon"],
            },
            "versions": [version],
        },
    }
    return json.loads(json.dumps(crd))  # plain JSON data, no shared sub-objects (no YAML anchors)


def validate_spec(document: dict) -> FlowMonitorSpec:
    """Validate a spec as the API server does with this CRD: JSON types strictly ("10" is no integer,
    "yes" no boolean), unlike pydantic's default lax mode. Raises pydantic.ValidationError."""
    return FlowMonitorSpec.model_validate_json(json.dumps(document), strict=True)


def crd_yaml() -> str:
    header = "# Generated by `python -m flowmon_operator.crd` from flowmon_contract.spec: do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)


# The duration pattern is part of the schema via the Duration type; re-exported for tests and docs.
__all__ = ["CRD_NAME", "DURATION_PATTERN", "RULES", "agent_counts", "build_crd", "crd_yaml", "validate_spec"]

if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(crd_yaml())
