"""Notice when files change by polling stat(): works for Kubernetes ConfigMap/Secret mounts, which swap a
`..data` symlink (the inode behind the path changes, not the file in place), and for plain rewrites."""

from __future__ import annotations

import os
from pathlib import Path

Signature = tuple[tuple[int, int, int, int] | None, ...]


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ConfigMap symlink shows a new inode
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatch:
    """`changed()` is True once after any of the files changed (or appeared or vanished)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = tuple(paths)
        self._seen: Signature = self.signature()

    def signature(self) -> Signature:
        return tuple(_stat(p) for p in self.paths)

    def changed(self) -> bool:
        now = self.signature()
        if now == self._seen:
            return False
        self._seen = now
        return True
