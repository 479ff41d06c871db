"""Long-lived tasks restart after an unexpected exception with a jittered, capped backoff, counted and logged
once per restart without the exception's message: the policy itself (injected clock, random and sleep: no
waiting), then each task of the agent failed on purpose (metadata watches, the server's file reloads, the
poll's file reloads, the local monitor files, conntrack)."""

from __future__ import annotations

import asyncio
import logging
import threading
from ipaddress import ip_address

import pytest

from flowmon_agent.export.policy_store import PolicyStore
from flowmon_agent.kernel.flows import FlowKey, Reporter
from flowmon_agent.main import MonitorFiles, follow_local_sources
from flowmon_agent.metadata import MetadataStore
from flowmon_agent.metadata.conntrack import ConntrackNat
from flowmon_agent.metadata.watcher import KubeWatcher
from flowmon_agent.supervision import Backoff, Restarts, where
from flowmon_contract.policy import compile_policy
from tests.k8s_objects import namespace, pod
from tests.server_rig import ADMIN, ServerRig
from tests.test_runner import fake_agent
from tests.test_server import monitor
from tests.waiting import until, wait_for

WAIT = 10.0
SECRET = "tok-9f8e7d6c5b4a-secret"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """An injected sleep: records each wait and returns at once (yielding to the loop)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def draws(*values: float):
    """An injected random source returning `values` in turn (then the last one)."""
    queue = list(values)
    return lambda: queue.pop(0) if len(queue) > 1 else queue[0]


def restart_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flowmon_agent.supervision"]


# ---- the policy ----


def test_backoff_doubles_up_to_the_cap_with_half_of_each_step_random():
    backoff = Backoff(first=1.0, cap=8.0)
    assert [backoff.delay(n, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [backoff.delay(n, 0.999) for n in range(1, 7)] == pytest.approx([1, 2, 4, 8, 8, 8], rel=1e-3)
    assert backoff.delay(10_000, 0.5) == 6.0  # capped, and no overflow at any count


def test_where_names_the_type_and_place_never_the_message():
    try:
        {}[SECRET]
    except KeyError as exc:
        text = where(exc)
    assert text.startswith("KeyError at test_supervision.py:") and "test_where" in text
    assert SECRET not in text


@pytest.mark.asyncio
async def test_a_failing_task_restarts_with_growing_jittered_waits_and_one_log_line_each(caplog):
    caplog.set_level(logging.DEBUG)
    clock, sleeps = Clock(), Sleeps()
    restarts = Restarts(
        backoff=Backoff(first=1.0, cap=4.0), clock=clock, random=draws(0.5, 0.0, 0.75), sleep=sleeps
    )
    runs = 0

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise RuntimeError(f"bad input {SECRET}")  # a message quoting what it failed on

    await asyncio.wait_for(restarts.supervise("reader", task), WAIT)
    assert runs == 5  # four failures, then a run that returned
    assert sleeps.delays == [0.75, 1.0, 3.5, 3.5]  # steps 1, 2, 4, 4 (the cap): half fixed, half drawn
    assert restarts.counts() == {"reader": 4}
    lines = restart_lines(caplog)
    assert len(lines) == 4 and lines[0].startswith("reader stopped on an unexpected RuntimeError at ")
    assert all(SECRET not in line for line in lines)


@pytest.mark.asyncio
async def test_a_run_that_lasted_resets_the_backoff_and_cancellation_is_not_a_failure():
    clock, sleeps = Clock(), Sleeps()
    restarts = Restarts(
        backoff=Backoff(first=1.0, cap=60.0, healthy_after=300.0),
        clock=clock,
        random=lambda: 0.0,
        sleep=sleeps,
    )
    lasted = [0.0, 0.0, 400.0, 0.0]  # how long each failing run lasted
    started = asyncio.Event()

    async def task() -> None:
        if lasted:
            clock.now += lasted.pop(0)
            raise ValueError("boom")
        started.set()
        await asyncio.Event().wait()  # runs until cancelled

    supervised = asyncio.create_task(restarts.supervise("long", task))
    await asyncio.wait_for(started.wait(), WAIT)
    supervised.cancel()
    await asyncio.gather(supervised, return_exceptions=True)
    assert supervised.cancelled()
    assert sleeps.delays == [0.5, 1.0, 0.5, 1.0]  # the third run lasted 400 s: back to the first step
    assert restarts.counts() == {"long": 4}


# ---- each long-lived task of the agent, failed on purpose ----


class FailingOnce(MetadataStore):
    """A store whose first watch event for a Pod raises, as a bug or an unforeseen object would."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()

    def apply(self, event_type, obj, kind=None) -> None:
        if kind == "Pod" and event_type != "DELETED" and not self.failed.is_set():
            self.failed.set()
            raise TypeError(f"unexpected object {SECRET}")
        super().apply(event_type, obj, kind)


def test_a_metadata_watch_that_raises_restarts_alone_and_relists(kube_api, caplog):
    caplog.set_level(logging.INFO)
    sleeps = Sleeps()
    restarts = Restarts(random=lambda: 0.5, sleep=sleeps)
    store = FailingOnce()
    watcher = KubeWatcher(store, kube_api.url, token=kube_api.token, retry_seconds=(0.05, 0.2))
    watcher.start(restarts)
    try:
        assert watcher.wait_synced(WAIT)
        kube_api.create(namespace("shop"))
        kube_api.create(pod("shop", "web-1", "10.244.0.7"))  # its watch event raises in the store
        wait_for(lambda: store.pod_by_ip(ip_address("10.244.0.7")) is not None)  # the relist brings it
        assert restarts.counts() == {"kube-watch/Pod": 1} and sleeps.delays == [0.75]
        assert watcher.relists == 1  # the Pod watch alone relisted; the other resources went on
        kube_api.create(pod("shop", "web-2", "10.244.0.8"))  # and the restarted watch follows events
        wait_for(lambda: store.pod_by_ip(ip_address("10.244.0.8")) is not None)
    finally:
        watcher.stop()
    assert [line for line in restart_lines(caplog) if "kube-watch/Pod" in line]
    assert SECRET not in caplog.text


@pytest.mark.asyncio
async def test_the_servers_file_reload_task_restarts_and_then_reloads(tmp_path, caplog):
    """The admin token file becomes a symlink loop (its stat raises, not a reload error): the reload task
    restarts with a backoff instead of ending, and a later good file is picked up."""
    caplog.set_level(logging.INFO)
    sleeps = Sleeps()
    restarts = Restarts(random=lambda: 0.0, sleep=sleeps)
    async with ServerRig(tmp_path, restarts=restarts) as rig:
        token_file = rig.server.config.admin_token_file
        token_file.unlink()
        token_file.symlink_to(token_file)  # ELOOP on every stat
        await until(lambda: restarts.counts().get("server-files", 0) >= 2)
        assert (await rig.request("GET", "/metrics", ADMIN))[0] == 200  # the last good token serves
        token_file.unlink()
        token_file.write_text("rotated-admin\n")
        await until(lambda: _status(rig, "rotated-admin", 200))
        assert (await rig.request("GET", "/metrics", ADMIN))[0] == 401
    lines = [line for line in restart_lines(caplog) if line.startswith("server-files")]
    assert len(lines) == restarts.counts()["server-files"]
    assert "OSError at filewatch.py" in lines[0]
    assert sleeps.delays[:2] == [0.5, 1.0]  # Backoff's steps 1 s and 2 s, their fixed halves


async def _status(rig: ServerRig, token: str, status: int) -> bool:
    return (await rig.request("GET", "/metrics", token))[0] == status


@pytest.mark.asyncio
async def test_a_file_the_poll_cannot_stat_is_refused_and_the_poll_goes_on(tmp_path):
    """The policy file's and the inventory's checks run inside the poll: a symlink loop fails neither."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("kind: Namespace\nmetadata: {name: shop}\n")
    agent, _made = fake_agent(tmp_path, compile_policy([monitor("shop", "web")]), inventory_file=inventory)
    await agent.start()
    try:
        for path in (inventory, agent.settings.policy_file):
            path.unlink()
            path.symlink_to(path)
        polls = agent.polls
        agent.poll_once()  # raised OSError (ELOOP) out of the poll before
        assert agent.polls == polls + 1
        registry = agent.instruments.registry
        for kind in ("inventory", "policy"):
            assert registry.get_sample_value("flowmon_agent_reload_rejected_total", {"file": kind}) == 1.0
        assert registry.get_sample_value("flowmon_agent_poll_errors_total") == 0.0
        assert agent.store.namespace_labels("shop") is not None and agent.policy.policy is not None
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_the_local_monitor_files_loop_restarts_and_picks_up_the_next_good_file(tmp_path):
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "apiVersion: flowmon.io/v1alpha1\nkind: FlowMonitor\nmetadata: {name: web, namespace: shop}\n"
    )
    files = MonitorFiles([str(path)], tokens=[])
    applied: list = []
    sleeps = Sleeps()
    restarts = Restarts(random=lambda: 0.0, sleep=sleeps)

    def apply(policy, *, source: str) -> None:
        applied.append((source, [m.key for m in policy.monitors]))

    task = asyncio.create_task(
        restarts.supervise("local-files", lambda: follow_local_sources(files, None, apply, interval=0.01))
    )
    try:
        path.unlink()
        path.symlink_to(path)
        await until(lambda: restarts.counts().get("local-files", 0) >= 1)
        path.unlink()
        path.write_text(
            "apiVersion: flowmon.io/v1alpha1\nkind: FlowMonitor\nmetadata: {name: db, namespace: shop}\n"
        )
        await until(lambda: applied)
        assert applied[-1] == ("monitor files", ["shop/db"])
        assert sleeps.delays[0] == 0.5  # Backoff's first step, its fixed half
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_conntrack_that_cannot_be_asked_backs_off_instead_of_failing_the_poll(caplog):
    """Its network namespace is gone: every lookup raises. The poll gets what is known (nothing here),
    the sockets are dropped, and lookups wait a growing backoff, one log line each time."""
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    restarts = Restarts(backoff=Backoff(first=2.0, cap=8.0), clock=clock, random=lambda: 0.0)
    nat = ConntrackNat("flowmon-test-no-such-netns", restarts=restarts)
    keys = [
        FlowKey(
            ip_address("10.244.0.7"), ip_address("10.96.0.10"), 80, Reporter.CLIENT, client_port=40000 + i
        )
        for i in range(5)
    ]
    assert nat.backends(keys) == {}  # raised FileNotFoundError out of the poll before
    assert restarts.counts() == {"conntrack": 1}
    assert nat.backends(keys) == {}  # within the backoff (1 s): not asked
    assert restarts.counts() == {"conntrack": 1}
    clock.now += 1.0
    assert nat.backends(keys) == {}  # asked again, failed again: one more restart, a longer wait
    assert restarts.counts() == {"conntrack": 2}
    clock.now += 1.5
    nat.backends(keys)
    assert restarts.counts() == {"conntrack": 2}  # the second wait is 2 s
    assert len(restart_lines(caplog)) == 2  # one line per restart, not one per key
    nat.close()


def test_a_policy_listener_that_raises_stops_neither_the_policy_nor_the_other_listeners(caplog):
    """A listener failing (e.g. waking a loop that has closed) must not turn a push into a 500 nor keep
    the poll loop from hearing of the policy."""
    store = PolicyStore()
    heard: list[str] = []

    def broken(_policy) -> None:
        raise RuntimeError(f"Event loop is closed {SECRET}")

    store.subscribe(broken)
    store.subscribe(lambda policy: heard.append(policy.hash))
    policy = compile_policy([monitor("shop", "web")])
    assert store.apply(policy, source="api") == policy.hash
    assert store.policy is policy and heard == [policy.hash]
    (line,) = [r.getMessage() for r in caplog.records if "listener failed" in r.getMessage()]
    assert "RuntimeError at test_supervision.py" in line and SECRET not in caplog.text
