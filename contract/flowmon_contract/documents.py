"""FlowMonitor manifests from files: parsed and validated once, with `file: field.path: message` problems.

Shared by `flowmon validate`, `flowmon render`, the standalone agent and the demo, so a file that
validates is exactly a file the agent and the operator accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from flowmon_contract.spec import API_GROUP, API_VERSION, KIND, FlowMonitor

API = f"{API_GROUP}/{API_VERSION}"


@dataclass(frozen=True, order=True)
class Problem:
    """One reason a file is invalid. `path` is a Kubernetes-style field path (spec.metrics[1])."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path or '(document)'}: {self.message}"


@dataclass(frozen=True)
class LoadedMonitor:
    monitor: FlowMonitor
    file: str  # the file (and document index when the file holds several), for messages
    document: dict  # as written, for checks against other schemas (crd_check)


class ManifestError(ValueError):
    """Some files are invalid; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = list(problems)


def _is_union_tag(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or "(" in part)


def field_path(loc: Iterable[int | str]) -> str:
    """pydantic's error location → `spec.selection.networks[0].cidr`.

    Union members show up in pydantic's loc as validator descriptions (with brackets or parentheses);
    they are not fields, so they are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            path += f".{part}" if path else part
    return path


def validation_problems(file: str, exc: ValidationError) -> list[Problem]:
    """One problem per field. A value that fits no member of a union (an IPv4 or IPv6 network) gets the
    first member's message only: the others only say why it is not, say, IPv6."""
    by_path: dict[str, list[str]] = {}
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        path = field_path(error["loc"])
        union_member = any(_is_union_tag(part) for part in error["loc"])
        messages = by_path.setdefault(path, [])
        if message not in messages and not (union_member and messages):
            messages.append(message)
    return [Problem(file, path, "; ".join(messages)) for path, messages in by_path.items()]


def parse_document(file: str, document: object) -> tuple[FlowMonitor | None, list[Problem]]:
    """Pure: one YAML document → a FlowMonitor, or the problems that prevent it."""
    if not isinstance(document, dict):
        return None, [Problem(file, "", f"expected a {KIND} object, got {type(document).__name__}")]
    problems = []
    if document.get("kind") != KIND:
        problems.append(Problem(file, "kind", f"expected {KIND}, got {document.get('kind')!r}"))
    if document.get("apiVersion") != API:
        problems.append(Problem(file, "apiVersion", f"expected {API}, got {document.get('apiVersion')!r}"))
    if not isinstance(document.get("metadata"), dict) or "name" not in document["metadata"]:
        problems.append(Problem(file, "metadata.name", "Field required"))
    if problems:
        return None, problems
    try:
        # Strict JSON types, as the API server applies the CRD: `maxSeries: "500"` is refused there,
        # so it is refused here too (pydantic's lax mode would coerce it).
        return FlowMonitor.model_validate_json(json.dumps(document), strict=True), []
    except ValidationError as exc:
        return None, validation_problems(file, exc)
    except (TypeError, ValueError) as exc:  # YAML values JSON cannot hold (dates, binary)
        return None, [Problem(file, "", f"not representable as JSON: {exc}")]


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """`line 4, column 1: expected ',' or '}', but got '<stream end>'`, not PyYAML's multi-line text."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(problem.split())


def parse_text(file: str, text: str) -> tuple[list[LoadedMonitor], list[Problem]]:
    """Pure: a file's text (one or more YAML documents) → monitors and problems.

    Documents of a multi-document file are named `file[i]` (0-based) in messages; empty documents
    (a trailing `---`) are skipped."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [], [Problem(file, "", f"not valid YAML: {yaml_error_text(exc)}")]
    if not documents:
        return [], [Problem(file, "", f"no {KIND} in this file")]
    monitors, problems = [], []
    for index, document in enumerate(documents):
        name = file if len(documents) == 1 else f"{file}[{index}]"
        monitor, doc_problems = parse_document(name, document)
        problems += doc_problems
        if monitor is not None:
            monitors.append(LoadedMonitor(monitor, name, document))
    return monitors, problems


def duplicate_problems(loaded: Sequence[LoadedMonitor]) -> list[Problem]:
    """Two documents naming the same namespace/name would overwrite each other when applied."""
    first: dict[str, str] = {}
    problems = []
    for item in loaded:
        key = item.monitor.key
        if key in first:
            problems.append(
                Problem(item.file, "metadata.name", f"{KIND} {key} is also defined in {first[key]}")
            )
        else:
            first[key] = item.file
    return problems


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yaml and *.yml files (sorted, not recursive)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            files.append(path)
    return files


def load_files(paths: Sequence[str | Path]) -> tuple[list[LoadedMonitor], list[Problem]]:
    loaded: list[LoadedMonitor] = []
    problems: list[Problem] = []
    for path in expand_paths(paths):
        try:
            text = Path(path).read_text()
        except OSError as exc:
            problems.append(Problem(str(path), "", f"cannot read: {exc.strerror}"))
            continue
        file_monitors, file_problems = parse_text(str(path), text)
        loaded += file_monitors
        problems += file_problems
    return loaded, problems + duplicate_problems(loaded)


def load_monitors(paths: Sequence[str | Path]) -> list[FlowMonitor]:
    """Every FlowMonitor in the files, or ManifestError listing every problem."""
    loaded, problems = load_files(paths)
    if problems:
        raise ManifestError(problems)
    return [item.monitor for item in loaded]
