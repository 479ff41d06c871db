"""The aggregation hop: kernel flows → per-monitor series, pure functions and one stateful `Aggregator`.

`tracing_scope` (selection and tenancy → what the kernel traces: `kernel_config`), `count_once` (NAT
re-keying, resolution, which agent reports what), `series` (groupBy labels, series totals, overflow, TTL,
families), `aggregator` (counter deltas and the `Aggregator`), `isolation` (environment-isolation
counters), `view` (the immutable `AgentView` handed to the exporter).
May import `flowmon_contract`, `flowmon_agent.kernel.flows` and `.counters`, and `flowmon_agent.metadata`;
no I/O.
"""
