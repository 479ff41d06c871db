"""The foundation works on this host: stdlib not shadowed, CLI wired, BCC loads and maps read back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flowmon_agent.kernel import loader as bpf_loader
from flowmon_agent.kernel.preflight import Cause
from flowmon_cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_operator_is_not_shadowed_from_repo_root() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator, bcc; print(operator.__file__); print(bcc.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(sys.base_prefix) or "/usr/lib/python3" in out[0], out
    assert "site-packages/bcc" not in out[1], "PyPI's unrelated bcc package must never be installed"


def test_cli_lists_all_subcommands() -> None:
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert set(subparsers.choices) == {"agent", "operator", "demo", "top", "render", "validate", "map"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "flowmon"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "{agent,operator,demo,top,render,validate,map}" in out.replace(" ", "")


@pytest.mark.root
def test_smoke_bpf_program_loads_and_counts_a_connection() -> None:
    prog = bpf_loader.load_program("smoke.c")
    try:
        before = sum(v.value for v in prog[b"events_seen"].values())
        with socket.socket() as sock:
            sock.settimeout(1)
            with pytest.raises(ConnectionRefusedError):
                sock.connect(("127.0.0.1", 9))  # nothing listens: SYN_SENT then CLOSE
        after = sum(v.value for v in prog[b"events_seen"].values())
        assert after - before >= 2
    finally:
        prog.cleanup()


def test_loader_names_the_cause_when_not_root(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(bpf_loader.BPFUnavailableError, match="needs uid 0") as failure:
        bpf_loader.load_program("smoke.c")
    assert failure.value.cause == Cause.CAPABILITY


def test_loader_names_missing_headers(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nowhere"))
    with pytest.raises(bpf_loader.BPFUnavailableError, match="no kernel headers for kernel") as failure:
        bpf_loader.check_host()
    assert failure.value.cause == Cause.HEADERS
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    assert bpf_loader.kernel_headers() == tmp_path


@pytest.mark.root
def test_loader_names_a_missing_source() -> None:
    with pytest.raises(bpf_loader.BPFUnavailableError, match="not found"):
        bpf_loader.load_program("does-not-exist.c")


@pytest.mark.root
def test_setup_is_idempotent_and_fast() -> None:
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stderr and "creating" not in result.stderr, result.stderr
