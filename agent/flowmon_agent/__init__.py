"""The flowmon node agent, grouped by the hops a flow takes through it.

`kernel/` (BPF programs, maps, the tracer) → `metadata/` (pods, Services, conntrack) → `aggregation/`
(tracing scope, count-once, series, the view) → `export/` (Prometheus collectors, HTTPS server, auth,
policy store). `runner` drives the loop; `main` is `flowmon agent` (also `python -m flowmon_agent`).
May import `flowmon_contract` and `flowmon_kube` (the Kubernetes API client); never `flowmon_operator`,
`flowmon_lab` or `flowmon_cli`.
"""

from flowmon_contract import __version__

__all__ = ["__version__"]
