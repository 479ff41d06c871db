"""A real Prometheus (Debian's /usr/bin/prometheus) on 127.0.0.1 with a temp config and data dir."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusProcess:
    """`with PrometheusProcess(tmp, scrape_configs) as prom:` — killed and waited for on exit."""

    def __init__(self, directory: Path, scrape_configs: list[dict], *, interval: str = "1s") -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": scrape_configs,
        }
        self.proc: subprocess.Popen | None = None
        self.log = directory / "prometheus.log"

    def __enter__(self) -> PrometheusProcess:
        config = self.directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc and self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log.read_text()}")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.load(resp)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_query(self, expr: str, want: str, timeout: float = 30) -> list[dict]:
        """Poll an instant query until one result has the value `want` (bounded by timeout)."""
        deadline, result = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if any(r["value"][1] == want for r in result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr} never became {want}: last {result}; targets {self.targets()}")

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]


def scrape_job(name: str, port: int, path: str, *, ca_file: Path, token_file: Path) -> dict:
    """A scrape job as a ServiceMonitor would render it: HTTPS, our CA, a bearer token from a file."""
    return {
        "job_name": name,
        "scheme": "https",
        "metrics_path": path,
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
        "tls_config": {"ca_file": str(ca_file), "server_name": "localhost", "min_version": "TLS12"},
        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
    }
