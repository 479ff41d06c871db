// Packet headers as cgroup-skb programs read them with bpf_skb_load_bytes (wire layouts, network byte
// order; no kernel struct layouts). Shared by bpf/dns.c and bpf/udp.c.
#ifndef FM_SKB_HEADERS_H
#define FM_SKB_HEADERS_H

#define FM_IPPROTO_UDP 17
#define FM_UDP_HEADER 8

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

// A UDP datagram's addresses and header, as the packet carries them.
struct fm_udp_packet {
    u8 saddr[16]; // IPv4 in the first 4 bytes
    u8 daddr[16];
    struct fm_udp udp;
    u32 l4;       // offset of the UDP header
    u8 family;    // 4 or 6
};

enum fm_walk {
    FM_UDP = 0,        // a UDP datagram: *pkt is filled in
    FM_NOT_UDP = 1,    // anything else, or a later IPv4 fragment (no UDP header there)
    FM_NOT_WALKED = 2, // IPv6 with extension headers: not walked, the protocol is unknown
};

// Walk the IP header to the UDP header (the skb starts at the network header in cgroup-skb programs).
static __always_inline int fm_walk_udp(struct __sk_buff *skb, struct fm_udp_packet *pkt) {
    // Most packets are not UDP (every TCP segment of the node passes here): when the IP header is in the
    // skb's linear area, read its protocol in place (direct packet access, no helper call) and leave.
    u8 *data = (u8 *)(long)skb->data, *end = (u8 *)(long)skb->data_end;
    if (data + sizeof(struct fm_ipv4) <= end) {
        u8 version = data[0] >> 4;
        if (version == 4 && data[9] != FM_IPPROTO_UDP)
            return FM_NOT_UDP;
        if (version == 6 && data + sizeof(struct fm_ipv6) <= end && data[6] != FM_IPPROTO_UDP) {
            u8 next = data[6];
            return next == 0 || next == 43 || next == 44 || next == 60 ? FM_NOT_WALKED : FM_NOT_UDP;
        }
    }
    u8 first = 0;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
        return FM_NOT_UDP;
    pkt->family = first >> 4;
    if (pkt->family == 4) {
        struct fm_ipv4 ip;
        if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0 || ip.protocol != FM_IPPROTO_UDP)
            return FM_NOT_UDP;
        if (ip.frag_off & bpf_htons(0x1fff))
            return FM_NOT_UDP; // a later fragment: no UDP header here
        pkt->l4 = (ip.version_ihl & 0xf) * 4;
        __builtin_memcpy(pkt->saddr, ip.saddr, 4);
        __builtin_memcpy(pkt->daddr, ip.daddr, 4);
    } else if (pkt->family == 6) {
        struct fm_ipv6 ip6;
        if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
            return FM_NOT_UDP;
        if (ip6.nexthdr != FM_IPPROTO_UDP) {
            // hop-by-hop, routing, fragment, destination options, ... (TCP and ICMPv6 pass untouched)
            if (ip6.nexthdr == 0 || ip6.nexthdr == 43 || ip6.nexthdr == 44 || ip6.nexthdr == 60)
                return FM_NOT_WALKED;
            return FM_NOT_UDP;
        }
        pkt->l4 = sizeof(ip6);
        __builtin_memcpy(pkt->saddr, ip6.saddr, 16);
        __builtin_memcpy(pkt->daddr, ip6.daddr, 16);
    } else {
        return FM_NOT_UDP;
    }
    if (bpf_skb_load_bytes(skb, pkt->l4, &pkt->udp, sizeof(pkt->udp)) < 0)
        return FM_NOT_UDP;
    return FM_UDP;
}

#endif
