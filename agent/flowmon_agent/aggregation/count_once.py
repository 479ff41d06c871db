"""Count-once: what a flow resolves to (both ends, the NAT backend) and how much of it this agent reports,
so that every connection is counted by exactly one agent (DESIGN). Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from flowmon_agent.kernel.counters import RETX_S2C, RST_S2C, WIDTH
from flowmon_agent.kernel.flows import FlowKey, IPAddress, IPNetwork, Reporter
from flowmon_agent.metadata.resolver import EXTERNAL, KIND_EXTERNAL, Endpoint, Resolver, service_endpoint
from flowmon_agent.metadata.store import MetadataStore
from flowmon_contract.policy import AgentPolicy

if TYPE_CHECKING:
    from flowmon_agent.aggregation.tracing_scope import TraceSet

# Conntrack's answer for a per-connection flow to a Service IP: the backend (ip, port).
Backend = tuple[IPAddress, int]
NatBackends = Mapping[FlowKey, Backend]
Vector = tuple[int, ...]
# What the server's agent reports when the client's agent reports the rest: what only the server sees.
SERVER_SENT_ONLY = (RETX_S2C, RST_S2C)


class PeerNames(Protocol):
    """Names of external peers learned from DNS answers (flowmon_agent.dns.names.NameTable)."""

    @property
    def generation(self) -> int: ...  # grows whenever a name appears, changes or goes

    def name_of(self, address: str, client: str | None = None) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ResolvedFlow:
    # a network where the kernel folded the peer (FlowKey.peer_network): external, or a named network
    client_ip: IPAddress | IPNetwork
    server_ip: IPAddress | IPNetwork  # the backend's for a Service connection conntrack could resolve
    client: Endpoint
    server: Endpoint
    server_port: int
    service: str  # the Service's name when the client connected to a ClusterIP
    server_dns_name: str = ""  # an external server's name from a DNS answer its client received


def peer_dns_name(
    client_ip: IPAddress, server: Endpoint, server_ip: IPAddress, names: PeerNames | None
) -> str:
    """The name a DNS answer gave an external server's address (the client's own answer first); ""
    for servers in the cluster and for addresses no answer named."""
    if names is None or server.kind != KIND_EXTERNAL:
        return ""
    return names.name_of(str(server_ip), str(client_ip)) or ""


def resolve_flow(
    key: FlowKey, resolver: Resolver, backends: NatBackends, names: PeerNames | None = None
) -> ResolvedFlow:
    """A folded peer has no address left, hence no DNS name (the agent keeps named peers exact:
    KernelConfig.named_peers)."""
    folded, port = key.peer_network, key.server_port
    if folded is not None:  # never a pod, node or Service: those are the cluster's, kept exact
        if key.reporter is Reporter.SERVER:
            return ResolvedFlow(folded, key.server_ip, EXTERNAL, resolver.endpoint(key.server_ip), port, "")
        return ResolvedFlow(key.client_ip, folded, resolver.endpoint(key.client_ip), EXTERNAL, port, "")
    client = resolver.endpoint(key.client_ip)
    service_record = resolver.service(key.server_ip, key.server_port)
    if service_record is None:
        server_ip, port = key.server_ip, key.server_port
        server = resolver.endpoint(server_ip)
    elif key in backends:
        server_ip, port = backends[key]
        server = resolver.endpoint(server_ip)
    else:  # conntrack had no entry (yet, or any more): the Service stands in for its backend
        server_ip, port = key.server_ip, key.server_port
        server = service_endpoint(service_record)
    service = service_record.name if service_record else ""
    dns_name = peer_dns_name(key.client_ip, server, server_ip, names)
    return ResolvedFlow(key.client_ip, server_ip, client, server, port, service, dns_name)


class Share(Enum):
    """How much of a flow this agent reports (DESIGN: each connection is counted once)."""

    NONE = 0
    SERVER_SENT = 1  # only what the server sent (retransmits, resets): the client's agent reports the rest
    ALL_BUT_SERVER_SENT = 2  # the server's agent reports what the server sent
    FULL = 3


def flow_share(
    reporter: Reporter,
    flow: ResolvedFlow,
    *,
    node: str | Collection[str],
    agent_nodes: Collection[str],
    traced: TraceSet,
) -> Share:
    """The client socket's agent reports a connection; the server's agent reports what only the server
    sees (its retransmits and resets) when it traces the server, and everything when no agent traces the
    client. Every agent evaluates the same rule on the same policy and metadata, so they agree. An
    endpoint with no node (an unknown address) belongs to whichever agent saw it. `node` may name several
    nodes: an agent standing for all the nodes whose sockets share its kernel (standalone mode).

    Resets: a socket counts the RSTs it sends, and RSTs it receives from a peer no traced socket on its
    kernel sent; on two nodes both ends may count one RST, hence the masks.
    """
    client, server = flow.client, flow.server
    local = {node, ""} if isinstance(node, str) else {*node, ""}
    client_traced = client.is_pod and client.node in agent_nodes and traced.has(flow.client_ip)
    server_traced = server.is_pod and server.node in agent_nodes and traced.has(flow.server_ip)
    if reporter == Reporter.CLIENT:
        if client.node not in local:
            return Share.NONE
        if client.is_pod:
            return Share.ALL_BUT_SERVER_SENT if server_traced else Share.FULL
        # A host process or an unknown address: the server's agent reports it when it traces it.
        return Share.NONE if server_traced else Share.FULL
    if server.node not in local:
        return Share.NONE
    return Share.SERVER_SENT if client_traced else Share.FULL


def share_of(delta: Vector, share: Share) -> Vector:
    if share == Share.FULL:
        return delta
    if share == Share.ALL_BUT_SERVER_SENT:
        return tuple(0 if i in SERVER_SENT_ONLY else v for i, v in enumerate(delta))
    masked = [0] * WIDTH
    for i in SERVER_SENT_ONLY:
        masked[i] = delta[i]
    return tuple(masked)


def effective_agent_nodes(
    policy: AgentPolicy, configured: Collection[str] | None, store: MetadataStore
) -> set[str]:
    """Nodes whose agent reports its clients' connections: the policy's list (the operator knows which
    agents are ready), else the agent's own setting, else every known node (standalone mode)."""
    if policy.agent_nodes is not None:
        return set(policy.agent_nodes)
    return set(configured) if configured is not None else set(store.node_names())
