"""A real Prometheus process: Debian's /usr/bin/prometheus on 127.0.0.1 with a generated config.

Used by `flowmon demo` and by the tests that check what Prometheus makes of the agents' output. The
config helpers are pure; `Prometheus` owns the process (start, readiness, HTTP API, stop).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import yaml

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


def https_scrape_job(
    name: str,
    path: str,
    targets: Mapping[str, Mapping[str, str]],
    *,
    ca_file: Path,
    token_file: Path,
    interval: str | None = None,
) -> dict:
    """Pure: a scrape job as a ServiceMonitor renders it: HTTPS with our CA, a bearer token from a file.
    `targets`: host:port → the labels its series get (none: only job and instance)."""
    job: dict = {"job_name": name, "scheme": "https", "metrics_path": path}
    if interval is not None:
        job |= {"scrape_interval": interval, "scrape_timeout": interval}
    return job | {
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
        "tls_config": {"ca_file": str(ca_file), "server_name": "localhost", "min_version": "TLS12"},
        "static_configs": [
            {"targets": [address], **({"labels": dict(labels)} if labels else {})}
            for address, labels in targets.items()
        ],
    }


def config(jobs: Iterable[dict], rule_files: Sequence[Path] = (), interval: str = "2s") -> dict:
    """Pure: a whole Prometheus config; scrapes time out within their interval (promtool insists)."""
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": list(jobs),
    }


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on 127.0.0.1, else any free port."""
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
    """`start(cfg)` (returns self); `url`, `query()`, `wait_query()`; `stop()` (idempotent).
    Also a context manager: `with Prometheus(tmp).start(cfg) as prom:` stops it on exit."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = directory / "prometheus.log"

    def start(
        self, cfg: dict, *, preexec_fn: Callable[[], object] | None = None, timeout: float = 60
    ) -> Prometheus:
        if not PROMETHEUS.exists():
            raise RuntimeError(f"{PROMETHEUS} is missing: install Debian's prometheus package (make setup)")
        path = self.directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if problem := promtool_check("config", path):
            raise RuntimeError(f"promtool refuses the Prometheus config: {problem}")
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
                start_new_session=True,  # Ctrl-C reaches the caller, which stops Prometheus in order
                preexec_fn=preexec_fn,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

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

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_query(self, expr: str, want: str, timeout: float = 30) -> list[dict]:
        """Poll an instant query until one result has the value `want` (bounded by timeout)."""
        deadline, result = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if any(r["value"][1] == want for r in result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr} never became {want}: last {result}; targets {self.targets()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
