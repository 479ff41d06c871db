"""flowmon operator: reconciles FlowMonitor resources into the shared agent and its scrape config.

May import `flowmon_contract` and `flowmon_kube` (the Kubernetes API client); never `flowmon_agent`.
"""
