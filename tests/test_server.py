"""The agent's HTTPS server, started in-process on 127.0.0.1 with a test CA: auth, policy API, reloads."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
import threading
import time
import warnings
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from flowmon_agent.export.auth import KubeTokenReviewer
from flowmon_agent.export.collectors import AgentStatus, Exporter
from flowmon_agent.export.policy_store import PolicyFile, PolicyStore, dump_policy_json
from flowmon_agent.export.server import (
    AgentServer,
    ServerConfig,
    ServerConfigError,
    accepts_gzip,
    server_mode,
)
from flowmon_contract.policy import compile_policy, token_sha256
from tests.export_samples import agent_view
from tests.kubeapi.shipped import agent_token as shipped_agent_token
from tests.kubeapi.shipped import install_rbac
from tests.server_rig import ADMIN, OPS, SHOP, ServerRig, make_policy, monitor
from tests.waiting import until

DURATION_LINE = b"flowmon_agent_scrape_collector_duration_seconds{"


@pytest_asyncio.fixture
async def agent(tmp_path):
    a = ServerRig(tmp_path)
    await a.server.start()
    a.session = aiohttp.ClientSession(auto_decompress=False)
    yield a
    await a.session.close()
    await a.server.stop()


# ---- pure rules ----


@pytest.mark.parametrize(
    ("config", "tls", "auth", "warns"),
    [
        (ServerConfig(host="127.0.0.1"), False, True, False),  # no token given: still auth, never off
        (ServerConfig(host="127.0.0.1", no_auth=True), False, False, False),
        (ServerConfig(host="::1", no_auth=True), False, False, False),
        (ServerConfig(host="localhost", admin_token_file=Path("t")), False, True, False),
        (ServerConfig(host="0.0.0.0", tls_cert_file=Path("c"), tls_key_file=Path("k")), True, True, False),
        (ServerConfig(host="0.0.0.0", insecure=True), False, True, True),
        (ServerConfig(host="10.1.2.3", insecure=True, admin_token_file=Path("t")), False, True, True),
    ],
)
def test_server_mode(config, tls, auth, warns):
    mode = server_mode(config)
    assert (mode.tls, mode.auth, bool(mode.warnings)) == (tls, auth, warns)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ServerConfig(host="0.0.0.0"), "refusing plain HTTP on 0.0.0.0:9400"),
        (ServerConfig(host="::"), "refusing plain HTTP"),
        (ServerConfig(host="192.0.2.1", admin_token_file=Path("t")), "pass --insecure"),
        (ServerConfig(tls_cert_file=Path("c")), "both a TLS certificate and key"),
        (ServerConfig(tls_cert_file=Path("c"), tls_key_file=Path("k"), insecure=True), "drop it"),
        (ServerConfig(host="0.0.0.0", insecure=True, no_auth=True), "--no-auth .* loopback address only"),
        (ServerConfig(tls_cert_file=Path("c"), tls_key_file=Path("k"), no_auth=True), "not HTTPS"),
    ],
)
def test_unsafe_listen_settings_are_refused(config, message):
    with pytest.raises(ServerConfigError, match=message):
        AgentServer(config, exporter=Exporter(), policy=PolicyStore(), readiness=lambda: None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip", True),
        ("deflate, gzip;q=0.5", True),
        ("GZIP", True),
        ("gzip;q=0", False),
        ("br", False),
        ("", False),
    ],
)
def test_accepts_gzip(header, expected):
    assert accepts_gzip(header) is expected


# ---- auth over HTTPS ----


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/metrics/shop/web", None, 401),
        ("/metrics/shop/web", "wrong-token", 401),
        ("/metrics/shop/web", OPS, 403),  # monitor A's token on monitor B's path
        ("/metrics/shop/web", SHOP, 200),
        ("/metrics/shop/web", ADMIN, 200),
        ("/metrics/ops/all", SHOP, 403),
        ("/metrics/ops/all", OPS, 200),
        ("/metrics/nope/none", ADMIN, 404),
        ("/metrics/nope/none", SHOP, 403),
        ("/metrics", None, 401),
        ("/metrics", SHOP, 403),
        ("/metrics", ADMIN, 200),
        ("/v1/policy", SHOP, 403),
        ("/v1/policy", None, 401),
        ("/healthz", None, 200),
        ("/readyz", None, 503),
        ("/debug/pprof/", ADMIN, 404),
    ],
)
async def test_auth(agent, path, token, status):
    got, body, headers = await agent.request("GET", path, token)
    assert got == status, body
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.asyncio
async def test_token_review_admits_service_account_tokens(kube_api, tmp_path):
    """Tokens matching no digest are reviewed by the (emulated) API server: the configured reader reads
    every monitor, a ServiceAccount of a monitor's namespace reads that namespace's, unknown ones get 401."""
    agent_token = tmp_path / "sa-token"
    install_rbac(kube_api)  # the shipped token-review overlay lets the agent ask
    agent_token.write_text(shipped_agent_token(kube_api))
    reviewer = KubeTokenReviewer(kube_api.url, sa_token_file=agent_token, ca_file=None)
    prometheus = kube_api.service_account_token("monitoring", "prometheus")
    team = kube_api.service_account_token("shop", "scraper")
    rig = ServerRig(
        tmp_path,
        token_reviewer=reviewer,
        token_review_readers=("system:serviceaccount:monitoring:prometheus",),
    )
    await rig.server.start()
    rig.session = aiohttp.ClientSession(auto_decompress=False)
    try:
        cases = [
            ("/metrics/shop/web", prometheus, 200),
            ("/metrics/ops/all", prometheus, 200),
            ("/metrics", prometheus, 403),  # a reader, not an admin
            ("/v1/policy", prometheus, 403),
            ("/metrics/shop/web", team, 200),
            ("/metrics/ops/all", team, 403),
            ("/metrics/shop/web", "forged-token", 401),
            ("/metrics/shop/web", SHOP, 200),  # static tokens still work, without a review
        ]
        for path, token, expected in cases:
            assert (await rig.request("GET", path, token))[0] == expected, (path, token)
        reviews = [p for m, p in kube_api.requests if m == "POST" and p.endswith("/tokenreviews")]
        assert len(reviews) == 3  # one per distinct unknown token: answers are cached
    finally:
        await rig.session.close()
        await rig.server.stop()


@pytest.mark.asyncio
async def test_scoped_token_reads_only_its_series(agent):
    status, body, headers = await agent.request("GET", "/metrics/shop/web", SHOP)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'flowmon_tcp_sent_bytes_total{client_namespace="shop",client_workload="web"' in body
    assert b"batch" not in body  # ops/all's series
    assert b"flowmon_agent_info" not in body


@pytest.mark.asyncio
async def test_readiness_follows_the_agent(agent):
    assert (await agent.request("GET", "/readyz"))[:2] == (503, b"BPF programs not attached yet\n")
    agent.ready_reason = None
    assert (await agent.request("GET", "/readyz"))[:2] == (200, b"ready\n")


@pytest.mark.asyncio
async def test_liveness_follows_the_poll_loop(agent):
    assert (await agent.request("GET", "/healthz"))[:2] == (200, b"ok\n")
    agent.stall = "no successful poll for 31 s"
    assert (await agent.request("GET", "/healthz"))[:2] == (503, b"no successful poll for 31 s\n")


@pytest.mark.asyncio
async def test_gzip_on_request(agent):
    plain = (await agent.request("GET", "/metrics/shop/web", SHOP))[1]
    status, body, headers = await agent.request(
        "GET", "/metrics/shop/web", SHOP, headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    strip = lambda text: [line for line in text.splitlines() if not line.startswith(DURATION_LINE)]  # noqa: E731
    assert strip(gzip.decompress(body)) == strip(plain)
    assert "Content-Encoding" not in (await agent.request("GET", "/metrics/shop/web", SHOP))[2]


@pytest.mark.asyncio
async def test_tls_below_1_2_is_refused(agent):
    ctx = agent.pki.client_context()
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(aiohttp.ClientError):
        async with agent.session.get(agent.server.url + "/healthz", ssl=ctx):
            pass
    ok = agent.pki.client_context()
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    async with agent.session.get(agent.server.url + "/healthz", ssl=ok) as resp:
        assert resp.status == 200


# ---- policy API ----


@pytest.mark.asyncio
async def test_invalid_policy_push_is_refused_and_the_old_policy_keeps_serving(agent):
    old_hash = agent.store.hash
    document = make_policy().dump()
    document["monitors"][0]["maxSeries"] = 0
    status, body, _ = await agent.request("PUT", "/v1/policy", ADMIN, data=json.dumps(document))
    assert status == 422
    errors = json.loads(body)["errors"]
    assert errors[0]["loc"] == "monitors.0.maxSeries" and "greater than or equal to 1" in errors[0]["msg"]
    for bad in (b"{not json", b'{"monitors": "x"}', b'{"surprise": 1}'):
        assert (await agent.request("PUT", "/v1/policy", ADMIN, data=bad))[0] == 422
    assert json.loads((await agent.request("GET", "/v1/policy", ADMIN))[1])["policyHash"] == old_hash
    assert (await agent.request("GET", "/metrics/shop/web", SHOP))[0] == 200


@pytest.mark.asyncio
async def test_valid_policy_push_applies_without_restart(agent):
    new = make_policy(monitor("team", "new"))
    assert (await agent.request("GET", "/metrics/team/new", ADMIN))[0] == 404
    status, body, _ = await agent.request("PUT", "/v1/policy", ADMIN, data=dump_policy_json(new))
    assert status == 200 and json.loads(body) == {"policyHash": new.hash, "scrapedSecondsAgo": {}}
    assert json.loads((await agent.request("GET", "/v1/policy", ADMIN))[1])["policyHash"] == new.hash
    assert (await agent.request("GET", "/metrics/team/new", ADMIN))[0] == 200
    assert (await agent.request("PUT", "/v1/policy", SHOP, data=dump_policy_json(new)))[0] == 403


@pytest.mark.asyncio
async def test_revoked_monitor_token_loses_access(agent):
    """Tokens live in the policy: a push without shop's hash revokes it at once."""
    revoked = compile_policy([monitor("shop", "web")], token_hashes={"shop/web": []})
    assert (await agent.request("PUT", "/v1/policy", ADMIN, data=dump_policy_json(revoked)))[0] == 200
    assert (await agent.request("GET", "/metrics/shop/web", SHOP))[0] == 401


def test_policy_file_reload_follows_configmap_symlink_swaps(tmp_path):
    """Kubelet updates a ConfigMap volume by pointing `..data` at a new directory."""
    store = PolicyStore()
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str, text: str) -> None:
        target = tmp_path / version
        target.mkdir()
        (target / "policy.json").write_text(text)
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to(target)
        os.replace(tmp_link, mount / "..data")

    first, second = make_policy(), make_policy(monitor("team", "new"))
    publish("v1", dump_policy_json(first))
    (mount / "policy.json").symlink_to("..data/policy.json")
    watched = PolicyFile(mount / "policy.json", store)
    assert watched.load() and store.hash == first.hash
    assert not watched.reload_if_changed()
    publish("v2", dump_policy_json(second))
    assert watched.reload_if_changed() and store.hash == second.hash
    publish("v3", '{"monitors": [{"namespace": "x"}]}')  # invalid: refused, the last good one stays
    assert not watched.reload_if_changed() and store.hash == second.hash
    publish("v4", dump_policy_json(first))
    assert watched.reload_if_changed() and store.hash == first.hash


def test_yaml_policy_file(tmp_path):
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(make_policy().dump()))
    store = PolicyStore()
    assert PolicyFile(path, store).load() and store.hash == make_policy().hash


# ---- reloads and concurrency ----


def _peer_cn(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


async def _served_cn(agent: ServerRig) -> str:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", agent.server.port, ssl=agent.pki.client_context(), server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return _peer_cn(der)


@pytest.mark.asyncio
async def test_tls_certificate_reload(agent):
    assert await _served_cn(agent) == "CN=agent-one"
    agent.pki.reissue("agent-two")

    async def serves(cn: str) -> bool:
        return await _served_cn(agent) == cn

    await until(lambda: serves("CN=agent-two"))
    assert agent.server.tls_reloads == 1
    agent.pki.cert_file.write_text("garbage")  # a broken rotation keeps the old certificate serving

    async def refused() -> bool:
        return await _admin_sample(agent, 'flowmon_agent_reload_rejected_total{file="tls"} ') == 1.0

    await until(refused)
    assert await serves("CN=agent-two")


async def _admin_sample(agent: ServerRig, prefix: str) -> float | None:
    _code, body, _ = await agent.request("GET", "/metrics", ADMIN)
    line = next((x for x in body.decode().splitlines() if x.startswith(prefix)), None)
    return None if line is None else float(line.rsplit(" ", 1)[1])


@pytest.mark.asyncio
async def test_admin_token_file_reload(agent):
    agent.server.config.admin_token_file.write_text("rotated-admin\n")

    async def accepted() -> bool:
        return (await agent.request("GET", "/metrics", "rotated-admin"))[0] == 200

    await until(accepted)
    assert (await agent.request("GET", "/metrics", ADMIN))[0] == 401


@pytest.mark.asyncio
async def test_concurrent_scrapes_agree(agent):
    """Scrapes racing with view swaps each see one whole poll: sent and received always match."""

    def status(n: int) -> AgentStatus:
        return AgentStatus(view=agent_view(policy_hash=f"{n:064x}", sent_bytes=n, received_bytes=n))

    stop, swaps = threading.Event(), [0]

    def swapper() -> None:  # a thread, like the poll loop
        while not stop.is_set():
            swaps[0] += 1
            agent.exporter.swap(status(swaps[0]))
            time.sleep(0.0005)

    thread = threading.Thread(target=swapper)
    thread.start()
    bodies = []
    try:
        for _ in range(4):  # waves of concurrent scrapes, apart in time so that they see different polls
            wave = (agent.request("GET", "/metrics/shop/web", SHOP) for _ in range(10))
            bodies += await asyncio.gather(*wave)
            await until(lambda n=swaps[0]: swaps[0] > n)  # the next wave sees another poll
    finally:
        stop.set()
        thread.join()
    values = set()
    for code, body, _ in bodies:
        assert code == 200
        sent = [
            line.rsplit(b" ", 1)[1]
            for line in body.splitlines()
            if line.startswith(b'flowmon_tcp_sent_bytes_total{client_namespace="shop"')
        ]
        received = [
            line.rsplit(b" ", 1)[1]
            for line in body.splitlines()
            if line.startswith(b"flowmon_tcp_received_bytes_total")
        ]
        assert sent == received, body
        values.add(sent[0])
    assert len(values) > 1  # the race was real: scrapes saw different polls
    # Without swaps, concurrent scrapes return the same bytes (but for their own duration sample).
    same = await asyncio.gather(*(agent.request("GET", "/metrics/shop/web", SHOP) for _ in range(20)))
    texts = {
        b"\n".join(x for x in body.splitlines() if not x.startswith(DURATION_LINE)) for _, body, _ in same
    }
    assert len(texts) == 1


@pytest.mark.asyncio
async def test_plain_http_on_loopback_with_no_auth_needs_no_token(tmp_path):
    a = ServerRig(tmp_path, tls_cert_file=None, tls_key_file=None, admin_token_file=None, no_auth=True)
    await a.server.start()
    a.session = aiohttp.ClientSession()
    try:
        assert a.server.url.startswith("http://127.0.0.1:")
        assert (await a.request("GET", "/metrics/shop/web"))[0] == 200
        assert (await a.request("GET", "/metrics"))[0] == 200
    finally:
        await a.session.close()
        await a.server.stop()


@pytest.mark.asyncio
async def test_the_policy_answer_says_which_monitors_were_scraped_and_how_long_ago(agent):
    """The operator's view of scrapes (the FlowMonitor's Scraped condition): a path read with an
    authorized token counts, a refused or unknown one does not; monitors leaving the policy are forgotten."""

    async def scraped() -> dict[str, float]:
        return json.loads((await agent.request("GET", "/v1/policy", ADMIN))[1])["scrapedSecondsAgo"]

    assert await scraped() == {}
    assert (await agent.request("GET", "/metrics/shop/web", OPS))[0] == 403
    assert (await agent.request("GET", "/metrics/nope/none", ADMIN))[0] == 404
    assert await scraped() == {}
    assert (await agent.request("GET", "/metrics/shop/web", SHOP))[0] == 200
    ages = await scraped()
    assert list(ages) == ["shop/web"] and 0 <= ages["shop/web"] < 5
    only_ops = compile_policy([monitor("ops", "all")], token_hashes={"ops/all": [token_sha256(OPS)]})
    assert (await agent.request("PUT", "/v1/policy", ADMIN, data=dump_policy_json(only_ops)))[0] == 200
    assert await scraped() == {}
