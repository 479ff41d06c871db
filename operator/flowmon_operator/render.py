"""Every object the operator would create for a set of FlowMonitors (`flowmon render`, golden tests).

Pure apart from the secret material, which comes from providers: pass fixed ones for a deterministic
output, or leave the defaults, which generate fresh ones as the operator does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import yaml

from flowmon_contract.policy import compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from flowmon_operator import builders, rules
from flowmon_operator import pki as certs
from flowmon_operator.pki import KeyPair
from flowmon_operator.settings import OperatorSettings


def render_all(
    monitors: Iterable[FlowMonitor],
    settings: OperatorSettings | None = None,
    *,
    token_for: Callable[[FlowMonitor], str] = lambda _m: certs.generate_token(),
    ca: KeyPair | None = None,
    serving_cert: KeyPair | None = None,
    admin_token: str | None = None,
) -> list[dict]:
    """Shared objects first (Secrets, ConfigMap, Service, DaemonSet), then per monitor, sorted by
    namespace/name: scrape Secret, ServiceMonitor, PrometheusRule (when alerting is enabled).
    No monitors, no objects: the shared ones exist only while a monitor does.
    With settings.cert_manager_issuer, a cert-manager Certificate replaces the CA and serving-cert Secrets,
    and `ca` is the issuer's CA the scrape Secrets carry (only its cert is used; the operator copies the
    issued Secret's ca.crt when it runs)."""
    settings = settings or OperatorSettings()
    ordered = sorted(monitors, key=lambda m: m.key)
    if not ordered:
        return []
    pki, ca_pem = _pki_objects(settings, ca, serving_cert)
    tokens = {m.key: token_for(m) for m in ordered}
    policy = compile_policy(
        ordered,
        operator_namespace=settings.operator_namespace,
        token_hashes={key: [token_sha256(token)] for key, token in tokens.items()},
    )
    objects = [
        *pki,
        builders.build_admin_token_secret(settings, admin_token or certs.generate_token()),
        *builders.build_shared_objects(settings, policy),
    ]
    for monitor in ordered:
        secret = builders.build_scrape_secret(settings, monitor, tokens[monitor.key], ca_pem)
        objects += [secret, builders.build_service_monitor(settings, monitor, secret["metadata"]["name"])]
        rule = _prometheus_rule(monitor, settings)
        if rule is not None:
            objects.append(rule)
    return objects


def _pki_objects(
    settings: OperatorSettings, ca: KeyPair | None, serving_cert: KeyPair | None
) -> tuple[list[dict], str]:
    """The serving-certificate objects and the CA (PEM) the scrape Secrets carry."""
    if settings.cert_manager_issuer:
        return [builders.build_serving_certificate(settings)], ca.cert_pem if ca else ""
    ca = ca or certs.generate_ca(
        f"flowmon-ca.{settings.operator_namespace}", validity_days=settings.ca_validity_days
    )
    serving_cert = serving_cert or certs.issue_serving_cert(
        ca, settings.agent_dns_names, validity_days=settings.cert_validity_days
    )
    secrets = [
        builders.build_ca_secret(settings, ca),
        builders.build_serving_cert_secret(settings, serving_cert, ca.cert_pem),
    ]
    return secrets, ca.cert_pem


def _prometheus_rule(monitor: FlowMonitor, settings: OperatorSettings) -> dict | None:
    if monitor.metadata.uid:
        return rules.build_prometheus_rule(monitor, settings)
    # Offline render: rules.py insists on an owner uid; render with a stand-in, then drop the owner
    # (a made-up uid in an applied object would make the garbage collector delete it).
    stand_in = monitor.model_copy(update={"metadata": monitor.metadata.model_copy(update={"uid": "render"})})
    rule = rules.build_prometheus_rule(stand_in, settings)
    if rule is not None:
        rule["metadata"].pop("ownerReferences", None)
    return rule


def to_yaml(objects: Iterable[dict]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f -` reads it."""
    return yaml.safe_dump_all(list(objects), sort_keys=False, width=110, explicit_start=True)
