"""One running `flowmon demo` shared by the map and dashboard tests (session-scoped, built once).

The demo (agents on two nodes, Prometheus, the traffic mix, the live map page) runs from the first test
that asks for `running_demo` to the last one; those tests are run next to each other, and the demo is
stopped after the last of them, so the demo's own tests (which refuse to run beside another demo) still
run as before. A second Prometheus, started here, scrapes what the demo's scrapes plus every agent's
own /metrics (the agents dashboard reads them; the demo's Prometheus does not scrape them).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

FIXTURE = "running_demo"
AGENT_LINE = re.compile(r"^Agent (\S+): https://(127\.0\.0\.1:\d+)/metrics/.* \(CA and token in (\S+)\)$")
AGENT_JOB = "flowmon-agent"


@dataclass
class RunningDemo:
    proc: subprocess.Popen
    prometheus_url: str  # the demo's own
    map_url: str
    agents: dict[str, str]  # node → host:port
    workdir: Path
    prometheus: object  # flowmon_lab.prometheus.Prometheus: the tests' own, scraping /metrics as well
    lines: list[str]

    @property
    def ca(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def token(self) -> Path:
        return self.workdir / "token"

    def monitor_urls(self, key: str) -> list[str]:
        return [f"https://{address}/metrics/{key}" for address in self.agents.values()]


def _read_intro(proc: subprocess.Popen, timeout: float = 180) -> list[str]:
    """The demo's lines up to the first query it suggests (every address is printed by then)."""
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the demo ended early:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("Queries to try"):
            return lines
    raise AssertionError("the demo did not start in time:\n" + "".join(lines))


def _test_prometheus(demo_lines: list[str], tmp: Path):
    from flowmon_contract.documents import load_monitors
    from flowmon_lab.demo import prometheus as demo_prometheus
    from flowmon_lab.demo.main import EXAMPLES
    from flowmon_lab.prometheus import Prometheus, config, https_scrape_job

    agents = {m.group(1): (m.group(2), Path(m.group(3))) for m in map(AGENT_LINE.match, demo_lines) if m}
    workdir = next(iter(agents.values()))[1]
    ca, token = workdir / "ca.crt", workdir / "token"
    targets = [demo_prometheus.Target(address, node) for node, (address, _) in agents.items()]
    jobs = [
        demo_prometheus.scrape_job(
            m.key, f"/metrics/{m.key}", targets, ca_file=ca, token_file=token, interval="2s"
        )
        for m in load_monitors([EXAMPLES])
    ]
    addresses = {t.address: {"node": t.node} for t in targets}
    jobs.append(
        https_scrape_job(AGENT_JOB, "/metrics", addresses, ca_file=ca, token_file=token, interval="2s")
    )
    prometheus = Prometheus(tmp)
    prometheus.start(config(jobs))
    return prometheus, {node: address for node, (address, _) in agents.items()}, workdir


_STOPS: list = []


@pytest.fixture(scope="session")
def running_demo(require_root, tmp_path_factory):
    from tests.test_demo import assert_nothing_left, demo_processes, run_demo, start_demo

    assert demo_processes() == [], "another demo is running"
    proc = start_demo("--no-ui", "--duration", "900")
    prometheus = None
    stopped = []

    def stop() -> None:
        if stopped:
            return
        stopped.append(True)
        if prometheus is not None:
            prometheus.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # no teardown ran: remove what it left for the tests after it
            proc.kill()
            out, _ = proc.communicate()
            run_demo("--cleanup", timeout=120)
            raise AssertionError(f"the demo did not stop on SIGINT:\n{out[-3000:]}") from None
        assert proc.returncode == 0, out
        assert_nothing_left([out])

    _STOPS.append(stop)
    try:
        lines = _read_intro(proc)
        prom_url = next(line.split()[1] for line in lines if line.startswith("Prometheus: "))
        map_url = next(line.split()[2] for line in lines if line.startswith("Live map: "))
        prometheus, agents, workdir = _test_prometheus(lines, tmp_path_factory.mktemp("demo-prometheus"))
        yield RunningDemo(proc, prom_url, map_url, agents, workdir, prometheus, lines)
    finally:
        stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the running demo, next to each other (where the first of them was)."""
    users = [item for item in items if FIXTURE in getattr(item, "fixturenames", ())]
    if not users:
        return
    first = items.index(users[0])
    rest = [item for item in items if FIXTURE not in getattr(item, "fixturenames", ())]
    items[:] = rest[:first] + users + rest[first:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test on the running demo, stop it (before the demo's own tests run)."""
    if FIXTURE not in getattr(item, "fixturenames", ()):
        return
    if nextitem is None or FIXTURE not in getattr(nextitem, "fixturenames", ()):
        while _STOPS:
            _STOPS.pop()()
