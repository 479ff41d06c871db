"""The clock that opens the srtt sampling window at the start of every epoch: its schedule on a fake time
(exact, no wall-clock luck), and its thread stopping for good."""

from __future__ import annotations

import threading

import pytest

from flowmon_agent.kernel.window_clock import WindowClock, next_start


def test_next_start_follows_the_period_and_skips_missed_ones() -> None:
    assert next_start(10.0, 1.0, now=10.2) == 11.0
    assert next_start(10.0, 1.0, now=13.7) == 13.7  # stalled for three periods: start now, no burst


class FakeTime:
    """A clock and a wait: each wait moves the time on (plus `lag`, a callback's or a scheduler's delay)
    and says stop once `until` is passed."""

    def __init__(self, until: float, lag: float = 0.0) -> None:
        self.now, self.until, self.lag = 100.0, 100.0 + until, lag

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds + self.lag
        return self.now <= self.until


def run_clock(period: float, window: float, seconds: float, *, lag: float = 0.0, on_open=None):
    time = FakeTime(seconds, lag)
    events: list[tuple[str, float]] = []
    clock = WindowClock(
        period,
        window,
        on_open or (lambda: events.append(("open", round(time.now - 100.0, 6)))),
        lambda: events.append(("close", round(time.now - 100.0, 6))),
        clock=time.clock,
        wait=time.wait,
    )
    clock.run()
    return events


def test_windows_open_every_period_and_close_a_window_later() -> None:
    events = run_clock(1.0, 0.1, 3.5)
    assert events == [
        ("open", 0.0),
        ("close", 0.1),
        ("open", 1.0),
        ("close", 1.1),
        ("open", 2.0),
        ("close", 2.1),
        ("open", 3.0),
        ("close", 3.1),
    ]


def test_a_late_wake_shortens_nothing_and_shifts_no_period() -> None:
    """Each wait returns 5 ms late: windows still open on the period's grid (late by the lag only)."""
    opens = [t for kind, t in run_clock(1.0, 0.1, 3.5, lag=0.005) if kind == "open"]
    assert opens == [0.005, 1.005, 2.005, 3.005]


def test_a_stall_longer_than_a_period_skips_the_missed_windows() -> None:
    opens = [t for kind, t in run_clock(1.0, 0.1, 10.0, lag=2.5) if kind == "open"]
    assert opens == [2.5, 7.5]  # open 2.5, close 5.0: periods 1-4 missed, the next starts then; no burst


def test_a_window_as_long_as_the_period_never_closes() -> None:
    events = run_clock(0.5, 0.5, 2.2)
    assert events == [("open", 0.0), ("open", 0.5), ("open", 1.0), ("open", 1.5), ("open", 2.0)]


def test_a_failing_callback_does_not_stop_the_clock() -> None:
    calls = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("attach failed")

    assert [kind for kind, _ in run_clock(1.0, 0.1, 2.5, on_open=boom)] == ["close"] * 3
    assert len(calls) == 3


def test_stop_ends_the_thread_and_no_callback_runs_after_it() -> None:
    opened, closed = threading.Event(), []
    clock = WindowClock(0.05, 0.01, opened.set, lambda: closed.append(1))
    clock.start()
    assert opened.wait(10)
    clock.stop()
    after = len(closed)
    assert not any(t.name == "window-clock" and t.is_alive() for t in threading.enumerate())
    assert len(closed) == after


@pytest.mark.parametrize("period, window", [(0, 0.1), (1, 0), (1, -1)])
def test_period_and_window_must_be_positive(period: float, window: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        WindowClock(period, window, lambda: None, lambda: None)
