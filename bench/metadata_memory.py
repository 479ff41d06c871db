"""Memory of the agent's Kubernetes metadata: extra RSS to list and keep 20,000 pods (budget: 100 MB).

A synthetic API server (a child process, so its memory is not counted) serves realistic objects: pods
of ~6 KB JSON each (containers, env, volumes, managedFields, conditions), spread over namespaces,
nodes, ReplicaSets and Services, with paging (limit/continue) and watches that stay open. This process
runs the real KubeWatcher until it is synced, resolves every pod IP once (filling the resolver's
cache, as flows would), and reports RSS growth and the peak.

    .venv/bin/python -m bench.metadata_memory [--pods 20000] [--budget-mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import sys
import time
from ipaddress import IPv4Address

from bench.waiting import wait_listening
from flowmon_lab.prometheus import free_port  # yaml, its one heavy import, the watcher loads too

NAMESPACES, NODES, PODS_PER_RS, SERVICES_PER_NS = 50, 100, 10, 20


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(field)


def pod_object(i: int) -> dict:
    ns, rs_index = f"team-{i % NAMESPACES}", i // PODS_PER_RS
    app = f"app-{rs_index % 400}"
    rs = f"{app}-{rs_index:05d}"
    labels = {"app": app, "pod-template-hash": f"{rs_index:05d}", "team": ns, "version": "v1"}
    ip = str(IPv4Address("10.128.0.0") + i + 2)
    container = {
        "name": "main",
        "image": f"registry.example.com/{app}:1.2.{i % 7}",
        "ports": [{"containerPort": 8080, "protocol": "TCP", "name": "http"}],
        "env": [{"name": f"SETTING_{k}", "value": f"value-{k}-{i}"} for k in range(8)],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {"name": "token", "mountPath": "/var/run"},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
    }
    return {
        "metadata": {
            "name": f"{rs}-{i:06d}",
            "namespace": ns,
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(1000 + i),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": rs,
                    "uid": f"rs-{rs_index}",
                    "controller": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in labels}}, "f:spec": {}},
                }
            ],
        },
        "spec": {
            "nodeName": f"node-{i % NODES}",
            "containers": [container, {**container, "name": "sidecar", "env": container["env"][:2]}],
            "volumes": [
                {"name": "config", "configMap": {"name": f"{app}-config"}},
                {"name": "token", "projected": {}},
            ],
            "serviceAccountName": "default",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": f"192.168.{i % NODES // 250}.{i % NODES % 250 + 1}",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": [
                {
                    "name": n,
                    "ready": True,
                    "restartCount": 0,
                    "image": container["image"],
                    "containerID": f"containerd://{i:064d}",
                }
                for n in ("main", "sidecar")
            ],
        },
    }


def collections(pods: int) -> dict[str, callable]:
    rs_count = (pods + PODS_PER_RS - 1) // PODS_PER_RS

    def rs_object(j: int) -> dict:
        app = f"app-{j % 400}"
        owner = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": app,
            "uid": f"d-{j}",
            "controller": True,
        }
        meta = {
            "name": f"{app}-{j:05d}",
            "namespace": f"team-{(j * PODS_PER_RS) % NAMESPACES}",
            "ownerReferences": [owner],
        }
        return {"metadata": meta, "spec": {"replicas": PODS_PER_RS}}

    def service_object(j: int) -> dict:
        spec = {"clusterIP": str(IPv4Address("10.96.0.10") + j), "ports": [{"port": 80, "protocol": "TCP"}]}
        return {"metadata": {"name": f"svc-{j}", "namespace": f"team-{j % NAMESPACES}"}, "spec": spec}

    def node_object(j: int) -> dict:
        meta = {"name": f"node-{j}", "labels": {"topology.kubernetes.io/zone": f"zone-{j % 3}"}}
        address = [{"type": "InternalIP", "address": f"192.168.{j // 250}.{j % 250 + 1}"}]
        return {"metadata": meta, "status": {"addresses": address}}

    def ns_object(j: int) -> dict:
        return {"metadata": {"name": f"team-{j}", "labels": {"env": "prod" if j % 2 else "staging"}}}

    return {
        "/api/v1/pods": (pods, pod_object),
        "/apis/apps/v1/replicasets": (rs_count, rs_object),
        "/api/v1/services": (NAMESPACES * SERVICES_PER_NS, service_object),
        "/api/v1/nodes": (NODES, node_object),
        "/api/v1/namespaces": (NAMESPACES, ns_object),
        "/apis/batch/v1/jobs": (0, None),
    }


def serve(port: int, pods: int) -> None:
    """The synthetic API (child process): pages are generated on request, watches idle until timeout."""
    import logging

    from aiohttp import web

    logging.disable(logging.CRITICAL)  # watches cut at shutdown are expected
    table = collections(pods)

    async def handle(request: web.Request) -> web.StreamResponse:
        count, make = table[request.path]
        if request.query.get("watch"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            await asyncio.sleep(float(request.query.get("timeoutSeconds", "60")))
            return resp
        limit = int(request.query.get("limit", "500"))
        start = int(request.query.get("continue", "0"))
        end = min(count, start + limit)
        meta = {"resourceVersion": "999999", **({"continue": str(end)} if end < count else {})}
        body = {
            "kind": "List",
            "apiVersion": "v1",
            "metadata": meta,
            "items": [make(i) for i in range(start, end)],
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=20_000)
    parser.add_argument("--budget-mb", type=float, default=100.0)
    args = parser.parse_args(argv)

    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port, args.pods), daemon=True)
    server.start()
    try:
        wait_listening("127.0.0.1", port, timeout=20)
        # Everything the measured path imports is loaded before the baseline.
        from flowmon_agent.metadata import MetadataStore, Resolver
        from flowmon_agent.metadata.watcher import KubeWatcher

        sample = json.dumps(pod_object(12345))
        gc.collect()
        before = _status_kb("VmRSS")
        started = time.monotonic()
        store = MetadataStore()
        watcher = KubeWatcher(store, f"http://127.0.0.1:{port}", page_size=500).start()
        if not watcher.wait_synced(300):
            print("not synced in 300 s", file=sys.stderr)
            return 2
        synced_s = time.monotonic() - started
        resolver = Resolver(store)
        pods = store.pods()
        resolved = sum(resolver.endpoint(ip).kind == "deployment" for p in pods for ip in p.ips)
        del pods
        gc.collect()
        after, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
        watcher.stop()
    finally:
        server.terminate()
        server.join(10)
    extra_mb = (after - before) / 1024
    result = {
        "pods": args.pods,
        "pod_json_bytes": len(sample),
        "resolved_to_deployment": resolved,
        "sync_seconds": round(synced_s, 2),
        "extra_rss_mb": round(extra_mb, 1),
        "peak_rss_over_baseline_mb": round((peak - before) / 1024, 1),
        "budget_mb": args.budget_mb,
    }
    print(json.dumps(result, indent=2))
    ok = extra_mb <= args.budget_mb and resolved == args.pods
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
