"""The key material kept in the cluster: the operator's CA, the agents' serving certificate, the admin
token (each monitor's scrape token is derived from it: pki.derive_scrape_token). Created once, then
reused (agents and Prometheus trust them); read by name in the operator's namespace only;
the serving certificate is reissued only when `pki.needs_renewal` says so. With cert-manager, the
operator applies a Certificate and trusts the issued Secret's ca.crt instead of keeping a CA.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flowmon_operator import builders, pki
from flowmon_operator.kube import Conflict, KubeClient, NotFound
from flowmon_operator.pki import KeyPair
from flowmon_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


class WaitingForCertificate(Exception):
    """cert-manager has not issued the agents' serving certificate yet: nothing can be pushed or scraped."""

    reason = "WaitingForCertificate"


@dataclass(frozen=True)
class Identity:
    """The operator-wide keys: the CA the push and scrapers trust, the serving certificate (None with
    cert-manager), the admin token."""

    ca: KeyPair
    serving_cert: KeyPair | None
    admin_token: str


def decode(secret: Mapping | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


async def _create_once(kube: KubeClient, obj: dict) -> dict:
    try:
        return await kube.create(obj)
    except Conflict:  # another round (or replica) was first: use theirs
        found = await kube.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"])
        if found is None:
            raise
        return found


async def _cert_manager_ca(kube: KubeClient, s: OperatorSettings) -> KeyPair:
    """Apply the Certificate; the CA is the issued Secret's ca.crt (cert-manager writes it for CA and
    selfSigned issuers). The operator holds no CA key in this mode."""
    ns, name = s.operator_namespace, s.serving_cert_secret_name
    try:
        await kube.apply(builders.build_serving_certificate(s))
    except NotFound:
        raise WaitingForCertificate(
            "the cert-manager Certificate CRD (cert-manager.io/v1) is not installed"
        ) from None
    serving = await kube.get("Secret", name, ns)
    ca_pem = decode(serving, builders.CA_KEY)
    if not ca_pem or not decode(serving, "tls.crt"):
        raise WaitingForCertificate(
            f"waiting for cert-manager ({s.cert_manager_issuer}) to issue Certificate {ns}/{name} into "
            f"Secret {ns}/{name} with tls.crt and ca.crt"
        )
    return KeyPair(ca_pem, "")


async def _own_pki(kube: KubeClient, s: OperatorSettings) -> tuple[KeyPair, KeyPair]:
    ns = s.operator_namespace
    ca_secret = await kube.get("Secret", s.ca_secret_name, ns)
    ca = KeyPair(decode(ca_secret, "tls.crt") or "", decode(ca_secret, "tls.key") or "")
    if not ca.cert_pem or not ca.key_pem:
        if ca_secret is not None:
            await kube.delete("Secret", s.ca_secret_name, ns)
        fresh = pki.generate_ca(f"flowmon-ca.{ns}", validity_days=s.ca_validity_days)
        ca_secret = await _create_once(kube, builders.build_ca_secret(s, fresh))
        ca = KeyPair(decode(ca_secret, "tls.crt") or "", decode(ca_secret, "tls.key") or "")
    serving_secret = await kube.get("Secret", s.serving_cert_secret_name, ns)
    serving = KeyPair(decode(serving_secret, "tls.crt") or "", decode(serving_secret, "tls.key") or "")
    if not serving.key_pem or pki.needs_renewal(serving.cert_pem, ca.cert_pem, s.agent_dns_names):
        log.info("issuing the agents' serving certificate")
        serving = pki.issue_serving_cert(ca, s.agent_dns_names, validity_days=s.cert_validity_days)
        await kube.apply(builders.build_serving_cert_secret(s, serving, ca.cert_pem))
    return ca, serving


async def _admin_token(kube: KubeClient, s: OperatorSettings) -> str:
    admin = await kube.get("Secret", s.admin_token_secret_name, s.operator_namespace)
    if decode(admin, builders.ADMIN_TOKEN_KEY) is None:
        admin = await _create_once(kube, builders.build_admin_token_secret(s, pki.generate_token()))
    return decode(admin, builders.ADMIN_TOKEN_KEY) or ""


async def ensure_identity(kube: KubeClient, s: OperatorSettings) -> Identity:
    """Read the operator's keys from its namespace, creating what is missing (raises
    WaitingForCertificate while cert-manager has not issued the serving certificate)."""
    if s.cert_manager_issuer:
        ca, serving = await _cert_manager_ca(kube, s), None
    else:
        ca, serving = await _own_pki(kube, s)
    return Identity(ca, serving, await _admin_token(kube, s))
