"""The interleaved churn bench's pure parts: reading accepted connections, and each mode slice's ratio to
the no-tracer slices around it."""

from __future__ import annotations

import pytest

from bench.churn_interleaved import bracketed_ratios, main, passive_opens, pooled_verdicts, rounds_from_log
from bench.kernel_overhead import DEFAULT_MODES, PERSISTENT_MODES, Result, verdicts

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 12345
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab
Tcp: 1 200 120000 -1 17 40321 0 2 5
TcpExt: SyncookiesSent PassiveOpens
TcpExt: 0 999
"""


def test_passive_opens_reads_the_tcp_line_not_tcpext() -> None:
    assert passive_opens(SNMP) == 40321


def test_each_mode_slice_is_divided_by_the_mean_of_its_neighbours() -> None:
    # none 100, mode 90, none 80, mode 81, none 82: 90 / 90 and 81 / 81
    assert bracketed_ratios([100.0, 90.0, 80.0, 81.0, 82.0]) == [1.0, 1.0]
    # a drift from 100 to 120 across a mode slice of 99 is a 10% cost, not 1% or 17.5%
    assert bracketed_ratios([100.0, 99.0, 120.0]) == [0.9]


def test_slices_must_start_and_end_without_a_tracer() -> None:
    with pytest.raises(ValueError, match="start and end"):
        bracketed_ratios([100.0, 90.0])


def test_the_steady_agent_is_judged_like_the_agent() -> None:
    results = {
        "churn": Result(ratio={"floor": [0.97], "agent-steady": [0.96]}, cpu={"agent-steady": [(0.03, 3.0)]})
    }
    assert verdicts(results)[1:] == [
        "- churn: agent-steady +1.0 points below the floor (target <= 2): met (90% interval +1.0 to +1.0)",
        "- churn: agent-steady process 0.010 cores (target <= 0.05): met",
    ]


def test_modes_started_per_measurement_cannot_be_interleaved(capsys) -> None:
    # they cannot switch in milliseconds: refused before any namespace or process is made
    with pytest.raises(SystemExit) as exit_info:
        main(["--modes", "floor,agent,tcplife"])
    assert exit_info.value.code == 2
    assert "not ['agent', 'tcplife']" in capsys.readouterr().err
    assert "agent-steady" in PERSISTENT_MODES and "floor" in PERSISTENT_MODES


def test_the_variants_without_sock_ops_or_udp_switch_in_milliseconds_and_run_only_on_demand() -> None:
    for variant in ("flowmon-nosockops", "flowmon-noudp"):
        assert variant in PERSISTENT_MODES and variant not in DEFAULT_MODES


RUN_A = """flowmon agent: compiling and loading the BPF programs (a few seconds)...
chunk 1/2 churn floor=0.980  flowmon=0.950  flowmon=0.990  floor=0.990
chunk 2/2 churn flowmon=0.960  floor=0.970  floor=1.000  flowmon=0.970

| floor | 0.985 |
"""
RUN_B = """chunk 1/1 churn agent-steady=0.940  floor=0.990  flowmon=0.980
"""


def test_a_saved_run_gives_its_rounds_in_order() -> None:
    assert rounds_from_log(RUN_A) == [
        {"floor": 0.98, "flowmon": 0.95},
        {"flowmon": 0.99, "floor": 0.99},
        {"flowmon": 0.96, "floor": 0.97},
        {"floor": 1.0, "flowmon": 0.97},
    ]


def test_a_cycle_without_every_mode_once_is_refused() -> None:
    with pytest.raises(ValueError, match="every mode once"):
        rounds_from_log("chunk 1/1 churn floor=0.98  floor=0.97  flowmon=0.95  flowmon=0.96\n")


def test_pooled_runs_pair_each_mode_with_the_floor_in_the_rounds_that_have_both() -> None:
    lines = pooled_verdicts([RUN_A, RUN_B])
    assert lines[:4] == [
        "Pooled: 5 rounds from 2 runs.",
        "- agent-steady: 1 rounds, 0.940 (0.940-0.940) of no tracer",
        "- floor: 5 rounds, 0.990 (0.975-0.995) of no tracer",
        "- flowmon: 5 rounds, 0.970 (0.955-0.985) of no tracer",
    ]
    # agent-steady only in RUN_B's round: 0.99 - 0.94; flowmon over all five: 0.99 - 0.97
    assert lines[4].startswith("- churn: agent-steady +5.0 points below the floor (target <= 2): NOT met")
    assert lines[5].startswith("- churn: flowmon +2.0 points below the floor (target <= 2): met")
