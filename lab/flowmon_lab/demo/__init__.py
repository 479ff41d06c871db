"""`flowmon demo`: a mini-cluster, its traffic, the agents and a real Prometheus on one host.

Modules import nothing heavy at import time: `trafficgen` runs inside every pod and uses only the
standard library.
"""
