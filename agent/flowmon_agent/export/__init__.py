"""The export hop: serve the current view to Prometheus over HTTPS, per monitor, with tokens.

`collectors` (prometheus_client collectors over an `AgentView`), `server` (aiohttp HTTPS server),
`auth` (tokens, TokenReview), `policy_store` (the running policy, from the ConfigMap file or a push).
May import `flowmon_contract` and `flowmon_agent.aggregation.view`.
"""
