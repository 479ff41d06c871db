"""A declarative mini-cluster on one host, built from network namespaces.

Built on `lab.Lab`: its switch netns (`<prefix>-sw`) is the node; it holds the bridge (the pod network,
with the pods' gateway address) and the Service rules, written the way kube-proxy's iptables mode writes
them (KUBE-SERVICES → KUBE-SVC-* with `-m statistic` → KUBE-SEP-* DNAT). Each pod is a lab netns with a
veth on that bridge, IPv4 and IPv6. `inventory()` describes it as ordinary Kubernetes objects
(Namespace, Node, Deployment, ReplicaSet, Pod, Service, EndpointSlice), which is what the standalone
agent's metadata loader reads. Nothing touches the host's own network namespace: every interface, rule
and process lives in a netns named `<prefix>-...`, so deleting those namespaces (and killing the
processes inside them) removes everything, even after a crash (`cleanup(prefix)`).

Planning (flowmon_lab.cluster_plan) and the rules and objects (flowmon_lab.cluster_objects) are pure;
only `MiniCluster` does I/O.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from flowmon_lab import network as lab
from flowmon_lab.cluster_objects import inventory_objects, kube_proxy_rules
from flowmon_lab.cluster_plan import ClusterSpec, Pod, Service, plan_cluster

BRIDGE = "br0"  # lab.Lab's bridge in its switch netns
_PR_SET_PDEATHSIG = 1


# --- I/O: building, running things inside pods, tearing down ---------------------------------------


class MiniClusterError(RuntimeError):
    """The mini-cluster could not be built; the message names the step and the command's error."""


def set_parent_death_signal() -> None:
    # A child must not outlive a demo or test that was killed: the kernel sends SIGKILL when we die.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def list_netns(prefix: str) -> list[str]:
    """Network namespaces that belong to the instance `prefix` (named `<prefix>-...`)."""
    return lab.lab_namespaces(prefix)


def netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def _kill_all(pids: Sequence[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.05)


def cleanup(prefix: str) -> list[str]:
    """Kill every process inside the netns named `<prefix>-...`, then remove them; returns their names.

    Safe at any time, e.g. after a crash: it only needs the prefix. (lab.cleanup_prefix removes the
    namespaces; processes started by someone else inside them would keep them alive, so they go first.)"""
    names = list_netns(prefix)
    pids = sorted({pid for name in names for pid in netns_pids(name)} - {os.getpid()})
    _kill_all(pids)
    lab.cleanup_prefix(prefix)
    return names


def new_prefix(base: str = "fmc") -> str:
    return f"{base}{secrets.token_hex(3)}"


class MiniCluster:
    """Builds a `ClusterSpec` on this host. Use as a context manager; teardown is idempotent.

    >>> with MiniCluster(spec) as cluster:
    ...     cluster.exec(cluster.pods_of("shop", "web")[0], ["true"])
    """

    def __init__(self, spec: ClusterSpec, prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        self.plan = plan_cluster(spec, self.prefix)
        self.lab = lab.Lab(
            self.prefix,
            [p.lab_name for p in self.plan.pods],
            subnet4=self.plan.pod_cidr,
            subnet6=self.plan.pod_cidr6,
        )

    # -- queries
    @property
    def pods(self) -> tuple[Pod, ...]:
        return self.plan.pods

    @property
    def services(self) -> tuple[Service, ...]:
        return self.plan.services

    @property
    def node_netns(self) -> str:
        return self.plan.node_netns

    @property
    def netns_names(self) -> list[str]:
        return [self.plan.node_netns, *(p.netns for p in self.plan.pods)]

    def pods_of(self, namespace: str, deployment: str) -> list[Pod]:
        pods = [p for p in self.plan.pods if p.namespace == namespace and p.deployment == deployment]
        if not pods:
            raise KeyError(f"no deployment {namespace}/{deployment}")
        return pods

    def service(self, namespace: str, name: str) -> Service:
        for svc in self.plan.services:
            if svc.namespace == namespace and svc.name == name:
                return svc
        raise KeyError(f"no service {namespace}/{name}")

    def inventory(self) -> list[dict]:
        return inventory_objects(self.plan)

    # -- lifecycle
    def __enter__(self) -> MiniCluster:
        self.build()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        """Create everything; on any failure, remove what was created and raise MiniClusterError."""
        if os.geteuid() != 0:
            raise MiniClusterError("building network namespaces needs root")
        cleanup(self.prefix)  # leftovers of a crashed run with the same prefix
        try:
            self.lab.start()
            self._setup_node()
            for pod in self.plan.pods:
                self._run(pod.netns, ["ip", "route", "add", "default", "via", self.plan.gateway])
        except lab.LabError as exc:
            self.teardown()
            raise MiniClusterError(str(exc)) from None
        except BaseException:
            self.teardown()
            raise

    def _setup_node(self) -> None:
        node, prefix_len = self.node_netns, self.plan.pod_cidr.split("/")[1]
        self._run(node, ["ip", "addr", "add", f"{self.plan.gateway}/{prefix_len}", "dev", BRIDGE])
        # Bridged frames go through iptables (br_netfilter): the reply from a Service backend to a pod
        # on the same bridge must be un-DNATed by conntrack, exactly as on a kubenet node.
        self._run(
            node,
            [
                "sysctl", "-q",
                "-w", "net.ipv4.ip_forward=1",
                "-w", "net.bridge.bridge-nf-call-iptables=1",
                "-w", "net.ipv4.conf.all.send_redirects=0",
                "-w", f"net.ipv4.conf.{BRIDGE}.send_redirects=0",
            ],
        )  # fmt: skip
        for pod in self.plan.pods:
            # A pod reaching its own Service may be DNATed back to itself (kube-proxy masquerades that).
            self._run(node, ["ip", "link", "set", pod.bridge_port, "type", "bridge_slave", "hairpin", "on"])
        self._run(
            node, ["iptables-restore", "-w", "5", "--noflush"], input=kube_proxy_rules(self.plan.services)
        )

    def _run(self, netns: str, argv: Sequence[str], *, input: str | None = None) -> None:
        done = self.exec(netns, argv, check=False, input=input)
        if done.returncode != 0:
            raise MiniClusterError(f"`{' '.join(argv)}` in {netns} failed: {done.stderr.strip()}")

    def teardown(self) -> None:
        self.lab.cleanup()  # the processes it started (process groups), then the namespaces
        cleanup(self.prefix)  # anything else still running inside them

    # -- running things inside a pod (or the node)
    def exec(
        self,
        target: Pod | str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a pod (or a netns by name) and wait for it (bounded by `timeout`)."""
        netns = target.netns if isinstance(target, Pod) else target
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def spawn(self, pod: Pod, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a long-running process inside a pod; teardown stops it, and it dies with its parent."""
        return self.lab.popen(
            self.lab.pod(pod.lab_name), argv, preexec_fn=set_parent_death_signal, **popen_kwargs
        )

    def iptables(self, pod: Pod, *args: str) -> None:
        """Add rules in a pod's own netns, e.g. a lossy link: they vanish with it."""
        self.lab.iptables(self.lab.pod(pod.lab_name), *args)
