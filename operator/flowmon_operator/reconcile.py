"""One cluster round: every FlowMonitor → the desired objects (flowmon_operator.desired) applied, the
policy brought to every agent once, every monitor's status written.

Rounds never overlap: flowmon_operator.rounds runs them one at a time, for the monitors kopf reported
(create, update, resume, deleted) or periodically for the whole cluster (drift, agents that missed a
push). Each round recomputes from the API (level-triggered). A problem of one monitor (an invalid spec,
a child or status the API refuses) goes into that monitor's status and the round's report, and never
stops the other monitors.

FlowMonitors carry no finalizer: a monitor's children live in its namespace and are owned by it, so the
garbage collector removes them; the next round drops it from the policy (and, with the last monitor,
deletes the shared objects). Nothing waits for the operator, so an uninstall never hangs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from flowmon_contract.policy import AgentPolicy, MonitorPolicy, canonical_json
from flowmon_contract.spec import FlowMonitor
from flowmon_operator import builders, rules
from flowmon_operator.desired import DesiredState, KeyMaterial, MonitorObjects, desired_objects
from flowmon_operator.keys import Identity, WaitingForCertificate, ensure_identity
from flowmon_operator.kube import KubeClient, KubeError, NotFound, load_connection
from flowmon_operator.pki import derive_scrape_token
from flowmon_operator.push import AgentChannel, AgentPod, AgentReport, PushTarget, agent_nodes, agent_pods
from flowmon_operator.settings import OperatorSettings
from flowmon_operator.status import (
    count_agents,
    invalid_status,
    last_scraped,
    running_status,
    runs_monitor,
    status_changed,
    validation_message,
    waiting_status,
)

log = logging.getLogger(__name__)
FLOWMONITOR = "FlowMonitor"
APPLY_CONCURRENCY = 8  # monitors whose children are applied at once (the API server works in parallel)

__all__ = ["RoundReport", "Runtime", "WaitingForCertificate", "run_round"]


@dataclass
class Runtime:
    """What rounds share for the operator's life: settings, the API client, the agents' channel, and
    what is remembered between rounds."""

    settings: OperatorSettings
    kube: KubeClient
    agents: AgentChannel
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    applied: set[str] = field(default_factory=set)  # monitors whose children a round applied
    policies: dict[str, AgentPolicy] = field(default_factory=dict)  # recent policies by hash
    notes: dict[str, list[str]] = field(default_factory=dict)  # monitor key → children that cannot exist

    @classmethod
    def connect(cls, settings: OperatorSettings, namespaces: Collection[str] = ()) -> Runtime:
        """The API client from the environment (in-cluster, else $KUBECONFIG) and a fresh agents' channel,
        whose connections outlive a period (reused by the next round) but not the agent server's 75 s."""
        keepalive = min(60.0, max(15.0, 2 * settings.timer_interval_seconds))
        return cls(
            settings,
            KubeClient(load_connection()),
            AgentChannel(keepalive_seconds=keepalive),
            tuple(namespaces),
        )

    async def close(self) -> None:
        await self.agents.close()
        await self.kube.close()


@dataclass(frozen=True)
class Fleet:
    """The agents: what each reports after the push, and how many the DaemonSet wants."""

    pods: tuple[AgentPod, ...]
    desired: int
    reports: tuple[AgentReport, ...] = ()


@dataclass(frozen=True)
class RoundReport:
    policy: AgentPolicy | None  # None: no monitor runs, the shared objects are gone
    fleet: Fleet | None
    problems: Mapping[str, str]  # monitor key → why its spec is invalid (permanent until it changes)
    errors: Mapping[str, str]  # monitor key → what the API refused for it this round (retried)


def monitor_key(body: Mapping) -> str:
    return f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def parse_monitor(body: Mapping) -> FlowMonitor:
    """The boundary: the API object → the validated model (ValidationError names the field path)."""
    return FlowMonitor.model_validate(
        {"metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {})}
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


# --- reading the cluster -----------------------------------------------------------------------------
async def list_monitors(rt: Runtime) -> list[dict]:
    """Live monitors (a monitor being deleted is left out: its delete handler removes its children)."""
    if not rt.namespaces:
        found = await rt.kube.list(FLOWMONITOR)
    else:
        found = [body for ns in rt.namespaces for body in await rt.kube.list(FLOWMONITOR, ns)]
    return [body for body in found if not body["metadata"].get("deletionTimestamp")]


async def running_policy(rt: Runtime) -> AgentPolicy | None:
    s = rt.settings
    cm = await rt.kube.get("ConfigMap", s.configmap_name, s.operator_namespace)
    text = ((cm or {}).get("data") or {}).get(builders.POLICY_FILE)
    if not text:
        return None
    try:
        return AgentPolicy.model_validate_json(text)
    except ValidationError:
        log.warning("the policy ConfigMap holds an invalid policy: it will be replaced")
        return None


async def list_agents(rt: Runtime) -> Fleet:
    """The DaemonSet's pods as agents (not pushed to yet), and how many the DaemonSet wants."""
    s = rt.settings
    selector = ",".join(f"{k}={v}" for k, v in sorted(s.agent_labels.items()))
    pods = await rt.kube.list("Pod", s.operator_namespace, selector)
    daemonset = await rt.kube.get("DaemonSet", s.daemonset_name, s.operator_namespace)
    desired = int(((daemonset or {}).get("status") or {}).get("desiredNumberScheduled") or 0)
    return Fleet(tuple(agent_pods(pods)), desired)


# --- writing -------------------------------------------------------------------------------------------
async def apply_children(rt: Runtime, children: MonitorObjects) -> list[str]:
    """Scrape Secret, ServiceMonitor, PrometheusRule; returns notes about children that cannot exist."""
    notes = []
    await rt.kube.apply(children.scrape_secret)
    try:
        await rt.kube.apply(children.service_monitor)
    except NotFound:
        notes.append("the ServiceMonitor CRD (monitoring.coreos.com/v1) is not installed")
    monitor, rule = children.monitor, children.prometheus_rule
    try:
        if rule is not None:
            await rt.kube.apply(rule)
        else:  # alerting turned off: the rule goes
            await rt.kube.delete("PrometheusRule", rules.rule_name(monitor), monitor.metadata.namespace)
    except NotFound:
        if rule is not None:
            notes.append("the PrometheusRule CRD (monitoring.coreos.com/v1) is not installed")
    return notes


async def operator_namespace_ending(rt: Runtime) -> bool:
    """Whether the operator's namespace is gone or being deleted (an uninstall): then the round writes
    nothing there. The API refuses creates in a terminating namespace, and re-creating what the namespace
    controller has just removed would fight it. A refused read counts as not ending (older RBAC)."""
    try:
        namespace = await rt.kube.get("Namespace", rt.settings.operator_namespace)
    except KubeError as exc:
        log.debug("cannot read the operator's namespace: %s", exc)
        return False
    return namespace is None or bool(namespace["metadata"].get("deletionTimestamp"))


async def delete_shared(rt: Runtime) -> None:
    s = rt.settings
    for kind, name in (
        ("DaemonSet", s.daemonset_name),
        ("Service", s.agent_service_name),
        ("ConfigMap", s.configmap_name),
    ):
        if await rt.kube.delete(kind, name, s.operator_namespace):
            log.info("deleted %s %s/%s: no FlowMonitor is left", kind, s.operator_namespace, name)


async def push_to_agents(
    rt: Runtime, policy: AgentPolicy, identity: Identity, agents: Fleet, *, force: bool
) -> Fleet:
    s = rt.settings
    target = PushTarget(
        port=s.agent_port,
        server_name=s.agent_service_dns,
        ca_pem=identity.ca.cert_pem,
        token=identity.admin_token,
        timeout=s.push_timeout_seconds,
    )
    reports = await rt.agents.sync(agents.pods, target, canonical_json(policy), policy.hash, force=force)
    for report in reports:
        if report.error:
            log.warning("agent %s missed the policy %s: %s", report.pod, policy.hash[:12], report.error)
    return Fleet(agents.pods, agents.desired, tuple(reports))


def remember(policies: dict[str, AgentPolicy], policy: AgentPolicy | None, keep: int = 32) -> None:
    """Keep the last few policies by hash: an agent reporting one of them may still run a monitor's
    current part (see status.runs_monitor)."""
    if policy is None:
        return
    policies.pop(policy.hash, None)
    policies[policy.hash] = policy
    while len(policies) > keep:
        del policies[next(iter(policies))]


# --- the round ---------------------------------------------------------------------------------------------
def _validate(live: list[dict]) -> tuple[dict[str, FlowMonitor], dict[str, str]]:
    valid: dict[str, FlowMonitor] = {}
    problems: dict[str, str] = {}
    for body in live:
        try:
            valid[monitor_key(body)] = parse_monitor(body)
        except ValidationError as exc:
            problems[monitor_key(body)] = validation_message(exc)
    return valid, problems


def _carried(running: AgentPolicy | None, keys: Collection[str]) -> list[MonitorPolicy]:
    """The running policy's part for monitors left out of this round's compile: they keep running."""
    if running is None:
        return []
    return [m for key in sorted(keys) if (m := running.monitor(*key.split("/", 1))) is not None]


async def run_round(rt: Runtime, requested: Collection[str] = (), *, full: bool = False) -> RoundReport:
    """Reconcile the cluster. The children of `requested` monitors are applied (of every monitor when
    `full`, and of any monitor seen for the first time); the policy covers every valid monitor."""
    s = rt.settings
    live = await list_monitors(rt)
    valid, problems = _validate(live)
    _forget_gone(rt, live)
    if await operator_namespace_ending(rt):
        log.info("namespace %s is being deleted: this round writes nothing", s.operator_namespace)
        return RoundReport(None, None, problems, {})
    running = await running_policy(rt)
    if not valid and not _carried(running, problems):
        await delete_shared(rt)
        errors = await _write_statuses(rt, live, problems, {}, None, None, set())
        return RoundReport(None, None, problems, errors)
    try:
        identity = await ensure_identity(rt.kube, s)
    except WaitingForCertificate as exc:
        await _write_waiting(rt, live, problems, exc)
        raise
    errors: dict[str, str] = {}
    to_apply = [key for key in valid if full or key in requested or key not in rt.applied]
    tokens = {
        key: derive_scrape_token(identity.admin_token, key, monitor.metadata.uid or "")
        for key, monitor in valid.items()
    }
    agents = await list_agents(rt)
    keys = KeyMaterial(identity.ca, identity.serving_cert, identity.admin_token, tokens)
    state = desired_objects(
        valid.values(), s, keys, agent_nodes=agent_nodes(agents.pods), carried=_carried(running, problems)
    )
    if state is None:  # not reached: a valid or a carried monitor exists (checked above)
        return RoundReport(None, None, problems, errors)
    for obj in state.shared:
        await rt.kube.apply(obj)
    policy = state.policy
    changed = running is None or running.hash != policy.hash
    if changed:
        log.info("policy %s: %d monitors", policy.hash[:12], len(policy.monitors))
    for known in (running, policy):
        remember(rt.policies, known)
    fleet = await push_to_agents(rt, policy, identity, agents, force=changed)
    # Children after the push: the agents need none of them, and at start there are many to apply.
    applied = await _apply_monitors(rt, state, to_apply, errors)
    rt.applied |= applied
    errors |= await _write_statuses(rt, live, problems, valid, policy, fleet, applied)
    return RoundReport(policy, fleet, problems, errors)


def _forget_gone(rt: Runtime, live: list[dict]) -> None:
    """What the runtime remembers of monitors that no longer exist (deleted: garbage collection took
    their children)."""
    keys = {monitor_key(body) for body in live}
    rt.applied &= keys
    for key in set(rt.notes) - keys:
        del rt.notes[key]


async def _apply_monitors(
    rt: Runtime, state: DesiredState, keys: list[str], errors: dict[str, str]
) -> set[str]:
    """Apply these monitors' children, a few monitors at a time (a full round applies them all), each on
    its own: a refusal goes into `errors` and the monitor's Degraded condition, and the others carry on.
    Returns the monitors whose children are applied."""
    gate = asyncio.Semaphore(APPLY_CONCURRENCY)

    async def apply(key: str) -> str | None:
        async with gate:
            try:
                rt.notes[key] = await apply_children(rt, state.monitors[key])
            except KubeError as exc:
                rt.notes[key] = [f"applying its children: {_short(exc)}"]
                log.warning("FlowMonitor %s: %s", key, rt.notes[key][0])
                return rt.notes[key][0]
            return None

    outcomes = await asyncio.gather(*(apply(key) for key in keys))
    errors.update({key: error for key, error in zip(keys, outcomes, strict=True) if error is not None})
    return {key for key, error in zip(keys, outcomes, strict=True) if error is None}


async def _patch_status(rt: Runtime, body: Mapping, new: dict) -> str | None:
    """Write a status when it changes; the API's refusal is returned, not raised (one monitor's)."""
    if not status_changed(body.get("status") or {}, new):
        return None
    meta = body["metadata"]
    try:
        await rt.kube.patch_status(FLOWMONITOR, meta["name"], meta["namespace"], new)
    except KubeError as exc:
        log.warning("FlowMonitor %s: status not written: %s", monitor_key(body), exc)
        return f"writing its status: {_short(exc)}"
    return None


async def _write_waiting(
    rt: Runtime, live: list[dict], problems: Mapping[str, str], exc: WaitingForCertificate
) -> None:
    """Valid monitors say why nothing runs yet (Ready=False with the reason); invalid ones keep theirs."""
    now = _now()
    for body in live:
        if monitor_key(body) in problems:
            continue
        previous = body.get("status") or {}
        generation = previous.get("observedGeneration")
        new = waiting_status(previous, generation=generation, reason=exc.reason, message=str(exc), now=now)
        await _patch_status(rt, body, new)


async def _write_statuses(
    rt: Runtime,
    live: list[dict],
    problems: Mapping[str, str],
    valid: Mapping[str, FlowMonitor],
    policy: AgentPolicy | None,
    fleet: Fleet | None,
    applied: set[str],
) -> dict[str, str]:
    """Every live monitor's status, written only when it changes. observedGeneration moves for the
    monitors whose children this round applied. Returns the monitors whose status the API refused."""
    now, errors = _now(), {}
    for body in live:
        key = monitor_key(body)
        previous = body.get("status") or {}
        if key in problems:
            generation = body["metadata"].get("generation")
            new = invalid_status(previous, generation=generation, message=problems[key], now=now)
        elif policy is not None and fleet is not None and key in valid:
            applied_now = key in applied
            generation = (
                body["metadata"].get("generation") if applied_now else previous.get("observedGeneration")
            )
            new = running_status(
                previous,
                generation=generation,
                agents=count_agents(fleet.reports, fleet.desired, runs_monitor(policy, key, rt.policies)),
                scraped=last_scraped(fleet.reports, key),
                scrape_interval=valid[key].spec.scrape.interval,
                service_monitor=builders.service_monitor_name(rt.settings, valid[key]),
                policy_hash=policy.hash,
                predicted_series=builders.predicted_series(valid[key]),
                now=now,
                notes=rt.notes.get(key, ()),
                start_failures=tuple(p.start_failure for p in fleet.pods if p.start_failure),
            )
        else:
            continue
        if (error := await _patch_status(rt, body, new)) is not None:
            errors[key] = error
    return errors
