"""The kernel-overhead bench's verdict lines: each target is judged from the run's medians."""

from __future__ import annotations

from bench.kernel_overhead import Result, verdicts


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
        # medians 0.96 and 0.94; the rounds' own differences 1, 1 and 5 points
        "- churn: flowmon +2.0 points below the floor (target <= 2): met (paired per round: +1.0)",
        "- bulk: flowmon +1.0 points below the floor (target <= 2): met (paired per round: +1.0)",
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
        "- churn: agent +3.0 points below the floor (target <= 2): NOT met (paired per round: +3.0)",
        "- keep-alive: agent 0.940 of no tracer (target >= 0.95): NOT met",
        "- churn: agent process 0.050 cores (target <= 0.05): met",
    ]
