"""Service NAT through conntrack: real connections to a ClusterIP behind kube-proxy-style DNAT in a netns
node, real netlink lookups."""

from __future__ import annotations

import sys
import textwrap
from ipaddress import ip_address

import pytest

from flowmon_agent.kernel.flows import FlowKey, Reporter
from flowmon_agent.metadata.conntrack import ConntrackNat, reply_source
from flowmon_lab import cluster_plan
from flowmon_lab import minicluster as mc
from tests.test_minicluster import SERVER  # answers each connection with the address it accepted it on

SPEC = cluster_plan.ClusterSpec(
    namespaces=[cluster_plan.NamespaceSpec("shop"), cluster_plan.NamespaceSpec("pay")],
    deployments=[cluster_plan.DeploymentSpec("shop", "web", 1), cluster_plan.DeploymentSpec("pay", "api", 2)],
    services=[cluster_plan.ServiceSpec("pay", "api", {"app": "api"}, 80, 8080)],
)

# Prints "local_port backend_ip" per connection (the backends listen already: see the fixture).
CLIENT = textwrap.dedent(
    """
    import socket, sys
    target, count = sys.argv[1], int(sys.argv[2])
    for _ in range(count):
        with socket.create_connection((target, 80), timeout=2) as s:
            print(s.getsockname()[1], s.recv(64).decode())
    """
)


def test_reply_source_reads_the_backend_from_the_reply_tuple() -> None:
    reply = {
        "attrs": [
            ("CTA_TUPLE_IP", {"attrs": [("CTA_IP_V6_SRC", "fd00::5"), ("CTA_IP_V6_DST", "fd00::2")]}),
            (
                "CTA_TUPLE_PROTO",
                {"attrs": [("CTA_PROTO_NUM", 6), ("CTA_PROTO_SRC_PORT", 8443), ("CTA_PROTO_DST_PORT", 5)]},
            ),
        ]
    }
    assert reply_source(reply) == (ip_address("fd00::5"), 8443)


# Waits until a server accepts on ip:8080.
WAIT = textwrap.dedent(
    """
    import socket, sys, time
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((sys.argv[1], 8080), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    """
)


@pytest.fixture(scope="module")
def cluster(require_root):
    with mc.MiniCluster(SPEC, prefix=mc.new_prefix("fmct")) as built:
        client = built.pods_of("shop", "web")[0]
        for pod in built.pods_of("pay", "api"):
            built.spawn(pod, [sys.executable, "-c", SERVER])
        for pod in built.pods_of("pay", "api"):  # every backend listens before any Service traffic
            built.exec(client, [sys.executable, "-c", WAIT, pod.ip], timeout=30)
        yield built


def test_conntrack_finds_each_connections_backend_in_the_node_netns(cluster: mc.MiniCluster) -> None:
    client = cluster.pods_of("shop", "web")[0]
    svc = cluster.service("pay", "api")
    out = cluster.exec(client, [sys.executable, "-c", CLIENT, svc.cluster_ip, "30"], timeout=40).stdout
    answers = [
        (int(port), ip_address(backend)) for port, backend in (line.split() for line in out.splitlines())
    ]
    assert len(answers) == 30
    assert {b for _, b in answers} == {ip_address(p.ip) for p in svc.endpoints}  # both backends used
    keys = {
        FlowKey(ip_address(client.ip), ip_address(svc.cluster_ip), 80, Reporter.CLIENT, port): backend
        for port, backend in answers
    }
    never = FlowKey(ip_address(client.ip), ip_address(svc.cluster_ip), 80, Reporter.CLIENT, 1)
    aggregated = FlowKey(ip_address(client.ip), ip_address(svc.cluster_ip), 80, Reporter.CLIENT)
    with ConntrackNat(cluster.node_netns) as nat:
        for key, backend in keys.items():
            assert nat.lookup(key.client_ip, key.client_port, key.server_ip, 80) == (backend, 8080)
        found = nat.backends([*keys, never, aggregated])
        assert found == {key: (backend, 8080) for key, backend in keys.items()}
        # No entry for a connection that never was; flows without a client port are not NAT lookups.
        assert nat.lookup(never.client_ip, 1, never.server_ip, 80) is None
    # A bounded number of lookups per poll: the rest are resolved by the next polls.
    with ConntrackNat(cluster.node_netns, max_lookups_per_poll=10) as nat:
        assert [len(nat.backends(keys)) for _ in range(4)] == [10, 20, 30, 30]
    # The host's own netns has no such connection: the netns matters.
    with ConntrackNat() as host:
        key = next(iter(keys))
        assert host.lookup(key.client_ip, key.client_port, key.server_ip, 80) is None
