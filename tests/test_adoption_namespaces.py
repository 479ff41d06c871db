"""Connections opened before the agent are found in every network namespace even without ptrace access
to the processes (the agent in a pod has no CAP_SYS_PTRACE: /proc/PID/ns/net is then denied for almost
every process, measured 112 of 113 here), and each is reported once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowmon_agent.kernel import adoption
from flowmon_lab.network import Lab

pytestmark = pytest.mark.root


@pytest.mark.root
def test_namespaces_are_found_and_read_once_without_ptrace_access(monkeypatch):
    real_stat = os.stat

    def no_ptrace(path, *args, **kwargs):
        if str(path).endswith("/ns/net") and str(path).startswith("/proc/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    with Lab("fad", ["a", "b"]) as lab:
        a, b = lab.pod("a"), lab.pod("b")
        sleeper = lab.popen(b, ["sleep", "60"])  # a process living in b's namespace (a pod's containers)
        try:
            server = lab.socket(b)
            server.bind((str(b.ipv4), 0))
            server.listen()
            client = lab.socket(a)
            client.connect(server.getsockname())
            accepted, _ = server.accept()
            monkeypatch.setattr(os, "stat", no_ptrace)
            keys = adoption.namespace_readers()
            pid_key = ("tcp", real_stat(f"/proc/{sleeper.pid}/net/tcp").st_ino)
            assert ("pid", Path(f"/proc/{sleeper.pid}/net")) in keys[pid_key]  # one of the ways to read it
            found = [c for c in adoption.discover() if c.local in (a.ipv4, b.ipv4)]
            # b's namespace is known twice (its process, and /run/netns): its end is still reported once
            assert sorted((str(c.local), c.role.name) for c in found) == [
                (str(a.ipv4), "CLIENT"),
                (str(b.ipv4), "SERVER"),
            ]
            for s in (accepted, client, server):
                s.close()
        finally:
            sleeper.kill()
            sleeper.wait(timeout=10)
