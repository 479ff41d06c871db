"""flowmon operator: reconciles FlowMonitor resources into the shared agent and its scrape config."""
