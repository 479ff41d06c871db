"""flowmon node agent: kernel flow accounting, metadata, aggregation and Prometheus export."""

__version__ = "0.1.0"
