"""The operator's PKI: certificates that a real TLS client accepts, renewal decisions, tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
from cryptography import x509

from flowmon_operator import pki as certs
from flowmon_operator.settings import OperatorSettings

NAMES = OperatorSettings().agent_dns_names
CA = certs.generate_ca("flowmon-test-ca")
SERVING = certs.issue_serving_cert(CA, NAMES, ["127.0.0.1"])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def handshake(tmp_path, server_name: str, ca_pem: str) -> str:
    """Serve SERVING on loopback, connect verifying against ca_pem as `server_name`; return the reply."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(
        write(tmp_path, "tls.crt", SERVING.cert_pem), write(tmp_path, "tls.key", SERVING.key_pem)
    )

    async def serve(reader, writer):
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cadata=ca_pem)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=server_name), 5
        )
        data = await reader.read()
        writer.close()
        return data.decode()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("name", NAMES)
def test_a_tls_client_verifies_the_agent_as_every_service_name(tmp_path, name):
    assert asyncio.run(handshake(tmp_path, name, CA.cert_pem)) == "ok"


@pytest.mark.parametrize(
    ("name", "ca_pem"),
    [("evil.example", CA.cert_pem), (NAMES[2], certs.generate_ca("other").cert_pem)],
    ids=["wrong name", "other CA"],
)
def test_a_tls_client_refuses_wrong_names_and_cas(tmp_path, name, ca_pem):
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(handshake(tmp_path, name, ca_pem))


def test_certificate_shapes():
    ca = x509.load_pem_x509_certificate(CA.cert_pem.encode())
    leaf = x509.load_pem_x509_certificate(SERVING.cert_pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    leaf.verify_directly_issued_by(ca)
    assert certs.cert_dns_names(SERVING.cert_pem) == NAMES
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


NOW = dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("cert", "ca", "names", "now", "renew"),
    [
        (SERVING, CA, NAMES, NOW, False),
        (SERVING, CA, list(reversed(NAMES)), NOW, False),  # order does not matter
        (SERVING, CA, [*NAMES, "extra.svc"], NOW, True),  # names changed
        (SERVING, certs.generate_ca("other"), NAMES, NOW, True),  # CA replaced
        (SERVING, CA, NAMES, NOW + dt.timedelta(days=340), True),  # within 30 days of expiry
        (certs.issue_serving_cert(CA, NAMES, validity_days=10), CA, NAMES, NOW, True),
        (certs.KeyPair("not a certificate", ""), CA, NAMES, NOW, True),
    ],
    ids=["fresh", "reordered", "names changed", "other CA", "expiring", "short-lived", "garbage"],
)
def test_needs_renewal(cert, ca, names, now, renew):
    assert certs.needs_renewal(cert.cert_pem, ca.cert_pem, names, now=now) is renew


def test_tokens_are_random_and_long():
    tokens = {certs.generate_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) >= 43 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)


def test_a_serving_certificate_needs_a_name():
    with pytest.raises(ValueError, match="DNS name"):
        certs.issue_serving_cert(CA, [])


def test_scrape_tokens_are_derived_the_same_way_every_time_and_differ_per_monitor():
    admin = certs.generate_token()
    token = certs.derive_scrape_token(admin, "shop/web", "uid-1")
    assert token == certs.derive_scrape_token(admin, "shop/web", "uid-1")  # a restart reads nothing back
    assert len(token) == len(certs.generate_token()) == 43
    others = {
        certs.derive_scrape_token(admin, "shop/api", "uid-1"),  # another monitor
        certs.derive_scrape_token(admin, "shop/web", "uid-2"),  # the monitor deleted and created again
        certs.derive_scrape_token(certs.generate_token(), "shop/web", "uid-1"),  # a new admin token
    }
    assert token not in others and len(others) == 3
