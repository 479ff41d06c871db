"""Image sizes and the agent container's start-to-ready time, as the DaemonSet runs it.

    .venv/bin/python -m bench.images [--starts 10]      (root; builds the images first when they changed)

Sizes: uncompressed as podman stores them; compressed as a registry would hold them (every layer gzipped
by `skopeo copy --dest-compress` into an OCI layout, blobs summed). Start to ready: the DaemonSet
flowmon_operator.render produces, run by the kubelet stand-in of the tests (tests/kubelet, under runc with
its securityContext, volumes and seccomp profile) against the API emulator; from `podman run` to the
readiness probe's first 200, on a node with Debian's split headers and on one without headers.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from flowmon_contract.spec import FlowMonitor
from flowmon_lab.prometheus import free_port
from flowmon_operator.render import render_all
from flowmon_operator.settings import OperatorSettings
from tests.kubeapi.server import KubeAPI
from tests.kubeapi.shipped import install_rbac
from tests.kubelet.pod import Node, Pod
from tests.tls_samples import make_pki

REPO = Path(__file__).resolve().parents[1]


def build() -> dict[str, str]:
    subprocess.run(["bash", str(REPO / "scripts" / "images.sh")], check=True)
    version = next(
        line.split('"')[1]
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if line.startswith("version")
    )
    return {name: f"flowmon/{name}:{version}" for name in ("agent", "operator")}


def sizes(image: str, work: Path) -> tuple[int, int]:
    """(uncompressed bytes, gzip-compressed bytes of config and layers)."""
    inspect = ["podman", "image", "inspect", "--format", "{{.Size}}", image]
    stored = int(subprocess.run(inspect, capture_output=True, text=True, check=True).stdout)
    layout = work / image.replace("/", "_").replace(":", "_")
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "gzip",
         f"containers-storage:localhost/{image}", f"oci:{layout}:bench"],
        check=True,
    )  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    compressed = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    return stored, compressed


def start_to_ready(image: str, headers: str, work: Path) -> float:
    pki_dir = work / f"pki-{time.monotonic_ns()}"
    pki_dir.mkdir()
    pki = make_pki(pki_dir, name="kubernetes")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    api = KubeAPI(ssl_context=context).start()
    settings = OperatorSettings(agent_port=free_port(), agent_image=image)
    monitor = FlowMonitor.model_validate({"metadata": {"name": "web", "namespace": "shop", "uid": "u1"}})
    objects = render_all([monitor], settings, token_for=lambda _m: "bench-token")
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    host_paths = {}
    if headers == "none":
        for path in ("/lib/modules", "/usr/src"):
            host_paths[path] = pki_dir / "empty" / path.strip("/")
            host_paths[path].mkdir(parents=True)
    node = Node(
        "bench-node", "127.0.0.1", work / "kubelet", api.host, api.port, pki.ca_file.read_text(), host_paths
    )
    install_rbac(api)
    token = api.service_account_token(settings.operator_namespace, settings.agent_service_account)
    pod = Pod(
        node,
        "flowmon-agent-bench",
        settings.operator_namespace,
        daemonset["spec"]["template"],
        objects,
        token,
    )
    try:
        pod.run_init_containers()
        started = pod.start("agent")
        pod.wait_ready("agent", 120)
        return time.monotonic() - started
    finally:
        pod.remove()
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10, help="container starts per header variant")
    args = parser.parse_args()
    images = build()
    with tempfile.TemporaryDirectory(prefix="flowmon-bench-images-") as tmp:
        work = Path(tmp)
        for image in images.values():
            stored, compressed = sizes(image, work)
            print(f"{image}: {stored / 1e6:.1f} MB uncompressed, {compressed / 1e6:.1f} MB compressed (gzip)")
        for headers in ("debian-split", "none"):
            times = [start_to_ready(images["agent"], headers, work) for _ in range(args.starts)]
            print(
                f"agent start to ready, headers {headers}: median {statistics.median(times):.2f} s, "
                f"min {min(times):.2f} s, max {max(times):.2f} s ({len(times)} starts)"
            )


if __name__ == "__main__":
    main()
