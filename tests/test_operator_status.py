"""FlowMonitor status from agent reports and spec validity (flowmon_operator.status), table-driven."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowmon_contract.policy import compile_policy
from flowmon_contract.spec import FlowMonitor
from flowmon_operator.push import AgentReport
from flowmon_operator.status import (
    Agents,
    Scrapes,
    count_agents,
    invalid_status,
    last_scraped,
    running_status,
    runs_monitor,
    scrape_condition,
    set_condition,
    status_changed,
    validation_message,
)

H1, H2 = "1" * 64, "2" * 64
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


@pytest.mark.parametrize(
    ("reports", "desired", "expected"),
    [
        ([], 0, Agents(0, 0, 0)),
        ([AgentReport("a", True, H1), AgentReport("b", True, H1)], 2, Agents(2, 2, 2)),
        ([AgentReport("a", True, H1), AgentReport("b", True, H2)], 2, Agents(2, 2, 1)),
        ([AgentReport("a", True, H1), AgentReport("b", False)], 3, Agents(3, 1, 1)),
        # More pods than the DaemonSet's status says (it lags): count what exists.
        ([AgentReport("a", True, H1), AgentReport("b", True, H1)], 1, Agents(2, 2, 2)),
        ([AgentReport("a", True, error="timeout")], 1, Agents(1, 1, 0, ("a: timeout",))),
    ],
)
def test_count_agents(reports, desired, expected):
    assert count_agents(reports, desired, lambda reported: reported == H1) == expected


def policy_of(**max_series: int):
    monitors = [
        FlowMonitor.model_validate(
            {"metadata": {"namespace": ns, "name": "m"}, "spec": {"aggregation": {"maxSeries": n}}}
        )
        for ns, n in max_series.items()
    ]
    return compile_policy(monitors)


def test_an_agent_on_an_earlier_policy_runs_the_monitors_that_did_not_change():
    before = policy_of(a=10, b=10)
    now = policy_of(a=10, b=20)  # team b changed; an agent still runs `before`
    known = {before.hash: before}
    assert runs_monitor(now, "a/m", known)(before.hash) is True
    assert runs_monitor(now, "b/m", known)(before.hash) is False
    assert runs_monitor(now, "a/m", known)(now.hash) is True
    # Unknown hashes (operator restarted, foreign policy) and unknown agents count as out of sync.
    assert runs_monitor(now, "a/m", {})(before.hash) is False
    assert runs_monitor(now, "a/m", known)(None) is False
    # A monitor that is new in `now` is in sync only where `now` runs.
    added = policy_of(a=10, b=20, c=5)
    assert runs_monitor(added, "c/m", {now.hash: now})(now.hash) is False


@pytest.mark.parametrize(
    ("agents", "notes", "ready", "applied", "degraded"),
    [
        (Agents(2, 2, 2), (), ("True", "Reconciled"), ("True", "AllAgentsInSync"), ("False", "AsExpected")),
        (
            Agents(2, 2, 1),
            (),
            ("True", "Reconciled"),
            ("False", "AgentsOutOfSync"),
            ("True", "AgentsOutOfSync"),
        ),
        (
            Agents(2, 1, 0, ("b: refused",)),
            (),
            ("False", "PolicyNotApplied"),
            ("False", "AgentsOutOfSync"),
            ("True", "AgentsOutOfSync"),
        ),
        (
            Agents(3, 2, 2),
            (),
            ("True", "Reconciled"),
            ("True", "AllAgentsInSync"),
            ("True", "AgentsNotReady"),
        ),
        (
            Agents(0, 0, 0),
            (),
            ("False", "NoAgentsReady"),
            ("False", "NoAgentsReady"),
            ("False", "AsExpected"),
        ),
        (
            Agents(1, 1, 1),
            ("CRD missing",),
            ("True", "Reconciled"),
            ("True", "AllAgentsInSync"),
            ("True", "ChildrenNotApplied"),
        ),
    ],
)
def test_running_status_conditions(agents, notes, ready, applied, degraded):
    status = running_status(
        {}, generation=3, agents=agents, policy_hash=H1, predicted_series=42, now=T0, notes=notes
    )
    got = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert got == {"Ready": ready, "PolicyApplied": applied, "Degraded": degraded}
    assert [c["type"] for c in status["conditions"]] == ["Ready", "PolicyApplied", "Degraded"]
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["agents"] == {
        "desired": agents.desired,
        "ready": agents.ready,
        "inSync": agents.in_sync,
        "summary": f"{agents.in_sync}/{agents.desired}",
    }
    assert (status["observedGeneration"], status["policyHash"], status["predictedSeries"]) == (3, H1, 42)


def test_transition_time_moves_only_when_the_status_flips():
    first = set_condition([], "Ready", True, "Reconciled", "ok", now=T0, generation=1)
    same = set_condition(first, "Ready", True, "Reconciled", "still ok", now=T1, generation=2)
    flipped = set_condition(same, "Ready", False, "InvalidSpec", "bad", now=T1, generation=3)
    assert same[0]["lastTransitionTime"] == T0 and same[0]["message"] == "still ok"
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["observedGeneration"] == 3


def test_invalid_status_changes_only_ready_and_keeps_what_runs():
    previous = running_status(
        {}, generation=1, agents=Agents(2, 2, 2), policy_hash=H1, predicted_series=7, now=T0
    )
    status = invalid_status(previous, generation=2, message="spec.metrics.0: bad", now=T1)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert by_type["Ready"]["message"] == "spec.metrics.0: bad"
    assert by_type["PolicyApplied"] == next(c for c in previous["conditions"] if c["type"] == "PolicyApplied")
    assert (status["agents"], status["policyHash"], status["observedGeneration"]) == (
        previous["agents"],
        H1,
        2,
    )


def test_validation_message_names_every_field_path():
    body = {
        "metadata": {"name": "m", "namespace": "a"},
        "spec": {"aggregation": {"maxSeries": 0}, "metrics": ["x"]},
    }
    with pytest.raises(ValidationError) as info:
        FlowMonitor.model_validate(body)
    message = validation_message(info.value)
    assert (
        message.startswith("spec.")
        and "spec.aggregation.maxSeries: " in message
        and "spec.metrics.0: " in message
    )


def test_status_changed_ignores_foreign_keys():
    new = {"policyHash": H1, "agents": {"desired": 1}}
    assert not status_changed({**new, "kopf": {"x": 1}}, new)
    assert status_changed({"policyHash": H2, "agents": {"desired": 1}}, new)


def test_status_must_fit_the_crd_status_model():
    with pytest.raises(ValidationError):
        running_status(
            {}, generation=1, agents=Agents(1, 1, 1), policy_hash="not-a-hash", predicted_series=1, now=T0
        )


def test_agents_that_cannot_start_say_why_in_the_monitor_status():
    """The agents' own one-line causes (push.start_failure) reach Ready and Degraded: `kubectl get fm`
    shows that the runtime's seccomp profile denies bpf() without looking at any pod."""
    why = "flowmon-agent-x on n2: agent exited 11: flowmon agent: the seccomp profile denies bpf() …"
    none_ready = running_status(
        {},
        generation=1,
        agents=Agents(1, 0, 0),
        policy_hash=H1,
        predicted_series=7,
        now=T0,
        start_failures=[why],
    )
    conditions = {c["type"]: c for c in none_ready["conditions"]}
    assert conditions["Ready"]["reason"] == "NoAgentsReady" and why in conditions["Ready"]["message"]
    some_ready = running_status(
        {},
        generation=1,
        agents=Agents(2, 1, 1),
        policy_hash=H1,
        predicted_series=7,
        now=T0,
        start_failures=[why],
    )
    degraded = {c["type"]: c for c in some_ready["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "AgentsNotReady")
    assert degraded["message"] == f"1 of 2 agents are ready: {why}"


def scraped(ages: dict[str, float] | None) -> list[AgentReport]:
    """One ready agent that tells these ages (None: it does not say), one pod not ready."""
    return [AgentReport("a", True, H1, scraped_seconds_ago=ages), AgentReport("b", False)]


@pytest.mark.parametrize(
    ("reports", "interval", "expected"),
    [
        (scraped({}), "15s", (False, "NotScraped")),
        (scraped({"shop/other": 3.0}), "15s", (False, "NotScraped")),
        (scraped({"shop/web": 3.0}), "15s", (True, "Scraped")),
        (scraped({"shop/web": 119.0}), "15s", (True, "Scraped")),  # at least two minutes
        (scraped({"shop/web": 121.0}), "15s", (False, "ScrapesStopped")),
        (scraped({"shop/web": 200.0}), "1m", (True, "Scraped")),  # four intervals
        (scraped({"shop/web": 241.0}), "1m", (False, "ScrapesStopped")),
        (scraped(None), "15s", None),  # no agent says (not answering, or older): nothing new is known
    ],
)
def test_scrape_condition(reports, interval, expected):
    condition = scrape_condition(last_scraped(reports, "shop/web"), interval, "flowmon-web")
    assert (condition[:2] if condition else None) == expected
    if condition is not None and not condition[0]:
        assert "ServiceMonitor flowmon-web" in condition[2] and "serviceMonitorLabels" in condition[2]


def test_the_scraped_condition_keeps_its_message_while_scrapes_go_on():
    """Ages are not in the message: a steady state writes no status."""
    first = scrape_condition(last_scraped(scraped({"shop/web": 1.0}), "shop/web"), "15s", "flowmon-web")
    later = scrape_condition(last_scraped(scraped({"shop/web": 29.0}), "shop/web"), "15s", "flowmon-web")
    assert first == later


def test_the_most_recent_scrape_on_any_agent_counts():
    reports = [
        AgentReport("a", True, H1, scraped_seconds_ago={"shop/web": 500.0}),
        AgentReport("b", True, H1, scraped_seconds_ago={"shop/web": 4.0}),
    ]
    assert last_scraped(reports, "shop/web") == Scrapes(answered=2, seconds_ago=4.0)
