"""Notice when files change by polling stat(): works for Kubernetes ConfigMap/Secret mounts, which swap a
`..data` symlink (the inode behind the path changes, not the file in place), and for plain rewrites.

A rewrite in place of the same size within one tick of the kernel's file clock (milliseconds) leaves
stat() unchanged. So a file modified recently (within RECENT_NS of the check, as git treats "racily
clean" files) is also compared by content; an older one by stat() alone, which costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RECENT_NS = 2_000_000_000  # coarser than any file clock we run on (ext4, xfs, tmpfs, overlayfs)


@dataclass(frozen=True, slots=True)
class Seen:
    stat: tuple[int, int, int, int] | None  # device, inode, mtime, size; None: the file is missing
    digest: bytes | None = None  # of the content, when it was modified recently

    def differs(self, other: Seen) -> bool:
        if self.stat != other.stat:
            return True
        return self.digest is not None and other.digest is not None and self.digest != other.digest


def _seen(path: Path, now_ns: int) -> Seen:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ConfigMap symlink shows a new inode
    except FileNotFoundError:
        return Seen(None)
    stat = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if now_ns - st.st_mtime_ns >= RECENT_NS:
        return Seen(stat)
    try:
        with open(path, "rb") as file:
            return Seen(stat, hashlib.file_digest(file, "sha256").digest())
    except OSError:
        return Seen(stat)


class FileWatch:
    """`changed()` is True once after any of the files changed (or appeared or vanished)."""

    def __init__(self, *paths: Path, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.paths = tuple(paths)
        self._clock_ns = clock_ns
        self._seen = self.signature()

    def signature(self) -> tuple[Seen, ...]:
        now = self._clock_ns()
        return tuple(_seen(p, now) for p in self.paths)

    def changed(self) -> bool:
        now = self.signature()
        if not any(old.differs(new) for old, new in zip(self._seen, now, strict=True)):
            return False
        self._seen = now
        return True
