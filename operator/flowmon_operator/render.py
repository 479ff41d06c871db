"""Every object the operator would create for a set of FlowMonitors, offline (`flowmon render`, tests).

The objects are flowmon_operator.desired's, as reconciliation applies them; only the key material differs:
pass fixed keys for a deterministic output, or leave the defaults, which generate fresh ones as the
operator does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import yaml

from flowmon_contract.spec import FlowMonitor
from flowmon_operator import pki
from flowmon_operator.desired import KeyMaterial, desired_objects
from flowmon_operator.pki import KeyPair
from flowmon_operator.settings import OperatorSettings


def render_all(
    monitors: Iterable[FlowMonitor],
    settings: OperatorSettings | None = None,
    *,
    token_for: Callable[[FlowMonitor], str] = lambda _m: pki.generate_token(),
    ca: KeyPair | None = None,
    serving_cert: KeyPair | None = None,
    admin_token: str | None = None,
) -> list[dict]:
    """Identity objects first (PKI and admin-token Secrets), then the shared ones (ConfigMap, Service,
    DaemonSet), then per monitor, sorted by namespace/name: scrape Secret, ServiceMonitor, PrometheusRule
    (when alerting renders one). No monitors, no objects.
    With settings.cert_manager_issuer, a cert-manager Certificate replaces the CA and serving-cert Secrets,
    and `ca` is the issuer's CA the scrape Secrets carry (only its cert is used; the operator copies the
    issued Secret's ca.crt when it runs)."""
    settings = settings or OperatorSettings()
    monitors = list(monitors)
    if not monitors:
        return []
    state = desired_objects(
        monitors, settings, _keys(settings, monitors, token_for, ca, serving_cert, admin_token)
    )
    return state.objects() if state is not None else []


def _keys(
    settings: OperatorSettings,
    monitors: list[FlowMonitor],
    token_for: Callable[[FlowMonitor], str],
    ca: KeyPair | None,
    serving_cert: KeyPair | None,
    admin_token: str | None,
) -> KeyMaterial:
    """The given key material, the missing parts generated as the operator would."""
    tokens = {m.key: token_for(m) for m in monitors}
    admin_token = admin_token or pki.generate_token()
    if settings.cert_manager_issuer:
        return KeyMaterial(ca or KeyPair("", ""), None, admin_token, tokens)
    ca = ca or pki.generate_ca(
        f"flowmon-ca.{settings.operator_namespace}", validity_days=settings.ca_validity_days
    )
    serving_cert = serving_cert or pki.issue_serving_cert(
        ca, settings.agent_dns_names, validity_days=settings.cert_validity_days
    )
    return KeyMaterial(ca, serving_cert, admin_token, tokens)


def to_yaml(objects: Iterable[dict]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f -` reads it."""
    return yaml.safe_dump_all(list(objects), sort_keys=False, width=110, explicit_start=True)
