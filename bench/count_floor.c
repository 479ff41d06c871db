// Benchmark floor: the same hooks as bpf/flowmon.c's default path, each only counting its events in a
// per-CPU array. The difference between this and "no tracer" is the cost of being attached at all.
// FLOOR_RAW 1: sock_{send,recv}_length as raw tracepoints (like flowmon's default), 0: classic.
// FLOOR_PROBE 0: without tcp:tcp_probe (what flowmon attaches only while RTT is wanted).
// FLOOR_SKB 1: also a cgroup-skb program per direction (linked to the cgroup v2 root by the bench, where
// bpf/udp.c and bpf/dns.c hook), counting every packet without reading it: the floor of UDP and DNS.
#ifndef FLOOR_RAW
#define FLOOR_RAW 1
#endif
#ifndef FLOOR_PROBE
#define FLOOR_PROBE 1
#endif
#ifndef FLOOR_SKB
#define FLOOR_SKB 0
#endif
BPF_PERCPU_ARRAY(events, u64, 10);

static __always_inline int bump(u32 idx) {
    u64 *v = events.lookup(&idx);
    if (v)
        (*v)++;
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) { return bump(0); }
#if FLOOR_RAW
RAW_TRACEPOINT_PROBE(sock_send_length) { return bump(1); }
RAW_TRACEPOINT_PROBE(sock_recv_length) { return bump(2); }
#else
TRACEPOINT_PROBE(sock, sock_send_length) { return bump(1); }
TRACEPOINT_PROBE(sock, sock_recv_length) { return bump(2); }
#endif
#if FLOOR_PROBE
TRACEPOINT_PROBE(tcp, tcp_probe) { return bump(3); }
#endif
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) { return bump(4); }
RAW_TRACEPOINT_PROBE(tcp_send_reset) { return bump(5); }
TRACEPOINT_PROBE(tcp, tcp_receive_reset) { return bump(6); }
#if FLOOR_SKB
int floor_skb_ingress(struct __sk_buff *skb) {
    bump(7);
    return 1;  // let the packet pass
}
int floor_skb_egress(struct __sk_buff *skb) {
    bump(8);
    return 1;
}
#endif
