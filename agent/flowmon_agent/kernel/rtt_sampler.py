"""srtt sampling: tcp:tcp_probe (every received segment, the costliest hook) is attached only while it
is needed.

A socket takes one periodic sample per epoch; the epoch is a counter advanced from user space (the
kernel compares integers instead of reading the clock on every received segment), and tcp_probe is
attached only for a window at the start of each epoch (docs/kernel.md, "Samples"). It stays attached
while pre-existing connections are being adopted and on the compat path, which count at a received
segment. Every connection's srtt at close comes from the sock_ops program (program.py), linked while RTT is
wanted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flowmon_agent.kernel.program import KernelProgram
from flowmon_agent.kernel.window_clock import WindowClock


class RttSampler:
    """Decides when tcp_probe is attached. With `window_clock=False` no thread opens the windows: the
    caller does (`open_window()`, `close_window()`), as tests do to cause exact samples."""

    def __init__(
        self,
        program: KernelProgram,
        set_epoch: Callable[[int], None],
        needed_anyway: Callable[[], bool],
        lock: threading.RLock,
        *,
        interval_ms: int = 1000,
        window_ms: int = 100,
        window_clock: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_ms, self.window_ms = interval_ms, window_ms
        self.always_open = window_ms >= interval_ms
        self._program, self._set_epoch, self._needed_anyway, self._lock = (
            program,
            set_epoch,
            needed_anyway,
            lock,
        )
        self.wanted = True
        self.epoch = 0
        self.in_window = True  # BCC attached tcp_probe with the other programs
        self._stopped = False
        self._clock = (
            WindowClock(
                interval_ms / 1000,
                window_ms / 1000,
                self.open_window,
                self.close_window,
                name="flowmon-rtt-window",
                clock=clock,
            )
            if window_clock
            else None
        )

    @property
    def sampling(self) -> bool:
        """Whether srtt samples are taken (tcp_probe attached, for a window of each epoch or always)."""
        return self.wanted or self._needed_anyway()

    def start(self) -> None:
        if self._clock is not None:
            self._clock.start()

    def stop(self) -> None:
        """No window opens or closes after this returns (call it without holding the lock)."""
        if self._clock is not None:
            self._clock.stop()
        with self._lock:
            self._stopped = True

    def set_wanted(self, wanted: bool) -> None:
        with self._lock:
            self.wanted = bool(wanted)
            self.update()

    def open_window(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.epoch += 1  # before the attach: each socket's first segment in the window is due a sample
            self._set_epoch(self.epoch)
            self.in_window = True
            self.update()

    def close_window(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.in_window = False
            self.update()

    def update(self) -> None:
        """Attach or detach tcp_probe, link or unlink the sock_ops program (srtt at close), as the state
        now asks (the caller holds the lock)."""
        in_window = self.in_window or self.always_open
        self._program.attach_probe((self.wanted and in_window) or self._needed_anyway())
        self._program.link_sockops(self.wanted)
