"""The operator's own small PKI: a CA, the agents' serving certificate, scrape/admin tokens.

PEM strings in, PEM strings out (they go into Secrets); `cryptography` does the work. ECDSA P-256 keys:
fast to generate at operator start and accepted by Prometheus, Go and Python TLS stacks.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = dt.timedelta(minutes=5)  # valid a little before "now": nodes' clocks differ


class KeyPair(NamedTuple):
    cert_pem: str
    key_pem: str


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def generate_ca(common_name: str, *, validity_days: int = 3650, now: dt.datetime | None = None) -> KeyPair:
    """A self-signed CA that may sign only end-entity certificates (path length 0)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now(now) - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def issue_serving_cert(
    ca: tuple[str, str],
    dns_names: Iterable[str],
    ips: Iterable[str] = (),
    *,
    validity_days: int = 365,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A TLS server certificate for the agents, signed by `ca` (cert_pem, key_pem)."""
    ca_cert = x509.load_pem_x509_certificate(ca[0].encode())
    ca_key = serialization.load_pem_private_key(ca[1].encode(), password=None)
    dns = list(dict.fromkeys(dns_names))
    if not dns:
        raise ValueError("a serving certificate needs at least one DNS name")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    key = _new_key()
    start = _now(now) - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=validity_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def generate_token() -> str:
    """A bearer token with 256 bits of randomness, URL-safe (goes into Secrets and HTTP headers)."""
    return secrets.token_urlsafe(32)


def derive_scrape_token(admin_token: str, monitor_key: str, uid: str) -> str:
    """A monitor's scrape token: HMAC-SHA256 of the monitor's key and uid under the admin token, in the
    format of generate_token. The same every round and after a restart, so the operator never reads a
    scrape Secret back (it may not: no cluster-wide Secret reads). Whoever holds the admin token may read
    every path anyway, so deriving from it grants nothing new; a new uid (the monitor recreated) or a new
    admin token gives new tokens."""
    message = f"flowmon.io/scrape-token/v1\n{monitor_key}\n{uid}".encode()
    digest = hmac.new(admin_token.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def cert_dns_names(cert_pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def needs_renewal(
    cert_pem: str,
    ca_cert_pem: str,
    dns_names: Iterable[str],
    *,
    margin: dt.timedelta = dt.timedelta(days=30),
    now: dt.datetime | None = None,
) -> bool:
    """True when a stored serving certificate must be reissued: expiring soon, names changed, or not
    signed by the current CA (e.g. the CA Secret was recreated)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    if cert.not_valid_after_utc - margin <= _now(now):
        return True
    return sorted(set(cert_dns_names(cert_pem))) != sorted(set(dns_names))
