"""`flowmon agent`: the node agent, standalone on this host or as the operator's DaemonSet runs it.

Standalone: `--monitor FILE...` are ordinary FlowMonitor YAML, compiled exactly as the operator compiles
them (`compile_policy`) and recompiled when a file changes; `--inventory FILE` is ordinary Kubernetes
objects. With neither, it monitors every flow of this host on 127.0.0.1:9400 with one default monitor
(`flowmon-system/host`); this host's addresses resolve to the pod host/<hostname>, each other network
namespace's (containers, `ip netns`) to a pod host/<netns> (see host_objects).

In a cluster the operator's DaemonSet gives no flags: every setting comes from FLOWMON_AGENT_*
variables (AgentSettings), the policy from the ConfigMap file. Flags override variables.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flowmon_agent.metadata.hostnets import HostMetadata, addresses_of
from flowmon_agent.scheduling import FullCollections, run_as_batch
from flowmon_agent.supervision import Restarts
from flowmon_contract.documents import ManifestError, load_monitors
from flowmon_contract.policy import AgentPolicy, compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor, FlowMonitorSpec, ObjectMeta

log = logging.getLogger("flowmon.agent")

DEFAULT_PORT = 9400
HOST_NAMESPACE = "host"
DEFAULT_MONITOR = FlowMonitor(
    metadata=ObjectMeta(name="host", namespace="flowmon-system"), spec=FlowMonitorSpec()
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--monitor", "-m", nargs="+", action="extend", default=[], metavar="FILE",
        help="FlowMonitor YAML files or directories (standalone); default: one monitor of every flow",
    )  # fmt: skip
    parser.add_argument("--inventory", type=Path, metavar="FILE", help="Kubernetes objects (YAML/JSON)")
    parser.add_argument(
        "--listen", metavar="ADDR", help=f"host:port to serve on (default 127.0.0.1:{DEFAULT_PORT})"
    )
    parser.add_argument(
        "--node", action="append", metavar="NAME",
        help="this node's name (default: the hostname); repeat it (or a,b) for one standalone agent that "
        "stands for several nodes of its inventory",
    )  # fmt: skip
    parser.add_argument("--compat", action="store_true", help="force the compat kernel path (older kernels)")
    parser.add_argument(
        "--policy-file", type=Path, metavar="FILE", help="a compiled agent policy (cluster mode)"
    )
    parser.add_argument(
        "--tls-cert-file", type=Path, metavar="FILE", help="serve HTTPS with this certificate"
    )
    parser.add_argument("--tls-key-file", type=Path, metavar="FILE", help="... and this key")
    parser.add_argument(
        "--admin-token-file", type=Path, metavar="FILE",
        help="bearer tokens (one per line) that may read every path and push policy",
    )  # fmt: skip
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE",
        help="bearer tokens (one per line) that may read every monitor's path (standalone scrape token)",
    )  # fmt: skip
    parser.add_argument("--insecure", action="store_true", help="allow plain HTTP on a non-loopback address")
    parser.add_argument(
        "--no-auth", action="store_true",
        help="serve every path without a token (plain HTTP on a loopback address only); without it the "
        "agent needs --token-file, --admin-token-file, a policy file or TokenReview",
    )  # fmt: skip
    parser.add_argument(
        "--conntrack-netns", metavar="NAME",
        help="read conntrack in this network namespace to undo Service NAT (default: the agent's own)",
    )  # fmt: skip
    parser.add_argument("--poll-interval", type=float, metavar="SECONDS", help="kernel map poll period")
    parser.add_argument(
        "--rtt-window",
        type=int,
        metavar="MS",
        help="sample srtt for this long at the start of each second (default 100; 1000: always)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


# --- pure helpers ----------------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9400`, `[::1]:9400`, `0.0.0.0:9443`, `:9400` (loopback) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port)


def settings_overrides(args: argparse.Namespace) -> dict:
    """Only what was given on the command line: everything else stays with FLOWMON_AGENT_* or defaults."""
    overrides: dict = {}
    if args.listen:
        overrides["listen_host"], overrides["listen_port"] = parse_listen(args.listen)
    if args.node:
        overrides["node_name"] = ",".join(args.node)
    for flag, field in (
        ("inventory", "inventory_file"),
        ("policy_file", "policy_file"),
        ("tls_cert_file", "tls_cert_file"),
        ("tls_key_file", "tls_key_file"),
        ("admin_token_file", "admin_token_file"),
        ("poll_interval", "poll_interval_seconds"),
        ("rtt_window", "rtt_window_ms"),
    ):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if args.insecure:
        overrides["insecure"] = True
    if args.no_auth:
        overrides["no_auth"] = True
    return overrides


def standalone_policy(monitors: Sequence[FlowMonitor], tokens: Sequence[str]) -> AgentPolicy:
    """Every monitor readable with each of `tokens` (standalone has one scraper: the local Prometheus)."""
    hashes = [token_sha256(t) for t in tokens]
    return compile_policy(monitors, token_hashes={m.key: hashes for m in monitors})


def host_objects(
    name: str, addresses: Sequence[str], namespaces: Mapping[str, Sequence[str]] | None = None
) -> list[dict]:
    """This host as Kubernetes objects, so that its flows are visible and named without a cluster.

    A monitor selects flows with a pod at one end; a host has none. So the host appears as a pod
    `<hostname>` in namespace `host` on a node of the same name, and so does each other network
    namespace of the host (containers, `ip netns`: `namespaces`, name → its addresses, see hostnets):
    its processes' flows read host/<hostname> → host/<hostname>:5432, a container's host/<netns>, remote
    peers `external`. All on this node: every local connection is counted once."""

    def host_pod(pod: str, ips: Sequence[str], labels: dict[str, str]) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": HOST_NAMESPACE, "labels": labels},
            "spec": {"nodeName": name},
            "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": a} for a in ips]},
        }

    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HOST_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}},
        host_pod(name, addresses, {"flowmon.io/host": "true"}),
        *(
            host_pod(pod, ips, {"flowmon.io/netns": "true"})
            for pod, ips in sorted((namespaces or {}).items())
            if pod != name and ips
        ),
    ]


def inventory_node_names(objects) -> set[str]:
    """Nodes an inventory names: its Node objects and its pods' spec.nodeName."""
    names = set()
    for obj, kind in objects:
        if kind == "Node":
            names.add((obj.get("metadata") or {}).get("name"))
        elif kind == "Pod":
            names.add((obj.get("spec") or {}).get("nodeName"))
    return names - {None, ""}


# --- I/O -------------------------------------------------------------------------------------------


def read_tokens(path: Path) -> list[str]:
    from flowmon_agent.export.tokens import TokenFileError, read_token_file

    try:
        return read_token_file(path)
    except (OSError, TokenFileError) as exc:
        raise AgentStartError(f"--token-file {path}: {exc}") from None


def credentials_problem(settings, token_file: Path | None) -> str | None:
    """Pure: why this agent would serve with auth on but no way for anyone to authenticate, or None.
    Auth is never turned off by leaving tokens out: that takes an explicit --no-auth."""
    if settings.no_auth or token_file or settings.admin_token_file or settings.token_review:
        return None
    if settings.policy_file is not None:  # the operator's policy carries each monitor's token digests
        return None
    return (
        "no token to authenticate scrapes: give --token-file (scrape tokens, one per line) and/or "
        "--admin-token-file, or pass --no-auth to serve without auth on a loopback address"
    )


def local_addresses() -> list[str]:
    return addresses_of() or ["127.0.0.1", "::1"]


def warn_foreign_node(inventory: Path, *nodes: str) -> None:
    """An agent owns the pods of its nodes: a node the inventory does not know gets no pods (each
    connection is reported by the agent of the client's node)."""
    from flowmon_agent.metadata.inventory import InventoryError, read_inventory

    try:
        known = inventory_node_names(read_inventory(inventory))
    except (OSError, InventoryError) as exc:
        raise AgentStartError(f"cannot read the inventory {inventory}: {exc}") from None
    for node in nodes:
        if known and node not in known:
            print(
                f"flowmon agent: warning: node {node!r} is not in {inventory} ({', '.join(sorted(known))}): "
                "this agent reports no pod's connections there; pass --node NAME",
                file=sys.stderr,
            )


class MonitorFiles:
    """The --monitor files: compiled now, and again whenever one changes, appears in a given directory
    or goes away (a bad edit is logged and the running policy stays)."""

    def __init__(self, paths: Sequence[str], tokens: Sequence[str]) -> None:
        self.paths, self.tokens = list(paths), list(tokens)
        self._watch = self._new_watch()

    def _new_watch(self):
        from flowmon_agent.filewatch import FileWatch
        from flowmon_contract.documents import expand_paths

        # A directory's own stat changes when an entry is added or removed.
        return FileWatch(*map(Path, self.paths), *expand_paths(self.paths))

    def compile(self) -> AgentPolicy:
        return standalone_policy(load_monitors(self.paths), self.tokens)

    def changed_policy(self) -> AgentPolicy | None:
        if not self._watch.changed():
            return None
        self._watch = self._new_watch()  # the set of files may have changed
        try:
            return self.compile()
        except ManifestError as exc:
            log.error("monitor files changed but are invalid, keeping the running policy:\n%s", exc)
            return None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from flowmon_agent.kernel.preflight import BPFUnavailableError, report

    try:
        return asyncio.run(serve(args))
    except AgentStartError as exc:
        print(f"flowmon agent: {exc}", file=sys.stderr)
        return 1
    except BPFUnavailableError as exc:  # one line naming the cause, its own exit code
        return report(exc)


class AgentStartError(RuntimeError):
    pass


def make_agent(args: argparse.Namespace):
    """The runner's Agent for these arguments, its monitor files (None in cluster mode), settings."""
    from pydantic import ValidationError

    from flowmon_agent.metadata import MetadataStore
    from flowmon_agent.runner import Agent, AgentSettings

    try:
        settings = AgentSettings(**settings_overrides(args))
    except (ValueError, ValidationError) as exc:
        raise AgentStartError(str(exc)) from None
    tokens = read_tokens(args.token_file) if args.token_file else []
    files = MonitorFiles(args.monitor, tokens) if args.monitor else None
    try:
        if files is not None:
            policy = files.compile()
        elif settings.policy_file is None:
            policy = standalone_policy([DEFAULT_MONITOR], tokens)
        else:
            policy = None  # the runner loads and watches the policy file
    except ManifestError as exc:
        raise AgentStartError("invalid monitor files:\n" + str(exc)) from None
    if problem := credentials_problem(settings, args.token_file):  # after the files' own errors
        raise AgentStartError(problem)
    if settings.inventory_file is not None:
        warn_foreign_node(settings.inventory_file, *settings.node_name)
    store, host = MetadataStore(), None
    if settings.inventory_file is None and settings.policy_file is None:  # bare: this host's namespaces
        host = HostMetadata(
            store, lambda netns: host_objects(settings.node_name[0], local_addresses(), netns)
        )
        host.refresh()

    from flowmon_agent.metadata.conntrack import ConntrackNat

    restarts = Restarts()
    nat = ConntrackNat(args.conntrack_netns, restarts=restarts)
    period = settings.full_gc_period_seconds
    agent = Agent(
        settings,
        force_compat=args.compat,
        store=store,
        nat_backends=lambda snapshot: nat.backends(snapshot.flows.keys()),
        restarts=restarts,
        full_collections=FullCollections(period) if period > 0 else None,
    )
    if policy is not None:
        agent.policy.apply(policy, source="monitor files" if files else "default monitor")
    return agent, files, nat, host


async def serve(args: argparse.Namespace) -> int:
    from flowmon_agent.export.server import ServerConfigError
    from flowmon_agent.runner import stop_on_signals

    try:
        agent, files, nat, host = make_agent(args)
    except ServerConfigError as exc:
        raise AgentStartError(str(exc)) from None
    if agent.settings.batch_scheduling and (problem := run_as_batch()):  # before any thread starts
        log.warning("%s; the agent's wake-ups may preempt applications", problem)
    stop = asyncio.Event()
    with stop_on_signals(stop):  # a child forked to read conntrack in another netns must not stop us
        print(
            "flowmon agent: compiling and loading the BPF programs (a few seconds)...",
            file=sys.stderr,
            flush=True,
        )
        try:
            await agent.start()
        except ServerConfigError as exc:  # e.g. an unusable admin token file
            raise AgentStartError(str(exc)) from None
        except OSError as exc:  # e.g. the port is taken
            raise AgentStartError(
                f"cannot serve on {agent.settings.listen_host}:{agent.settings.listen_port}: {exc}"
            ) from None
        policy = agent.policy.policy
        paths = (
            ", ".join(f"{agent.url}{m.path}" for m in policy.monitors) if policy else "(policy file pending)"
        )
        nodes = ", ".join(agent.settings.node_name)
        print(
            f"flowmon agent: node {nodes}, kernel path {agent.tracer.kernel_path}, "  # type: ignore[union-attr]
            f"srtt at close: {getattr(agent.tracer, 'rtt_at_close', '-')}, serving {paths}",
            file=sys.stderr,
            flush=True,
        )
        follow = functools.partial(follow_local_sources, files, host, agent.policy.apply)
        local = asyncio.create_task(agent.restarts.supervise("local-files", follow))
        try:
            await stop.wait()
        finally:
            local.cancel()
            await asyncio.gather(local, return_exceptions=True)
            await agent.stop()
            nat.close()
    return 0


async def follow_local_sources(
    files: MonitorFiles | None,
    host: HostMetadata | None,
    apply: Callable[..., object],
    interval: float = 1.0,
) -> None:
    """Every `interval`: recompile changed --monitor files (`apply` the policy), and follow this host's
    network namespaces (a container started or stopped: its namespace's pod follows). Runs supervised:
    an unexpected error (a file's stat failing) restarts it after a backoff."""
    while True:
        await asyncio.sleep(interval)
        if files is not None and (policy := await asyncio.to_thread(files.changed_policy)) is not None:
            apply(policy, source="monitor files")
        if host is not None:
            await asyncio.to_thread(host.refresh)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flowmon_agent`: what the agent image runs (the same as `flowmon agent`)."""
    parser = argparse.ArgumentParser(prog="flowmon agent", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
