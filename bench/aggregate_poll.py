"""CPU time of one aggregation poll: N flows between 2,000 pods, three monitors, a share of flows changing.

    .venv/bin/python bench/aggregate_poll.py [--flows 10000] [--changing 1.0] [--polls 10]

Reports the median milliseconds per `Aggregator.build_view` (the agent polls once a second, so 10 ms
is 1% of one core).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from ipaddress import IPv4Address

from flowmon_agent.aggregation.aggregator import Aggregator
from flowmon_agent.kernel.counters import RTT_SLOTS, SENT, FlowCounters
from flowmon_agent.kernel.flows import FlowKey, FlowSnapshot, Reporter
from flowmon_agent.metadata import MetadataStore, Resolver
from flowmon_contract.policy import AgentPolicy, MonitorPolicy
from flowmon_contract.spec import DEFAULT_GROUP_BY, HistogramBuckets, Metric, Selection

PODS, NODES, NAMESPACES, WORKLOADS = 2000, 10, 20, 100
BASE = IPv4Address("10.0.0.0")


def build_store() -> MetadataStore:
    store = MetadataStore()
    for n in range(NODES):
        store.apply("ADDED", {"kind": "Node", "metadata": {"name": f"n{n}"}})
    for i in range(PODS):
        meta = {
            "namespace": f"ns{i % NAMESPACES}",
            "name": f"w{i % WORKLOADS}-abc-{i}",
            "labels": {"app": f"w{i % WORKLOADS}", "pod-template-hash": "abc"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"w{i % WORKLOADS}-abc", "controller": True}],
        }
        status = {"phase": "Running", "podIP": str(BASE + i + 1)}
        store.apply(
            "ADDED",
            {"kind": "Pod", "metadata": meta, "spec": {"nodeName": f"n{i % NODES}"}, "status": status},
        )
    return store


def monitor(name: str, **selection) -> MonitorPolicy:
    return MonitorPolicy(
        namespace="flowmon-system",
        name=name,
        selection=Selection.model_validate(selection),
        metrics=list(Metric),
        group_by=list(DEFAULT_GROUP_BY),
        max_series=2000,
        series_ttl_seconds=300,
        histogram_buckets=HistogramBuckets(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--changing", type=float, default=1.0, help="share of flows that grow each poll")
    parser.add_argument("--polls", type=int, default=10)
    args = parser.parse_args(argv)

    store = build_store()
    resolver = Resolver(store)
    policy = AgentPolicy(
        monitors=[
            monitor("all"),
            monitor("half", namespaces={"include": [f"ns{i}" for i in range(NAMESPACES // 2)]}),
            monitor("one", podSelector={"matchLabels": {"app": "w1"}}),
        ]
    )
    rnd = random.Random(1)
    flows: dict[FlowKey, FlowCounters] = {}
    while len(flows) < args.flows:
        client, server = BASE + rnd.randrange(1, PODS + 1), BASE + rnd.randrange(1, PODS + 1)
        rtt_slots = [0] * 10 + [3] + [0] * 21
        flows[FlowKey(client, server, 8080, Reporter.CLIENT)] = FlowCounters.of(
            sent_bytes=1,
            opened=1,
            closed=1,
            rtt_slots=rtt_slots,
            rtt_sum_us=3000,  # none open: as before
        )
    changing = list(flows)[: int(len(flows) * args.changing)]
    aggregator = Aggregator("n0")
    timings = []
    for poll in range(args.polls + 1):
        for key in changing:  # a new vector each poll, as the tracer's snapshot gives
            vector = list(flows[key])
            vector[SENT] += 100
            vector[RTT_SLOTS.start + 10] += 1
            flows[key] = FlowCounters(vector)
        snapshot = FlowSnapshot(dict(flows), {}, "default", poll)
        started = time.process_time()
        view = aggregator.build_view(snapshot, policy, resolver, float(poll))
        if poll:  # the first poll resolves everything once
            timings.append((time.process_time() - started) * 1000)
    result = {
        "flows": len(flows),
        "changing_per_poll": len(changing),
        "monitors": len(policy.monitors),
        "series": {k: v.series for k, v in view.monitors.items()},
        "median_ms_per_poll": round(statistics.median(timings), 1),
        "max_ms_per_poll": round(max(timings), 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
