"""The running agent policy: parsed and validated at the boundary, swapped as a whole, never half-applied.

Sources: the policy file at start and whenever it changes (the mounted ConfigMap in a cluster), and
`PUT /v1/policy` from the operator. An invalid policy from either source is refused with its field errors
and the last good policy keeps running. Validation is strict (no coercion: "500" and true are not
integers) and what it reports is bounded: the first MAX_REPORTED_ERRORS errors, then a count.
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
from flowmon_agent.supervision import where
from flowmon_contract.documents import yaml_error_text
from flowmon_contract.policy import AgentPolicy

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True, slots=True)
class FieldError:
    loc: str  # dotted camelCase path, e.g. monitors.0.maxSeries
    msg: str

    def dump(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}


class PolicyError(ValueError):
    """A policy document that cannot run; `errors` name the fields (at most MAX_REPORTED_ERRORS of
    them), `more` counts those left out."""

    def __init__(self, errors: list[FieldError], more: int = 0) -> None:
        self.errors = errors[:MAX_REPORTED_ERRORS]
        self.more = more + len(errors) - len(self.errors)
        text = "; ".join(f"{e.loc or '(document)'}: {e.msg}" for e in self.errors)
        super().__init__(text + (f"; and {self.more} more" if self.more else ""))

    def dump(self) -> list[dict[str, str]]:
        dumped = [e.dump() for e in self.errors]
        if self.more:
            dumped.append({"loc": "", "msg": f"and {self.more} more"})
        return dumped


def _policy_error(exc: ValidationError) -> PolicyError:
    total = exc.error_count()
    details = exc.errors(include_url=False, include_context=False, include_input=False)
    first = [FieldError(".".join(str(p) for p in e["loc"]), e["msg"]) for e in details[:MAX_REPORTED_ERRORS]]
    return PolicyError(first, more=total - len(first))


def parse_policy_json(data: bytes | str) -> AgentPolicy:
    """Pure: JSON text → AgentPolicy, or PolicyError with field paths (camelCase, as on the wire)."""
    try:
        return AgentPolicy.model_validate_json(data, strict=True)
    except ValidationError as exc:
        raise _policy_error(exc) from None


def parse_policy_text(text: str, *, yaml_format: bool) -> AgentPolicy:
    """JSON, or YAML held to the same strict JSON rules (a YAML date or a quoted number is refused)."""
    if not yaml_format:
        return parse_policy_json(text)
    try:
        document = yaml.safe_load(text)
        as_json = json.dumps(document)
    except yaml.YAMLError as exc:
        raise PolicyError([FieldError("", f"not YAML: {yaml_error_text(exc)}")]) from None
    except (TypeError, ValueError) as exc:  # e.g. a timestamp: YAML types JSON does not have
        raise PolicyError([FieldError("", f"not a JSON-compatible document: {exc}")]) from None
    return parse_policy_json(as_json)


def load_policy_file(path: Path) -> AgentPolicy:
    """A policy file is JSON, or YAML when it ends in .yaml/.yml."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([FieldError("", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        reason = f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise PolicyError([FieldError("", reason)]) from None
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
        for (
            listener
        ) in self._listeners:  # the policy is in: a listener that fails stops neither it nor the rest
            try:
                listener(policy)
            except Exception as exc:
                log.error("policy %s: a listener failed with %s", policy.hash[:12], where(exc))
        return policy.hash


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
