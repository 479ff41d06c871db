// flowmon DNS capture: every UDP datagram to or from the DNS port at a socket of this node, handed to
// user space with its addresses and the first DNS_CAPTURE_BYTES of its payload; user space parses it.
//
// Hook: BPF_PROG_TYPE_CGROUP_SKB on the cgroup v2 root, ingress and egress. Every socket of the node
// belongs to a cgroup below the root, so one attachment sees every pod's packets, whatever its network
// namespace. The program reads only the packet through `__sk_buff` and bpf_skb_load_bytes (stable UAPI,
// no kernel struct layouts), always lets the packet pass (returns 1) and never changes it.
//
// Bounded: each record has a fixed size; the ring buffer holds DNS_RING_PAGES pages; a record that finds
// no room is not written and is counted in dns_counts[DNS_RING_FULL]. IPv6 packets whose next header is
// not UDP (extension headers) are not walked: they are counted in dns_counts[DNS_NOT_WALKED], whatever
// their port. Non-first IPv4 fragments carry no UDP header and are let through unseen.
//
// Integer cflags (set by agent/flowmon_agent/dns/capture.py, never user strings):
//   DNS_PORT (53), DNS_CAPTURE_BYTES (payload bytes copied, <= 4096), DNS_RING_PAGES (a power of two)

#ifndef DNS_PORT
#define DNS_PORT 53
#endif
#ifndef DNS_CAPTURE_BYTES
#define DNS_CAPTURE_BYTES 512
#endif
#ifndef DNS_RING_PAGES
#define DNS_RING_PAGES 64
#endif

#define FM_IPPROTO_UDP 17
#define FM_UDP_HEADER 8

enum dns_count {
    DNS_SEEN = 0,       // datagrams to or from the DNS port
    DNS_HANDED = 1,     // records written to the ring
    DNS_RING_FULL = 2,  // records lost: the ring was full
    DNS_NOT_WALKED = 3, // IPv6 packets with extension headers (port unknown)
    DNS_COUNT_MAX = 4,
};

// Layout mirrored by agent/flowmon_agent/dns/capture.py (EVENT_HEADER).
struct dns_event {
    u64 ts_ns;          // bpf_ktime_get_ns: CLOCK_MONOTONIC
    u8 saddr[16];       // IPv4 in the first 4 bytes
    u8 daddr[16];
    u16 sport;          // host byte order
    u16 dport;
    u16 payload_len;    // the DNS payload's length on the wire (from the UDP header)
    u16 captured;       // bytes of it in payload[]
    u8 family;          // 4 or 6
    u8 egress;          // 1: leaving the socket; 0: arriving at it
    u8 pad[6];
    u8 payload[DNS_CAPTURE_BYTES];
};
BPF_RINGBUF_OUTPUT(dns_events, DNS_RING_PAGES);

BPF_PERCPU_ARRAY(dns_counts, u64, DNS_COUNT_MAX);

struct fm_ipv4 {
    u8 version_ihl;
    u8 tos;
    u16 tot_len;
    u16 id;
    u16 frag_off;
    u8 ttl;
    u8 protocol;
    u16 check;
    u8 saddr[4];
    u8 daddr[4];
};

struct fm_ipv6 {
    u32 version_class_flow;
    u16 payload_len;
    u8 nexthdr;
    u8 hop_limit;
    u8 saddr[16];
    u8 daddr[16];
};

struct fm_udp {
    u16 sport;
    u16 dport;
    u16 len;
    u16 check;
};

static __always_inline void count(u32 which) {
    u64 *n = dns_counts.lookup(&which);
    if (n)
        *n += 1; // per-CPU: no atomic needed
}

static __always_inline int capture(struct __sk_buff *skb, u8 egress) {
    u8 first = 0;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
        return 1;
    u8 family = first >> 4;
    u32 l4;
    u8 saddr[16] = {}, daddr[16] = {};
    if (family == 4) {
        struct fm_ipv4 ip;
        if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0 || ip.protocol != FM_IPPROTO_UDP)
            return 1;
        if (ip.frag_off & bpf_htons(0x1fff))
            return 1; // a later fragment: no UDP header here
        l4 = (ip.version_ihl & 0xf) * 4;
        __builtin_memcpy(saddr, ip.saddr, 4);
        __builtin_memcpy(daddr, ip.daddr, 4);
    } else if (family == 6) {
        struct fm_ipv6 ip6;
        if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
            return 1;
        if (ip6.nexthdr != FM_IPPROTO_UDP) {
            // hop-by-hop, routing, fragment, destination options, ... (TCP and ICMPv6 pass untouched)
            if (ip6.nexthdr == 0 || ip6.nexthdr == 43 || ip6.nexthdr == 44 || ip6.nexthdr == 60)
                count(DNS_NOT_WALKED);
            return 1;
        }
        l4 = sizeof(ip6);
        __builtin_memcpy(saddr, ip6.saddr, 16);
        __builtin_memcpy(daddr, ip6.daddr, 16);
    } else {
        return 1;
    }
    struct fm_udp udp;
    if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
        return 1;
    if (udp.sport != bpf_htons(DNS_PORT) && udp.dport != bpf_htons(DNS_PORT))
        return 1;
    count(DNS_SEEN);

    struct dns_event *ev = dns_events.ringbuf_reserve(sizeof(struct dns_event));
    if (!ev) {
        count(DNS_RING_FULL);
        return 1;
    }
    ev->ts_ns = bpf_ktime_get_ns();
    __builtin_memcpy(ev->saddr, saddr, 16);
    __builtin_memcpy(ev->daddr, daddr, 16);
    ev->sport = bpf_ntohs(udp.sport);
    ev->dport = bpf_ntohs(udp.dport);
    u16 udp_len = bpf_ntohs(udp.len);
    ev->payload_len = udp_len > FM_UDP_HEADER ? udp_len - FM_UDP_HEADER : 0;
    ev->family = family;
    ev->egress = egress;
    __builtin_memset(ev->pad, 0, sizeof(ev->pad));

    u32 offset = l4 + FM_UDP_HEADER;
    u32 len = skb->len > offset ? skb->len - offset : 0;
    if (len > DNS_CAPTURE_BYTES)
        len = DNS_CAPTURE_BYTES;
    if (len > 0 && bpf_skb_load_bytes(skb, offset, ev->payload, len) < 0)
        len = 0;
    ev->captured = len;
    dns_events.ringbuf_submit(ev, 0);
    count(DNS_HANDED);
    return 1;
}

int dns_ingress(struct __sk_buff *skb) {
    return capture(skb, 0);
}

int dns_egress(struct __sk_buff *skb) {
    return capture(skb, 1);
}
