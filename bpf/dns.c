// flowmon DNS capture: every UDP datagram to or from the DNS port at a socket of this node, handed to
// user space with its addresses and the first DNS_CAPTURE_BYTES of its payload; user space parses it.
//
// Hook: BPF_PROG_TYPE_CGROUP_SKB on the cgroup v2 root, ingress and egress. Every socket of the node
// belongs to a cgroup below the root, so one attachment sees every pod's packets, whatever its network
// namespace. The program reads only the packet through `__sk_buff` and bpf_skb_load_bytes (stable UAPI,
// no kernel struct layouts), always lets the packet pass (returns 1) and never changes it.
//
// Bounded: a record is its header and the payload bytes copied (variable length, at most
// DNS_CAPTURE_BYTES); the ring buffer holds DNS_RING_PAGES pages; a record that finds no room is not
// written and is counted in dns_counts[DNS_RING_FULL]. Waking the reader costs more than the rest of
// the program (measured: bench/dns_overhead.py), so a CPU wakes it only every DNS_WAKE_EVERY records;
// the reader polls with a timeout and takes the rest then. IPv6 packets whose next header is
// not UDP (extension headers) are not walked: they are counted in dns_counts[DNS_NOT_WALKED], whatever
// their port. Non-first IPv4 fragments carry no UDP header and are let through unseen.
//
// Integer cflags (set by agent/flowmon_agent/dns/capture.py, never user strings):
//   DNS_PORT (53), DNS_CAPTURE_BYTES (payload bytes copied, <= 4096), DNS_RING_PAGES (a power of two),
//   DNS_WAKE_EVERY (records per CPU between two wake-ups of the reader)
//   DNS_MODE 1: the product (copy to the ring). Measurement variants for bench/dns_overhead.py, kept
//   here so that they share every line before the port match: 0 counts matches only (the floor of
//   this hook), 2 walks the question in the kernel and hands over a small record without payload.

#include "skb_headers.h"

#ifndef DNS_PORT
#define DNS_PORT 53
#endif
#ifndef DNS_CAPTURE_BYTES
#define DNS_CAPTURE_BYTES 512
#endif
#ifndef DNS_RING_PAGES
#define DNS_RING_PAGES 64
#endif
#ifndef DNS_WAKE_EVERY
#define DNS_WAKE_EVERY 64
#endif
#ifndef DNS_MODE
#define DNS_MODE 1
#endif

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
BPF_PERCPU_ARRAY(dns_scratch, struct dns_event, 1); // a record is built here, then copied at its length

BPF_PERCPU_ARRAY(dns_counts, u64, DNS_COUNT_MAX);
BPF_PERCPU_ARRAY(dns_since_wake, u64, 1);

static __always_inline void count(u32 which) {
    u64 *n = dns_counts.lookup(&which);
    if (n)
        *n += 1; // per-CPU: no atomic needed
}

// Ring flags for the next record: wake the reader on every DNS_WAKE_EVERY-th record of this CPU only.
static __always_inline u64 wake_flags(void) {
    u32 zero = 0;
    u64 *since = dns_since_wake.lookup(&zero);
    if (!since)
        return 0;
    if (++*since < DNS_WAKE_EVERY)
        return BPF_RB_NO_WAKEUP;
    *since = 0;
    return BPF_RB_FORCE_WAKEUP;
}

#if DNS_MODE == 2
// What parsing in the kernel would hand over: the header's id and flags and the question's type.
struct dns_parsed {
    u64 ts_ns;
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u16 id;
    u16 flags;
    u16 qtype;  // 0: the question could not be walked
    u8 family;
    u8 egress;
};
BPF_RINGBUF_OUTPUT(dns_parsed_events, DNS_RING_PAGES);

static __always_inline int hand_parsed(struct __sk_buff *skb, u32 offset, u8 family, u8 egress,
                                       u8 *saddr, u8 *daddr, struct fm_udp *udp) {
    struct dns_parsed *ev = dns_parsed_events.ringbuf_reserve(sizeof(struct dns_parsed));
    if (!ev) {
        count(DNS_RING_FULL);
        return 1;
    }
    u16 hdr[2] = {};
    bpf_skb_load_bytes(skb, offset, hdr, sizeof(hdr));
    u32 pos = offset + 12;
    u16 qtype = 0;
    for (int i = 0; i < 128; i++) { // a name has at most 127 labels
        u8 len = 0;
        if (bpf_skb_load_bytes(skb, pos, &len, 1) < 0 || (len & 0xc0))
            break;
        pos += 1 + len;
        if (len == 0) {
            if (bpf_skb_load_bytes(skb, pos, &qtype, 2) < 0)
                qtype = 0;
            break;
        }
    }
    ev->ts_ns = bpf_ktime_get_ns();
    __builtin_memcpy(ev->saddr, saddr, 16);
    __builtin_memcpy(ev->daddr, daddr, 16);
    ev->sport = bpf_ntohs(udp->sport);
    ev->dport = bpf_ntohs(udp->dport);
    ev->id = bpf_ntohs(hdr[0]);
    ev->flags = bpf_ntohs(hdr[1]);
    ev->qtype = bpf_ntohs(qtype);
    ev->family = family;
    ev->egress = egress;
    dns_parsed_events.ringbuf_submit(ev, wake_flags());
    count(DNS_HANDED);
    return 1;
}
#endif

static __always_inline int capture(struct __sk_buff *skb, u8 egress) {
    struct fm_udp_packet pkt = {};
    int walked = fm_walk_udp(skb, &pkt);
    if (walked == FM_NOT_WALKED)
        count(DNS_NOT_WALKED);
    if (walked != FM_UDP)
        return 1;
    struct fm_udp udp = pkt.udp;
    u32 l4 = pkt.l4;
    u8 family = pkt.family;
    u8 *saddr = pkt.saddr, *daddr = pkt.daddr;
    if (udp.sport != bpf_htons(DNS_PORT) && udp.dport != bpf_htons(DNS_PORT))
        return 1;
    count(DNS_SEEN);
#if DNS_MODE == 0
    return 1;
#elif DNS_MODE == 2
    return hand_parsed(skb, l4 + FM_UDP_HEADER, family, egress, saddr, daddr, &udp);
#endif

    u32 zero = 0;
    struct dns_event *ev = dns_scratch.lookup(&zero);
    if (!ev)
        return 1;
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
    u64 size = offsetof(struct dns_event, payload) + len;
    if (dns_events.ringbuf_output(ev, size, wake_flags()) < 0)
        count(DNS_RING_FULL);
    else
        count(DNS_HANDED);
    return 1;
}

int dns_ingress(struct __sk_buff *skb) {
    return capture(skb, 0);
}

int dns_egress(struct __sk_buff *skb) {
    return capture(skb, 1);
}
