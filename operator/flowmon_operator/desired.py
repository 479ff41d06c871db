"""Pure: every object the operator wants, from the FlowMonitors, the settings and the key material.

One function, `desired_objects`, for both consumers: `flowmon render` prints `DesiredState.objects()`
(with placeholder keys), and each reconciliation round applies `shared` and the monitors' children (with
the keys kept in the cluster; the identity objects are created once by flowmon_operator.keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flowmon_contract.policy import AgentPolicy, MonitorPolicy, compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from flowmon_operator import builders, rules
from flowmon_operator.pki import KeyPair
from flowmon_operator.settings import OperatorSettings


@dataclass(frozen=True)
class KeyMaterial:
    """The secrets the objects carry. `ca` is the CA scrapers and the push trust (with cert-manager only
    its certificate is known); `serving_cert` is None with cert-manager, which issues it."""

    ca: KeyPair
    serving_cert: KeyPair | None
    admin_token: str
    scrape_tokens: Mapping[str, str]  # monitor key → its scrape token


@dataclass(frozen=True)
class MonitorObjects:
    """One monitor's children, in its namespace."""

    monitor: FlowMonitor
    scrape_secret: dict
    service_monitor: dict
    prometheus_rule: dict | None  # None: alerting renders no rule (an existing one must go)

    def objects(self) -> list[dict]:
        return [self.scrape_secret, self.service_monitor, *filter(None, [self.prometheus_rule])]


@dataclass(frozen=True)
class DesiredState:
    policy: AgentPolicy
    identity: tuple[dict, ...]  # CA and serving-cert Secrets (or the Certificate), admin-token Secret
    shared: tuple[dict, ...]  # policy ConfigMap, agent Service, DaemonSet (creation order)
    monitors: Mapping[str, MonitorObjects]  # by monitor key, sorted

    def objects(self) -> list[dict]:
        """Everything, in creation order: identity, shared, then each monitor's children."""
        children = [obj for key in sorted(self.monitors) for obj in self.monitors[key].objects()]
        return [*self.identity, *self.shared, *children]


def merge_policy(fresh: AgentPolicy, carried: Iterable[MonitorPolicy]) -> AgentPolicy:
    """The freshly compiled monitors plus the last good policy of monitors whose spec is now invalid."""
    monitors = sorted([*fresh.monitors, *carried], key=lambda m: m.key)
    return AgentPolicy(
        operator_namespace=fresh.operator_namespace, monitors=monitors, agent_nodes=fresh.agent_nodes
    )


def identity_objects(settings: OperatorSettings, keys: KeyMaterial) -> list[dict]:
    """The operator's identity in its namespace: generated once, kept (agents and scrapers trust it)."""
    if settings.cert_manager_issuer:
        pki = [builders.build_serving_certificate(settings)]
    else:
        if keys.serving_cert is None:
            raise ValueError("without cert-manager the operator issues the serving certificate: pass it")
        pki = [
            builders.build_ca_secret(settings, keys.ca),
            builders.build_serving_cert_secret(settings, keys.serving_cert, keys.ca.cert_pem),
        ]
    return [*pki, builders.build_admin_token_secret(settings, keys.admin_token)]


def monitor_objects(settings: OperatorSettings, monitor: FlowMonitor, keys: KeyMaterial) -> MonitorObjects:
    secret = builders.build_scrape_secret(
        settings, monitor, keys.scrape_tokens[monitor.key], keys.ca.cert_pem
    )
    return MonitorObjects(
        monitor=monitor,
        scrape_secret=secret,
        service_monitor=builders.build_service_monitor(settings, monitor, secret["metadata"]["name"]),
        prometheus_rule=rules.build_prometheus_rule(monitor),
    )


def desired_objects(
    monitors: Iterable[FlowMonitor],
    settings: OperatorSettings,
    keys: KeyMaterial,
    *,
    agent_nodes: Sequence[str] | None = None,
    carried: Iterable[MonitorPolicy] = (),
) -> DesiredState | None:
    """Every object for these (valid) monitors; `carried` are the last good policies of monitors whose
    spec is invalid now (they keep running, without children of their own). `agent_nodes`: nodes with a
    ready agent (None: agents assume every node has one). None when nothing runs: the shared objects
    exist only while a monitor does."""
    ordered = sorted(monitors, key=lambda m: m.key)
    carried = list(carried)
    if not ordered and not carried:
        return None
    fresh = compile_policy(
        ordered,
        operator_namespace=settings.operator_namespace,
        token_hashes={m.key: [token_sha256(keys.scrape_tokens[m.key])] for m in ordered},
        agent_nodes=agent_nodes,
    )
    policy = merge_policy(fresh, carried)
    return DesiredState(
        policy=policy,
        identity=tuple(identity_objects(settings, keys)),
        shared=tuple(builders.build_shared_objects(settings, policy)),
        monitors={m.key: monitor_objects(settings, m, keys) for m in ordered},
    )
