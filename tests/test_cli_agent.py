"""`flowmon agent` (standalone) and `flowmon top`: pure helpers, then the real command on this host."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flowmon_agent import main as cmd
from flowmon_agent.scheduling import thread_policies
from flowmon_cli import main as cli
from flowmon_cli import topview
from flowmon_contract.documents import load_monitors
from flowmon_contract.policy import compile_policy, token_sha256
from flowmon_lab.demo.trafficgen import receive
from flowmon_lab.network import Lab
from flowmon_lab.prometheus import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400)),
        ("0.0.0.0:9443", ("0.0.0.0", 9443)),
        ("[::1]:9400", ("::1", 9400)),
        (":0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert cmd.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:", "host:http", "host:70000"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        cmd.parse_listen(text)


def test_only_given_flags_override_settings() -> None:
    args = cli.build_parser().parse_args(["agent", "--listen", "[::1]:0", "--node", "n1", "--insecure"])
    assert cmd.settings_overrides(args) == {
        "listen_host": "::1",
        "listen_port": 0,
        "node_name": "n1",
        "insecure": True,
    }
    bare = cli.build_parser().parse_args(["agent"])
    assert cmd.settings_overrides(bare) == {}  # FLOWMON_AGENT_* variables (the DaemonSet) stay in charge


def test_several_node_flags_make_one_agent_stand_for_several_nodes() -> None:
    from flowmon_agent.runner import AgentSettings

    args = cli.build_parser().parse_args(["agent", "--node", "node-a", "--node", "node-b,node-c"])
    assert cmd.settings_overrides(args) == {"node_name": "node-a,node-b,node-c"}
    assert AgentSettings(**cmd.settings_overrides(args)).node_name == ["node-a", "node-b", "node-c"]


def test_monitor_files_compile_exactly_as_the_operator_compiles_them() -> None:
    monitors = load_monitors([ROOT / "examples"])
    policy = cmd.standalone_policy(monitors, ["t0k3n"])
    expected = compile_policy(monitors, token_hashes={m.key: [token_sha256("t0k3n")] for m in monitors})
    assert policy == expected and policy.hash == expected.hash
    assert {m.tenant_namespace for m in policy.monitors} == {None, "shop"}  # tenancy as in a cluster


def test_host_objects_make_this_host_a_pod_with_every_address() -> None:
    ns, node, pod = cmd.host_objects("box", ["127.0.0.1", "::1", "192.0.2.7"])
    assert (ns["kind"], node["kind"], pod["kind"]) == ("Namespace", "Node", "Pod")
    assert pod["metadata"]["namespace"] == "host" and pod["spec"]["nodeName"] == "box"
    assert [a["ip"] for a in pod["status"]["podIPs"]] == ["127.0.0.1", "::1", "192.0.2.7"]
    assert "addresses" not in node.get("status", {})  # a node address would win over the pod
    # Every other network namespace of the host is a pod of its own on the same node.
    objects = cmd.host_objects("box", ["192.0.2.7"], {"fm-a": ["10.9.0.1", "fd00::1"], "empty": []})
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Namespace", "host"),
        ("Node", "box"),
        ("Pod", "box"),
        ("Pod", "fm-a"),
    ]
    netns_pod = objects[-1]
    assert netns_pod["spec"]["nodeName"] == "box" and netns_pod["metadata"]["namespace"] == "host"
    assert [a["ip"] for a in netns_pod["status"]["podIPs"]] == ["10.9.0.1", "fd00::1"]


def test_invalid_monitor_files_stop_the_agent_before_bpf(tmp_path: Path) -> None:
    bad = ROOT / "tests" / "golden" / "invalid" / "semantic.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmon_cli.main",
            "agent",
            "--monitor",
            str(bad),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{bad}: spec.selection.namespaces: namespaces both included and excluded" in done.stderr


# --- the real agent on this host --------------------------------------------------------------------


def loopback_exchange(
    request: int,
    response: int,
    connections: int,
    server_ip: str = "127.0.0.1",
    client_ip: str | None = None,
    server_netns=contextlib.nullcontext,
    client_netns=contextlib.nullcontext,
) -> int:
    """A server and a client on loopback (or lab namespace) addresses: `connections` exchanges of known
    sizes; returns the server's port. `*_netns()` enter the namespace each end's sockets are made in."""
    with server_netns():
        srv = socket.socket(socket.AF_INET6 if ":" in server_ip else socket.AF_INET)
    srv.bind((server_ip, 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(connections):
            conn, _ = srv.accept()
            with conn:
                receive(conn, request)
                conn.sendall(b"r" * response)
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    for _ in range(connections):
        source = (client_ip, 0) if client_ip else None
        with (
            client_netns(),
            socket.create_connection((server_ip, port), timeout=5, source_address=source) as c,
        ):
            c.sendall(b"q" * request)
            receive(c, response)
    thread.join(timeout=10)
    return port


@contextlib.contextmanager
def bare_agent(node: str = "box"):
    """`flowmon agent` with no monitor, inventory or policy (only --listen, --node, --no-auth): yields its
    default monitor's URL and its pid once ready; stopped with SIGTERM, which must end it cleanly."""
    port = free_port()
    argv = ["agent", "--listen", f"127.0.0.1:{port}", "--node", node, "--no-auth"]
    agent = subprocess.Popen(
        [sys.executable, "-m", "flowmon_cli.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert agent.poll() is None, agent.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "agent not ready"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/metrics/flowmon-system/host", agent.pid
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, out


def row_when_opened(base: str, want: tuple[str, str], opened: int, timeout: float = 30) -> topview.Row:
    """The top row client → server once it counts `opened` connections (the last one seen otherwise)."""
    deadline, rows = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base, timeout=5) as r:
            rows = {
                (row.client, row.server): row
                for row in topview.rows(topview.parse_exposition(r.read().decode()))
            }
        if want in rows and rows[want].opened >= opened:
            break
        time.sleep(0.5)
    assert want in rows, sorted(rows)
    return rows[want]


@pytest.mark.root
def test_bare_agent_monitors_every_flow_of_this_host_and_top_shows_it() -> None:
    with bare_agent() as (base, pid):
        # every thread (poll workers, the srtt window's clock...) runs as SCHED_BATCH: none preempts an
        # application when it wakes
        policies = thread_policies(pid)
        assert len(policies) >= 3 and set(policies.values()) == {os.SCHED_BATCH}, policies
        server_port = loopback_exchange(request=3333, response=77777, connections=4)
        row = row_when_opened(base, ("host/box", f"host/box:{server_port}"), 4)
        # Exact kernel-measured payload bytes, each connection counted once (client and server on this host).
        assert (row.sent_bytes, row.received_bytes, row.opened) == (4 * 3333, 4 * 77777, 4)
        top = subprocess.run(
            [sys.executable, "-m", "flowmon_cli.main", "top", "--once", base],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert top.returncode == 0, top.stderr
        line = next(line for line in top.stdout.splitlines() if f"host/box:{server_port}" in line)
        assert "13.0 KiB" in line and "303.8 KiB" in line  # 13332 B and 311108 B


@pytest.mark.root
def test_bare_agent_shows_flows_between_network_namespaces_and_to_unknown_addresses() -> None:
    """Containers on this host: each network namespace is named after itself, its connections to another
    one are counted once, a namespace that appears later is picked up, an address that names no
    namespace (link-local) is external."""
    with Lab("fca", ["a", "b"]) as lab, bare_agent() as (base, _):
        a, b = lab.pod("a"), lab.pod("b")
        port = loopback_exchange(
            1111, 2222, 3, str(b.ipv4), None, lambda: lab.inside(b), lambda: lab.inside(a)
        )
        row = row_when_opened(base, (f"host/{a.netns}", f"host/{b.netns}:{port}"), 3)
        assert (row.sent_bytes, row.received_bytes, row.opened) == (3 * 1111, 3 * 2222, 3)
        # IPv6 between the same two namespaces: the same pods.
        port6 = loopback_exchange(
            500, 600, 2, str(b.ipv6), None, lambda: lab.inside(b), lambda: lab.inside(a)
        )
        row = row_when_opened(base, (f"host/{a.netns}", f"host/{b.netns}:{port6}"), 2)
        assert (row.sent_bytes, row.received_bytes, row.opened) == (2 * 500, 2 * 600, 2)
        # A link-local address (the same kind in every namespace) names nobody: an external peer.
        lab.run(b, ["ip", "addr", "add", "169.254.77.2/24", "dev", "eth0"])
        lab.run(a, ["ip", "route", "add", "169.254.77.0/24", "dev", "eth0", "src", str(a.ipv4)])
        port_ext = loopback_exchange(
            700, 800, 2, "169.254.77.2", str(a.ipv4), lambda: lab.inside(b), lambda: lab.inside(a)
        )
        row = row_when_opened(base, (f"host/{a.netns}", f"/external:{port_ext}"), 2)  # no namespace
        assert (row.sent_bytes, row.received_bytes, row.opened) == (2 * 700, 2 * 800, 2)
        # A container started after the agent: its namespace becomes a pod within a second or so.
        with Lab("fcb", ["c", "d"]) as late:
            c, d = late.pod("c"), late.pod("d")
            row = None
            for _ in range(10):  # the agent re-lists namespaces about once a second: a few tries at most
                port_late = loopback_exchange(
                    900, 1000, 2, str(d.ipv4), None, lambda: late.inside(d), lambda: late.inside(c)
                )
                with contextlib.suppress(AssertionError):
                    row = row_when_opened(base, (f"host/{c.netns}", f"host/{d.netns}:{port_late}"), 2, 3)
                    break
            assert row is not None, "the late namespaces never became pods"
            assert (row.sent_bytes, row.received_bytes, row.opened) == (2 * 900, 2 * 1000, 2)


def test_top_reports_an_unreachable_agent() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmon_cli.main",
            "top",
            "--once",
            f"http://127.0.0.1:{free_port()}/metrics/a/b",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "NO_PROXY": "*"},
    )
    assert done.returncode == 1 and "Connection refused" in done.stderr


def test_an_agent_named_after_a_node_the_inventory_lacks_is_warned(tmp_path: Path, capsys) -> None:
    import yaml

    from flowmon_lab import cluster_objects, cluster_plan

    spec = cluster_plan.ClusterSpec(
        namespaces=[cluster_plan.NamespaceSpec("a")],
        deployments=[cluster_plan.DeploymentSpec("a", "x", 2)],
        nodes=[cluster_plan.NodeSpec("node-a"), cluster_plan.NodeSpec("node-b")],
    )
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        yaml.safe_dump_all(cluster_objects.inventory_objects(cluster_plan.plan_cluster(spec, "p")))
    )
    cmd.warn_foreign_node(inventory, "node-b")
    assert capsys.readouterr().err == ""
    cmd.warn_foreign_node(inventory, "laptop")
    assert "node 'laptop' is not in" in capsys.readouterr().err
    cmd.warn_foreign_node(inventory, "node-a", "node-b")  # one agent for both nodes
    assert capsys.readouterr().err == ""
    cmd.warn_foreign_node(inventory, "node-a", "laptop")
    err = capsys.readouterr().err
    assert "node 'laptop' is not in" in err and "node 'node-a'" not in err
    inventory.write_text("{not yaml")
    with pytest.raises(cmd.AgentStartError, match="cannot read the inventory"):
        cmd.warn_foreign_node(inventory, "node-a")


AGENT_METRICS = """# TYPE flowmon_agent_series gauge
flowmon_agent_series{monitor="shop/web"} 2.0
flowmon_agent_series{monitor="flowmon-system/service-map"} 7.0
flowmon_agent_series{monitor="a/b"} 1.0
# TYPE flowmon_agent_info gauge
flowmon_agent_info{version="0.1.0"} 1.0
"""


def test_an_agent_address_alone_stands_for_its_first_monitor() -> None:
    from flowmon_cli.commands import top

    assert top.monitors_served(AGENT_METRICS) == ["flowmon-system/service-map", "a/b", "shop/web"]
    fetched = []

    def fetch(url: str) -> str:
        fetched.append(url)
        return AGENT_METRICS

    urls, notes = top.expand_agent_urls(["https://10.0.0.1:9443", "http://h:1/metrics/x/y"], fetch)
    assert urls == ["https://10.0.0.1:9443/metrics/flowmon-system/service-map", "http://h:1/metrics/x/y"]
    assert fetched == ["https://10.0.0.1:9443/metrics"]
    assert notes == [
        "https://10.0.0.1:9443: showing flowmon-system/service-map; it also serves a/b, shop/web"
    ]
    with pytest.raises(OSError, match="serves no monitor"):
        top.expand_agent_urls(["http://h:1/"], lambda _url: "")


def test_monitor_files_recompile_on_change_and_keep_the_policy_on_a_bad_edit(tmp_path: Path, caplog) -> None:
    import os as _os

    path = tmp_path / "m.yaml"
    path.write_text((ROOT / "examples" / "cost-by-zone.yaml").read_text())
    files = cmd.MonitorFiles([str(tmp_path)], ["tok"])
    first = files.compile()
    assert [m.key for m in first.monitors] == ["flowmon-system/cost-by-zone"]
    assert files.changed_policy() is None  # nothing changed
    path.write_text(path.read_text().replace("name: cost-by-zone", "name: cost"))
    _os.utime(path, ns=(1, 1))  # a different mtime even within one clock tick
    changed = files.changed_policy()
    assert changed is not None and [m.key for m in changed.monitors] == ["flowmon-system/cost"]
    assert changed.monitors[0].token_sha256 == [token_sha256("tok")]
    (tmp_path / "n.yaml").write_text((ROOT / "examples" / "service-map.yaml").read_text())  # a new file
    added = files.changed_policy()
    assert added is not None and [m.key for m in added.monitors] == [
        "flowmon-system/cost",
        "flowmon-system/service-map",
    ]
    path.write_text("kind: FlowMonitor\n")
    _os.utime(path, ns=(2, 2))
    assert files.changed_policy() is None
    assert "keeping the running policy" in caplog.text and "m.yaml: apiVersion" in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "no token to authenticate scrapes: give --token-file"),  # auth is never off by omission
        (["--no-auth", "--listen", "0.0.0.0:0", "--insecure"], "--no-auth .* loopback address only"),
    ],
)
def test_auth_cannot_be_left_out(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowmon_cli.main", "agent", "--listen", "127.0.0.1:0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_an_unusable_token_file_stops_the_agent_without_quoting_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_bytes(b"fine-token\n\xffsecret-bytes\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmon_cli.main",
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            tokens,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"--token-file {tokens}: line 2 is not ASCII text" in done.stderr
    assert "secret" not in done.stderr and "fine-token" not in done.stderr
