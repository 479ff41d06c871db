"""A repeating period that opens a window at its start, run by one daemon thread.

The tracer samples srtt this way: at the start of each sampling epoch it attaches `tcp:tcp_probe` (which
runs on every received segment) and detaches it when the window closes, so the costliest hook runs for a
fraction of the time. Scheduling only: what opening and closing do is the caller's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def next_start(start: float, period_s: float, now: float) -> float:
    """The next period's start after `start`; periods missed while the thread did not run (a suspended
    host, a long stall) are skipped, not run in a burst."""
    following = start + period_s
    return following if following > now else now


class WindowClock:
    """Calls `on_open()` at the start of every period and `on_close()` `window_s` later; a window as
    long as the period never closes (only `on_open()`, once a period). A callback that raises is logged
    and the clock goes on.

    `clock` tells the time and `wait(seconds)` sleeps (False: stop); by default the monotonic clock and
    a wait that stop() interrupts. Tests give both from a fake time and call run() themselves."""

    def __init__(
        self,
        period_s: float,
        window_s: float,
        on_open: Callable[[], None],
        on_close: Callable[[], None],
        *,
        name: str = "window-clock",
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if period_s <= 0 or window_s <= 0:
            raise ValueError(f"period and window must be positive, not {period_s} and {window_s}")
        self.period_s, self.window_s = period_s, window_s
        self.always_open = window_s >= period_s
        self._on_open, self._on_close, self._clock = on_open, on_close, clock
        self._stop = threading.Event()
        self._wait = wait or (lambda seconds: not self._stop.wait(seconds))
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops and waits for the thread: no callback runs after this returns."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _sleep_until(self, at: float) -> bool:
        """False when stopped meanwhile."""
        return not self._stop.is_set() and self._wait(max(0.0, at - self._clock()))

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("%s: callback failed", self._thread.name)

    def run(self) -> None:
        """The clock's loop, until a wait says stop (start() runs it in its thread)."""
        start = self._clock()
        while self._sleep_until(start):
            self._call(self._on_open)
            if not self.always_open:
                if not self._sleep_until(start + self.window_s):
                    return
                self._call(self._on_close)
            start = next_start(start, self.period_s, self._clock())
