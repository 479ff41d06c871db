"""One reconciliation round: every FlowMonitor → the shared agent objects, one monitor's children, a policy
push to the agents, and the status of every monitor. The kopf handlers (flowmon_operator.handlers) call
`sync` and nothing else; the objects come from the pure builders.

Rounds are serialized by one lock: the policy covers all monitors, so two rounds must not interleave.
Each round recomputes everything from the API (level-triggered), which is what makes the timer restore
drift and retry agents that missed a push.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from flowmon_contract.policy import AgentPolicy, MonitorPolicy, canonical_json, compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from flowmon_operator import builders, rules
from flowmon_operator import pki as certs
from flowmon_operator.kube import Conflict, KubeClient, NotFound
from flowmon_operator.labels import monitor_selector
from flowmon_operator.pki import KeyPair
from flowmon_operator.push import AgentPod, AgentReport, PushTarget, agent_nodes, agent_pods, sync_agents
from flowmon_operator.settings import OperatorSettings
from flowmon_operator.status import (
    Agents,
    count_agents,
    invalid_status,
    running_status,
    runs_monitor,
    status_changed,
    validation_message,
    waiting_status,
)

log = logging.getLogger(__name__)
FLOWMONITOR = "FlowMonitor"
CHILD_KINDS = ("ServiceMonitor", "PrometheusRule", "Secret")


@dataclass
class Runtime:
    """What every handler shares (kept in kopf's memo): settings, the API client, the round lock."""

    settings: OperatorSettings
    kube: KubeClient
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tokens: dict[str, str] = field(default_factory=dict)  # monitor key → scrape token (cache)
    policies: dict[str, AgentPolicy] = field(default_factory=dict)  # recent policies by hash
    notes: dict[str, list[str]] = field(default_factory=dict)  # monitor key → children that cannot exist


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    admin_token: str


@dataclass(frozen=True)
class Outcome:
    policy: AgentPolicy | None  # None: no monitor runs, the shared objects are gone
    agents: Agents | None
    problems: dict[str, str]  # monitor key → why its spec is invalid


def monitor_key(body: Mapping) -> str:
    return f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def parse_monitor(body: Mapping) -> FlowMonitor:
    """The boundary: the API object → the validated model (ValidationError names the field path)."""
    return FlowMonitor.model_validate(
        {"metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {})}
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decode(secret: Mapping | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


# --- operator PKI: created once, then reused -------------------------------------------------------------
async def _create_once(kube: KubeClient, obj: dict) -> dict:
    try:
        return await kube.create(obj)
    except Conflict:  # another round (or replica) was first: use theirs
        found = await kube.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"])
        if found is None:
            raise
        return found


class WaitingForCertificate(Exception):
    """cert-manager has not issued the agents' serving certificate yet: nothing can be pushed or scraped."""

    reason = "WaitingForCertificate"


async def cert_manager_ca(rt: Runtime) -> KeyPair:
    """Apply the Certificate; the CA scrapers and the push trust is the issued Secret's ca.crt (cert-manager
    writes it for CA and selfSigned issuers). The operator holds no CA key in this mode."""
    s, ns = rt.settings, rt.settings.operator_namespace
    name = s.serving_cert_secret_name
    try:
        await rt.kube.apply(builders.build_serving_certificate(s))
    except NotFound:
        raise WaitingForCertificate(
            "the cert-manager Certificate CRD (cert-manager.io/v1) is not installed"
        ) from None
    serving = await rt.kube.get("Secret", name, ns)
    ca_pem = _decode(serving, builders.CA_KEY)
    if not ca_pem or not _decode(serving, "tls.crt"):
        raise WaitingForCertificate(
            f"waiting for cert-manager ({s.cert_manager_issuer}) to issue Certificate {ns}/{name} into "
            f"Secret {ns}/{name} with tls.crt and ca.crt"
        )
    return KeyPair(ca_pem, "")


async def ensure_pki(rt: Runtime) -> Pki:
    s, kube, ns = rt.settings, rt.kube, rt.settings.operator_namespace
    if s.cert_manager_issuer:
        return Pki(ca=await cert_manager_ca(rt), admin_token=await ensure_admin_token(rt))
    ca_secret = await kube.get("Secret", s.ca_secret_name, ns)
    ca = KeyPair(_decode(ca_secret, "tls.crt") or "", _decode(ca_secret, "tls.key") or "")
    if not ca.cert_pem or not ca.key_pem:
        if ca_secret is not None:
            await kube.delete("Secret", s.ca_secret_name, ns)
        fresh = certs.generate_ca(f"flowmon-ca.{ns}", validity_days=s.ca_validity_days)
        ca_secret = await _create_once(kube, builders.build_ca_secret(s, fresh))
        ca = KeyPair(_decode(ca_secret, "tls.crt") or "", _decode(ca_secret, "tls.key") or "")
    serving = await kube.get("Secret", s.serving_cert_secret_name, ns)
    cert_pem = _decode(serving, "tls.crt")
    if cert_pem is None or certs.needs_renewal(cert_pem, ca.cert_pem, s.agent_dns_names):
        log.info("issuing the agents' serving certificate")
        pair = certs.issue_serving_cert(ca, s.agent_dns_names, validity_days=s.cert_validity_days)
        await kube.apply(builders.build_serving_cert_secret(s, pair, ca.cert_pem))
    return Pki(ca=ca, admin_token=await ensure_admin_token(rt))


async def ensure_admin_token(rt: Runtime) -> str:
    s, kube = rt.settings, rt.kube
    admin = await kube.get("Secret", s.admin_token_secret_name, s.operator_namespace)
    if _decode(admin, builders.ADMIN_TOKEN_KEY) is None:
        admin = await _create_once(kube, builders.build_admin_token_secret(s, certs.generate_token()))
    return _decode(admin, builders.ADMIN_TOKEN_KEY) or ""


# --- per monitor -------------------------------------------------------------------------------------------
async def ensure_scrape_secret(rt: Runtime, monitor: FlowMonitor, pki: Pki) -> str:
    """The monitor's scrape token: kept from its Secret when there is one, generated otherwise."""
    s = rt.settings
    existing = await rt.kube.get(
        "Secret", builders.scrape_secret_name(s, monitor), monitor.metadata.namespace
    )
    token = (
        _decode(existing, builders.SCRAPE_TOKEN_KEY) or rt.tokens.get(monitor.key) or certs.generate_token()
    )
    await rt.kube.apply(builders.build_scrape_secret(s, monitor, token, pki.ca.cert_pem))
    rt.tokens[monitor.key] = token
    return token


async def apply_children(rt: Runtime, monitor: FlowMonitor, pki: Pki) -> list[str]:
    """Scrape Secret, ServiceMonitor, PrometheusRule; returns notes about children that cannot exist."""
    s, notes = rt.settings, []
    await ensure_scrape_secret(rt, monitor, pki)
    try:
        await rt.kube.apply(
            builders.build_service_monitor(s, monitor, builders.scrape_secret_name(s, monitor))
        )
    except NotFound:
        notes.append("the ServiceMonitor CRD (monitoring.coreos.com/v1) is not installed")
    rule = rules.build_prometheus_rule(monitor)
    try:
        if rule is not None:
            await rt.kube.apply(rule)
        else:  # alerting turned off: the rule goes
            await rt.kube.delete("PrometheusRule", rules.rule_name(monitor), monitor.metadata.namespace)
    except NotFound:
        if rule is not None:
            notes.append("the PrometheusRule CRD (monitoring.coreos.com/v1) is not installed")
    return notes


async def delete_children(rt: Runtime, namespace: str, name: str) -> int:
    """Everything labelled as this monitor's, in its namespace (owner references are only a backup)."""
    deleted = 0
    selector = monitor_selector(namespace, name)
    for kind in CHILD_KINDS:
        try:
            children = await rt.kube.list(kind, namespace, selector)
        except NotFound:  # the kind's CRD is not installed
            continue
        for child in children:
            deleted += await rt.kube.delete(kind, child["metadata"]["name"], namespace)
    rt.tokens.pop(f"{namespace}/{name}", None)
    rt.notes.pop(f"{namespace}/{name}", None)
    return deleted


# --- shared objects ----------------------------------------------------------------------------------------
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


async def delete_shared(rt: Runtime) -> None:
    s = rt.settings
    for kind, name in (
        ("DaemonSet", s.daemonset_name),
        ("Service", s.agent_service_name),
        ("ConfigMap", s.configmap_name),
    ):
        if await rt.kube.delete(kind, name, s.operator_namespace):
            log.info("deleted %s %s/%s: no FlowMonitor is left", kind, s.operator_namespace, name)


@dataclass(frozen=True)
class Fleet:
    """The agents after a push round: what each reports, and how many the DaemonSet wants."""

    reports: tuple[AgentReport, ...]
    desired: int
    pods: tuple[AgentPod, ...] = ()


async def list_agents(rt: Runtime) -> Fleet:
    """The DaemonSet's pods as agents (not yet pushed to), and how many the DaemonSet wants."""
    s = rt.settings
    selector = ",".join(f"{k}={v}" for k, v in sorted(s.agent_labels.items()))
    pods = await rt.kube.list("Pod", s.operator_namespace, selector)
    daemonset = await rt.kube.get("DaemonSet", s.daemonset_name, s.operator_namespace)
    desired = int(((daemonset or {}).get("status") or {}).get("desiredNumberScheduled") or 0)
    return Fleet((), desired, tuple(agent_pods(pods)))


async def push_to_agents(rt: Runtime, policy: AgentPolicy, pki: Pki, agents: Fleet, *, force: bool) -> Fleet:
    s = rt.settings
    target = PushTarget(
        port=s.agent_port,
        server_name=s.agent_service_dns,
        ca_pem=pki.ca.cert_pem,
        token=pki.admin_token,
        timeout=s.push_timeout_seconds,
    )
    reports = await sync_agents(agents.pods, target, canonical_json(policy), policy.hash, force=force)
    for report in reports:
        if report.error:
            log.warning("agent %s missed the policy %s: %s", report.pod, policy.hash[:12], report.error)
    return Fleet(tuple(reports), agents.desired, agents.pods)


# --- the round ---------------------------------------------------------------------------------------------
async def list_monitors(rt: Runtime) -> list[dict]:
    if not rt.namespaces:
        return await rt.kube.list(FLOWMONITOR)
    found: list[dict] = []
    for namespace in rt.namespaces:
        found += await rt.kube.list(FLOWMONITOR, namespace)
    return found


def remember(policies: dict[str, AgentPolicy], policy: AgentPolicy | None, keep: int = 32) -> None:
    """Keep the last few policies by hash: an agent reporting one of them may still run a monitor's
    current part (see status.runs_monitor)."""
    if policy is None:
        return
    policies.pop(policy.hash, None)
    policies[policy.hash] = policy
    while len(policies) > keep:
        del policies[next(iter(policies))]


def merge_policy(fresh: AgentPolicy, carried: list[MonitorPolicy]) -> AgentPolicy:
    """Pure: the freshly compiled monitors plus the last good policy of monitors now invalid."""
    monitors = sorted([*fresh.monitors, *carried], key=lambda m: m.key)
    return AgentPolicy(
        operator_namespace=fresh.operator_namespace, monitors=monitors, agent_nodes=fresh.agent_nodes
    )


async def sync(rt: Runtime, *, trigger: Mapping | None = None, deleting: str | None = None) -> Outcome:
    """Reconcile everything; `trigger` also gets its children applied, `deleting` is left out."""
    trigger_key = monitor_key(trigger) if trigger is not None else None
    async with rt.lock:
        s = rt.settings
        live = [
            b
            for b in await list_monitors(rt)
            if not b["metadata"].get("deletionTimestamp") and monitor_key(b) != deleting
        ]
        valid: dict[str, FlowMonitor] = {}
        problems: dict[str, str] = {}
        for body in live:
            try:
                valid[monitor_key(body)] = parse_monitor(body)
            except ValidationError as exc:
                problems[monitor_key(body)] = validation_message(exc)
        running = await running_policy(rt)
        carried = [
            m for key in problems if running and (m := running.monitor(*key.split("/", 1))) is not None
        ]
        if not valid and not carried:
            await delete_shared(rt)
            await _write_statuses(rt, live, valid, problems, None, None, trigger_key)
            return Outcome(None, None, problems)

        try:
            pki = await ensure_pki(rt)
        except WaitingForCertificate as exc:
            await _write_waiting(rt, live, problems, exc)
            raise
        for key, monitor in valid.items():
            if key == trigger_key:
                rt.notes[key] = await apply_children(rt, monitor, pki)
            elif key not in rt.tokens:
                await ensure_scrape_secret(rt, monitor, pki)
        agents = await list_agents(rt)
        fresh = compile_policy(
            valid.values(),
            operator_namespace=s.operator_namespace,
            token_hashes={key: [token_sha256(rt.tokens[key])] for key in valid},
            agent_nodes=agent_nodes(agents.pods),
        )
        policy = merge_policy(fresh, carried)
        for obj in builders.build_shared_objects(s, policy):
            await rt.kube.apply(obj)
        changed = running is None or running.hash != policy.hash
        if changed:
            log.info("policy %s: %d monitors", policy.hash[:12], len(policy.monitors))
        for known in (running, policy):
            remember(rt.policies, known)
        fleet = await push_to_agents(rt, policy, pki, agents, force=changed)
        await _write_statuses(rt, live, valid, problems, policy, fleet, trigger_key)
        agents = count_agents(fleet.reports, fleet.desired, lambda reported: reported == policy.hash)
        return Outcome(policy, agents, problems)


async def _write_waiting(
    rt: Runtime, live: list[dict], problems: dict[str, str], exc: WaitingForCertificate
) -> None:
    """Valid monitors say why nothing runs yet (Ready=False with the reason); invalid ones keep theirs."""
    for body in live:
        if monitor_key(body) in problems:
            continue
        previous = body.get("status") or {}
        new = waiting_status(
            previous,
            generation=previous.get("observedGeneration"),
            reason=exc.reason,
            message=str(exc),
            now=_now(),
        )
        if status_changed(previous, new):
            await rt.kube.patch_status(
                FLOWMONITOR, body["metadata"]["name"], body["metadata"]["namespace"], new
            )


async def _write_statuses(
    rt: Runtime,
    live: list[dict],
    valid: dict[str, FlowMonitor],
    problems: dict[str, str],
    policy: AgentPolicy | None,
    fleet: Fleet | None,
    trigger_key: str | None,
) -> None:
    """Every live monitor's status, written only when it changes. Only the trigger's observedGeneration
    moves: its children were applied in this round, the others' in their own rounds."""
    now = _now()
    for body in live:
        key = monitor_key(body)
        previous = body.get("status") or {}
        generation = (
            body["metadata"].get("generation") if key == trigger_key else previous.get("observedGeneration")
        )
        if key in problems:
            new = invalid_status(
                previous, generation=body["metadata"].get("generation"), message=problems[key], now=now
            )
        elif policy is not None and fleet is not None:
            runs = runs_monitor(policy, key, rt.policies)
            new = running_status(
                previous,
                generation=generation,
                agents=count_agents(fleet.reports, fleet.desired, runs),
                policy_hash=policy.hash,
                predicted_series=builders.predicted_series(valid[key]),
                now=now,
                notes=rt.notes.get(key, ()),
                start_failures=tuple(p.start_failure for p in fleet.pods if p.start_failure),
            )
        else:
            continue
        if status_changed(previous, new):
            await rt.kube.patch_status(
                FLOWMONITOR, body["metadata"]["name"], body["metadata"]["namespace"], new
            )
