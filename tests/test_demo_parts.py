"""The demo's parts on their own: scenario consistency, Prometheus config (checked by promtool), the
state file that `--cleanup` relies on, the traffic generator."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from flowmon_cli.commands.render import rendered_objects
from flowmon_contract.documents import load_monitors
from flowmon_lab.cluster_plan import plan_cluster
from flowmon_lab.demo import prometheus as prom
from flowmon_lab.demo import scenario, state, trafficgen
from flowmon_lab.prometheus import config, free_port, promtool_check
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


# --- scenario ------------------------------------------------------------------------------------


def test_every_call_targets_a_service_with_backends_except_the_broken_one() -> None:
    plan = plan_cluster(scenario.CLUSTER, scenario.PREFIX)
    services = {s.key: s for s in plan.services}
    serving = {(ns, dep): port for ns, dep, port in scenario.SERVERS}
    cluster_ips = {(s.namespace, s.name): s.cluster_ip for s in plan.services if s.protocol == "tcp"}
    hosts = scenario.resolver_hosts(cluster_ips, "192.0.2.1")
    for call in scenario.CALLS:
        assert [p for p in plan.pods if (p.namespace, p.deployment) == call.client_ref], call
        if call.name and call.service not in services:  # no Service: a name nobody answers, or outside
            if call.what == "a name that does not exist":
                assert call.name not in hosts and call.name.endswith("." + scenario.CLUSTER_DOMAIN)
            else:
                assert call.service_ref[0] in scenario.OUTSIDE and call.name in hosts
                assert serving[call.service_ref] == call.port
            continue
        if call.name:
            assert hosts[call.name] == [services[call.service].cluster_ip]
        svc = services[call.service]
        assert svc.endpoints, call
        backend = (svc.endpoints[0].namespace, svc.endpoints[0].deployment)
        if call.what == "failing dependency":
            assert backend not in serving  # nothing listens: connects are refused
        else:
            assert serving[backend] == svc.target_port, call
        assert [p for p in plan.pods if (p.namespace, p.deployment) == call.client_ref], call
    forbidden = [c for c in scenario.CALLS if c.what == "forbidden"]
    assert [c.client_ref[0] for c in forbidden] == ["shop-staging"]
    envs = {ns.name: ns.labels.get("env") for ns in scenario.CLUSTER.namespaces}
    assert envs[forbidden[0].client_ref[0]] == "staging" and envs[forbidden[0].service_ref[0]] == "prod"
    assert len({p.node for p in plan.pods}) == 2 and len(plan.pods) == 15
    (dns,) = [s for s in plan.services if s.key == "kube-system/kube-dns"]
    assert dns.protocol == "udp" and dns.port == 53 and dns.endpoints


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool checks rule expressions: wrap every demo query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "demo",
                "rules": [
                    {"record": f"demo:q{i}", "expr": expr} for i, (_, expr) in enumerate(scenario.QUERIES)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    assert promtool_check("rules", path) is None


# --- Prometheus config -----------------------------------------------------------------------------


def test_scrape_config_and_rendered_rules_pass_promtool(tmp_path: Path) -> None:
    monitors = load_monitors([ROOT / "examples"])
    ca, token = tmp_path / "ca.crt", tmp_path / "token"
    ca.write_text("x")
    token.write_text("t")
    targets = [prom.Target("127.0.0.1:9401", "node-a"), prom.Target("127.0.0.1:9402", "node-b")]
    jobs = [
        prom.scrape_job(m.key, f"/metrics/{m.key}", targets, ca_file=ca, token_file=token, interval="2s")
        for m in monitors
    ]
    job = jobs[0]
    assert job["scheme"] == "https" and job["authorization"]["credentials_file"] == str(token)
    assert job["static_configs"][1] == {
        "targets": ["127.0.0.1:9402"],
        "labels": {"flowmon_monitor": monitors[0].key, "node": "node-b"},
    }
    rules = prom.rules_file(o for o in rendered_objects(monitors) if o["kind"] == "PrometheusRule")
    assert len(rules["groups"]) >= 3
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config(jobs, [rules_path])))
    assert promtool_check("rules", rules_path) is None
    assert promtool_check("config", config_path) is None


# --- state file ------------------------------------------------------------------------------------


def test_release_kills_recorded_processes_but_never_a_reused_pid(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    mine = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        st = state.DemoState(path)
        st.add_process(mine.pid, "agent node-a")
        st.add_directory(workdir)
        # A record whose pid now belongs to another process (different start time): must survive.
        st.owned.processes.append(
            {"pid": stranger.pid, "start": state.start_time(stranger.pid) - 1, "what": "old"}
        )
        st._save()
        assert state.alive(state.load(path), "agent node-a") == [mine.pid]
        done = state.release(path)
        assert done == [f"stopped agent node-a (pid {mine.pid})", f"removed {workdir}"]
        assert mine.wait(timeout=5) is not None
        assert stranger.poll() is None
        assert not path.exists() and not workdir.exists()
        assert state.release(path) == []  # idempotent
    finally:
        mine.kill()
        stranger.kill()


# --- traffic generator -----------------------------------------------------------------------------


def call(port: int, *args: str) -> str:
    """`trafficgen call` against the local server: its one line of results."""
    argv = [sys.executable, "-m", "flowmon_lab.demo.trafficgen", "call", f"127.0.0.1:{port}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()


def test_trafficgen_exchanges_counts_refusals_and_stops_in_time() -> None:
    port, stop = free_port(), threading.Event()
    server = threading.Thread(target=trafficgen.serve, args=(port, 300.0, stop), daemon=True)
    server.start()
    try:
        wait_for(lambda: trafficgen.call_once(("127.0.0.1", port), 5000, 70000, 2.0) == "ok")  # listening
        paced = call(port, "--rate", "50", "--seconds", "1")
        assert paced.startswith(f"127.0.0.1:{port}: {{'ok': ")
        # --seconds bounds the run: at 50/s for 1 s no more than 50 calls, however slow the host.
        assert 0 < sum(ast.literal_eval(paced.partition(": ")[2]).values()) <= 50
        # 4 + 4 + 2: the count bounds it (--seconds is far away).
        bursts = call(port, "--burst", "4", "--every", "0.4", "--count", "10", "--seconds", "60")
        assert bursts == f"127.0.0.1:{port}: {{'ok': 10}}"
    finally:
        stop.set()
        server.join(timeout=10)
    assert not server.is_alive()
    assert trafficgen.call_once(("127.0.0.1", port), 10, 10, 1.0) == "refused"


def test_trafficgen_server_stops_after_its_seconds() -> None:
    server = threading.Thread(target=trafficgen.serve, args=(free_port(), 0.2), daemon=True)
    server.start()
    server.join(timeout=30)
    assert not server.is_alive()


@pytest.mark.parametrize("probability", [0.03, 0.5])
def test_loss_rule_is_an_iptables_statistic_drop(probability: float) -> None:
    rule = scenario.loss_rule(5432, probability)
    assert rule[:2] == ["-A", "INPUT"] and rule[-2:] == ["-j", "DROP"]
    assert ["-m", "statistic", "--mode", "random", "--probability", str(probability)] == rule[6:12]


def test_trafficgen_resolves_names_like_a_client_without_cache() -> None:
    """The demo's DNS client against a local responder (dnspython's answers, compressed like dnsmasq's)."""
    import socket
    import threading

    import dns.message

    from flowmon_lab.demo.trafficgen import resolve
    from tests.dns_samples import answer

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def respond(count: int) -> None:
            for _ in range(count):
                data, peer = server.recvfrom(512)
                asked = dns.message.from_wire(data)
                name = asked.question[0].name.to_text(omit_final_dot=True)
                found = name == "cart.shop.svc.cluster.local"
                reply = answer(name, "A", asked.id, rcode="NOERROR" if found else "NXDOMAIN",
                               addresses=("10.96.0.11",) if found else ())  # fmt: skip
                server.sendto(reply, peer)

        responder = threading.Thread(target=respond, args=(2,))
        responder.start()
        assert resolve("cart.shop.svc.cluster.local", "127.0.0.1", 5, port) == ("10.96.0.11", "NOERROR")
        assert resolve("reviews.shop.svc.cluster.local", "127.0.0.1", 5, port) == (None, "NXDOMAIN")
        responder.join(timeout=5)
        # nobody answers: a timeout, no exception
        assert resolve("cart.shop.svc.cluster.local", "127.0.0.1", 0.05, port) == (None, "dns-timeout")
