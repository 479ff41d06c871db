"""Graphviz's `dot` (Debian's graphviz) lays the map out: DOT text in, SVG or PNG bytes out."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FORMATS = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot"}


class GraphvizError(RuntimeError):
    """`dot` is missing or refused the input; the message says which."""


def format_for(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: the map is written as {', '.join(FORMATS)}") from None


def layout(dot_text: str, fmt: str, timeout: float = 60.0) -> bytes:
    """Run `dot -T<fmt>`; `dot` format returns the text itself (no Graphviz needed)."""
    if fmt == "dot":
        return dot_text.encode()
    binary = shutil.which("dot")
    if binary is None:
        raise GraphvizError("Graphviz's `dot` is not installed: apt-get install graphviz (make setup does)")
    done = subprocess.run(
        [binary, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise GraphvizError(f"dot -T{fmt} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
