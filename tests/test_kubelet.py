"""The agent image, run exactly as the DaemonSet the operator renders says, under runc (tests/kubelet).

Not a hand-copied spec: the DaemonSet, its ConfigMap and Secrets come from flowmon_operator.render. The
agent watches an API server (the emulator, over HTTPS, with the pod's service account token) that knows two
pods, network namespaces on this host that exchange known traffic; a scrape over HTTPS with the monitor's
token must read exact byte and connection counts. Twice: with this host's kernel headers (Debian's split
layout) mounted, and on a node without any (empty /lib/modules and /usr/src).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmon_cli import topview
from flowmon_contract.spec import FlowMonitor
from flowmon_lab.network import Lab
from flowmon_lab.prometheus import free_port
from flowmon_operator.builders import metrics_path
from flowmon_operator.render import render_all
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi.server import KubeAPI
from tests.kubeapi.shipped import install_rbac
from tests.kubelet.pod import Node, Pod, PodNetwork
from tests.test_cli_agent import loopback_exchange
from tests.tls_samples import make_pki
from tests.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.root, pytest.mark.slow]

NODE = "kubelet-node"
TOKEN = "kubelet-test-scrape-token"
READY_TIMEOUT_S = 60  # the DaemonSet's startup probe allows 36 x 5 s; here the agent is ready in seconds
KREL = os.uname().release


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeAPI, str]]:
    """The API emulator over HTTPS on 127.0.0.1 (what in-cluster clients expect), and its CA."""
    (tmp_path / "api-pki").mkdir()
    pki = make_pki(tmp_path / "api-pki", name="kubernetes")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    api = KubeAPI(ssl_context=context).start()
    try:
        yield api, pki.ca_file.read_text()
    finally:
        api.stop()


def pods_on_the_node(api: KubeAPI, lab: Lab) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})  # flowmon-system: by RBAC
    for pod in lab.pods:
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": "shop", "labels": {"app": pod.name}},
                "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "example"}]},
                "status": {
                    "phase": "Running",
                    "podIP": str(pod.ipv4),
                    "podIPs": [{"ip": str(pod.ipv4)}, {"ip": str(pod.ipv6)}],
                },
            }
        )


def rendered(settings: OperatorSettings) -> tuple[FlowMonitor, list[dict], dict]:
    monitor = FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": "shop", "uid": "u1"}})
    objects = render_all([monitor], settings, token_for=lambda _m: TOKEN)
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    return monitor, objects, daemonset


class _PinnedName(http.client.HTTPSConnection):
    """HTTPS to an address, verifying the certificate for a DNS name (ServiceMonitor tlsConfig.serverName)."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context, timeout=5)
        self.server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_name)  # type: ignore[attr-defined]


def scrape(
    settings: OperatorSettings, objects: list[dict], monitor: FlowMonitor, token: str
) -> tuple[int, str]:
    """What Prometheus does with the ServiceMonitor: the monitor's path, its token, its Secret's CA."""
    import base64

    (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["namespace"] == "shop"]
    ca = base64.b64decode(secret["data"]["ca.crt"]).decode()
    conn = _PinnedName(
        "127.0.0.1", settings.agent_port, settings.agent_service_dns, ssl.create_default_context(cadata=ca)
    )
    try:
        conn.request("GET", metrics_path(monitor), headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def node_for(tmp_path: Path, api: KubeAPI, api_ca: str, headers: str) -> Node:
    host_paths = {}
    if headers == "none":  # a node without kernel headers (GKE COS, Bottlerocket, Talos, ...)
        for path in ("/lib/modules", "/usr/src"):
            empty = tmp_path / "empty-node" / path.strip("/")
            empty.mkdir(parents=True)
            host_paths[path] = empty
    return Node(NODE, "127.0.0.1", tmp_path / "kubelet", api.host, api.port, api_ca, host_paths)


@pytest.mark.parametrize("headers", ["debian-split", "none"])
@pytest.mark.root
def test_the_rendered_daemonset_runs_and_counts(tmp_path, images, api, headers):
    kube, api_ca = api
    settings = OperatorSettings(agent_port=free_port(), agent_image=images["agent"])
    monitor, objects, daemonset = rendered(settings)
    node = node_for(tmp_path, kube, api_ca, headers)
    install_rbac(kube)  # the agent reads pods, nodes, ... with what the shipped manifests grant
    sa_token = kube.service_account_token(settings.operator_namespace, settings.agent_service_account)
    with Lab("fkl", ["client", "server"]) as lab:
        pods_on_the_node(kube, lab)
        pod = Pod(
            node,
            "flowmon-agent-k1",
            settings.operator_namespace,
            daemonset["spec"]["template"],
            objects,
            sa_token,
        )
        try:
            pod.run_init_containers()
            assert (node.seccomp_dir / "flowmon" / "agent.json").is_file()  # what the init container did
            started = pod.start("agent")
            pod.wait_ready("agent", READY_TIMEOUT_S)
            ready_s = time.monotonic() - started
            # ready once the programs are attached; the start line follows the first poll and DNS capture
            wait_for(lambda: "flowmon agent: node " in pod.logs("agent"))
            logs = pod.logs("agent")
            assert "srtt at close: sock_ops" in logs, logs  # linked on the host's cgroup v2 root
            if headers == "none":
                assert "the image's generic headers" in logs, logs
            else:
                assert (
                    f"the node's headers at /lib/modules/{KREL}/build and /lib/modules/{KREL}/source" in logs
                ), logs
            client, server = lab.pod("client"), lab.pod("server")
            port = loopback_exchange(
                1111, 2222, 3, str(server.ipv4), None, lambda: lab.inside(server), lambda: lab.inside(client)
            )
            want = ("shop/client", f"shop/server:{port}")
            deadline, rows = time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                status, text = scrape(settings, objects, monitor, TOKEN)
                assert status == 200, text
                rows = {(r.client, r.server): r for r in topview.rows(topview.parse_exposition(text))}
                if want in rows and rows[want].opened >= 3:
                    break
                time.sleep(0.5)
            assert want in rows, (sorted(rows), pod.logs("agent"))
            row = rows[want]
            assert (row.sent_bytes, row.received_bytes, row.opened) == (3 * 1111, 3 * 2222, 3)
            assert scrape(settings, objects, monitor, "not-the-token")[0] in (401, 403)
            assert pod.probe("agent", "livenessProbe") == 200 and pod.probe("agent", "readinessProbe") == 200
            assert pod.state("agent")[0]
            print(f"\nkubelet stand-in ({headers}): container start to ready {ready_s:.2f} s")
        finally:
            pod.remove()


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ("runtime-default-seccomp", 11, "the seccomp profile denies bpf() and perf_event_open()"),
        ("no-perfmon", 10, "missing capability CAP_PERFMON"),
    ],
)
@pytest.mark.root
def test_a_failed_start_names_its_cause(tmp_path, images, api, change, code, says):
    """The runtime's default seccomp profile here (podman's, like CRI-O's) denies bpf(); a capability
    taken away: one line in the log and in the termination message, and the cause's exit code."""
    kube, api_ca = api
    seccomp = "RuntimeDefault" if change == "runtime-default-seccomp" else "Localhost"
    settings = OperatorSettings(agent_port=free_port(), agent_image=images["agent"], agent_seccomp=seccomp)
    _monitor, objects, daemonset = rendered(settings)
    template = daemonset["spec"]["template"]
    if change == "no-perfmon":
        caps = template["spec"]["containers"][0]["securityContext"]["capabilities"]
        caps["add"] = [c for c in caps["add"] if c != "PERFMON"]
    node = node_for(tmp_path, kube, api_ca, "debian-split")
    install_rbac(kube)  # the agent reads pods, nodes, ... with what the shipped manifests grant
    sa_token = kube.service_account_token(settings.operator_namespace, settings.agent_service_account)
    pod = Pod(node, "flowmon-agent-k2", settings.operator_namespace, template, objects, sa_token)
    try:
        pod.run_init_containers()
        pod.start("agent")
        assert pod.wait_exit("agent", READY_TIMEOUT_S) == code, pod.logs("agent")
        message = pod.termination_log("agent").read_text().strip()
        assert message.startswith("flowmon agent: ") and says in message and "\n" not in message
        assert message in pod.logs("agent")
    finally:
        pod.remove()


@pytest.mark.root
def test_the_operator_image_runs_as_its_deployment_and_reconciles(tmp_path, images):
    """The operator Deployment of manifests/ (kustomize-built): non-root, read-only root, no capabilities,
    RuntimeDefault seccomp, in a pod network namespace of its own. Against the API emulator (HTTPS, in
    another pod's namespace) it reconciles a FlowMonitor: the agent DaemonSet appears, and the monitor's
    status says no agent is ready yet (there is no DaemonSet controller here)."""
    import yaml

    from flowmon_operator.pki import generate_ca, issue_serving_cert
    from tests.schemas import FLOWMON_CRD, SHARED_SCHEMAS
    from tests.test_manifests import find

    deployment = find("Deployment", "flowmon-operator")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == images["operator"]
    with Lab("fko", ["api", "operator"]) as lab:
        api_pod, operator_pod = lab.pod("api"), lab.pod("operator")
        ca = generate_ca("kubelet-test-api-ca")
        cert = issue_serving_cert(ca, ["kubernetes"], [str(api_pod.ipv4)])
        (tmp_path / "api.crt").write_text(cert.cert_pem)
        (tmp_path / "api.key").write_text(cert.key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "api.crt", tmp_path / "api.key")
        with lab.inside(api_pod):  # the server's thread, and so its socket, live in the api pod's namespace
            kube = KubeAPI(host=str(api_pod.ipv4), ssl_context=context).start()
        try:
            kube.create(yaml.safe_load(FLOWMON_CRD.read_text()))
            for kind in ("servicemonitors", "prometheusrules"):
                kube.create(
                    yaml.safe_load((SHARED_SCHEMAS / f"monitoring.coreos.com_{kind}.yaml").read_text())
                )
            for namespace in ("flowmon-system", "shop"):
                kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            node = Node(NODE, "127.0.0.1", tmp_path / "kubelet", str(api_pod.ipv4), kube.port, ca.cert_pem)
            network = PodNetwork(operator_pod.netns, str(operator_pod.ipv4), probe_from=api_pod.netns)
            install_rbac(kube)
            token = kube.service_account_token("flowmon-system", "flowmon-operator")
            pod = Pod(node, "flowmon-operator-k3", "flowmon-system", template, [], token, network)
            try:
                pod.start("operator")
                kube.create(
                    {
                        "apiVersion": "flowmon.io/v1alpha1",
                        "kind": "FlowMonitor",
                        "metadata": {"name": "web", "namespace": "shop"},
                    }
                )
                deadline = time.monotonic() + 60
                reason = None
                while time.monotonic() < deadline:
                    monitor = kube.get("flowmon.io/v1alpha1", "FlowMonitor", "web", "shop")
                    ready = [
                        c for c in monitor.get("status", {}).get("conditions", []) if c["type"] == "Ready"
                    ]
                    reason = ready[0]["reason"] if ready else None
                    if reason == "NoAgentsReady":
                        break
                    assert pod.state("operator")[0], pod.logs("operator")
                    time.sleep(0.5)
                assert reason == "NoAgentsReady", pod.logs("operator")
                daemonset = kube.get("apps/v1", "DaemonSet", "flowmon-agent", "flowmon-system")
                agent = daemonset["spec"]["template"]["spec"]["containers"][0]
                assert agent["image"] == images["agent"]
                assert agent["securityContext"]["seccompProfile"]["type"] == "Localhost"
                pod.wait_ready("operator", 30)  # kopf's liveness endpoint, probed as kubelet would
            finally:
                pod.remove()
        finally:
            kube.stop()
