"""The kernel hop: load `bpf/flowmon.c`, configure it through maps, read its per-flow counters.

`loader` (BCC and host checks), `paths` (which tracepoints this kernel has), `maps` (binary layouts of
the maps), `flows` (what a poll returns), `adoption` (connections open before the agent started),
`window_clock` (the RTT sampling window), `tracer` (`FlowTracer`, the one object the runner uses).
Imports nothing of flowmon outside `flowmon_agent.kernel` except `flowmon_agent.netns`.
"""
