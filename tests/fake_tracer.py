"""A tracer without a kernel, for the runner's logic: it implements the `Tracer` protocol, returns the
snapshots the test gives it, and records every configuration it was given."""

from __future__ import annotations

import threading

from flowmon_agent.kernel.counters import FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, KernelConfig


class FakeTracer:
    def __init__(self, initial: KernelConfig) -> None:
        self.configs: list[KernelConfig] = [initial]  # the constructor's, then every configure()
        self.flows: dict[FlowKey, FlowCounters] = {}
        self.dropped: dict[str, int] = {"socket_table_full": 0}
        self.polls = 0
        self.closed = False
        self._lock = threading.Lock()  # the runner polls from a worker thread

    @property
    def config(self) -> KernelConfig:
        return self.configs[-1]

    def poll(self) -> FlowSnapshot:
        with self._lock:
            if self.closed:
                raise RuntimeError("FakeTracer is closed")
            self.polls += 1
            return FlowSnapshot(dict(self.flows), dict(self.dropped), "fake", float(self.polls))

    def configure(self, config: KernelConfig) -> None:
        with self._lock:
            if config != self.configs[-1]:
                self.configs.append(config)

    def close(self) -> None:
        self.closed = True
