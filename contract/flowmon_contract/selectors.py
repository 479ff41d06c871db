"""Kubernetes label selectors: the model and the pure matching function."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from flowmon_contract.model_base import StrictModel

# Kubernetes' label key syntax: an optional DNS-subdomain prefix and "/", then a name of at most 63
# characters that begins and ends alphanumeric. `[.]`, not `\.`: the pattern is also embedded in CEL.
LabelKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=317,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
    ),
]
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
# Bounds on lists and maps keep the CRD's CEL rules within the API server's cost budget.
MAX_SELECTOR_TERMS = 32
MAX_SELECTOR_VALUES = 64


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class SelectorRequirement(StrictModel):
    """One matchExpressions entry."""

    key: LabelKey = Field(description="The label key the requirement applies to.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[LabelValue] = Field(
        default_factory=list,
        max_length=MAX_SELECTOR_VALUES,
        description="Values for In and NotIn (non-empty); must be empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> SelectorRequirement:
        needs_values = self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)
        if needs_values and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if not needs_values and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(StrictModel):
    """A standard Kubernetes label selector; empty selects everything."""

    match_labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_SELECTOR_TERMS,
        description="Labels that must all be present with these values.",
    )
    match_expressions: list[SelectorRequirement] = Field(
        default_factory=list, max_length=MAX_SELECTOR_TERMS, description="Requirements that must all hold."
    )

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """True when the labels satisfy every part of the selector (None and empty select all)."""
    if selector is None:
        return True
    if any(labels.get(key) != value for key, value in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == SelectorOperator.IN and (not present or labels[req.key] not in req.values):
            return False
        if req.operator == SelectorOperator.NOT_IN and present and labels[req.key] in req.values:
            return False
        if req.operator == SelectorOperator.EXISTS and not present:
            return False
        if req.operator == SelectorOperator.DOES_NOT_EXIST and present:
            return False
    return True
