"""Kubernetes metadata for flow attribution: records, the store, the inventory file, the watcher,
and the IP resolver."""

from flowmon_agent.metadata.inventory import InventoryError, load_inventory, parse_inventory
from flowmon_agent.metadata.records import PodRecord, ServiceRecord, parse_object
from flowmon_agent.metadata.resolver import EXTERNAL, Endpoint, Resolver
from flowmon_agent.metadata.store import MetadataStore
from flowmon_agent.metadata.watcher import KubeWatcher

__all__ = [
    "EXTERNAL",
    "Endpoint",
    "InventoryError",
    "KubeWatcher",
    "MetadataStore",
    "PodRecord",
    "Resolver",
    "ServiceRecord",
    "load_inventory",
    "parse_inventory",
    "parse_object",
]
