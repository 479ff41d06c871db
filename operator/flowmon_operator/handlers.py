"""The kopf handlers: thin functions that call flowmon_operator.reconcile, wired into a registry.

`make_registry(settings)` registers them (the timer's interval comes from the settings);
`run(...)` runs the real kopf operator with that registry; `flowmon operator` calls it.
Everything a handler needs (settings, the API client, the round lock) travels in kopf's memo.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import kopf

from flowmon_contract.spec import API_GROUP, API_VERSION, PLURAL
from flowmon_operator import reconcile
from flowmon_operator.kube import KubeClient, load_connection
from flowmon_operator.reconcile import Runtime
from flowmon_operator.settings import OperatorSettings

FINALIZER = f"{API_GROUP}/finalizer"
RESOURCE = (API_GROUP, API_VERSION, PLURAL)


def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf authenticates exactly as the operator's own client does (in-cluster, else $KUBECONFIG)."""
    conn = load_connection()
    return kopf.ConnectionInfo(
        server=conn.server,
        token=conn.bearer(),
        ca_path=conn.ca_path,
        certificate_path=conn.cert_path,
        private_key_path=conn.key_path,
        insecure=conn.insecure,
    )


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorSettings = memo.config
    settings.persistence.finalizer = FINALIZER
    # Progress and the last-handled spec live in annotations: status belongs to the status model.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Kubernetes events only for problems
    # A deleted monitor keeps its finalizer until its timer has exited; check soon, not after 60 s.
    settings.background.cancellation_polling = min(5.0, config.timer_interval_seconds)
    # Reconnect watches regularly: a connection that silently died (no RST) would otherwise hang forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    memo.runtime = Runtime(config, KubeClient(load_connection()), tuple(memo.namespaces))


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.kube.close()


async def _sync(memo: kopf.Memo, **kwargs: Any) -> reconcile.Outcome:
    """One round; waiting for cert-manager is temporary: retried after one timer period."""
    try:
        return await reconcile.sync(memo.runtime, **kwargs)
    except reconcile.WaitingForCertificate as exc:
        raise kopf.TemporaryError(str(exc), delay=memo.runtime.settings.timer_interval_seconds) from None


async def reconcile_monitor(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """create, update and resume: one idempotent round. An invalid spec gets Ready=False (written by the
    round) and a permanent error: retrying cannot fix it, the next spec change will."""
    outcome = await _sync(memo, trigger=body)
    problem = outcome.problems.get(reconcile.monitor_key(body))
    if problem is not None:
        raise kopf.PermanentError(f"invalid spec: {problem}")


async def resync_monitor(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The timer: restores children edited or deleted by hand, retries agents that missed a push."""
    await _sync(memo, trigger=body)


async def delete_monitor(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Drop the monitor from the policy (the last one takes the shared objects along), then its children."""
    meta = body["metadata"]
    await _sync(memo, deleting=reconcile.monitor_key(body))
    await reconcile.delete_children(memo.runtime, meta["namespace"], meta["name"])


def make_registry(config: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    backoff = config.timer_interval_seconds
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    for cause in (kopf.on.create, kopf.on.update, kopf.on.resume):
        cause(*RESOURCE, registry=registry, backoff=backoff)(reconcile_monitor)
    kopf.on.delete(*RESOURCE, registry=registry, backoff=backoff)(delete_monitor)
    # A failed round (e.g. the API is away) is retried after one timer period, not kopf's default minute.
    kopf.timer(
        *RESOURCE,
        registry=registry,
        interval=config.timer_interval_seconds,
        initial_delay=backoff,
        backoff=backoff,
    )(resync_monitor)
    return registry


async def operator(
    config: OperatorSettings,
    *,
    namespaces: Sequence[str] = (),
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """The real kopf operator; cluster-wide unless namespaces are given. Standalone (no peering) unless a
    peering name is given: manifests/ runs one replica with the Recreate strategy."""
    await kopf.operator(
        registry=make_registry(config),
        memo=kopf.Memo(config=config, namespaces=tuple(namespaces)),
        standalone=peering_name is None,
        peering_name=peering_name,
        liveness_endpoint=liveness_endpoint,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
