"""Environment isolation in the agent: which environment a namespace is in, which flows break a forbidden
pair, and the per-monitor counters the exporter shows.

Prometheus does not know namespace labels, so the agent decides: every poll (1 s) it classifies the
flows that grew and adds their connection attempts and bytes to
`flowmon_isolation_violations_total` / `flowmon_isolation_violation_bytes_total` of the monitor whose
`spec.alerting.isolation` forbids them. A violation is visible at the next scrape, without waiting for
rule evaluation; the PrometheusRule (flowmon_operator.rules) alerts on it.

Integration (aggregation): keep one `IsolationCounter` per monitor next to its series state (start a
new one when the monitor's `isolation` changes); for each update the monitor sees, call
`counter.add(...)` with the delta's attempts (opened + refused + timeout) and bytes (sent + received);
append `counter.families()` to the monitor's view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flowmon_agent.aggregation.view import Family, LabelValues
from flowmon_contract.alerting import IsolationAlerting
from flowmon_contract.metrics import (
    ISOLATION_LABEL_NAMES,
    OVERFLOW_VALUE,
    VIOLATION_BYTES,
    VIOLATIONS,
)
from flowmon_contract.selectors import selector_matches

NamespaceLabels = Callable[[str], Mapping[str, str] | None]


def environment_of(isolation: IsolationAlerting, labels: Mapping[str, str] | None) -> str | None:
    """The first environment (in spec order) whose namespace selector matches; None for no namespace."""
    if labels is None:
        return None
    return next(
        (env.name for env in isolation.environments if selector_matches(env.namespace_selector, labels)), None
    )


def violation(
    isolation: IsolationAlerting,
    client_namespace: str,
    server_namespace: str,
    namespace_labels: NamespaceLabels,
) -> tuple[str, str] | None:
    """(from_env, to_env) when a flow between these namespaces is forbidden, else None. Ends outside any
    namespace (nodes, external addresses) belong to no environment."""
    if not isolation.forbidden or not client_namespace or not server_namespace:
        return None
    client_env = environment_of(isolation, namespace_labels(client_namespace))
    server_env = environment_of(isolation, namespace_labels(server_namespace))
    if client_env is None or server_env is None:
        return None
    if any(p.from_ == client_env and p.to == server_env for p in isolation.forbidden):
        return client_env, server_env
    return None


@dataclass(slots=True)
class IsolationCounter:
    """One monitor's cumulative violation counters (monotonic; never expired: violations are rare and
    each one matters). Beyond `max_series` pairs, new ones fold into an overflow pair per env pair."""

    isolation: IsolationAlerting
    max_series: int = 2000
    totals: dict[LabelValues, list[int]] = field(default_factory=dict)  # labels → [attempts, bytes]

    def add(
        self,
        client: tuple[str, str],
        server: tuple[str, str],
        *,
        attempts: int,
        bytes_: int,
        namespace_labels: NamespaceLabels,
    ) -> LabelValues | None:
        """Count one flow's growth; client/server are (namespace, workload). Returns the labels counted."""
        if not attempts and not bytes_:
            return None
        envs = violation(self.isolation, client[0], server[0], namespace_labels)
        if envs is None:
            return None
        labels = (*envs, *client, *server)
        if labels not in self.totals and len(self.totals) >= self.max_series:
            labels = (*envs, *(OVERFLOW_VALUE,) * 4)
        total = self.totals.setdefault(labels, [0, 0])
        total[0] += attempts
        total[1] += bytes_
        return labels

    def families(self) -> tuple[Family, ...]:
        if not self.isolation.forbidden:
            return ()
        return (
            Family(
                VIOLATIONS, ISOLATION_LABEL_NAMES, samples={k: float(v[0]) for k, v in self.totals.items()}
            ),
            Family(
                VIOLATION_BYTES,
                ISOLATION_LABEL_NAMES,
                samples={k: float(v[1]) for k, v in self.totals.items()},
            ),
        )
