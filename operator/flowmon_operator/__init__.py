"""flowmon operator: reconciles FlowMonitor resources into the shared agent, its policy and scrape config.

From event to agents: `handlers` (kopf) ask `rounds` for a cluster round → `reconcile.run_round` reads the
cluster, keeps the key material (`keys`, with `pki`), computes everything wanted with the pure
`desired.desired_objects` (from `builders`, `rules` and the ownership marks in `labels`), applies it
through `kube`, pushes the policy to the agents (`push`) and writes each monitor's status (`status`).
`render` prints the same desired objects offline; `crd` generates the CRD; `settings` holds the knobs.

May import `flowmon_contract` and `flowmon_kube` (the Kubernetes API client); never `flowmon_agent`,
`flowmon_lab` or `flowmon_cli`.
"""
