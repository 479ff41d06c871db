"""Pure: what a FlowMonitor's status says, from the spec's validity and the agents' reports.

Conditions (types and their meaning are defined with the CRD's status model, flowmon_operator.crd):
Ready (objects exist and the policy runs), PolicyApplied (every ready agent runs the current policy),
Degraded (something works only partly), Scraped (a Prometheus reads the monitor's path, as the agents
saw it). lastTransitionTime changes only when a condition's status does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from flowmon_contract.model_base import duration_seconds
from flowmon_contract.policy import AgentPolicy
from flowmon_operator.crd import FlowMonitorStatus, agent_counts
from flowmon_operator.push import AgentReport


@dataclass(frozen=True)
class Agents:
    desired: int
    ready: int
    in_sync: int
    failed: tuple[str, ...] = ()  # "pod: error" of ready agents that did not answer or refused


def runs_monitor(
    current: AgentPolicy, key: str, known: Mapping[str, AgentPolicy]
) -> Callable[[str | None], bool]:
    """Whether an agent reporting a policy hash runs this monitor's current policy: it runs the current
    policy, or an earlier one (known by its hash) whose entry for this monitor is the same. So one team's
    change that has not reached an agent yet does not put another team's monitor out of sync."""
    wanted = current.monitor(*key.split("/", 1))

    def runs(policy_hash: str | None) -> bool:
        if policy_hash is None:
            return False
        if policy_hash == current.hash:
            return True
        earlier = known.get(policy_hash)
        return earlier is not None and wanted is not None and earlier.monitor(*key.split("/", 1)) == wanted

    return runs


def count_agents(reports: Iterable[AgentReport], desired: int, runs: Callable[[str | None], bool]) -> Agents:
    """desired: the DaemonSet's count (or the pods that exist, when more); in_sync: ready agents for which
    `runs(reported hash)` holds."""
    reports = list(reports)
    ready = [r for r in reports if r.ready]
    return Agents(
        desired=max(desired, len(reports)),
        ready=len(ready),
        in_sync=sum(runs(r.policy_hash) for r in ready),
        failed=tuple(f"{r.pod}: {r.error}" for r in ready if r.error),
    )


@dataclass(frozen=True)
class Scrapes:
    """What the ready agents that answered say about one monitor's path."""

    answered: int  # ready agents that told the operator this round
    seconds_ago: float | None  # since the most recent scrape on any of them; None: never (since they started)


def last_scraped(reports: Iterable[AgentReport], key: str) -> Scrapes:
    answered = [r.scraped_seconds_ago for r in reports if r.ready and r.scraped_seconds_ago is not None]
    ages = [seen[key] for seen in answered if key in seen]
    return Scrapes(len(answered), min(ages) if ages else None)


STALE_SCRAPES = 4  # a path not scraped for this many intervals (and at least two minutes) is not scraped


def scrape_condition(scrapes: Scrapes, interval: str, service_monitor: str) -> tuple[bool, str, str] | None:
    """The Scraped condition; None when no agent answered (nothing new is known: it stays as it was).
    Messages do not carry times, so a steady state writes nothing."""
    if scrapes.answered == 0:
        return None
    window = max(120, round(STALE_SCRAPES * duration_seconds(interval)))
    if scrapes.seconds_ago is not None and scrapes.seconds_ago <= window:
        return True, "Scraped", f"a Prometheus scraped this monitor's path within the last {window}s"
    hint = (
        f"check that a Prometheus selects ServiceMonitor {service_monitor} (its labels come from "
        "spec.scrape.serviceMonitorLabels; the Prometheus' serviceMonitorNamespaceSelector must include "
        "this namespace) and may discover the agents' endpoints in the operator's namespace "
        "(manifests/prometheus-discovery; docs/operator.md, Prometheus)"
    )
    if scrapes.seconds_ago is None:
        return False, "NotScraped", f"no Prometheus has scraped this monitor on any agent yet: {hint}"
    return False, "ScrapesStopped", f"no Prometheus has scraped this monitor for over {window}s: {hint}"


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """Each error as `field.path: message`, e.g. `spec.aggregation.maxSeries: Input should be ...`."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(p) for p in (*((prefix,) if prefix else ()), *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def set_condition(
    conditions: Sequence[Mapping],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[dict]:
    """Replace one condition, keeping lastTransitionTime when its status did not change."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == value else now
    condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    kept = [dict(c) for c in conditions if c.get("type") != type_]
    order = {"Ready": 0, "PolicyApplied": 1, "Degraded": 2, "Scraped": 3}
    return sorted([*kept, condition], key=lambda c: order.get(c["type"], 9))


def _checked(status: dict) -> dict:
    """The status must fit the CRD's status schema (the same pydantic model generates it)."""
    return FlowMonitorStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True)


def running_status(
    previous: Mapping,
    *,
    generation: int | None,
    agents: Agents,
    policy_hash: str,
    predicted_series: int,
    now: str,
    notes: Sequence[str] = (),
    start_failures: Sequence[str] = (),
    scraped: Scrapes | None = None,
    scrape_interval: str = "15s",
    service_monitor: str = "",
) -> dict:
    """Status of a valid monitor whose policy has been compiled and pushed; `notes` are children that
        could not be created (e.g. the Prometheus Operator CRDs are missing), `start_failures` why agents do
        not start (push.start_failure: the agent's one-line cause from its termination message), `scraped`
    what the agents saw of Prometheus scraping the monitor's path."""
    why = "; ".join(start_failures)[:1500]  # a condition's message stays readable in `kubectl get -o wide`
    short = policy_hash[:12]
    counts = f"{agents.in_sync} of {agents.ready} ready agents ({agents.desired} desired) run policy {short}"
    if agents.ready == 0:
        ready = (
            False,
            "NoAgentsReady",
            f"no agent is ready yet ({agents.desired} desired)" + (f": {why}" if why else ""),
        )
    elif agents.in_sync == 0:
        ready = (False, "PolicyNotApplied", counts)
    else:
        ready = (True, "Reconciled", counts)
    if agents.ready == 0:
        applied = (False, "NoAgentsReady", counts)
    elif agents.in_sync < agents.ready:
        applied = (False, "AgentsOutOfSync", counts)
    else:
        applied = (True, "AllAgentsInSync", counts)
    if notes:
        degraded = (True, "ChildrenNotApplied", "; ".join(notes))
    elif agents.failed:
        degraded = (True, "AgentsOutOfSync", "; ".join(agents.failed)[:2000])
    elif agents.in_sync < agents.ready:
        degraded = (True, "AgentsOutOfSync", counts)
    elif agents.ready < agents.desired:
        not_ready = f"{agents.ready} of {agents.desired} agents are ready" + (f": {why}" if why else "")
        degraded = (True, "AgentsNotReady", not_ready)
    else:
        degraded = (False, "AsExpected", counts)
    conditions = list(previous.get("conditions") or [])
    scrape = scrape_condition(scraped, scrape_interval, service_monitor) if scraped is not None else None
    for type_, (value, reason, message) in (
        ("Ready", ready),
        ("PolicyApplied", applied),
        ("Degraded", degraded),
        *((("Scraped", scrape),) if scrape is not None else ()),
    ):
        conditions = set_condition(conditions, type_, value, reason, message, now=now, generation=generation)
    status = {
        "observedGeneration": generation,
        "conditions": conditions,
        "agents": agent_counts(agents.desired, agents.ready, agents.in_sync),
        "predictedSeries": predicted_series,
        "policyHash": policy_hash,
    }
    return _checked(status)


def waiting_status(previous: Mapping, *, generation: int | None, reason: str, message: str, now: str) -> dict:
    """Ready=False for `reason` (e.g. cert-manager has not issued the certificate yet); the agents, series
    and policy hash stay as they were: nothing that runs changed."""
    conditions = set_condition(
        list(previous.get("conditions") or []),
        "Ready",
        False,
        reason,
        message[:4000],
        now=now,
        generation=generation,
    )
    kept = {k: v for k, v in previous.items() if k in ("agents", "predictedSeries", "policyHash")}
    return _checked({**kept, "observedGeneration": generation, "conditions": conditions})


def invalid_status(previous: Mapping, *, generation: int | None, message: str, now: str) -> dict:
    """Ready=False naming the invalid fields; everything else stays as it was (nothing that runs changed)."""
    return waiting_status(previous, generation=generation, reason="InvalidSpec", message=message, now=now)


def status_changed(previous: Mapping, new: Mapping) -> bool:
    """Whether writing `new` would change anything we own (no write, no watch event, no churn)."""
    return any(previous.get(key) != value for key, value in new.items())
