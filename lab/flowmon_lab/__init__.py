"""The lab: flowmon on one host, with network namespaces for pods and nodes (tests and `flowmon demo`).

`network` (netns pods on a bridge), `minicluster` (nodes, Deployments, Services from netns), `prometheus`
(a real Prometheus process), `demo/` (the demo's scenario, traffic and live view). May import every
other flowmon package; none of them imports it, and it is never installed in an image.
"""
