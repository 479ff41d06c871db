"""The strict pydantic base shared by every boundary model (FlowMonitor spec, agent policy)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class StrictModel(BaseModel):
    """Unknown fields are errors, instances are immutable, JSON/YAML use camelCase like Kubernetes."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_enum_values=True,
    )

    def dump(self) -> dict:
        """The camelCase JSON form, as it appears in a manifest or on the wire."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def duration_seconds(text: str) -> int:
    """Parse a Prometheus-style duration ("90s", "5m", "1h30m", "7d") into whole seconds."""
    match = _DURATION.fullmatch(text)
    if not text or not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h30m or 7d")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _valid_duration(text: str) -> str:
    duration_seconds(text)
    return text


DURATION_PATTERN = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
# The pattern and length bounds appear in the JSON schema (so in the CRD, where CEL needs bounded strings).
Duration = Annotated[
    str, Field(min_length=2, max_length=32, pattern=DURATION_PATTERN), AfterValidator(_valid_duration)
]
