"""The kernel-overhead bench's verdict lines: each target is judged from the run's medians, and a gap's
verdict is firm only when its bootstrap interval lies on one side of the target."""

from __future__ import annotations

from bench.kernel_overhead import Result, gap_interval, verdicts


def result(ratios: dict[str, list[float]], cpu: dict[str, list[tuple[float, float]]] | None = None) -> Result:
    return Result(ratio=ratios, cpu=cpu or {})


def test_every_target_met_is_said_met() -> None:
    results = {
        "churn": result(
            {"floor": [0.96, 0.90, 0.99], "flowmon": [0.95, 0.89, 0.94]}, {"flowmon": [(0.03, 3.0)]}
        ),
        "keepalive": result({"floor": [0.97], "flowmon": [0.951]}),
        "bulk": result({"floor": [1.0], "flowmon": [0.99]}),
    }
    assert verdicts(results) == [
        "Targets (medians of this run):",
        # medians 0.96 and 0.94; resampled rounds give gaps from 1 to 5 points: not a firm verdict
        "- churn: flowmon +2.0 points below the floor (target <= 2): met"
        " (90% interval +1.0 to +5.0, within noise)",
        "- bulk: flowmon +1.0 points below the floor (target <= 2): met (90% interval +1.0 to +1.0)",
        "- keep-alive: flowmon 0.951 of no tracer (target >= 0.95): met",
        "- churn: flowmon process 0.010 cores (target <= 0.05): met",
    ]


def test_a_missed_target_is_said_not_met_and_absent_modes_are_not_judged() -> None:
    results = {
        "churn": result({"floor": [0.97], "agent": [0.94]}, {"agent": [(0.3, 3.0), (0.0, 3.0)]}),
        "keepalive": result({"floor": [0.97], "agent": [0.94]}),
    }
    assert verdicts(results) == [
        "Targets (medians of this run):",
        "- churn: agent +3.0 points below the floor (target <= 2): NOT met (90% interval +3.0 to +3.0)",
        "- keep-alive: agent 0.940 of no tracer (target >= 0.95): NOT met",
        "- churn: agent process 0.050 cores (target <= 0.05): met",
    ]


def test_the_gap_interval_resamples_whole_rounds() -> None:
    # every round 1 point apart, however far the rounds swing: resampled rounds always give 1 point
    low, high = gap_interval([0.99, 0.90, 0.95, 1.02], [0.98, 0.89, 0.94, 1.01])
    assert (round(low, 6), round(high, 6)) == (1.0, 1.0)
    # one round of nine far off does not move the median: the interval stays on the typical gap
    low, high = gap_interval([0.97] * 9, [0.96] * 8 + [0.80])
    assert (round(low, 6), round(high, 6)) == (1.0, 1.0)
    # rounds that disagree (2 points above the floor, 4 below) span the possible medians: -2, 1 and 4
    low, high = gap_interval([0.97] * 4, [0.99, 0.93, 0.99, 0.93])
    assert (round(low, 6), round(high, 6)) == (-2.0, 4.0)
