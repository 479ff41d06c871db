// The flow key of bpf/flowmon.c (TCP) and bpf/udp.c (UDP, client_port 0): one layout, one decoder in user
// space (flowmon_agent.kernel.maps.FLOW_KEY).
#ifndef FLOWMON_FLOW_KEY_H
#define FLOWMON_FLOW_KEY_H

// Aggregated flow: every connection client -> server:port seen by one end (reporter). IPv4 addresses
// use the first 4 bytes; IPv4-mapped IPv6 addresses are stored as IPv4. client_port is 0 except for
// connections to a NAT peer (a Service IP): those stay per connection so user space can undo the NAT.
// peer_fold (peer_fold.h): 0, or the remote end (the one that is not the reporter) is folded to a network
// (prefix length + 1; 1: external, every address outside the cluster's networks, address zeroed).
struct flow_key {
    u8 client[16];
    u8 server[16];
    u16 family;
    u16 server_port;
    u8 reporter;
    u8 peer_fold;
    u16 client_port;
};

#endif
