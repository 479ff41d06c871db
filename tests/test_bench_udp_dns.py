"""UDP and DNS on in the interleaved overhead bench (bench/udp_dns_modes.py): the workloads and modes are
wired, the monitor the agent mode runs with is one the agent accepts, the DNS capture switches as the
agent's DnsLifecycle polls it, and the report judges each mode against floor-skb too."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.churn_interleaved import main as churn_main
from bench.kernel_overhead import (
    DEFAULT_MODES,
    MODES,
    PERSISTENT_MODES,
    WORKLOADS,
    Result,
    gap_interval,
    verdicts,
)
from bench.udp_dns_modes import (
    DNS_WORKLOADS,
    UDP_DNS_MODES,
    SwitchedDns,
    counted_totals,
    skb_floor_lines,
    udp_dns_monitor,
    udp_dns_policy,
)
from flowmon_agent.dns.capture import CaptureStats
from flowmon_agent.dns.lifecycle import DnsLifecycle
from flowmon_agent.dns.tracker import DnsTracker
from flowmon_contract.documents import parse_text
from flowmon_contract.spec import DNS_METRICS, UDP_METRICS


def test_the_dns_workloads_and_the_udp_dns_modes_are_wired_and_run_on_demand() -> None:
    assert set(DNS_WORKLOADS) == {"dns-flood", "dns-rate"} and set(DNS_WORKLOADS) <= set(WORKLOADS)
    assert UDP_DNS_MODES == ("floor-skb", "flowmon-udp-dns", "agent-udp-dns")
    for mode in UDP_DNS_MODES:  # loaded once, switched in milliseconds: interleaved churn can take them
        assert mode in MODES and mode in PERSISTENT_MODES and mode not in DEFAULT_MODES


def test_interleaved_churn_refuses_only_what_cannot_switch(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:  # before any namespace or process is made
        churn_main(["--modes", "floor-skb,flowmon-udp-dns,agent-udp-dns,agent"])
    assert exit_info.value.code == 2
    assert "not ['agent']" in capsys.readouterr().err


def test_the_agent_mode_runs_a_monitor_the_agent_accepts_with_udp_and_dns() -> None:
    (loaded,), problems = parse_text("udp-dns.yaml", json.dumps(udp_dns_monitor()))  # as `--monitor`
    assert problems == []
    metrics = set(loaded.monitor.spec.metrics)
    assert metrics >= UDP_METRICS | DNS_METRICS
    assert loaded.monitor.key == "flowmon-system/host"  # the bare agent's URL, scraped the same way
    policy = udp_dns_policy()
    assert policy.wants_udp and policy.wants_dns and policy.wants_rtt


PAIR = 'client_namespace="host",client_workload="fkb-client"'
SERVER = 'server_namespace="host",server_workload="fkb-server"'
OTHER = 'client_namespace="host",client_workload="elsewhere"'


def test_what_the_agent_counted_is_read_per_pair_and_dns_timeouts_are_not_answers() -> None:
    text = "\n".join(
        [
            "# TYPE flowmon_tcp_connections_opened_total counter",
            f'flowmon_tcp_connections_opened_total{{{PAIR},{SERVER},server_port="8080"}} 40',
            f'flowmon_tcp_connections_opened_total{{{OTHER},{SERVER},server_port="8080"}} 7',
            "# TYPE flowmon_udp_sent_bytes_total counter",
            f'flowmon_udp_sent_bytes_total{{{PAIR},{SERVER},server_port="5201"}} 1400',
            "# TYPE flowmon_dns_requests_total counter",
            f'flowmon_dns_requests_total{{{PAIR},{SERVER},server_port="53",qtype="A",rcode="NOERROR"}} 90',
            f'flowmon_dns_requests_total{{{PAIR},{SERVER},server_port="53",qtype="A",rcode="timeout"}} 3',
            "",
        ]
    )
    totals = counted_totals(text, "host/fkb-client", "host/fkb-server")
    assert totals == {"opened": 40, "sent_bytes": 0, "udp_sent_bytes": 1400, "dns_answered": 90}


class Capture:
    """Stands in for DnsCapture (BPF): counts its polls; `seen` grows by 10 a poll."""

    batch_max = 4

    def __init__(self, made: list[Capture]) -> None:
        self.polls, self.closed = 0, False
        made.append(self)

    def poll(self, timeout_ms: int = 0) -> int:
        assert not self.closed
        self.polls += 1
        return 1

    def stats(self) -> CaptureStats:
        fields = dict.fromkeys((f.name for f in dataclasses.fields(CaptureStats)), 0)
        return CaptureStats(**{**fields, "seen": 10 * self.polls, "read": self.polls})

    def close(self) -> None:
        self.closed = True


def test_the_capture_exists_only_while_switched_on_and_its_counts_carry_across() -> None:
    made: list[Capture] = []
    switched = SwitchedDns(DnsTracker(), lambda _tracker: Capture(made))
    lifecycle = DnsLifecycle(switched.tracker, lambda _tracker: switched)  # as the agent holds it
    policy = udp_dns_policy()
    assert lifecycle.poll(policy) == 0 and made == []  # attached for the lifecycle, switched off
    for _ in range(2):  # on: made at the next poll (the agent's poll thread), off: read once more, closed
        switched.want(True)
        assert not switched.applied.is_set()
        assert lifecycle.poll(policy) == 1 and switched.applied.is_set()
        switched.want(False)
        assert lifecycle.poll(policy) == 0 and made[-1].closed
    assert [c.polls for c in made] == [2, 2]
    assert switched.stats().seen == 40 and lifecycle.health().events["seen"] == 40
    switched.want(True)
    switched.apply()
    lifecycle.close()  # at stop: closed without another attach
    assert made[-1].closed and len(made) == 3


def test_each_mode_is_judged_against_floor_skb_in_the_same_rounds() -> None:
    results = {
        "churn": Result(
            ratio={"floor": [0.98, 0.97], "floor-skb": [0.96, 0.95], "flowmon-udp-dns": [0.95, 0.94]},
            cost={"floor": [1.0, 1.0], "floor-skb": [1.02, 1.04], "flowmon-udp-dns": [1.05, 1.06]},
            cpu={"flowmon-udp-dns": [(0.01, 2.0), (0.01, 2.0)]},
        ),
        "dns-rate": Result(
            ratio={"floor-skb": [1.0], "agent-udp-dns": [1.0]},
            cost={"floor-skb": [1.0], "agent-udp-dns": [1.1]},
        ),
    }
    interval = "(90% interval {0} to {0})"
    assert verdicts(results)[1:3] == [
        "- churn: flowmon-udp-dns +3.0 points below the floor (target <= 2): NOT met "
        + interval.format("+3.0"),
        "- churn: flowmon-udp-dns +1.0 points below floor-skb (target <= 2): met " + interval.format("+1.0"),
    ]
    lines = skb_floor_lines(results, gap_interval)
    assert lines[0] == "Against floor-skb (same rounds):"
    assert lines[1].startswith("- churn: floor -2.0 points below floor-skb")  # the skb hook's own cost
    assert lines[2].startswith(
        "- churn: flowmon-udp-dns +1.0 points below floor-skb " + interval.format("+1.0")
    )
    assert lines[2].endswith("workload CPU per unit 1.024 of floor-skb's")  # median of 1.0294 and 1.0192
    assert lines[3].startswith("- dns-rate: agent-udp-dns +0.0 points below floor-skb")
    assert lines[3].endswith("workload CPU per unit 1.100 of floor-skb's")
    assert skb_floor_lines({"churn": Result(ratio={"floor": [1.0]})}, gap_interval) == []
