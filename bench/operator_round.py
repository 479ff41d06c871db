"""The operator's round at scale: 100 FlowMonitors x 500 agents, the per-monitor rounds of before and the
one cluster round of now, side by side.

    .venv/bin/python -m bench.operator_round [--monitors 100] [--agents 500] [--period 30]
        [--steady-periods 2] [--before-ref 321b436] [--only after|before]

Each variant runs the real operator as a process (`python -m flowmon_operator -A`, kopf's event loop),
against the Kubernetes API emulator (tests/kubeapi, in this process) and a process of HTTPS stand-in
agents (bench.agent_standins) on distinct loopback addresses, one port, as push.py addresses agents
(pod IP, the Service's name verified). "before" is the operator package of `--before-ref` (git archive
into a temporary directory, first on PYTHONPATH); "after" is this tree's.

Measured:
- converge: from the operator's start until every agent runs the policy of all monitors;
- steady: HTTPS calls per agent per period (GET + PUT) and new TLS connections per agent per period,
  over `--steady-periods` periods after one period of settling; operator CPU seconds per period;
- edit: `--edits` times, one FlowMonitor's spec changes (0.37 periods apart, so that they land at
  different phases of the periodic round); time until every agent runs the new policy hash (the last
  accepting PUT's monotonic time minus the edit's), and PUTs per agent per edit (counted until one
  period after the last edit converged).
Targets: edit ≤ 5 s; steady ≤ 1 call per agent per period.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.agent_standins import agent_ips, agent_pod
from flowmon_contract.policy import AgentPolicy
from flowmon_lab.prometheus import free_port
from flowmon_operator import builders, pki
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi import KubeAPI, crd_body

ROOT = Path(__file__).resolve().parent.parent
FM = "flowmon.io/v1alpha1"
NS = "flowmon-system"
FIRST_AGENT = "127.77.0.1"
POLL = 0.1  # seconds between looks at the stand-ins' state or the ConfigMap
TEAMS = 10  # monitors are spread over this many namespaces


@dataclass
class Result:
    variant: str
    converge: float | None  # seconds; None: not within the timeout
    steady_calls: float | None  # per agent per period
    steady_connections: float | None
    steady_cpu: float | None  # operator CPU seconds per period
    edits: list[float] | None  # seconds, per edit
    edit_puts: set[float] | None  # PUTs per agent per edit (a set: one element when equal everywhere)


def wait(predicate: Callable[[], object], timeout: float) -> object | None:
    """Poll until `predicate` is truthy (its value) or the time is up (None); bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL)
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def operator_source(ref: str, directory: Path) -> Path:
    """The operator package as it was at `ref`, for PYTHONPATH (it imports the contract of this tree)."""
    archive = subprocess.run(
        ["git", "archive", ref, "operator/flowmon_operator"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory / "operator"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.api = KubeAPI().start()
        self.settings = OperatorSettings(agent_port=free_port())
        self.ips = agent_ips(FIRST_AGENT, args.agents)
        self.control = free_port()

    def close(self) -> None:
        self.api.stop()

    # --- the cluster ---
    def populate(self) -> None:
        api, s = self.api, self.settings
        api.create(yaml.safe_load((ROOT / "crds" / "flowmonitors.flowmon.io.yaml").read_text()))
        api.create(crd_body("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"))
        api.create(crd_body("monitoring.coreos.com", "PrometheusRule", "prometheusrules"))
        for namespace in (NS, *(f"team-{t}" for t in range(TEAMS))):
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        # The operator's identity exists already (it reuses it), so the stand-ins can serve its certificate.
        ca = pki.generate_ca("bench-ca")
        serving = pki.issue_serving_cert(ca, s.agent_dns_names)
        admin = pki.generate_token()
        api.create(builders.build_ca_secret(s, ca))
        api.create(builders.build_serving_cert_secret(s, serving, ca.cert_pem))
        api.create(builders.build_admin_token_secret(s, admin))
        tls = self.work / "tls"
        tls.mkdir()
        for name, text in (
            ("tls.crt", serving.cert_pem),
            ("tls.key", serving.key_pem),
            ("admin-token", admin),
        ):
            (tls / name).write_text(text)
        for i, ip in enumerate(self.ips):
            api.create(agent_pod(i, ip, NS, s.agent_labels))
        for m in range(self.args.monitors):
            meta = {"name": f"monitor-{m}", "namespace": f"team-{m % TEAMS}"}
            api.create({"apiVersion": FM, "kind": "FlowMonitor", "metadata": meta, "spec": {}})

    def policy(self) -> AgentPolicy | None:
        cm = self.api.find("v1", "ConfigMap", self.settings.configmap_name, NS)
        text = ((cm or {}).get("data") or {}).get(builders.POLICY_FILE)
        return AgentPolicy.model_validate_json(text) if text else None

    def agents(self) -> dict[str, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}/state", timeout=10) as response:
            return json.load(response)

    def all_run(self, policy_hash: str) -> dict[str, dict] | None:
        state = self.agents()
        return state if all(a["hash"] == policy_hash for a in state.values()) else None

    # --- one variant ---
    def run(self, variant: str, pythonpath: Path | None) -> Result:
        a, logs = self.args, self.work / variant
        logs.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWMON_")}
        env |= {
            "KUBECONFIG": str(self.api.kubeconfig(logs / "kubeconfig")),
            "FLOWMON_AGENT_PORT": str(self.settings.agent_port),
            "FLOWMON_TIMER_INTERVAL_SECONDS": str(a.period),
            "FLOWMON_PUSH_TIMEOUT_SECONDS": "10",
        }
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            )
        standins = [
            sys.executable, "-m", "bench.agent_standins", "--first", FIRST_AGENT, "--count", str(a.agents),
            "--port", str(self.settings.agent_port), "--tls-dir", str(self.work / "tls"),
            "--control", str(self.control),
        ]  # fmt: skip
        with process(standins, env, logs / "standins.log"):
            if wait(lambda: "ready" in (logs / "standins.log").read_text(), 60) is None:
                raise RuntimeError(f"the stand-in agents did not start: {logs / 'standins.log'}")
            started = time.monotonic()
            with process([sys.executable, "-m", "flowmon_operator", "-A"], env, logs / "operator.log") as op:
                return self._measure(variant, op.pid, started)

    def _measure(self, variant: str, pid: int, started: float) -> Result:
        a = self.args
        result = Result(variant, None, None, None, None, None, None)
        full = wait(
            lambda: (p := self.policy()) is not None and len(p.monitors) == a.monitors and p, a.timeout
        )
        if not full or not wait(lambda: self.all_run(full.hash), a.timeout):
            return result
        result.converge = time.monotonic() - started
        print(
            f"{variant}: every agent runs the policy of {a.monitors} monitors after {result.converge:.1f} s"
        )
        time.sleep(a.period)  # settle: start-up rounds done
        before, cpu_before, t0 = self.agents(), cpu_seconds(pid), time.monotonic()
        time.sleep(a.steady_periods * a.period)
        after, cpu_after, periods = self.agents(), cpu_seconds(pid), (time.monotonic() - t0) / a.period
        calls = sum(
            after[ip]["get"] + after[ip]["put"] - before[ip]["get"] - before[ip]["put"] for ip in after
        )
        connections = sum(after[ip]["connections"] - before[ip]["connections"] for ip in after)
        result.steady_calls = calls / len(after) / periods
        result.steady_connections = connections / len(after) / periods
        result.steady_cpu = (cpu_after - cpu_before) / periods
        print(
            f"{variant}: steady {result.steady_calls:.2f} calls and {result.steady_connections:.2f} new TLS "
            f"connections per agent per period, operator {result.steady_cpu:.2f} CPU s per period"
        )

        edited, latencies = self.agents(), []
        for n in range(a.edits):
            # Spaced by 0.37 periods: the edits land at different phases of the periodic round.
            time.sleep(0.37 * a.period if n else 0)
            latency = self._edit(n)
            if latency is None:
                print(f"{variant}: edit {n} did not reach every agent within {a.timeout:.0f} s")
                return result
            latencies.append(latency)
        result.edits = latencies
        time.sleep(a.period)  # anything else pushed for these edits would come within a period
        final = self.agents()
        result.edit_puts = {(final[ip]["put"] - edited[ip]["put"]) / a.edits for ip in final}
        print(
            f"{variant}: edit → every agent on the new hash in {', '.join(f'{x:.2f}' for x in latencies)} s;"
            f" PUTs per agent per edit {result.edit_puts}"
        )
        return result

    def _edit(self, n: int) -> float | None:
        """Change monitor-n's spec; seconds until every agent runs the new hash (None: not in time)."""
        running, timeout = self.policy(), self.args.timeout
        edit_at = time.monotonic()
        patch = {"spec": {"aggregation": {"maxSeries": 4000 + n}}}
        self.api.patch(FM, "FlowMonitor", f"monitor-{n}", patch, f"team-{n % TEAMS}")
        new = wait(lambda: (p := self.policy()) is not None and p.hash != running.hash and p, timeout)
        done = new and wait(lambda: self.all_run(new.hash), timeout)
        return max(agent["last_put"] for agent in done.values()) - edit_at if done else None


def table(results: list[Result], args: argparse.Namespace) -> str:
    def num(value: float | None, unit: str = "", digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}{unit}"

    rows = [
        f"| | {' | '.join(r.variant for r in results)} | target |",
        f"|---|{'---|' * len(results)}---|",
        f"| converge after start | {' | '.join(num(r.converge, ' s', 1) for r in results)} | |",
        "| edit → every agent on the new hash, median (max) | "
        + " | ".join(
            "—" if not r.edits else f"{statistics.median(r.edits):.2f} s ({max(r.edits):.2f} s)"
            for r in results
        )
        + " | ≤ 5 s |",
        "| PUTs per agent per edit | "
        + " | ".join(
            "—" if r.edit_puts is None else "/".join(f"{x:g}" for x in sorted(r.edit_puts)) for r in results
        )
        + " | 1 |",
        "| HTTPS calls per agent per steady period | "
        + " | ".join(num(r.steady_calls) for r in results)
        + " | ≤ 1 |",
        "| new TLS connections per agent per steady period | "
        + " | ".join(num(r.steady_connections) for r in results)
        + " | |",
        f"| operator CPU s per steady period | {' | '.join(num(r.steady_cpu) for r in results)} | |",
    ]
    head = f"{args.monitors} FlowMonitors x {args.agents} agents, period {args.period:g} s"
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monitors", type=int, default=100)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--period", type=float, default=30.0, help="the operator's round period (s)")
    parser.add_argument("--steady-periods", type=int, default=2)
    parser.add_argument("--edits", type=int, default=5, help="FlowMonitor edits, each timed")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of every wait (s)")
    parser.add_argument("--before-ref", default="321b436", help="git ref of the per-monitor-round operator")
    parser.add_argument("--only", choices=("before", "after"))
    args = parser.parse_args()
    results = []
    for variant in ("before", "after"):
        if args.only not in (None, variant):
            continue
        with tempfile.TemporaryDirectory(prefix=f"flowmon-bench-{variant}-") as tmp:
            work = Path(tmp)
            source = operator_source(args.before_ref, work) if variant == "before" else None
            bench = Bench(args, work)
            try:
                bench.populate()
                results.append(bench.run(variant, source))
            finally:
                bench.close()
    print()
    print(table(results, args))


if __name__ == "__main__":
    main()
