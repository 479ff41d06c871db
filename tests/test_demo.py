"""`flowmon demo` end to end: real netns, BPF agents, Prometheus; and nothing of it left afterwards.

The demo runs as the user runs it (`python -m flowmon_cli.main demo`); while it runs, its Prometheus
must answer every query the demo prints with the series the traffic mix produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flowmon_lab import minicluster
from flowmon_lab.demo import scenario, state
from tests.waiting import wait_for as wait_for_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.root, pytest.mark.root, pytest.mark.slow]


def run_demo(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`flowmon demo ARGS` to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flowmon_cli.main", "demo", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until_prometheus(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, list[str]]:
    """Lines until `Prometheus: URL` (everything is started by then); returns the URL and the lines."""
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("demo ended early:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("Prometheus: "):
            return line.split()[1], lines
    raise AssertionError("demo did not start in time:\n" + "".join(lines))


def query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5
    ) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def demo_processes() -> list[str]:
    """Command lines of any process the demo starts (agents, Prometheus, pod workloads)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if (
            "flowmon_lab.demo.trafficgen" in cmdline
            or f"--conntrack-netns {scenario.PREFIX}-sw" in cmdline
            or ("prometheus" in cmdline and "flowmon-demo-" in cmdline)
            or ("flowmon_cli.main demo" in cmdline and "--cleanup" not in cmdline)
        ):
            found.append(cmdline)
    return found


def assert_nothing_left(lines: list[str] = ()) -> None:
    assert minicluster.list_netns(scenario.PREFIX) == [], "".join(lines)
    wait_for_state(lambda: demo_processes() == [])  # killed by the parent-death signal: a moment
    assert not state.STATE_FILE.exists()
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("flowmon-demo-*")]
    # The host's own tables were never touched: kube-proxy's chains exist only in the node netns.
    host_nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert "KUBE-SVC" not in host_nat


@pytest.fixture
def no_demo_running(require_root):
    assert demo_processes() == [], "another demo is running"
    yield
    run_demo("--cleanup")


def wait_for(url: str, expr: str, check, deadline: float) -> list[dict]:
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = query(url, expr)
        if result and check(result):
            return result
        time.sleep(1)
    raise AssertionError(f"{expr}: {result}")


def client(r: dict, workload: str) -> bool:
    return f"{r['metric'].get('client_namespace')}/{r['metric'].get('client_workload')}" == workload


def pair(r: dict, client: str, server: str) -> bool:
    return pair_of(r) == (client, server)


def pair_of(r: dict) -> tuple[str, str]:
    m = r["metric"]
    return (
        f"{m.get('client_namespace')}/{m.get('client_workload')}",
        f"{m.get('server_namespace')}/{m.get('server_workload')}",
    )


HEADLESS_SECONDS = 60


def test_headless_demo_answers_its_queries_and_leaves_nothing(no_demo_running) -> None:
    proc = start_demo("--no-ui", "--duration", str(HEADLESS_SECONDS))
    try:
        url, lines = read_until_prometheus(proc)
        deadline = time.monotonic() + HEADLESS_SECONDS - 10  # the whole run but its summary: no fixed speed
        by_query = dict((what, expr) for what, expr in scenario.QUERIES)
        bytes_query = "bytes/s per workload pair (service map)"

        def rtt_for_every_pair_with_bytes(rs: list[dict]) -> bool:
            """Every connection gives an srtt sample at close (the sock_ops program), and the demo's
            connections are one request each: every pair that moved bytes in the last minute has an RTT."""
            with_rtt = {pair_of(r) for r in rs if r["value"][1] not in ("NaN", "0")}
            with_bytes = {pair_of(r) for r in query(url, by_query[bytes_query]) if float(r["value"][1]) > 0}
            return bool(with_bytes) and with_bytes <= with_rtt

        checks = {
            bytes_query: lambda rs: (
                any(pair(r, "shop/frontend", "payments/api") and float(r["value"][1]) > 0 for r in rs)
                and any(pair(r, "shop/frontend", "shop/cart") for r in rs)
            ),
            "failed connects (the broken dependency)": lambda rs: any(
                pair(r, "shop/cart", "shop/recommendations") and r["metric"]["reason"] == "refused"
                for r in rs
            ),
            "retransmitted segments (the lossy link)": lambda rs: any(
                pair(r, "payments/settlement", "payments/ledger") for r in rs
            ),
            "RTT p99 per pair": rtt_for_every_pair_with_bytes,
            "bytes/s between zones (cost)": lambda rs: any(
                r["metric"].get("client_zone") != r["metric"].get("server_zone") for r in rs
            ),
            "staging → prod connections (isolation)": lambda rs: any(
                pair(r, "shop-staging/frontend", "payments/api") and float(r["value"][1]) >= 1 for r in rs
            ),
            "DNS requests/s per client workload and answer code": lambda rs: (
                any(client(r, "shop/catalog") and r["metric"]["rcode"] == "NXDOMAIN" for r in rs)
                and any(client(r, "shop/frontend") and r["metric"]["rcode"] == "NOERROR" for r in rs)
            ),
            "DNS p99 latency per client workload": lambda rs: any(
                client(r, "payments/settlement") and r["value"][1] != "NaN" for r in rs
            ),
            "bytes/s to external services, by DNS name (cost)": lambda rs: any(
                r["metric"].get("server_dns_name") == scenario.PROVIDER_NAME and float(r["value"][1]) > 0
                for r in rs
            ),
        }
        assert set(checks) == set(by_query), "every printed query is checked"
        for what, check in checks.items():
            wait_for(url, by_query[what], check, deadline)
        # The rendered rules run: the single forbidden connection fires the isolation alert.
        wait_for(
            url,
            'ALERTS{alertname="FlowmonIsolationViolation",alertstate="firing"}',
            lambda rs: any(pair(r, "shop-staging/frontend", "payments/api") for r in rs),
            deadline,
        )
        # Every agent is scraped over TLS with the token, for every monitor.
        up = query(url, "up")
        assert len(up) == 2 * 4 and all(r["value"][1] == "1" for r in up), up
        out, _ = proc.communicate(timeout=90)
        lines.append(out)
        assert proc.returncode == 0, "".join(lines)
        assert "totals per workload pair" in out and "nothing of the demo remains" in out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    assert_nothing_left(lines)


def test_second_demo_refuses_and_cleanup_after_a_killed_demo(no_demo_running) -> None:
    proc = start_demo("--no-ui", "--duration", "120")
    try:
        _, lines = read_until_prometheus(proc)
        assert len(minicluster.list_netns(scenario.PREFIX)) == 1 + 15
        assert state.STATE_FILE.exists()
        # A second demo refuses instead of tearing down the running one.
        second = run_demo("--no-ui")
        assert second.returncode == 1 and "another demo is running" in second.stderr
        assert len(minicluster.list_netns(scenario.PREFIX)) == 1 + 15
        proc.kill()  # SIGKILL: no teardown runs
        proc.wait(timeout=10)
        assert minicluster.list_netns(scenario.PREFIX), "the netns outlive a killed demo"
        done = run_demo("--cleanup", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "network namespaces" in done.stdout
    finally:
        proc.kill()
    assert_nothing_left(lines)
    again = run_demo("--cleanup")
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_demo_refuses_clearly_without_root() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.setuid(65534); from flowmon_cli import main; main.main(['demo'])",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "needs root" in done.stderr


def test_live_view_in_a_terminal(no_demo_running) -> None:
    """The default path of `make demo`: a terminal, the live table redrawn until --duration."""
    import pty
    import re

    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowmon_cli.main", "demo", "--duration", "14"],
        cwd=ROOT,
        stdin=child,
        stdout=child,
        stderr=child,
        env={**os.environ, "COLUMNS": "180", "LINES": "40", "TERM": "xterm"},
    )
    os.close(child)
    output = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    proc.wait(timeout=30)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert proc.returncode == 0, text[-3000:]
    assert "workload pairs" in text and "conns/s" in text
    # Rates appear once two refreshes happened: the steady calls to payments/api through the Service.
    pattern = r"shop/frontend\s*│\s*payments/api via api\s*│\s*tcp\s*│\s*[0-9.]+ KiB/s"
    assert re.search(pattern, text), text[-3000:]
    assert "nothing of the demo remains" in text
    assert_nothing_left()


def test_ctrl_c_ends_the_demo_early_and_removes_everything(no_demo_running) -> None:
    proc = start_demo("--no-ui", "--duration", "120")
    try:
        _, lines = read_until_prometheus(proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        out, _ = proc.communicate(timeout=60)  # well before its --duration: it ended early
        lines.append(out)
        assert proc.returncode == 0, "".join(lines)
        assert "nothing of the demo remains" in out
    finally:
        proc.kill()
    assert_nothing_left(lines)
