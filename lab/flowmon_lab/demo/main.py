"""`flowmon demo`: the whole product on this machine, no cluster needed.

Builds the mini-cluster of `demo.scenario` from network namespaces, starts one agent per node (the real
`flowmon agent` with the FlowMonitors of examples/, over TLS with a token), a real Prometheus scraping
them and evaluating the rendered alert rules, drives the traffic mix inside the pods, serves the live
service map (`flowmon map --serve`, its address printed) and shows the live view (`flowmon top`).
Ctrl-C or the end of --duration removes every namespace, rule and process it created; `flowmon demo
--cleanup` does the same after a crash (see demo.state).
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

from flowmon_lab.minicluster import set_parent_death_signal

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DEFAULT_DURATION = 120.0
FIRST_AGENT_PORT = 9401
MAP_PORT = 9480
RULE_INTERVAL = "10s"  # the rendered rules evaluate every minute; a short demo wants answers sooner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=DEFAULT_DURATION, metavar="SECONDS",
        help=f"run this long, then clean up (default {DEFAULT_DURATION:.0f}; Ctrl-C ends it earlier)",
    )  # fmt: skip
    parser.add_argument("--no-ui", action="store_true", help="no live view; print a summary at the end")
    parser.add_argument("--cleanup", action="store_true", help="remove what a crashed or killed demo left")
    parser.add_argument("--monitors", type=Path, default=EXAMPLES, metavar="DIR", help="FlowMonitor files")


class DemoError(RuntimeError):
    """A prerequisite is missing or a step failed; the message says which and what to do."""


def say(text: str) -> None:
    print(f"flowmon demo: {text}", flush=True)


def cleanup_everything() -> list[str]:
    """Whatever a demo left: its processes and directories (state file), its namespaces (prefix)."""
    from flowmon_lab import minicluster
    from flowmon_lab.demo import scenario, state

    done = state.release()
    removed = minicluster.cleanup(scenario.PREFIX)
    if removed:
        done.append(
            f"removed {len(removed)} network namespaces ({scenario.PREFIX}-*) and their iptables rules"
        )
    return done


def check_root() -> None:
    if os.geteuid() != 0:
        raise DemoError(
            "needs root: it builds network namespaces and loads BPF programs (try: sudo make demo)"
        )


def check_host() -> None:
    from flowmon_agent.kernel.loader import BPFUnavailableError
    from flowmon_agent.kernel.loader import check_host as check_bpf
    from flowmon_lab.prometheus import PROMETHEUS

    check_root()
    try:
        check_bpf()
    except BPFUnavailableError as exc:
        raise DemoError(f"this kernel cannot run flowmon's BPF programs: {exc}") from None
    if not PROMETHEUS.exists():
        raise DemoError(f"{PROMETHEUS} is missing: run `make setup` (installs Debian's prometheus)")
    if not Path("/proc/sys/net/bridge").exists():
        raise DemoError("the kernel has no bridge netfilter (br_netfilter): Service DNAT cannot be shown")


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        from flowmon_lab.demo import state

        self.args = args
        self.state = state.DemoState()
        self.state.add_process(os.getpid(), "demo")
        self.workdir = Path(tempfile.mkdtemp(prefix="flowmon-demo-"))
        self.state.add_directory(self.workdir)
        self.cluster = None
        self.agents: list[tuple[str, int, subprocess.Popen]] = []
        self.prometheus = None
        self.map_page: subprocess.Popen | None = None
        self.map_url = ""
        self.token = ""
        self.tls: ssl.SSLContext | None = None

    # ---- steps ----

    def write_credentials(self) -> tuple[Path, Path, Path, Path]:
        from flowmon_operator import pki

        ca = pki.generate_ca("flowmon-demo-ca", validity_days=1)
        serving = pki.issue_serving_cert(ca, ["localhost"], ["127.0.0.1"], validity_days=1)
        self.token = pki.generate_token()
        files = []
        secrets = {"ca.crt": ca.cert_pem, "tls.crt": serving.cert_pem, "tls.key": serving.key_pem}
        for name, text in (*secrets.items(), ("token", self.token)):
            path = self.workdir / name
            path.touch(mode=0o600)
            path.write_text(text)
            files.append(path)
        self.tls = ssl.create_default_context(cafile=str(files[0]))
        return files[0], files[1], files[2], files[3]

    def build_cluster(self) -> Path:
        import yaml

        from flowmon_lab.demo import scenario
        from flowmon_lab.minicluster import MiniCluster

        spec = scenario.CLUSTER
        say(
            f"building the mini-cluster: {len(spec.namespaces)} namespaces, "
            f"{sum(d.replicas for d in spec.deployments)} pods on {len(spec.nodes)} nodes, "
            f"{len(spec.services)} Services behind kube-proxy-style DNAT..."
        )
        self.cluster = MiniCluster(spec, scenario.PREFIX)
        self.cluster.build()
        inventory = self.workdir / "inventory.yaml"
        known = [o for o in self.cluster.inventory() if not scenario.outside_the_cluster(o)]
        inventory.write_text(yaml.safe_dump_all(known, sort_keys=False))
        return inventory

    def start_agents(self, inventory: Path, ca: Path, cert: Path, key: Path, token: Path) -> None:
        from flowmon_lab.demo import scenario
        from flowmon_lab.prometheus import free_port

        nodes = [n.name for n in scenario.CLUSTER.nodes]
        say(
            f"starting {len(nodes)} agents, one per node, with the FlowMonitors in {self.args.monitors} "
            "(compiling the BPF programs)..."
        )
        for i, node in enumerate(nodes):
            port = free_port(FIRST_AGENT_PORT + i)  # another one when taken
            argv = [
                sys.executable, "-m", "flowmon_cli.main", "agent",
                "--monitor", str(self.args.monitors), "--inventory", str(inventory),
                "--listen", f"127.0.0.1:{port}", "--node", node,
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--token-file", str(token), "--admin-token-file", str(token),
                "--conntrack-netns", self.cluster.node_netns, "--log-level", "WARNING",
            ]  # fmt: skip
            with (self.workdir / f"agent-{node}.log").open("w") as log:  # the child keeps its own fd
                proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=set_parent_death_signal,
                )
            self.state.add_process(proc.pid, f"agent {node}")
            self.agents.append((node, port, proc))
        for node, port, proc in self.agents:
            self._wait_ready(node, port, proc)

    def _wait_ready(self, node: str, port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (self.workdir / f"agent-{node}.log").read_text()[-3000:]
                raise DemoError(f"the agent for {node} exited:\n{log}")
            with (
                suppress(OSError),
                urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", timeout=1, context=self.tls) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise DemoError(f"the agent for {node} was not ready after {timeout:.0f}s")

    def start_prometheus(self, ca: Path, token: Path) -> None:
        import yaml

        from flowmon_cli.commands.render import rendered_objects
        from flowmon_contract.documents import load_monitors
        from flowmon_lab.demo import prometheus as prom
        from flowmon_lab.prometheus import Prometheus, config, free_port, promtool_check

        say("starting Prometheus (scrapes every agent over TLS with a bearer token)...")
        monitors = load_monitors([self.args.monitors])
        targets = [prom.Target(f"127.0.0.1:{port}", node) for node, port, _ in self.agents]
        jobs = [
            prom.scrape_job(m.key, f"/metrics/{m.key}", targets, ca_file=ca, token_file=token, interval="2s")
            for m in monitors
        ]
        rule_objects = [o for o in rendered_objects(monitors) if o["kind"] == "PrometheusRule"]
        rules = prom.rules_file(rule_objects)
        for group in rules["groups"]:
            group["interval"] = RULE_INTERVAL
        rules_path = self.workdir / "rules.yml"
        rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        rule_files = [rules_path]
        if problem := promtool_check("rules", rules_path):
            say(f"warning: promtool refuses the rendered rules, Prometheus runs without them: {problem}")
            rule_files = []
        self.prometheus = Prometheus(self.workdir / "prometheus", free_port(prom.PREFERRED_PORT))
        self.prometheus.directory.mkdir()
        self.prometheus.start(config(jobs, rule_files), preexec_fn=set_parent_death_signal)
        self.state.add_process(self.prometheus.proc.pid, "prometheus")

    def start_traffic(self) -> None:
        from flowmon_lab.demo import scenario

        cluster, duration = self.cluster, self.args.duration
        say(
            "starting the workloads: servers, a lossy link, a resolver, calls by name and by Service IP, "
            "bursts, a broken dependency, a name that does not exist, an external provider..."
        )
        logs = self.workdir / "pods"
        logs.mkdir()
        servers = []
        for namespace, deployment, port in scenario.SERVERS:
            for pod in cluster.pods_of(namespace, deployment):
                with (logs / f"{pod.lab_name}-serve.log").open("w") as out:
                    argv = scenario.server_argv(port, duration + 60)
                    cluster.spawn(pod, argv, stdout=out, stderr=subprocess.STDOUT)
                servers.append((pod, port))
        for pod, port in servers:
            self._wait_listening(pod, port)
        namespace, deployment, port, probability = scenario.LOSSY
        for pod in cluster.pods_of(namespace, deployment):
            cluster.iptables(pod, *scenario.loss_rule(port, probability))
        dns_ip = self.start_resolver()
        for call in scenario.CALLS:
            if call.name:
                target, server, log_name = f"{call.name}:{call.port}", dns_ip, call.service_ref[1]
            else:
                svc = cluster.service(*call.service_ref)
                target, server, log_name = f"{svc.cluster_ip}:{svc.port}", "", svc.name
            for pod in cluster.pods_of(*call.client_ref):
                argv = scenario.call_argv(call, target, duration, server)
                with (logs / f"{pod.lab_name}-call-{log_name}.log").open("w") as out:
                    cluster.spawn(pod, argv, stdout=out, stderr=subprocess.STDOUT)

    def start_resolver(self) -> str:
        """dnsmasq in the kube-system pod: the Services' names and the payment provider's; the kube-dns
        Service IP (what the workloads ask)."""
        from flowmon_lab.demo import scenario
        from flowmon_lab.resolver import ResolverConfig, start_resolver

        cluster = self.cluster
        (pod,) = cluster.pods_of(*scenario.RESOLVER)
        (provider,) = cluster.pods_of("internet", "payment-provider")
        cluster_ips = {(s.namespace, s.name): s.cluster_ip for s in cluster.services if s.protocol == "tcp"}
        config = ResolverConfig(
            local_zone=scenario.CLUSTER_DOMAIN,
            hosts=scenario.resolver_hosts(cluster_ips, provider.ip),
            ttl_s=scenario.DNS_TTL,
        )
        start_resolver(cluster.lab, cluster.lab.pod(pod.lab_name), config)
        return cluster.service(*scenario.DNS_SERVICE).cluster_ip

    def _wait_listening(self, pod, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.cluster.exec(pod, ["ss", "-Hltn", f"sport = :{port}"], check=False, timeout=5)
            if done.stdout.strip():
                return
            time.sleep(0.1)
        raise DemoError(
            f"the server in {pod.namespace}/{pod.name} did not listen on {port} in {timeout:.0f}s"
        )

    def start_map_page(self, ca: Path, token: Path) -> None:
        """`flowmon map --serve`: the live service map of both agents, in a browser."""
        from flowmon_lab.prometheus import free_port

        port = free_port(MAP_PORT)
        endpoints = self.endpoints()
        argv = [
            sys.executable, "-m", "flowmon_cli.main", "map", *endpoints.urls,
            "--violations", *endpoints.violations, "--ca", str(ca), "--token", str(token),
            "--serve", f"127.0.0.1:{port}", "--interval", "3", "--title", "flowmon demo — service map",
        ]  # fmt: skip
        with (self.workdir / "map-page.log").open("w") as log:
            self.map_page = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=set_parent_death_signal,
            )  # fmt: skip
        self.state.add_process(self.map_page.pid, "map page")
        self.map_url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.map_page.poll() is None:
            with suppress(OSError), urllib.request.urlopen(self.map_url, timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        log = (self.workdir / "map-page.log").read_text()[-2000:]
        raise DemoError(f"the live map page did not start:\n{log}")

    # ---- views ----

    def endpoints(self):
        from flowmon_cli.commands.top import Endpoints

        base = [f"https://127.0.0.1:{port}/metrics/flowmon-system/service-map" for _, port, _ in self.agents]
        isolation = [
            f"https://127.0.0.1:{port}/metrics/flowmon-system/environment-isolation"
            for _, port, _ in self.agents
        ]
        return Endpoints(base, isolation, self.token, self.tls)

    def firing_alerts(self) -> list[str]:
        try:
            result = self.prometheus.query('ALERTS{alertstate="firing"}')
        except (OSError, RuntimeError):
            return []
        return sorted({r["metric"]["alertname"] for r in result})

    def print_intro(self) -> None:
        from flowmon_lab.demo import scenario

        print()
        print(f"Prometheus: {self.prometheus.url}")
        print(f"Live map: {self.map_url}")
        for node, port, _ in self.agents:
            print(
                f"Agent {node}: https://127.0.0.1:{port}/metrics/<namespace>/<name> "
                f"(CA and token in {self.workdir})"
            )
        print("Queries to try in Prometheus (Graph tab):")
        for what, expr in scenario.QUERIES:
            print(f"  # {what}\n  {expr}")
        team = " ".join(f"https://127.0.0.1:{port}/metrics/shop/shop-flows" for _, port, _ in self.agents)
        print(
            "The shop team's own view, from another terminal (its monitor sees only flows touching `shop`):"
        )
        print(f"  .venv/bin/flowmon top --ca {self.workdir}/ca.crt --token {self.workdir}/token {team}")
        print(flush=True)

    def live(self, end: float) -> None:
        from flowmon_cli.commands.top import watch, wide_console
        from flowmon_cli.sources import AgentSource

        alerts: list[str] = []
        checked = [0.0]

        def caption() -> str:
            if time.monotonic() - checked[0] > 5:
                alerts[:], checked[0] = self.firing_alerts(), time.monotonic()
            left = max(0, end - time.monotonic())
            firing = f" · alerts firing: {', '.join(alerts)}" if alerts else ""
            return f"{left:.0f}s left, Ctrl-C stops · Prometheus {self.prometheus.url}{firing}"

        watch(
            AgentSource(self.endpoints()),
            interval=2.0,
            title="flowmon demo — workload pairs (service-map monitor, both agents), per second",
            until=lambda: time.monotonic() >= end,
            caption=caption,
            console=wide_console(),
        )

    def headless(self, end: float) -> None:
        next_note = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            if time.monotonic() >= next_note:
                say(f"running, {max(0, end - time.monotonic()):.0f}s left")
                next_note += 10

    def summary(self) -> None:
        from flowmon_cli.commands.top import view, wide_console
        from flowmon_cli.sources import Sample
        from flowmon_lab.demo import scenario

        console = wide_console()
        try:
            totals = self.endpoints().snapshot()
        except OSError as exc:
            say(f"could not read the agents for the summary: {exc}")
            return
        console.print(view(Sample(totals, None, totals), title="flowmon demo — totals per workload pair"))
        for what, expr in scenario.QUERIES:
            try:
                result = self.prometheus.query(expr)
            except (OSError, RuntimeError) as exc:
                console.print(f"  {what}: query failed: {exc}")
                continue
            console.print(f"  {what}: {len(result)} series")
        console.print(f"  alerts firing: {', '.join(self.firing_alerts()) or 'none'}")

    # ---- lifecycle ----

    def run(self) -> int:
        ca, cert, key, token = self.write_credentials()
        inventory = self.build_cluster()
        self.start_agents(inventory, ca, cert, key, token)
        self.start_prometheus(ca, token)
        self.start_traffic()
        self.start_map_page(ca, token)
        self.print_intro()
        end = time.monotonic() + self.args.duration
        if self.args.no_ui:
            self.headless(end)
            self.summary()
        else:
            self.live(end)
        return 0

    def dead_agents(self) -> list[str]:
        """Agents that exited before the end, with the tail of their log: a demo must not hide a crash."""
        return [
            f"the agent for {node} exited with {proc.returncode}:\n"
            + (self.workdir / f"agent-{node}.log").read_text()[-3000:]
            for node, _, proc in self.agents
            if proc.poll() is not None
        ]

    def teardown(self) -> None:
        for report in self.dead_agents():
            print(f"flowmon demo: {report}", file=sys.stderr)
        say("cleaning up: workloads, namespaces, iptables rules, agents, Prometheus...")
        if self.cluster is not None:
            self.cluster.teardown()
        processes = [proc for _, _, proc in self.agents] + ([self.map_page] if self.map_page else [])
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.prometheus is not None:
            self.prometheus.stop()
        for line in cleanup_everything():  # the state file's directories, anything that escaped
            if not line.startswith("stopped"):
                continue
            say(f"also {line}")
        say("done: nothing of the demo remains")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from flowmon_lab.demo import state

    try:
        check_root()
        if args.cleanup:  # needs nothing else: a host that cannot run the demo can still be cleaned
            done = cleanup_everything()
            for line in done:
                say(line)
            say("nothing to clean up" if not done else "clean")
            return 0
        check_host()
        if running := state.alive(state.load(), "demo"):
            raise DemoError(
                f"another demo is running (pid {running[0]}): stop it, or run `flowmon demo --cleanup`"
            )
        if leftovers := cleanup_everything():
            say("an earlier demo left things behind; removed them: " + "; ".join(leftovers))
    except DemoError as exc:
        print(f"flowmon demo: {exc}", file=sys.stderr)
        return 1
    # Python leaves SIGINT ignored when it starts so (a background job of a script): Ctrl-C stops it anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    demo = None
    try:
        demo = Demo(args)
        return demo.run()
    except KeyboardInterrupt:
        print()
        return 0
    except (DemoError, RuntimeError) as exc:
        print(f"flowmon demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        if demo is not None:
            demo.teardown()
        signal.signal(signal.SIGINT, signal.default_int_handler)
