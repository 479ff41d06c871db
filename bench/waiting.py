"""Waiting for what a benchmark started: a port that accepts, an agent whose /readyz answers 200."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def wait_listening(host: str, port: int, timeout: float = 30.0) -> None:
    """Until a TCP connection to host:port succeeds (in the calling thread's network namespace)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_ready(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Until the agent on 127.0.0.1:port answers /readyz with 200; fails at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent on port {port} not ready within {timeout:g} s")
        time.sleep(0.2)
