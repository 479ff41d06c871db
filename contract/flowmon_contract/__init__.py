"""The operator-agent contract: what a FlowMonitor says and what the agent is told.

The FlowMonitor spec (`spec`, `alerting`, `selectors`), reading FlowMonitor documents (`documents`),
the compiled agent policy (`policy`) and the exported metric names and label sets (`metrics`).
Both sides import this package; it imports neither (only pydantic and the standard library), so that a
change to the contract is one change in one place.
"""

__version__ = "0.1.0"
