"""Hostile input and bounded resources at the agent's server: every pod can reach it, none may take it down.

Real servers on 127.0.0.1 (other 127/8 addresses as other sources), real TLS clients and raw sockets.
Every wait is bounded; timeouts are configured small so that the tests take seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import ipaddress
import json
import logging
import ssl
import sys
import threading
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from flowmon_agent.export.auth import KubeTokenReviewer
from flowmon_agent.export.review_budget import ReviewLimits
from flowmon_agent.export.server import ServerLimits
from flowmon_agent.main import add_arguments, make_agent
from flowmon_agent.metadata import MetadataStore
from flowmon_agent.metadata.inventory import InventoryError, read_inventory
from flowmon_agent.runner import reload_inventory
from flowmon_operator.pki import issue_serving_cert
from tests.kubeapi.shipped import agent_token as shipped_agent_token
from tests.kubeapi.shipped import install_rbac
from tests.server_rig import ADMIN, SHOP, ServerRig, make_policy
from tests.test_runner import fake_agent
from tests.waiting import WAIT, until


def limits(**fields) -> ServerLimits:
    return ServerLimits(**({"header_timeout": 0.5, "idle_timeout": 30.0} | fields))


async def tls_stream(rig: ServerRig, source: str = "127.0.0.1"):
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1",
            rig.server.port,
            ssl=rig.pki.client_context(),
            server_hostname="localhost",
            local_addr=(source, 0),
        ),
        WAIT,
    )


async def raw_exchange(rig: ServerRig, request: bytes) -> int:
    """Send raw bytes over TLS, return the response's status code (the server answers and closes)."""
    reader, writer = await tls_stream(rig)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), WAIT)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1."), (request[:80], status_line)
    return int(status_line.split()[1])


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closes (EOF or reset) within WAIT; False if it kept the connection open."""
    try:
        async with asyncio.timeout(WAIT):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


# ---- connections held forever ----


@pytest.mark.asyncio
async def test_a_tls_client_stuck_mid_headers_is_closed(tmp_path):
    # the handshake must fit in the header time limit, on a loaded host too
    async with ServerRig(tmp_path, limits=limits(header_timeout=2.0)) as rig:
        reader, writer = await tls_stream(rig)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # and nothing more
        await writer.drain()
        assert await closed_by_server(reader)
        writer.close()
        assert rig.sample("flowmon_agent_http_timeouts_total", phase="header") == 1.0


@pytest.mark.asyncio
async def test_a_client_that_never_finishes_the_tls_handshake_is_closed(tmp_path):
    async with ServerRig(tmp_path, limits=limits(header_timeout=0.5)) as rig:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.server.port)  # TCP, no ClientHello
        assert await closed_by_server(reader)
        writer.close()
        await until(lambda: rig.sample("flowmon_agent_http_tls_handshake_failures_total") == 1.0)
        assert rig.sample("flowmon_agent_http_connections") == 0.0


@pytest.mark.asyncio
async def test_an_idle_keep_alive_connection_is_closed(tmp_path):
    async with ServerRig(tmp_path, limits=limits(header_timeout=5.0, idle_timeout=0.5)) as rig:
        reader, writer = await tls_stream(rig)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"HTTP/1.1 200")
        assert await closed_by_server(reader)  # kept alive, then idle: closed after idle_timeout
        writer.close()


@pytest.mark.asyncio
async def test_connections_over_the_caps_are_refused_and_the_rest_keep_working(tmp_path):
    """Three per source, five in all: the fourth from one address and the sixth overall are reset right
    after accept; a closed connection frees its slot. Other 127/8 addresses stand for other pods."""
    caps = limits(header_timeout=5.0, max_connections_per_source=3, max_connections=5)
    async with ServerRig(tmp_path, limits=caps) as rig:

        async def admitted(source: str):
            reader, writer = await tls_stream(rig, source)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # keep-alive: stays open
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"HTTP/1.1 200")
            return writer

        async def refused(source: str) -> bool:
            try:
                reader, writer = await tls_stream(rig, source)
            except (ConnectionError, ssl.SSLError, OSError):
                return True  # reset during the handshake
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            try:
                line = await asyncio.wait_for(reader.readline(), WAIT)
            except (ConnectionError, ssl.SSLError):
                return True
            finally:
                writer.close()
            return line == b""

        first = [await admitted("127.0.0.1") for _ in range(3)]
        assert await refused("127.0.0.1")
        assert rig.sample("flowmon_agent_http_connections_refused_total", reason="source") == 1.0
        second = [await admitted("127.0.0.2") for _ in range(2)]
        assert await refused("127.0.0.3")  # a new source, but five are open
        assert rig.sample("flowmon_agent_http_connections_refused_total", reason="capacity") == 1.0
        assert rig.sample("flowmon_agent_http_connections") == 5.0

        first.pop().close()
        await until(lambda: rig.sample("flowmon_agent_http_connections") == 4.0)
        first.append(await admitted("127.0.0.3"))
        for writer in first + second:
            writer.close()


# ---- malformed requests: a 4xx, never a 500 or a traceback ----

GOOD = b"GET /metrics/shop/web HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
ADMIN_HEADER = f"Authorization: Bearer {ADMIN}\r\n".encode()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (GOOD + b"Authorization: Bearer \xff\xfe\xfd\r\n\r\n", 401),  # invalid UTF-8
        (GOOD + "Authorization: Bearer tök€n\r\n\r\n".encode(), 401),  # UTF-8, not ASCII
        (GOOD + b"Authorization: \xc3\x28\r\n\r\n", 401),
        (GOOD + b"Authorization: Bearer a b c\r\n\r\n", 401),
        (GOOD + b"Authorization: Bearer " + b"x" * 20_000 + b"\r\n\r\n", 400),  # header line too large
        (GOOD + b"".join(b"X-%d: y\r\n" % i for i in range(100)) + b"\r\n", 400),  # too many headers
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # request line too long
        (b"GET /metrics/%ff%fe/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + ADMIN_HEADER + b"\r\n", 404),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".replace(b"GET", b"G\x00T"), 400),
        (b"DELETE /v1/policy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"\x16\x03\x01garbage\r\n\r\n", 400),
        (
            b"PUT /v1/policy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + ADMIN_HEADER
            + b"Content-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
            422,  # not UTF-8, not JSON
        ),
        (
            b"PUT /v1/policy HTTP/1.1\r\nHost: x\r\n" + ADMIN_HEADER
            + b"Content-Encoding: gzip\r\nContent-Length: 20\r\n\r\n" + gzip.compress(b"{}")[:20],
            415,  # a compressed body is never inflated (no gzip bomb)
        ),
        (
            b"PUT /v1/policy HTTP/1.1\r\nHost: x\r\n" + ADMIN_HEADER + b"Content-Length: 100000000\r\n\r\n{",
            413,  # refused from its Content-Length, before reading
        ),
    ],
)  # fmt: skip
async def test_malformed_requests_get_a_4xx_and_no_traceback(tmp_path, caplog, request_bytes, expected):
    caplog.set_level(logging.DEBUG)
    async with ServerRig(tmp_path, limits=limits(header_timeout=5.0)) as rig:
        assert await raw_exchange(rig, request_bytes) == expected
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert problems == []  # aiohttp's "Error handling request" traceback per bad request: not for input


@pytest.mark.asyncio
async def test_a_body_that_never_arrives_ends_with_408_in_the_handler_time_limit(tmp_path):
    async with ServerRig(tmp_path, limits=limits(header_timeout=5.0, handler_timeout=0.5)) as rig:
        reader, writer = await tls_stream(rig)
        writer.write(
            b"PUT /v1/policy HTTP/1.1\r\nHost: x\r\n" + ADMIN_HEADER + b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"HTTP/1.1 408")
        assert await closed_by_server(reader)
        writer.close()
        assert rig.sample("flowmon_agent_http_timeouts_total", phase="handler") == 1.0


@pytest.mark.asyncio
async def test_no_token_appears_in_any_log_line(tmp_path, caplog):
    """Tokens sent well-formed, malformed and oversized, and token files refused on reload: the log at
    DEBUG holds none of them."""
    secret = "s3cr3t-T0KEN-material"
    caplog.set_level(logging.DEBUG)
    async with ServerRig(tmp_path, limits=limits(header_timeout=5.0)) as rig:
        await rig.request("GET", "/metrics", ADMIN)
        await rig.request("GET", "/metrics/shop/web", secret)
        for header in (
            f"Authorization: Bearer {secret}\xff\r\n".encode("latin-1"),
            f"Authorization: Bearer {secret}".encode() + b"x" * 20_000 + b"\r\n",
            f"Authorization: Basic {secret}\r\n".encode(),
        ):
            await raw_exchange(rig, GOOD + header + b"\r\n")
        token_file = rig.server.config.admin_token_file
        for content in (f"{secret}\n\xff".encode("latin-1"), f"{secret} with spaces\n".encode(), b""):
            rejected = rig.sample("flowmon_agent_reload_rejected_total", file="admin_token") or 0.0
            token_file.write_bytes(content)
            await until(
                lambda r=rejected: rig.sample("flowmon_agent_reload_rejected_total", file="admin_token") > r
            )
    logged = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert "admin token file" in logged  # the refusals were logged...
    assert secret not in logged and ADMIN not in logged  # ...without what the file held


# ---- TLS: 1.2+ with ECDHE and AEAD only ----


def rsa_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed RSA certificate for 127.0.0.1 (the test CA's are ECDSA: RSA key exchange needs RSA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-agent")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "rsa.crt", directory / "rsa.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


async def negotiates(rig: ServerRig, suite: str) -> bool:
    """Whether a TLS 1.2 client offering only `suite` completes a handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE  # negotiation only
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(f"{suite}:@SECLEVEL=0")
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", rig.server.port, ssl=client), WAIT
        )
    except (ssl.SSLError, ConnectionError):
        return False
    negotiated = writer.get_extra_info("cipher")[0]
    writer.close()
    assert negotiated == suite
    return True


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("key_type", "suite", "accepted"),
    [
        ("ec", "ECDHE-ECDSA-AES128-GCM-SHA256", True),
        ("ec", "ECDHE-ECDSA-CHACHA20-POLY1305", True),
        ("ec", "ECDHE-ECDSA-AES128-SHA", False),  # CBC with a SHA-1 MAC
        ("ec", "ECDHE-ECDSA-AES256-SHA384", False),  # CBC
        ("rsa", "ECDHE-RSA-AES256-GCM-SHA384", True),
        ("rsa", "AES128-GCM-SHA256", False),  # static RSA key exchange (AEAD or not)
        ("rsa", "AES256-SHA", False),  # static RSA, CBC, SHA-1
        ("rsa", "ECDHE-RSA-AES128-SHA", False),
        ("rsa", "DHE-RSA-AES128-GCM-SHA256", False),  # finite-field DHE: not in the list
    ],
)
async def test_tls_offers_ecdhe_with_aead_only(tmp_path, key_type, suite, accepted):
    pair = {}
    if key_type == "rsa":
        pair["tls_cert_file"], pair["tls_key_file"] = rsa_pair(tmp_path)
    async with ServerRig(tmp_path, **pair) as rig:
        assert await negotiates(rig, suite) is accepted


# ---- reloads that cannot break serving ----


async def served_cn(rig: ServerRig) -> str:
    _reader, writer = await tls_stream(rig)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


@pytest.mark.asyncio
async def test_a_new_certificate_with_the_old_key_is_refused_and_the_old_pair_keeps_serving(tmp_path):
    async with ServerRig(tmp_path) as rig:
        assert await served_cn(rig) == "CN=agent-one"
        new = issue_serving_cert(rig.pki.ca, ["agent-two", "localhost"], ["127.0.0.1"])
        rig.pki.cert_file.write_text(new.cert_pem)  # the rotation's first half: the key is still the old
        await until(lambda: rig.sample("flowmon_agent_reload_rejected_total", file="tls") == 1.0)
        for _ in range(5):  # handshakes during the mismatch: the old pair, whole
            assert await served_cn(rig) == "CN=agent-one"
        assert (await rig.request("GET", "/metrics/shop/web", SHOP))[0] == 200
        rig.pki.key_file.write_text(new.key_pem)  # the second half: the new pair loads
        await until(lambda: rig.server.tls_reloads == 1)
        assert await served_cn(rig) == "CN=agent-two"
        assert rig.sample("flowmon_agent_reload_rejected_total", file="tls") == 1.0


@pytest.mark.asyncio
async def test_the_reload_task_survives_bad_token_files_and_picks_up_a_good_one(tmp_path):
    async with ServerRig(tmp_path) as rig:
        token_file = rig.server.config.admin_token_file

        def rejected() -> float:
            return rig.sample("flowmon_agent_reload_rejected_total", file="admin_token") or 0.0

        for n, bad in enumerate((b"new-admin\n\xff\xfe\n", b"", b"  \n\n"), start=1):  # bytes, truncations
            token_file.write_bytes(bad)
            await until(lambda n=n: rejected() == n)
            assert (await rig.request("GET", "/metrics", ADMIN))[0] == 200  # the last good token
        token_file.write_text("rotated-admin\n")
        async with asyncio.timeout(WAIT):  # the next reload round picks the good file up
            while (await rig.request("GET", "/metrics", "rotated-admin"))[0] != 200:
                await asyncio.sleep(0.05)
        assert (await rig.request("GET", "/metrics", ADMIN))[0] == 401
        assert rejected() == 3


def test_inventories_that_do_not_parse_or_look_truncated_are_refused(tmp_path):
    path = tmp_path / "inventory.yaml"
    good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
    path.write_text(good)
    store = MetadataStore()
    reload_inventory(path, store)
    assert store.namespace_labels("shop") is not None
    for content, message in (
        (b"", "no Kubernetes object"),  # a truncated write
        (b"# nothing here\n", "no Kubernetes object"),
        (good.encode() + b"---\nkind: Pod\nmetadata:\n", "object 2 has no kind or no metadata.name"),
        (b'{"kind": "List", "items": [{"kind": "Pod", "metad', "not valid YAML or JSON"),
        (b"kind: Namespace\nmetadata: {name: caf\xe9}\n", "not UTF-8 text"),
    ):
        path.write_bytes(content)
        with pytest.raises(InventoryError, match=message):
            reload_inventory(path, store)
        assert store.namespace_labels("shop") is not None  # the last good one stays
    path.write_text("kind: List\nitems: []\n")  # deliberately empty: said so
    assert read_inventory(path) == []


# ---- the policy boundary ----


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"maxSeries": "500"}, "monitors.{i}.maxSeries"),  # a string is not an integer
        ({"maxSeries": True}, "monitors.{i}.maxSeries"),  # nor is a boolean
        ({"seriesTtlSeconds": 60.5}, "monitors.{i}.seriesTtlSeconds"),
        ({"tenantNamespace": None}, "monitors.{i}.tenantNamespace must be 'shop'"),  # widened to all
        ({"tenantNamespace": "ops"}, "monitors.{i}.tenantNamespace must be 'shop'"),  # another tenant
    ],
)
async def test_pushed_policies_are_validated_strictly(tmp_path, change, where):
    async with ServerRig(tmp_path) as rig:
        old = rig.store.hash
        document = make_policy().dump()
        index = [m["namespace"] for m in document["monitors"]].index("shop")
        shop = document["monitors"][index]
        for key, value in change.items():
            if value is None:
                shop.pop(key, None)
            else:
                shop[key] = value
        status, body, _ = await rig.request("PUT", "/v1/policy", ADMIN, data=json.dumps(document))
        assert status == 422, body
        errors, expected = json.loads(body)["errors"], where.format(i=index)
        assert any(e["loc"] == expected or expected in e["msg"] for e in errors), errors
        assert rig.store.hash == old
        assert rig.sample("flowmon_agent_policy_rejected_total", source="api") == 1.0


@pytest.mark.asyncio
async def test_policy_errors_are_capped(tmp_path):
    async with ServerRig(tmp_path) as rig:
        body = json.dumps({"monitors": [{}] * 5000})  # 40,000 errors
        status, raw, _ = await rig.request("PUT", "/v1/policy", ADMIN, data=body)
        errors = json.loads(raw)["errors"]
        assert status == 422 and len(errors) == 21
        assert errors[0]["loc"] == "monitors.0.namespace"
        assert errors[-1] == {"loc": "", "msg": "and 39980 more"}
        assert len(raw) < 4096


# ---- rendering never waits for the poll's threads ----


@pytest.mark.asyncio
async def test_scrapes_are_served_while_the_default_thread_pool_is_busy(tmp_path):
    """The poll runs in the loop's default executor; a scrape must not queue behind it."""
    async with ServerRig(tmp_path) as rig:
        loop = asyncio.get_running_loop()
        release = threading.Event()
        busy = [loop.run_in_executor(None, release.wait, WAIT) for _ in range(64)]  # every default worker
        try:
            status, body, _ = await asyncio.wait_for(rig.request("GET", "/metrics/shop/web", SHOP), WAIT / 2)
            assert status == 200 and b"flowmon_tcp_sent_bytes_total" in body
        finally:
            release.set()
            await asyncio.gather(*busy)


# ---- TokenReview: bounded, rate-limited, and no token in any log line ----


def reviewer_for(kube_api, tmp_path: Path, **limits) -> KubeTokenReviewer:
    agent_token = tmp_path / "sa-token"
    install_rbac(kube_api)  # the shipped token-review overlay lets the agent ask
    agent_token.write_text(shipped_agent_token(kube_api))
    return KubeTokenReviewer(
        kube_api.url, sa_token_file=agent_token, ca_file=None, limits=ReviewLimits(**limits)
    )


def token_reviews(kube_api) -> int:
    return sum(1 for m, p in kube_api.requests if m == "POST" and p.endswith("/tokenreviews"))


@pytest.mark.asyncio
async def test_made_up_tokens_past_the_review_rate_get_429_and_cost_no_api_call(kube_api, tmp_path):
    """One pod guessing tokens: reviews up to its burst, then 429 with Retry-After and no API call; the
    cluster Prometheus, another address, still gets its review (and then its cached verdict)."""
    reviewer = reviewer_for(kube_api, tmp_path, source_burst=5, source_rate=0.01)
    prometheus = kube_api.service_account_token("monitoring", "prometheus")
    rig = ServerRig(tmp_path, token_reviewer=reviewer, token_review_readers=(PROMETHEUS,))
    async with rig:
        statuses = []
        for n in range(40):
            status, _body, headers = await raw_request(rig, f"guess-{n:04d}-{'x' * 24}", source="127.0.0.66")
            statuses.append((status, headers.get("retry-after")))
        assert statuses[:5] == [(401, None)] * 5
        assert {s for s, _ in statuses[5:]} == {429} and statuses[5][1] == "100"  # 1 token per 100 s
        assert token_reviews(kube_api) == 5
        for _ in range(3):
            assert (await raw_request(rig, prometheus, source="127.0.0.9"))[0] == 200
        assert token_reviews(kube_api) == 6
        assert rig.sample("flowmon_agent_token_reviews_throttled_total", scope="source") == 35.0
        assert rig.sample("flowmon_agent_token_review_cache_hits_total") == 2.0


PROMETHEUS = "system:serviceaccount:monitoring:prometheus"


async def raw_request(rig: ServerRig, token: str, source: str, path: str = "/metrics/shop/web"):
    """One GET with `token` from a 127/8 `source`; (status, body, lower-cased headers)."""
    reader, writer = await tls_stream(rig, source)
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n"
        writer.write(head.encode() + b"\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), body, {k.lower(): v for k, v in headers.items()}


def leaked(tokens: list[str], text: str, window: int = 8) -> list[str]:
    """Every `window`-character piece of any token found in `text` (a prefix counts as a leak too)."""
    return [
        t[i : i + window] for t in tokens for i in range(len(t) - window + 1) if t[i : i + window] in text
    ]


@pytest.mark.asyncio
async def test_no_token_bytes_in_any_log_line_with_token_review_on(kube_api, tmp_path, caplog):
    """Known, unknown, throttled, malformed and oversized tokens, with the API server answering and then
    gone, and refused admin token files: the log at DEBUG holds no piece of any token."""
    caplog.set_level(logging.DEBUG)
    reviewer = reviewer_for(kube_api, tmp_path, source_burst=3, source_rate=0.01)
    prometheus = kube_api.service_account_token("monitoring", "prometheus")
    secrets_sent = [prometheus, *(f"Zq{n}-made-up-Tk9v3LmW{n:03d}" for n in range(6))]
    rig = ServerRig(tmp_path, token_reviewer=reviewer, token_review_readers=(PROMETHEUS,))
    async with rig:
        assert (await raw_request(rig, prometheus, "127.0.0.9"))[0] == 200
        for token in secrets_sent[1:7]:  # three reviewed, three throttled
            await raw_request(rig, token, "127.0.0.66")
        await raw_request(rig, SHOP, "127.0.0.10")
        await raw_request(rig, ADMIN, "127.0.0.10", path="/metrics")
        for header in (
            f"Authorization: Bearer {secrets_sent[1]}\xff\r\n".encode("latin-1"),
            f"Authorization: Bearer {secrets_sent[2]}".encode() + b"y" * 20_000 + b"\r\n",
            f"Authorization: Basic {secrets_sent[3]}\r\n".encode(),
            f"Authorization: Bearer {secrets_sent[4]} {secrets_sent[5]}\r\n".encode(),
        ):
            await raw_exchange(rig, GOOD + header + b"\r\n")
        echoed = "Ec4-quoted-by-the-API-Vb6Nm1"  # an API server (or proxy) that quotes the request
        secrets_sent.append(echoed)
        kube_api.deny("POST", "/apis/authentication.k8s.io/", f'spec.token: Invalid value: "{echoed}"')
        assert (await raw_request(rig, echoed, "127.0.0.12"))[0] == 401
        kube_api.stop()  # the API server gone: reviews fail, and say so without the token
        fresh = "Pm7-never-seen-Hx2Qw8Rt"
        secrets_sent.append(fresh)
        assert (await raw_request(rig, fresh, "127.0.0.11"))[0] == 401
        assert rig.sample("flowmon_agent_token_reviews_total", result="unavailable") == 2.0
        token_file = rig.server.config.admin_token_file
        for content in (f"{fresh}\n\xfe".encode("latin-1"), f"{fresh} {ADMIN}\n".encode()):
            rejected = rig.sample("flowmon_agent_reload_rejected_total", file="admin_token") or 0.0
            token_file.write_bytes(content)
            await until(
                lambda r=rejected: rig.sample("flowmon_agent_reload_rejected_total", file="admin_token") > r
            )
    logged = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert (
        "TokenReview unavailable: HTTP 403 Forbidden" in logged and "admin token file" in logged
    )  # logged...
    assert leaked(secrets_sent, logged) == []  # ...no token, nor any 8 characters of one
    assert ADMIN not in logged and SHOP not in logged  # (words like "admin-token" are file names)


# ---- auth is never off by omission ----


@pytest.mark.asyncio
async def test_a_token_file_without_an_admin_token_keeps_auth_on_loopback(tmp_path):
    """`flowmon agent --token-file F` on 127.0.0.1 and no admin token: the scrape token reads the monitor's
    path; no token, or a wrong one, is a 401 (it used to serve everyone)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("scrape-token-1\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--node", "n1", "--token-file", str(tokens)])
    agent, _files, nat, _host = make_agent(args)
    await agent.server.start()  # the server alone: no kernel needed to ask it for a path
    try:
        url = agent.url + "/metrics/flowmon-system/host"
        async with aiohttp.ClientSession() as http:

            async def status(token: str | None, target: str = url) -> int:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.get(target, headers=headers) as response:
                    return response.status

            assert agent.server.mode.auth and agent.url.startswith("http://127.0.0.1:")
            assert await status(None) == 401
            assert await status("not-the-token") == 401
            assert await status("scrape-token-1") == 200
            assert await status("scrape-token-1", agent.url + "/metrics") == 403  # a scrape token, not admin
    finally:
        await agent.server.stop()
        nat.close()


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # a client that old, on purpose
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_before_1_2_is_refused(tmp_path, version):
    """A client that speaks only TLS 1.0 or 1.1 (which OpenSSL allows it at SECLEVEL=0) gets no handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.minimum_version = client.maximum_version = version
    client.set_ciphers("ALL:@SECLEVEL=0")  # the client would; the server must not
    async with ServerRig(tmp_path) as rig:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", rig.server.port, ssl=client), WAIT)
        await until(lambda: rig.sample("flowmon_agent_http_tls_handshake_failures_total") == 1.0)


@pytest.mark.asyncio
async def test_a_truncated_inventory_is_refused_counted_and_the_last_good_one_serves(tmp_path):
    """Through the agent's poll (a fake kernel): a truncated write is refused with a log line and
    flowmon_agent_reload_rejected_total{file="inventory"}; the metadata it had stays."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "kind: Namespace\nmetadata: {name: shop}\n---\nkind: Namespace\nmetadata: {name: ops}\n"
    )
    agent, _made = fake_agent(tmp_path, make_policy(), inventory_file=inventory)
    await agent.start()
    try:
        inventory.write_text("kind: Namespace\nmetadata: {name: shop}\n---\nkind: Namespace\nmetadata:\n")
        agent.poll_once()
        sample = agent.instruments.registry.get_sample_value
        assert sample("flowmon_agent_reload_rejected_total", {"file": "inventory"}) == 1.0
        assert agent.store.namespace_labels("ops") is not None  # the last good inventory
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_pushed_policies_are_parsed_off_the_event_loop(tmp_path):
    """Validation is CPU work in proportion to the body: it runs on the server's policy thread, never on
    the thread of the event loop (which every other client shares). Seen by a profiler on every thread."""
    parsed_on: list[str] = []

    def profiler(frame, event, _arg):
        if event == "call" and frame.f_code.co_name == "parse_policy_json":
            parsed_on.append(threading.current_thread().name)

    async with ServerRig(tmp_path) as rig:
        threading.setprofile(profiler)  # threads started from now on (the policy pool's)
        sys.setprofile(profiler)  # and this one, the event loop's
        try:
            status, body, _ = await rig.request(
                "PUT", "/v1/policy", ADMIN, data=make_policy().model_dump_json()
            )
            bad = await rig.request("PUT", "/v1/policy", ADMIN, data=b'{"monitors": "x"}')
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        assert status == 200, body
        assert bad[0] == 422
    assert len(parsed_on) == 2 and all(name.startswith("flowmon-policy") for name in parsed_on), parsed_on
