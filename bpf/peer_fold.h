// Peer folding: the remote end of a flow key stays exact only inside the cluster's networks.
//
// A remote address outside every network user space pushed into `peer_nets` is folded: replaced by the
// all-zero address of its family, so that every such peer of one local endpoint, server port and
// direction shares one flow ("external"); a remote inside a network user space pushed to be folded (a
// monitor's named network) becomes that network's address. The number of flows then grows with the
// cluster, not with the internet. The caller stores the returned marker in its key (0: exact).
//
// For any program that builds flow keys: this header declares the maps; BCC rewrites map calls only
// (`.lookup`) in the main source file, so the including program does the two lookups itself, as flowmon.c's
// fold_peer does:
//     u64 *on = peer_fold_on.lookup(&zero);          // 0 or missing: nothing is folded
//     struct peer_net_key k = {};
//     peer_net_key_of(&k, addr, family);
//     marker = peer_fold_apply(addr, peer_nets.lookup(&k));
// User space writes `peer_nets` and turns folding on with `peer_fold_on` (agent/flowmon_agent/kernel/
// config_maps.py). Until it does, nothing is folded: before the agent knows the cluster's networks it
// cannot tell a pod from the internet.
//
// Integer cflag: PEER_NETS_MAX, the trie's size.

#ifndef FLOWMON_PEER_FOLD_H
#define FLOWMON_PEER_FOLD_H

#ifndef PEER_NETS_MAX
#define PEER_NETS_MAX 65536
#endif
#define PEER_FOLD_AF_INET 2

// LPM key: the prefix covers `family` (32 bits with pad, always matched) and then the address.
struct peer_net_key {
    u32 prefixlen;  // 32 + the network's prefix length
    u16 family;
    u16 pad;
    u8 addr[16];    // IPv4 in the first 4 bytes
};
struct peer_net_val {
    u8 addr[16];    // folded: the network's address
    u8 fold;        // 0: a cluster network (the peer stays exact); else the network's prefix length + 1
    u8 pad[7];
};
BPF_LPM_TRIE(peer_nets, struct peer_net_key, struct peer_net_val, PEER_NETS_MAX);
BPF_ARRAY(peer_fold_on, u64, 1);

// The key to look `peer_nets` up with for a remote address.
static __always_inline void peer_net_key_of(struct peer_net_key *k, const u8 *addr, u16 family) {
    k->prefixlen = 32 + (family == PEER_FOLD_AF_INET ? 32 : 128);
    k->family = family;
    __builtin_memcpy(k->addr, addr, 16);
}

// Fold a remote address in place by what `peer_nets` answered for it (0: no network holds it); returns
// the marker for the key: 0 exact, else prefix length + 1 (1: external, the address zeroed).
static __always_inline u8 peer_fold_apply(u8 *addr, const struct peer_net_val *v) {
    if (v && !v->fold)
        return 0;
    if (v) {
        __builtin_memcpy(addr, v->addr, 16);
        return v->fold;
    }
#pragma unroll
    for (int i = 0; i < 16; i++)  // not memset: clang may emit a call to it, which BPF has not
        addr[i] = 0;
    return 1;
}

#endif
