"""The agent's start checks: which privilege is missing, said in one line with the cause's exit code."""

from __future__ import annotations

import pytest

from flowmon_agent.kernel import preflight
from flowmon_agent.kernel.preflight import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    BPFUnavailableError,
    Cause,
)

STATUS = "Name:\tpython3\nCapEff:\t000000c000001000\nSeccomp:\t2\nSeccomp_filters:\t1\n"


def test_status_parsing():
    assert preflight.effective_capabilities(STATUS) == {CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF}
    assert preflight.seccomp_filtered(STATUS) and not preflight.seccomp_filtered("Seccomp:\t0\n")
    assert preflight.kernel_version("6.18.44-fc-v1300") == (6, 18)
    assert preflight.kernel_version("5.10.0-28-amd64") == (5, 10)


@pytest.mark.parametrize(
    ("caps", "release", "cause", "says"),
    [
        ({CAP_PERFMON, CAP_NET_ADMIN}, "6.1.0", Cause.CAPABILITY, "missing capability CAP_BPF: add BPF"),
        ({CAP_NET_ADMIN}, "6.1.0", Cause.CAPABILITY, "missing capability CAP_BPF and CAP_PERFMON"),
        ({CAP_BPF, CAP_PERFMON}, "5.10.0", Cause.KERNEL, "kernel 5.10.0 is older than 5.11"),
    ],
)
def test_missing_privileges_are_named(caps, release, cause, says):
    with pytest.raises(BPFUnavailableError, match=says) as failure:
        preflight.check_privileges(caps, release, filtered=False)
    assert failure.value.cause == cause


def test_enough_privileges_pass_and_sys_admin_stands_for_both():
    preflight.check_privileges({CAP_BPF, CAP_PERFMON}, "6.1.0", filtered=False)
    preflight.check_privileges({CAP_SYS_ADMIN}, "5.4.0", filtered=False)


def test_a_seccomp_denial_names_the_syscalls(monkeypatch):
    monkeypatch.setattr(preflight, "bpf_denied_by_seccomp", lambda: True)
    monkeypatch.setattr(preflight, "perf_event_open_denied_by_seccomp", lambda: False)
    with pytest.raises(BPFUnavailableError, match=r"the seccomp profile denies bpf\(\) \(EPERM") as failure:
        preflight.check_privileges({CAP_BPF, CAP_PERFMON}, "6.1.0", filtered=True)
    assert failure.value.cause == Cause.SECCOMP == 11


@pytest.mark.root
def test_this_host_allows_everything():
    """Root without a seccomp filter: the probes see the kernel's own answers; raw tracepoints attach."""
    assert not preflight.bpf_denied_by_seccomp() and not preflight.perf_event_open_denied_by_seccomp()
    preflight.check_privileges()
    assert preflight.raw_tracepoint_attaches("tcp_send_reset")
    assert not preflight.raw_tracepoint_attaches("no_such_tracepoint")


def test_report_writes_one_line_to_the_log_and_the_termination_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "TERMINATION_LOG", tmp_path / "termination-log")
    code = preflight.report(BPFUnavailableError("missing capability CAP_BPF: …", Cause.CAPABILITY))
    assert code == 10
    assert capsys.readouterr().err == "flowmon agent: missing capability CAP_BPF: …\n"
    assert (tmp_path / "termination-log").read_text() == "flowmon agent: missing capability CAP_BPF: …\n"
    monkeypatch.setattr(preflight, "TERMINATION_LOG", tmp_path / "no" / "such" / "dir")
    assert preflight.report(BPFUnavailableError("x")) == Cause.BPF_LOAD  # no termination log: just the line


def test_exit_codes_are_distinct_and_the_entrypoint_uses_the_headers_one():
    from tests.schemas import REPO

    assert len({c.value for c in Cause}) == len(Cause) and min(Cause) > 2  # 1, 2: Python's own
    assert f"EXIT_HEADERS={int(Cause.HEADERS)}" in (REPO / "images" / "agent-entrypoint.sh").read_text()
