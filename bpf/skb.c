// flowmon's cgroup-skb entry points: one program per direction (skb_ingress, skb_egress) on the cgroup v2
// root does UDP accounting (bpf/udp.c) and DNS capture (bpf/dns.c), so a node with both on pays one hook
// per packet, and a TCP segment leaves after one protocol check (fm_walk_udp reads it in place).
//
// One source text: BCC rewrites map calls (`udp_flows.lookup(...)`) only in the main file it compiles,
// not in #included files, so agent/flowmon_agent/kernel/skb_hooks.py concatenates the bodies it wants
// (udp.c, dns.c) and this file into one text. Integer cflags SKB_UDP and SKB_DNS (0 or 1) say which
// bodies the text holds; `skb_jobs[0]` (written by user space) says which of them run, so a policy turns
// UDP or DNS on or off without a reload. The headers are walked once, for both.

#include "skb_headers.h"

#ifndef SKB_UDP
#define SKB_UDP 0
#endif
#ifndef SKB_DNS
#define SKB_DNS 0
#endif
#define SKB_JOB_UDP 1 // bits of skb_jobs[0] (agent/flowmon_agent/kernel/skb_hooks.py Job)
#define SKB_JOB_DNS 2

BPF_ARRAY(skb_jobs, u64, 1);

static __always_inline int skb_run(struct __sk_buff *skb, u8 egress) {
    struct fm_udp_packet pkt = {};
    int walked = fm_walk_udp(skb, &pkt);
    if (walked == FM_NOT_UDP)
        return 1; // TCP and everything else but UDP: no map read
    u32 zero = 0;
    u64 *jobs = skb_jobs.lookup(&zero);
    if (!jobs)
        return 1;
    u64 on = *jobs;
#if SKB_UDP
    if (on & SKB_JOB_UDP) {
        if (walked == FM_NOT_WALKED)
            stat(UST_NOT_WALKED);
        else
            account(skb, &pkt, egress);
    }
#endif
#if SKB_DNS
    if (on & SKB_JOB_DNS) {
        if (walked == FM_NOT_WALKED)
            count(DNS_NOT_WALKED);
        else
            capture(skb, &pkt, egress);
    }
#endif
    return 1;
}

int skb_ingress(struct __sk_buff *skb) {
    return skb_run(skb, 0);
}

int skb_egress(struct __sk_buff *skb) {
    return skb_run(skb, 1);
}
