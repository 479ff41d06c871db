"""When each monitor's path was last read by a scraper it authorized, on this agent.

The operator asks every agent on each round (the answer to GET/PUT /v1/policy carries
`scrapedSecondsAgo`), so a FlowMonitor's status can say that no Prometheus has scraped it yet: the usual
sign of a ServiceMonitor that no Prometheus selects. Ages, not timestamps: the agent's monotonic clock,
so the nodes' wall clocks need not agree with the operator's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection


class ScrapeLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}  # monitor key → clock at its last served scrape

    def served(self, key: str) -> None:
        self._last[key] = self._clock()

    def seconds_ago(self, keys: Collection[str]) -> dict[str, float]:
        """Ages of the last scrape of these monitors (the running policy's); others are forgotten."""
        now = self._clock()
        self._last = {key: at for key, at in self._last.items() if key in keys}
        return {key: round(now - at, 1) for key, at in self._last.items()}
