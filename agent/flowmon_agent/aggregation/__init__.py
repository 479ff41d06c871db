"""The aggregation hop: kernel flows → per-monitor series, pure functions and one stateful `Aggregator`.

`aggregator` (NAT re-keying, count-once, selection, tenancy, groupBy, overflow, TTL), `isolation`
(environment-isolation counters), `view` (the immutable `AgentView` handed to the exporter).
May import `flowmon_contract`, `flowmon_agent.kernel.flows` and `flowmon_agent.metadata`; no I/O.
"""
