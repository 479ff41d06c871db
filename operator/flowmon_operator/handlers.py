"""The kopf handlers: thin functions that ask flowmon_operator.rounds for a cluster round, wired into a
registry.

`make_registry(settings)` registers them; `operator(...)` runs the real kopf operator with that registry;
`flowmon operator` calls it. At startup one RoundScheduler task starts (with the API client and the one
HTTPS channel to the agents, kept in kopf's memo): create, update and resume only ask it for a round and
read that round's report for their monitor; it also runs the periodic full round, so there is no timer
per monitor.

No deletion handler, hence no finalizer on FlowMonitors: a monitor's children are owned by it (garbage
collection removes them) and a deleted monitor only asks for a round, which drops it from the policy. So
deleting a monitor, its namespace, the CRD or the operator never waits for the operator. Monitors
created by an earlier version carry kopf's finalizer FINALIZER; kopf removes it when it sees them,
because no handler needs it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import kopf

from flowmon_contract.spec import API_GROUP, API_VERSION, PLURAL
from flowmon_operator import reconcile
from flowmon_operator.kube import load_connection
from flowmon_operator.reconcile import Runtime
from flowmon_operator.rounds import RoundScheduler
from flowmon_operator.settings import OperatorSettings

FINALIZER = f"{API_GROUP}/finalizer"  # earlier versions' finalizer: kopf removes it (see above)
log = logging.getLogger(__name__)
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
    # Reconnect watches regularly: a connection that silently died (no RST) would otherwise hang forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    runtime = Runtime.connect(config, memo.namespaces)

    async def cluster_round(requested: frozenset[str], full: bool) -> reconcile.RoundReport:
        return await reconcile.run_round(runtime, requested, full=full)

    memo.runtime = runtime
    memo.rounds = RoundScheduler(
        cluster_round, debounce=config.round_debounce_seconds, period=config.timer_interval_seconds
    )
    memo.round_task = asyncio.create_task(memo.rounds.run(), name="flowmon-rounds")


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task: asyncio.Task | None = memo.get("round_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.close()


async def _round_for(body: kopf.Body, memo: kopf.Memo) -> reconcile.RoundReport:
    """Wait for the round that covers this monitor; waiting for cert-manager is temporary."""
    try:
        return await memo.rounds.request(reconcile.monitor_key(body))
    except reconcile.WaitingForCertificate as exc:
        raise kopf.TemporaryError(str(exc), delay=memo.config.timer_interval_seconds) from None


async def reconcile_monitor(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """create, update and resume. An invalid spec gets Ready=False (written by the round) and a permanent
    error: retrying cannot fix it, the next spec change will. What the API refused for this monitor is
    in its status and retried after one period."""
    report = await _round_for(body, memo)
    key = reconcile.monitor_key(body)
    if key in report.problems:
        raise kopf.PermanentError(f"invalid spec: {report.problems[key]}")
    if key in report.errors:
        raise kopf.TemporaryError(report.errors[key], delay=memo.config.timer_interval_seconds)


async def monitor_deleted(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A monitor is gone: a round without it (the last one takes the shared objects along). Its children
    are the garbage collector's. Failures are the periodic round's to repair: nothing is retried here."""
    if event.get("type") != "DELETED":
        return
    try:
        await memo.rounds.request(reconcile.monitor_key(body))
    except Exception as exc:  # the round failed for everyone; its loop logs and goes on
        log.info("the round after deleting %s failed: %s", reconcile.monitor_key(body), exc)


def make_registry(config: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    backoff = config.timer_interval_seconds
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    for cause in (kopf.on.create, kopf.on.update, kopf.on.resume):
        cause(*RESOURCE, registry=registry, backoff=backoff)(reconcile_monitor)
    kopf.on.event(*RESOURCE, registry=registry)(monitor_deleted)
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
