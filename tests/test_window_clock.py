"""The clock that opens the srtt sampling window at the start of every epoch."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from flowmon_agent.kernel.window_clock import WindowClock, next_start


def test_next_start_follows_the_period_and_skips_missed_ones() -> None:
    assert next_start(10.0, 1.0, now=10.2) == 11.0
    assert next_start(10.0, 1.0, now=13.7) == 13.7  # stalled for three periods: start now, no burst


def run_clock(period: float, window: float, seconds: float, on_open=None) -> list[tuple[str, float]]:
    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    def record(what: str):
        def call() -> None:
            with lock:
                events.append((what, time.monotonic()))

        return call

    clock = WindowClock(period, window, on_open or record("open"), record("close"))
    clock.start()
    time.sleep(seconds)
    clock.stop()
    after = len(events)
    time.sleep(2 * period)
    assert len(events) == after  # nothing runs once stop() returned
    return events


def test_windows_open_every_period_and_close_a_window_later() -> None:
    events = run_clock(0.1, 0.02, 1.0)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["open", "close"] and 8 <= kinds.count("open") <= 11
    assert all(a != b for a, b in itertools.pairwise(kinds))  # open, close, open, close...
    opens = [t for k, t in events if k == "open"]
    closes = [t for k, t in events if k == "close"]
    assert all(0.015 <= c - o < 0.08 for o, c in zip(opens, closes, strict=False))
    assert all(0.08 < b - a < 0.2 for a, b in itertools.pairwise(opens))


def test_a_window_as_long_as_the_period_never_closes() -> None:
    events = run_clock(0.05, 0.05, 0.5)
    assert {k for k, _ in events} == {"open"} and len(events) >= 5


def test_a_failing_callback_does_not_stop_the_clock() -> None:
    calls = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("attach failed")

    run_clock(0.05, 0.01, 0.4, on_open=boom)
    assert len(calls) >= 4


@pytest.mark.parametrize("period, window", [(0, 0.1), (1, 0), (1, -1)])
def test_period_and_window_must_be_positive(period: float, window: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        WindowClock(period, window, lambda: None, lambda: None)
