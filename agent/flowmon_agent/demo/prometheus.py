"""A real Prometheus for the demo: Debian's /usr/bin/prometheus on 127.0.0.1, scraping the agents over
TLS with a bearer token, as the operator's ServiceMonitors would, and evaluating the rendered rules."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
PREFERRED_PORT = 9090


@dataclass(frozen=True)
class Target:
    address: str  # host:port of one agent
    node: str


def scrape_job(
    monitor_key: str, path: str, targets: Sequence[Target], *, ca_file: Path, token_file: Path, interval: str
) -> dict:
    """Pure: one monitor's scrape job over every agent, labelled like the ServiceMonitor's relabelings
    (flowmon_monitor, node), so that the rendered alert rules work unchanged."""
    return {
        "job_name": f"flowmon-{monitor_key.replace('/', '-')}",
        "scheme": "https",
        "metrics_path": path,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
        "tls_config": {"ca_file": str(ca_file), "server_name": "localhost", "min_version": "TLS12"},
        "static_configs": [
            {"targets": [t.address], "labels": {"flowmon_monitor": monitor_key, "node": t.node}}
            for t in targets
        ],
    }


def config(jobs: Iterable[dict], rule_files: Sequence[Path] = (), interval: str = "2s") -> dict:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": list(jobs),
    }


def rules_file(prometheus_rules: Iterable[dict]) -> dict:
    """PrometheusRule objects (as the operator renders them) → one Prometheus rules file."""
    return {"groups": [g for rule in prometheus_rules for g in rule["spec"]["groups"]]}


def free_port(preferred: int = PREFERRED_PORT) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prometheus itself binds
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def promtool_check(kind: str, path: Path) -> str | None:
    """None when promtool accepts the file, else its complaint."""
    done = subprocess.run(
        [str(PROMTOOL), "check", kind, str(path)], capture_output=True, text=True, check=False
    )
    return None if done.returncode == 0 else (done.stdout + done.stderr).strip()


class Prometheus:
    """Start with `start(...)`; `url`, `query()`; stop with `stop()` (idempotent)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = directory / "prometheus.log"

    def start(self, cfg: dict, *, preexec_fn=None, timeout: float = 60) -> None:
        if not PROMETHEUS.exists():
            raise RuntimeError(f"{PROMETHEUS} is missing: install Debian's prometheus package (make setup)")
        path = self.directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if problem := promtool_check("config", path):
            raise RuntimeError(f"promtool refuses the demo's Prometheus config: {problem}")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops Prometheus in order
                preexec_fn=preexec_fn,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Prometheus not ready after {timeout:.0f}s: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.load(resp)
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus answered {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
