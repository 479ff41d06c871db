"""The kernel hop: load `bpf/flowmon.c`, configure it through maps, read its per-flow counters.

`flows` (the interface: `KernelConfig` in, `FlowSnapshot` out, the `Tracer` protocol), `counters` (the one
table of flow counters, in `struct flow_val` order), `maps` (constants and byte layouts mirrored from the
C), `preflight` (what the host lacks, and why), `loader` (BCC, map readers), `paths` (which tracepoints
this kernel has), `program` (loading, the tcp_probe hook), `config_maps` (filters through maps),
`adoption` (connections open before the agent started), `rtt_sampler` and `window_clock` (when srtt is
sampled), `flow_reader` (fold, flush, read, decode, incarnations), `tracer` (`FlowTracer`, the façade the
runner drives).
Imports nothing of flowmon outside `flowmon_agent.kernel` except `flowmon_agent.netns`.
"""
