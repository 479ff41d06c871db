"""FileWatch: changes seen by stat(), and by content while a file is recent (same size, same tick)."""

from __future__ import annotations

import os

from flowmon_agent.filewatch import RECENT_NS, FileWatch


def rewrite_keeping_stat(path, data: bytes) -> None:
    """A rewrite in place of the same size within one tick of the file clock: stat() shows nothing."""
    before = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_a_same_size_rewrite_within_one_tick_is_a_change(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"admin-token-0123\n")
    written = os.stat(path).st_mtime_ns
    watch = FileWatch(path, clock_ns=lambda: written + 1)  # still within the tick, however slow the host
    assert not watch.changed()
    rewrite_keeping_stat(path, b"new-admin\n\xff\xfe\xfd\xfc\xfb\xfa\n")
    assert watch.changed()
    assert not watch.changed()


def test_old_files_are_compared_by_stat_alone(tmp_path):
    path = tmp_path / "policy.json"
    path.write_bytes(b"{}")
    mtime = os.stat(path).st_mtime_ns
    now = [mtime + RECENT_NS + 1]  # the check runs long after the last write
    watch = FileWatch(path, clock_ns=lambda: now[0])
    assert not watch.changed()
    path.write_bytes(b"[]")  # a real rewrite moves the mtime: seen by stat()
    now[0] = os.stat(path).st_mtime_ns + RECENT_NS + 1
    assert watch.changed()
    path.unlink()
    assert watch.changed() and not watch.changed()  # gone is a change, once
