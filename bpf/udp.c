// flowmon UDP accounting: application payload bytes and datagrams per workload pair, aggregated in the
// kernel (no per-packet output to user space), for connected and unconnected sockets, IPv4 and IPv6.
//
// Hook: BPF_PROG_TYPE_CGROUP_SKB on the cgroup v2 root, ingress and egress: this file is a body, its
// entry points are bpf/skb.c's (one program per direction for UDP and DNS, loaded by
// agent/flowmon_agent/kernel/skb_hooks.py). Every socket
// of the node is below the root, whatever its network namespace. Egress runs before IP fragmentation
// and ingress after reassembly, at the socket: one whole datagram (or a UDP GSO/GRO train of
// skb->gso_segs datagrams) per run, of a socket on this node. Only `__sk_buff` and the packet are read
// (stable UAPI); the program always lets the packet pass (returns 1) and never changes it.
//
// Client and server: the client is the end that sent the first datagram of the 5-tuple. The first
// datagram a socket's 5-tuple (local, remote address and port) shows decides its role (egress: this
// end is the client; ingress: the peer is), kept in `udp_tuples` until the tuple is idle for
// UDP_IDLE_NS, then decided afresh. `udp_tuples` is a plain hash (never evicts a live tuple): user space
// deletes idle tuples (agent/flowmon_agent/kernel/udp_flows.py); a new tuple that finds it full is
// counted in udp_stats[UST_TUPLE_FULL] and decided by ports instead (the lower port is the server's).
//
// Aggregation: `udp_flows` (LRU) is keyed by bpf/flowmon.c's `struct flow_key` layout, without the
// client port, with the reporting end's role; user space reads it each poll like the TCP flows and counts
// evictions from udp_stats[UST_FLOWS_CREATED]. Directions are client→server (c2s) and server→client.
//
// Integer cflags (set by udp_flows.py): UDP_TUPLE_MAX, UDP_FLOW_MAX, UDP_IDLE_S, PEER_NETS_MAX
// (peer_fold.h), and UDP_MODE: 1 the product; for bench/kernel_overhead.py, 0 the count-only floor of
// this hook (every line up to the datagram's walk shared) and 2 the product with roles by ports alone
// (no tuple map: what remembering the first sender costs).

#include "skb_headers.h"

#ifndef UDP_TUPLE_MAX
#define UDP_TUPLE_MAX 65536
#endif
#ifndef UDP_FLOW_MAX
#define UDP_FLOW_MAX 16384
#endif
#ifndef UDP_IDLE_S
#define UDP_IDLE_S 120
#endif
#ifndef UDP_MODE
#define UDP_MODE 1
#endif

#define FM_AF_INET 2
#define FM_AF_INET6 10
#define FM_ROLE_CLIENT 0
#define FM_ROLE_SERVER 1
#define UDP_IDLE_NS ((u64)UDP_IDLE_S * 1000000000ULL)
#define UDP_TOUCH_NS 1000000000ULL // a tuple's last_ns is rewritten at most once a second

enum udp_stat {
    UST_FLOWS_CREATED = 0, // udp_flows entries created (evictions = created - entries present)
    UST_FLOW_FAILED = 1,   // datagrams not counted: no flow entry could be made
    UST_TUPLE_FULL = 2,    // new tuples not remembered (udp_tuples full): decided by ports
    UST_NOT_WALKED = 3,    // IPv6 packets with extension headers, not counted
    UST_SEEN = 4,          // UDP_MODE 0: datagrams seen
    UST_MAX = 5,
};

// A socket's 5-tuple, from its own side (IPv4 in the first 4 bytes).
struct udp_tuple {
    u8 local[16];
    u8 remote[16];
    u16 local_port;  // host byte order
    u16 remote_port;
    u16 family;      // FM_AF_INET or FM_AF_INET6
    u16 pad;
};

struct udp_role {
    u64 last_ns;     // bpf_ktime_get_ns of the tuple's last datagram (to the second)
    u64 local_is_client;
};

#include "flow_key.h"  // client_port is 0; peer_fold as for TCP (peer_fold.h)

struct udp_val {
    u64 created_ns;
    u64 c2s_bytes;      // application payload bytes, client → server
    u64 s2c_bytes;
    u64 c2s_datagrams;
    u64 s2c_datagrams;
};

struct ip_key {
    u8 addr[16];
    u16 family;
    u16 pad;
};

BPF_HASH(udp_tuples, struct udp_tuple, struct udp_role, UDP_TUPLE_MAX);
BPF_TABLE("lru_hash", struct flow_key, struct udp_val, udp_flows, UDP_FLOW_MAX);
BPF_PERCPU_ARRAY(udp_stats, u64, UST_MAX);
// Configuration written by user space, as bpf/flowmon.c's (agent/flowmon_agent/kernel/config_maps.py):
// cfg[0] local-IP filter on, cfg[1] ignored ports on; the other indexes are unused here.
BPF_ARRAY(cfg, u64, 6);
BPF_HASH(local_ips, struct ip_key, u8, 4096);
BPF_HASH(ignored_ports, u16, u8, 1024);
#include "peer_fold.h"

static __always_inline void stat(u32 which) {
    u64 *n = udp_stats.lookup(&which);
    if (n)
        *n += 1; // per-CPU: no atomic needed
}

static __always_inline int flag(u32 index) {
    u64 *on = cfg.lookup(&index);
    return on && *on;
}

// The key's peer (the end that is not the reporter) outside the cluster's networks is folded, as TCP
// keys are (bpf/flowmon.c's fold_peer): the flows grow with the cluster, not with the internet.
static __always_inline u8 fold_addr(u8 *addr, u16 family) {
    u32 zero = 0;
    u64 *on = peer_fold_on.lookup(&zero);
    if (!on || !*on)
        return 0;
    struct peer_net_key nk = {};
    peer_net_key_of(&nk, addr, family);
    return peer_fold_apply(addr, peer_nets.lookup(&nk));
}

// This end's role for the tuple: remembered from its first datagram while the tuple is active.
static __always_inline u64 local_role(struct udp_tuple *t, u8 egress, u64 now) {
#if UDP_MODE == 2
    return t->local_port > t->remote_port || (t->local_port == t->remote_port && egress);
#endif
    struct udp_role *r = udp_tuples.lookup(t);
    if (r && now - r->last_ns < UDP_IDLE_NS) {
        if (now - r->last_ns > UDP_TOUCH_NS)
            r->last_ns = now;
        return r->local_is_client;
    }
    struct udp_role fresh = {.last_ns = now, .local_is_client = egress};
    if (udp_tuples.update(t, &fresh) < 0) {
        stat(UST_TUPLE_FULL);
        return t->local_port > t->remote_port || (t->local_port == t->remote_port && egress);
    }
    return egress;
}

// Count one UDP datagram, its headers walked by the caller (bpf/skb.c, once for UDP and DNS).
static __always_inline int account(struct __sk_buff *skb, struct fm_udp_packet *pkt, u8 egress) {
    u32 headers = pkt->l4 + FM_UDP_HEADER;
    u64 payload = skb->len > headers ? skb->len - headers : 0;
    u64 datagrams = skb->gso_segs > 1 ? skb->gso_segs : 1;
#if UDP_MODE == 0
    stat(UST_SEEN);
    return 1;
#endif
    struct udp_tuple t = {};
    t.family = pkt->family == 4 ? FM_AF_INET : FM_AF_INET6;
    if (egress) {
        __builtin_memcpy(t.local, pkt->saddr, 16);
        __builtin_memcpy(t.remote, pkt->daddr, 16);
        t.local_port = bpf_ntohs(pkt->udp.sport);
        t.remote_port = bpf_ntohs(pkt->udp.dport);
    } else {
        __builtin_memcpy(t.local, pkt->daddr, 16);
        __builtin_memcpy(t.remote, pkt->saddr, 16);
        t.local_port = bpf_ntohs(pkt->udp.dport);
        t.remote_port = bpf_ntohs(pkt->udp.sport);
    }
    if (flag(0)) {
        struct ip_key ip = {.family = t.family};
        __builtin_memcpy(ip.addr, t.local, 16);
        if (!local_ips.lookup(&ip))
            return 1;
    }
    u64 now = bpf_ktime_get_ns();
    u64 local_client = local_role(&t, egress, now);
    struct flow_key k = {.family = t.family};
    if (local_client) {
        __builtin_memcpy(k.client, t.local, 16);
        __builtin_memcpy(k.server, t.remote, 16);
        k.server_port = t.remote_port;
        k.reporter = FM_ROLE_CLIENT;
    } else {
        __builtin_memcpy(k.client, t.remote, 16);
        __builtin_memcpy(k.server, t.local, 16);
        k.server_port = t.local_port;
        k.reporter = FM_ROLE_SERVER;
    }
    if (flag(1) && ignored_ports.lookup(&k.server_port))
        return 1;
    if (k.reporter == FM_ROLE_CLIENT)
        k.peer_fold = fold_addr(k.server, k.family);
    else
        k.peer_fold = fold_addr(k.client, k.family);
    struct udp_val *v = udp_flows.lookup(&k);
    if (!v) {
        struct udp_val zero = {.created_ns = now};
        if (udp_flows.insert(&k, &zero) == 0)
            stat(UST_FLOWS_CREATED);
        v = udp_flows.lookup(&k);
        if (!v) {
            stat(UST_FLOW_FAILED);
            return 1;
        }
    }
    if (egress == local_client) { // the client sent it
        __sync_fetch_and_add(&v->c2s_bytes, payload);
        __sync_fetch_and_add(&v->c2s_datagrams, datagrams);
    } else {
        __sync_fetch_and_add(&v->s2c_bytes, payload);
        __sync_fetch_and_add(&v->s2c_datagrams, datagrams);
    }
    return 1;
}
