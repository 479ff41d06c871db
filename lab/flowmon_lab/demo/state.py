"""What a running demo owns outside its network namespaces (agents, Prometheus, a temp directory),
recorded in a state file so that `flowmon demo --cleanup` can remove it after a crash or SIGKILL.

A recorded process is identified by pid *and* start time, so a reused pid is never killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = Path("/run/flowmon-demo.json")


@dataclass
class Owned:
    processes: list[dict] = field(default_factory=list)  # {"pid", "start", "what"}
    directories: list[str] = field(default_factory=list)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None when it
    does not run (gone, or a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


class DemoState:
    def __init__(self, path: Path = STATE_FILE) -> None:
        self.path = path
        self.owned = Owned()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.owned)))
        tmp.replace(self.path)

    def add_process(self, pid: int, what: str) -> None:
        self.owned.processes.append({"pid": pid, "start": start_time(pid), "what": what})
        self._save()

    def add_directory(self, path: Path) -> None:
        self.owned.directories.append(str(path))
        self._save()

    def forget(self) -> None:
        with suppress(FileNotFoundError):
            self.path.unlink()


def load(path: Path = STATE_FILE) -> Owned:
    try:
        return Owned(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return Owned()


def alive(owned: Owned, what: str) -> list[int]:
    """Recorded processes named `what` that still run (same pid and start time)."""
    return [
        p["pid"]
        for p in owned.processes
        if p["what"] == what and p["start"] is not None and start_time(p["pid"]) == p["start"]
    ]


def release(path: Path = STATE_FILE, grace: float = 5.0) -> list[str]:
    """Stop every recorded process that is still the same process, remove the recorded directories and
    the state file; returns what was done, for the user."""
    owned = load(path)
    done: list[str] = []
    alive = [
        p
        for p in owned.processes
        if p["start"] is not None and start_time(p["pid"]) == p["start"] and p["pid"] != os.getpid()
    ]
    done += [f"stopped {p['what']} (pid {p['pid']})" for p in alive]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in alive:
            with suppress(ProcessLookupError):
                os.kill(proc["pid"], sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(start_time(p["pid"]) == p["start"] for p in alive):
            time.sleep(0.05)
        alive = [p for p in alive if start_time(p["pid"]) == p["start"]]
        if not alive:
            break
    for directory in owned.directories:
        if Path(directory).exists():
            shutil.rmtree(directory, ignore_errors=True)
            done.append(f"removed {directory}")
    with suppress(FileNotFoundError):
        path.unlink()
    return done
