"""Environment isolation in the agent: namespace → environment, forbidden flows, cumulative counters, and
end to end in a netns mini-cluster with the real tracer: staging → prod is counted within a second."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from flowmon_agent.aggregation.isolation import IsolationCounter, environment_of, violation
from flowmon_agent.export.collectors import render_family, text_exposition
from flowmon_contract.alerting import IsolationAlerting
from flowmon_contract.metrics import OVERFLOW_VALUE
from tests.waiting import WAIT, wait_for

ISOLATION = IsolationAlerting.model_validate(
    {
        "environments": [
            {"name": "staging", "namespaceSelector": {"matchLabels": {"env": "staging"}}},
            {
                "name": "prod",
                "namespaceSelector": {
                    "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "production"]}]
                },
            },
            {
                "name": "any-team",
                "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
            },
        ],
        "forbidden": [{"from": "staging", "to": "prod"}, {"from": "any-team", "to": "prod"}],
    }
)
NAMESPACES = {
    "shop-staging": {"env": "staging", "team": "shop"},  # first matching environment wins: staging
    "shop": {"env": "prod"},
    "payments": {"env": "production"},
    "tools": {"team": "ops"},
    "default": {},
}


@pytest.mark.parametrize(
    ("labels", "env"),
    [
        (NAMESPACES["shop-staging"], "staging"),
        (NAMESPACES["shop"], "prod"),
        (NAMESPACES["payments"], "prod"),
        (NAMESPACES["tools"], "any-team"),
        ({}, None),
        (None, None),
    ],
)
def test_environment_of_a_namespace(labels: dict | None, env: str | None) -> None:
    assert environment_of(ISOLATION, labels) == env


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        ("shop-staging", "shop", ("staging", "prod")),
        ("shop-staging", "payments", ("staging", "prod")),
        ("tools", "shop", ("any-team", "prod")),
        ("shop", "shop-staging", None),  # prod → staging is allowed
        ("shop", "payments", None),
        ("shop-staging", "shop-staging", None),
        ("default", "shop", None),  # a namespace in no environment
        ("", "shop", None),  # a node or an external address
        ("shop-staging", "unknown-ns", None),
    ],
)
def test_forbidden_flows(client: str, server: str, expected: tuple[str, str] | None) -> None:
    assert violation(ISOLATION, client, server, NAMESPACES.get) == expected


def test_no_forbidden_pairs_means_no_violations() -> None:
    open_ = IsolationAlerting.model_validate({"environments": ISOLATION.dump()["environments"]})
    assert violation(open_, "shop-staging", "shop", NAMESPACES.get) is None
    assert IsolationCounter(open_).families() == ()


def test_counter_accumulates_attempts_and_bytes_and_renders() -> None:
    counter = IsolationCounter(ISOLATION)
    stg, prod = ("shop-staging", "loadgen"), ("shop", "db")
    add = lambda c, s, a, b: counter.add(c, s, attempts=a, bytes_=b, namespace_labels=NAMESPACES.get)  # noqa: E731
    assert add(stg, prod, 1, 500) == ("staging", "prod", "shop-staging", "loadgen", "shop", "db")
    assert add(stg, prod, 0, 1500) is not None  # a long-lived connection's bytes keep counting
    assert add(stg, prod, 0, 0) is None
    assert add(prod, stg, 4, 100) is None
    assert add(("tools", "backup"), ("payments", "api"), 2, 0) is not None
    text = text_exposition(render_family(f) for f in counter.families()).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    loadgen = tuple(
        sorted(
            {
                "from_env": "staging",
                "to_env": "prod",
                "client_namespace": "shop-staging",
                "client_workload": "loadgen",
                "server_namespace": "shop",
                "server_workload": "db",
            }.items()
        )
    )
    assert samples[("flowmon_isolation_violations_total", loadgen)] == 1
    assert samples[("flowmon_isolation_violation_bytes_total", loadgen)] == 2000
    assert len(samples) == 4  # two pairs, two families
    assert "# TYPE flowmon_isolation_violations_total counter" in text


def test_counter_caps_pairs_with_an_overflow_per_environment_pair() -> None:
    counter = IsolationCounter(ISOLATION, max_series=2)
    for i in range(5):
        counter.add(
            ("shop-staging", f"w{i}"), ("shop", "db"), attempts=1, bytes_=10, namespace_labels=NAMESPACES.get
        )
    assert len(counter.totals) == 3
    assert counter.totals[("staging", "prod", *(OVERFLOW_VALUE,) * 4)] == [3, 30]


# --- end to end: the real tracer in a netns mini-cluster -------------------------------------------

SERVER = """
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 5432)); srv.listen(16); srv.settimeout(30)
print("listening", flush=True)
held = []
end = time.time() + 30
while time.time() < end and len(held) < 4:
    conn, _ = srv.accept(); conn.recv(65536); held.append(conn)
time.sleep(5)
"""
CLIENT = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 5432), timeout=10)
sock.sendall(b"x" * 1000)
print("connected", flush=True)
sys.stdin.read()  # held open until the test closes our stdin
sock.close()
"""


@pytest.mark.root
def test_staging_to_prod_is_counted_while_the_connection_is_open() -> None:
    from flowmon_agent.aggregation.aggregator import Aggregator
    from flowmon_agent.aggregation.tracing_scope import kernel_config
    from flowmon_agent.kernel.tracer import FlowTracer
    from flowmon_agent.metadata import MetadataStore, Resolver
    from flowmon_contract.policy import compile_policy
    from flowmon_contract.spec import FlowMonitor
    from flowmon_lab import cluster_plan
    from flowmon_lab import minicluster as mc

    spec = cluster_plan.ClusterSpec(
        namespaces=[
            cluster_plan.NamespaceSpec("staging", {"env": "staging"}),
            cluster_plan.NamespaceSpec("prod", {"env": "prod"}),
        ],
        deployments=[
            cluster_plan.DeploymentSpec("staging", "loadgen", replicas=1),
            cluster_plan.DeploymentSpec("prod", "web", replicas=1),
            cluster_plan.DeploymentSpec("prod", "db", replicas=1),
        ],
    )
    monitor = FlowMonitor.model_validate(
        {
            "metadata": {"name": "isolation", "namespace": "flowmon-system"},
            "spec": {
                "selection": {"namespaces": {"include": ["staging", "prod"]}},
                "alerting": {"isolation": ISOLATION.dump()},
            },
        }
    )
    policy = compile_policy([monitor])
    (mon,) = policy.monitors
    prefix = mc.new_prefix("fiso")
    try:
        with mc.MiniCluster(spec, prefix=prefix) as cluster, FlowTracer() as tracer:
            store = MetadataStore()
            for obj in cluster.inventory():
                store.apply("ADDED", obj)
            resolver = Resolver(store)
            node = cluster.pods[0].node
            tracer.configure(kernel_config(policy, store, node))
            aggregator = Aggregator(node)
            seen_pairs: set[tuple[str, str]] = set()
            totals: dict[tuple[str, ...], list[float]] = {}

            def poll() -> None:  # what the agent's runner does every poll: the real aggregation path
                view = aggregator.build_view(tracer.poll(), policy, resolver, time.monotonic())
                families = {f.info.name: f for f in view.monitors[mon.key].families}
                group = families["flowmon_tcp_sent_bytes"].label_names
                for labels in families["flowmon_tcp_sent_bytes"].samples:
                    named = dict(zip(group, labels, strict=True))
                    seen_pairs.add((named["client_workload"], named["server_workload"]))
                totals.clear()
                for name, index in (
                    ("flowmon_isolation_violations", 0),
                    ("flowmon_isolation_violation_bytes", 1),
                ):
                    for labels, value in families[name].samples.items():
                        totals.setdefault(labels, [0.0, 0.0])[index] = value

            db = cluster.pods_of("prod", "db")[0]
            server = cluster.spawn(db, ["python3", "-c", SERVER], stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "listening"
            poll()

            def connect(pod) -> subprocess.Popen:
                client = cluster.spawn(
                    pod,
                    ["python3", "-c", CLIENT, db.ip],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert client.stdout.readline().strip() == "connected"
                return client

            def poll_until(done) -> None:  # as the runner would, poll after poll
                wait_for(lambda: done() or poll())

            # Allowed: prod → prod. Seen by aggregation, never counted.
            web_client = connect(cluster.pods_of("prod", "web")[0])
            poll_until(lambda: ("web", "db") in seen_pairs)
            assert totals == {}

            # Forbidden: staging → prod, counted while the client still holds the connection open (it
            # does until the test closes its stdin): no need to wait for the close.
            loadgen_client = connect(cluster.pods_of("staging", "loadgen")[0])
            connected = time.monotonic()
            key = ("staging", "prod", "staging", "loadgen", "prod", "db")
            poll_until(lambda: key in totals)
            latency = time.monotonic() - connected
            assert loadgen_client.poll() is None
            attempts, bytes_ = totals[key]
            assert attempts == 1 and bytes_ >= 1000
            assert list(totals) == [key]
            print(f"staging → prod counted {latency * 1000:.0f} ms after connect")
            for proc in (web_client, loadgen_client):
                proc.stdin.close()
                proc.wait(timeout=30)
            server.kill()
    finally:
        mc.cleanup(prefix)


# --- a real Prometheus: the rendered rules turn the agent's counter into a firing alert ----------


def evaluated_since(prom, moment: float) -> bool:
    """Every rule group of this Prometheus last evaluated after `moment` (epoch seconds)."""
    groups = prom.api("rules")["groups"]
    return bool(groups) and all(
        dt.datetime.fromisoformat(g["lastEvaluation"]).timestamp() > moment for g in groups
    )


def test_real_prometheus_fires_isolation_alert_on_a_single_connection(tmp_path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flowmon_contract.spec import FlowMonitor
    from flowmon_lab.prometheus import Prometheus, config
    from flowmon_operator.rules import monitor_relabeling, rule_groups

    monitor = FlowMonitor.model_validate(
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"alerting": {"isolation": ISOLATION.dump()}},
        }
    )
    counter = IsolationCounter(monitor.spec.alerting.isolation)

    class Endpoint(BaseHTTPRequestHandler):  # serves the monitor's path the way the exporter renders it
        def do_GET(self) -> None:
            body = text_exposition(render_family(f) for f in counter.families())
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    relabel = {
        "action": "replace",
        **{re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in monitor_relabeling(monitor).items()},
    }
    job = {
        "job_name": "flowmon-agent",
        "metrics_path": "/metrics/shop/web",
        "static_configs": [{"targets": [f"127.0.0.1:{server.server_port}"]}],
        "relabel_configs": [relabel],
    }
    # Production groups evaluate every minute; only the interval is shortened here.
    groups = [{**g, "interval": "1s"} for g in rule_groups(monitor)]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    try:
        with Prometheus(tmp_path).start(config([job], [tmp_path / "rules.yml"], interval="1s")) as prom:
            prom.wait_query('up{job="flowmon-agent"}', "1")
            scraped = time.time()
            # Every rule group evaluated twice on a scrape of no violation: no alert, not even pending.
            wait_for(lambda: evaluated_since(prom, scraped + 1.0))
            assert prom.query('ALERTS{alertname="FlowmonIsolationViolation"}') == []
            counter.add(
                ("shop-staging", "loadgen"),
                ("shop", "db"),
                attempts=1,
                bytes_=0,
                namespace_labels=NAMESPACES.get,
            )
            started = time.monotonic()
            firing = prom.wait_query(
                'ALERTS{alertname="FlowmonIsolationViolation",alertstate="firing"}', "1", WAIT
            )
            elapsed = time.monotonic() - started
            (alert,) = firing
            labels = alert["metric"]
            assert labels["flowmon_monitor"] == "shop/web" and labels["severity"] == "critical"
            assert (labels["from_env"], labels["to_env"]) == ("staging", "prod")
            assert (labels["client_workload"], labels["server_workload"]) == ("loadgen", "db")
            assert "job" not in labels and "instance" not in labels
            print(f"FlowmonIsolationViolation firing {elapsed:.1f}s after the violation was counted")
    finally:
        server.shutdown()
