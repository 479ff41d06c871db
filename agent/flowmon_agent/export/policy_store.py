"""The running agent policy: parsed and validated at the boundary, swapped as a whole, never half-applied.

Sources: the policy file at start and whenever it changes (the mounted ConfigMap in a cluster), and
`PUT /v1/policy` from the operator. An invalid policy from either source is refused with its field errors
and the last good policy keeps running.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from flowmon_agent.filewatch import FileWatch
from flowmon_contract.policy import AgentPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FieldError:
    loc: str  # dotted camelCase path, e.g. monitors.0.maxSeries
    msg: str

    def dump(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}


class PolicyError(ValueError):
    """A policy document that cannot run; `errors` name the fields."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.loc or '(document)'}: {e.msg}" for e in errors))
        self.errors = errors


def _field_errors(exc: ValidationError) -> list[FieldError]:
    return [FieldError(".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors()]


def parse_policy_json(data: bytes | str) -> AgentPolicy:
    """Pure: JSON text → AgentPolicy, or PolicyError with field paths (camelCase, as on the wire)."""
    try:
        return AgentPolicy.model_validate_json(data)
    except ValidationError as exc:
        raise PolicyError(_field_errors(exc)) from None


def parse_policy_text(text: str, *, yaml_format: bool) -> AgentPolicy:
    if not yaml_format:
        return parse_policy_json(text)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([FieldError("", f"not YAML: {exc}")]) from None
    try:
        return AgentPolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(_field_errors(exc)) from None


def load_policy_file(path: Path) -> AgentPolicy:
    """A policy file is JSON, or YAML when it ends in .yaml/.yml."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError([FieldError("", f"cannot read {path}: {exc.strerror}")]) from None
    return parse_policy_text(text, yaml_format=path.suffix in (".yaml", ".yml"))


def dump_policy_json(policy: AgentPolicy) -> str:
    return json.dumps(policy.dump(), indent=2, sort_keys=True)


Listener = Callable[[AgentPolicy], None]


class PolicyStore:
    """Holds the running policy. `apply` swaps it in whole and tells listeners (the poll loop)."""

    def __init__(self, on_rejected: Callable[[str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._policy: AgentPolicy | None = None
        self._listeners: list[Listener] = []
        self._on_rejected = on_rejected or (lambda _source: None)

    @property
    def policy(self) -> AgentPolicy | None:
        return self._policy

    @property
    def hash(self) -> str | None:
        policy = self._policy
        return policy.hash if policy else None

    def rejected(self, source: str) -> None:
        self._on_rejected(source)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def apply(self, policy: AgentPolicy, *, source: str) -> str:
        with self._lock:
            previous, self._policy = self._policy, policy
        if previous is None or previous.hash != policy.hash:
            log.info("policy %s from %s: %d monitors", policy.hash[:12], source, len(policy.monitors))
        for listener in self._listeners:
            listener(policy)
        return policy.hash

    def apply_json(self, data: bytes, *, source: str) -> str:
        """Validate then apply; PolicyError leaves the running policy untouched."""
        try:
            policy = parse_policy_json(data)
        except PolicyError:
            self.rejected(source)
            raise
        return self.apply(policy, source=source)


class PolicyFile:
    """The policy file: loaded at start, reloaded when its content or the symlink behind it changes."""

    def __init__(self, path: Path, store: PolicyStore) -> None:
        self.path, self._store = path, store
        self._watch = FileWatch(path)

    def load(self) -> bool:
        """Apply the file now; False (logged, counted) when it is missing or invalid."""
        try:
            policy = load_policy_file(self.path)
        except PolicyError as exc:
            log.error("policy file %s refused, keeping the running policy: %s", self.path, exc)
            self._store.rejected("file")
            return False
        self._store.apply(policy, source=f"file {self.path}")
        return True

    def reload_if_changed(self) -> bool:
        return self._watch.changed() and self.load()
