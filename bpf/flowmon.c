// flowmon kernel side: exact TCP flow accounting, aggregated in the kernel.
//
// Only tracepoint arguments are read (a stable ABI), never kernel struct layouts, so this compiles
// against any kernel headers. Per-socket state lives in `socks` (found by the socket pointer) while the
// socket lives; counters land in `flows`, keyed by the flow without the ephemeral port. Nothing is sent
// to user space per event.
//
// Failures, retransmits, resets and samples go into the flow entry as they happen. A live socket's
// bytes and open wait in its own slot (default path) and reach the flow when user space runs
// flowmon_fold just before it reads `flows` (the fold visits only slots marked since the last one), or
// at close, which adds them with the close to this CPU's copy of the flow (close_cache), moved into
// `flows` by flowmon_flush_closes before each read: user space reads only `flows`, so its work grows
// with distinct flows, not with connections.
//
// Integer cflags (set by agent/flowmon_agent/kernel/paths.py and program.py, never user strings):
//   FLOWMON_COMPAT   1: bytes from tcp:tcp_probe (kernels without sock:sock_{send,recv}_length)
//   FLOWMON_RAW      1: sock_{send,recv}_length as raw tracepoints (cheaper, args are plain values)
//   FLOWMON_RAW_RESET 1: tcp_send_reset as a raw tracepoint (see on_send_reset)
//   SOCK_MAX (a power of two), FLOW_MAX, RST_MAX, ADOPT_MAX, NAT_MAX, LOCAL_IPS_MAX, PEER_NETS_MAX
//   (peer_fold.h), CLOSE_SLOTS: map sizes;  FOLD_STEPS:
//   steps per run of flowmon_fold

#ifndef FLOWMON_COMPAT
#define FLOWMON_COMPAT 0
#endif
#ifndef FLOWMON_RAW
#define FLOWMON_RAW 1
#endif
#ifndef FLOWMON_RAW_RESET
#define FLOWMON_RAW_RESET 1
#endif
#ifndef SOCK_MAX
#define SOCK_MAX 65536
#endif
#ifndef FLOW_MAX
#define FLOW_MAX 16384
#endif
#ifndef RST_MAX
#define RST_MAX 4096
#endif
#ifndef ADOPT_MAX
#define ADOPT_MAX 16384
#endif
#ifndef NAT_MAX
#define NAT_MAX 16384
#endif
#ifndef LOCAL_IPS_MAX
#define LOCAL_IPS_MAX 4096
#endif

#define FM_AF_INET 2
#define FM_AF_INET6 10
#define FM_IPPROTO_TCP 6
#define FM_MSG_PEEK 2
#define FM_TCP_ESTABLISHED 1
#define FM_TCP_SYN_SENT 2
#define FM_TCP_SYN_RECV 3
#define FM_TCP_FIN_WAIT1 4
#define FM_TCP_CLOSE 7
#define FM_TCP_CLOSE_WAIT 8
#define FM_ROLE_CLIENT 0
#define FM_ROLE_SERVER 1
#define FM_SLOTS 32

#include "flow_key.h"

// Cumulative since the entry was created (created_ns tells user space when an LRU entry was replaced).
// opened - closed = connections open now.
struct flow_val {
    u64 created_ns;
    u64 c2s_bytes;
    u64 s2c_bytes;
    u64 opened;
    u64 closed;
    u64 failed_refused;
    u64 failed_timeout;
    u64 retrans_c2s;
    u64 retrans_s2c;
    u64 resets_c2s;
    u64 resets_s2c;
    u64 latency_sum_us;
    u64 rtt_sum_us;
    u64 latency_slots[FM_SLOTS];
    u64 rtt_slots[FM_SLOTS];
    u64 syn_retrans;   // SYNs retransmitted while connecting (also in retrans_c2s)
    u64 min_rtt_sum_us;
    u64 min_rtt_slots[FM_SLOTS];  // each connection's min RTT at close (sock_ops only)
};
// LRU: a long-running agent sheds the least recently updated flows; user space keeps their totals and
// counts evictions (flows_created minus entries present).
BPF_TABLE("lru_hash", struct flow_key, struct flow_val, flows, FLOW_MAX);
// Template for new flow entries (too large for the 512-byte BPF stack).
BPF_PERCPU_ARRAY(flow_zero, struct flow_val, 1);

// Per-socket state while the socket lives: what routes its events to its flow (and a connecting
// client's SYN retransmits, whose NAT per-connection key is not final yet). Its first cache line is read
// by every event and written only on state changes and srtt samples.
struct sock_state {
    u64 sk;            // the socket (0: slot free, FM_SK_CLAIMED: being written)
    struct flow_key key;
    u64 rtt_epoch;     // the sampling epoch (cfg[CFG_RTT_EPOCH]) of the last periodic srtt sample
    u32 srtt_us;       // latest smoothed RTT from tcp_probe
    u8 has_srtt;
    u8 established;
    u8 per_conn;       // the server is a NAT peer: key.client_port is filled in
    u8 probe;          // distance of this slot from the socket's home slot
    // --- second cache line: rarely touched
    u64 start_ns;      // client: when SYN_SENT was entered (connect latency)
    u32 retrans;       // SYN retransmits while connecting (moved to the flow at ESTABLISHED or close)
    u32 seq_hw;        // compat: highest snd_nxt seen
    u16 client_port;   // the connection's client port (NAT-stable RST matching)
    u8 rst_received;   // an RST arrived while connecting: refused
    u8 seq_init;       // compat: seq_hw is valid
    u8 peer_local;     // compat: the peer socket is traced here; its snd_nxt advance is our rx
    u8 pad0[3];
    u32 min_rtt_us;    // the connection's min RTT, given at close by the sock_ops program (0: none)
    u8 pad[28];
};

// The socket table: an array indexed by a hash of the socket pointer, each socket in its home slot or
// one of the next SOCK_PROBES - 1. An array lookup is inlined by the verifier (no key hashing, no bucket
// lock, no free list): measured under connection churn, 2,500 -> 2,000 ns of BPF time per request against
// the preallocated hash map it replaced (docs/BENCHMARKS.md). Not LRU: evicting a live socket would
// silently lose its counters; a socket whose slots are all taken is counted (ST_SOCK_FULL), not traced.
#define FM_SK_CLAIMED 1ULL
#define SOCK_PROBES 8
#define FM_GEN_ONE (1ULL << 48)
#define FM_GEN_MASK 0xFFFF000000000000ULL
#define FM_OPEN_PENDING (1ULL << 47)
#define FM_HAS_LATENCY (1ULL << 46)
#define FM_LATENCY_MAX (FM_HAS_LATENCY - 1)
//
// A slot is 256 bytes, page-aligned (a memory-mappable array): the counters a socket's own send/recv add
// to (default path) sit in the second 128-byte half, so the hot path never writes a cache line that other
// CPUs read, nor its neighbour, which x86 prefetches in pairs (measured: a 64-byte split still cost
// ~60 ns per receive on keep-alive connections; see docs/kernel.md).
struct sock_slot {
    struct sock_state st;
    u32 displaced;     // sockets whose home is this slot but that live in a later one
    u32 pad;
    // --- second half: written by the socket's own events
    u64 tx_word;       // default path: generation << 48 | bytes sent, not yet in the flow
    u64 rx_word;       //               generation << 48 | bytes received, not yet in the flow
    u64 open_word;     //               generation << 48 | FM_OPEN_PENDING | FM_HAS_LATENCY | latency_us
    u64 marked;        // default path: a fold mark for this slot is set and not yet taken
    u8 pad2[32];
    struct flow_key peer_key;  // compat, peer_local: the peer's flow, credited with what we send
    u8 pad3[24];
};
_Static_assert(sizeof(struct sock_state) == 120 && sizeof(struct sock_slot) == 256, "sock_slot layout");
#define FM_BPF_F_MMAPABLE 1024
BPF_F_TABLE("array", u32, struct sock_slot, socks, SOCK_MAX, FM_BPF_F_MMAPABLE);

// Sockets that closed abruptly (from ESTABLISHED, CLOSE_WAIT or FIN_WAIT1): tcp_disconnect (SO_LINGER 0,
// abort, unread data) moves to CLOSE first and only then sends its RST, possibly after migrating to
// another CPU, and the peer's own CLOSE may run in between (veth delivers inline). A small shared ring;
// normal closes (FIN_WAIT2, LAST_ACK) never touch it.
struct closed_sock {
    u64 sk;
    u64 ts_ns;         // the RST follows within the same syscall; older entries may be a reused pointer
    struct flow_key key;
    u16 client_port;
    u8 pad[6];
};
#define CLOSED_MATCH_NS 100000000ULL
#define CLOSED_RING 16
struct closed_ring {
    u32 next;
    u32 pad;
    struct closed_sock slots[CLOSED_RING];
};
BPF_ARRAY(last_closed, struct closed_ring, 1);

// RST de-duplication when both ends are traced. Keyed by the connection's client end (address, port),
// which destination NAT (Service VIPs) does not rewrite, plus which role sent the RST.
struct rst_key {
    u8 client[16];
    u16 family;
    u16 client_port;
    u8 sender;
    u8 pad[3];
};
// An RST received from a peer not (yet) known to be traced; user space counts it after a grace period
// unless the traced sender claims it first.
struct rst_pending_val {
    struct flow_key key;
    u64 ts_ns;
    u8 to_client;      // 1: the RST went server -> client
    u8 pad[7];
};
BPF_HASH(rst_pending, struct rst_key, struct rst_pending_val, RST_MAX);
BPF_TABLE("lru_hash", struct rst_key, u64, rst_sent, RST_MAX);

// Connections open before the agent started, found by user space in every netns, adopted on their
// first received segment. Key: local/remote address and ports; value: role.
struct tuple_key {
    u8 local[16];
    u8 remote[16];
    u16 family;
    u16 local_port;
    u16 remote_port;
    u16 pad;
};
BPF_HASH(adopt, struct tuple_key, u8, ADOPT_MAX);

// Configuration written by user space. Index: 0 local-IP filter on, 1 ignored ports on, 2 adoption on,
// 3 NAT peers set, 4 the srtt sampling epoch: user space advances it once per sampling interval, and a
// socket takes one periodic srtt sample per epoch. Reading it is one load where a clock read
// (bpf_ktime_get_ns) on every received segment cost ~25 ns (docs/BENCHMARKS.md). 5 tracing: BCC attaches
// the programs as it loads them, before user space has written the filters; until user space sets it,
// no socket is taken in (maps start zeroed), so none that the filters would exclude fills a table.
#define CFG_FILTER 0
#define CFG_PORTS 1
#define CFG_ADOPT 2
#define CFG_NAT 3
#define CFG_RTT_EPOCH 4
#define CFG_TRACING 5
BPF_ARRAY(cfg, u64, 6);
struct ip_key {
    u8 addr[16];
    u16 family;
    u16 pad;
};
BPF_HASH(local_ips, struct ip_key, u8, LOCAL_IPS_MAX);
BPF_HASH(ignored_ports, u16, u8, 1024);
BPF_HASH(nat_peers, struct ip_key, u8, NAT_MAX);
#include "peer_fold.h"

// A remote address outside the cluster's networks is folded (peer_fold.h); returns the key's marker.
static __always_inline u8 fold_peer(u8 *addr, u16 family) {
    u32 zero = 0;
    u64 *on = peer_fold_on.lookup(&zero);
    if (!on || !*on)
        return 0;
    struct peer_net_key k = {};
    peer_net_key_of(&k, addr, family);
    return peer_fold_apply(addr, peer_nets.lookup(&k));
}

// Drop and event counters (per CPU, summed by user space).
#define ST_SOCK_FULL 0
#define ST_FLOW_FAILED 1
#define ST_RST_FULL 2
#define ST_FLOWS_CREATED 3
#define ST_ADOPTED 4
#define ST_MAX 8
BPF_PERCPU_ARRAY(stats, u64, ST_MAX);

static __always_inline void stat_inc(u32 idx) {
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline u32 log2_slot(u64 v) {
    if (v == 0)
        return 0;
    u32 r = 1;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r > FM_SLOTS - 1 ? FM_SLOTS - 1 : r;
}

// Copy an address out of tracepoint args (bpf_probe_read_kernel: the verifier refuses ctx pointer
// arithmetic) and turn IPv4-mapped IPv6 (dual-stack sockets) into plain IPv4.
static __always_inline u16 copy_addr(u8 *dst, const u8 *src4, const u8 *src6, u16 family) {
    if (family == FM_AF_INET) {
        bpf_probe_read_kernel(dst, 4, src4);
        return FM_AF_INET;
    }
    u8 a[16] = {};
    bpf_probe_read_kernel(a, 16, src6);
    u64 hi;
    u32 w2;
    __builtin_memcpy(&hi, a, 8);
    __builtin_memcpy(&w2, a + 8, 4);
    if (hi == 0 && w2 == 0xffff0000) {  // ::ffff:a.b.c.d (little-endian load of 00 00 ff ff)
        __builtin_memcpy(dst, a + 12, 4);
        return FM_AF_INET;
    }
    __builtin_memcpy(dst, a, 16);
    return FM_AF_INET6;
}

// Address and port from a tracepoint's 28-byte sockaddr_in / sockaddr_in6.
static __always_inline u16 copy_sockaddr(u8 *dst, u16 *port, const u8 *sa) {
    u8 buf[28] = {};
    bpf_probe_read_kernel(buf, 28, sa);
    u16 family, nport;
    __builtin_memcpy(&family, buf, 2);
    __builtin_memcpy(&nport, buf + 2, 2);
    *port = __builtin_bswap16(nport);
    if (family == FM_AF_INET) {
        __builtin_memcpy(dst, buf + 4, 4);
        return FM_AF_INET;
    }
    u64 hi;
    u32 w2;
    __builtin_memcpy(&hi, buf + 8, 8);
    __builtin_memcpy(&w2, buf + 16, 4);
    if (hi == 0 && w2 == 0xffff0000) {
        __builtin_memcpy(dst, buf + 20, 4);
        return FM_AF_INET;
    }
    __builtin_memcpy(dst, buf + 8, 16);
    return FM_AF_INET6;
}

// Every socket enters the tables through here (connect, accept, adoption).
static __always_inline int is_traced(u16 family, const u8 *local, u16 server_port) {
    u32 idx = CFG_TRACING;
    u64 *on = cfg.lookup(&idx);
    if (!on || !*on)
        return 0;
    idx = CFG_PORTS;
    on = cfg.lookup(&idx);
    if (on && *on && ignored_ports.lookup(&server_port))
        return 0;
    idx = CFG_FILTER;
    on = cfg.lookup(&idx);
    if (on && *on) {
        struct ip_key k = {};
        k.family = family;
        __builtin_memcpy(k.addr, local, 16);
        if (!local_ips.lookup(&k))
            return 0;
    }
    return 1;
}

static __always_inline u64 rtt_epoch_now(void) {
    u32 idx = CFG_RTT_EPOCH;
    u64 *epoch = cfg.lookup(&idx);
    return epoch ? *epoch : 0;
}

static __always_inline int is_nat_peer(u16 family, const u8 *server) {
    u32 idx = CFG_NAT;
    u64 *on = cfg.lookup(&idx);
    if (!on || !*on)
        return 0;
    struct ip_key k = {};
    k.family = family;
    __builtin_memcpy(k.addr, server, 16);
    return nat_peers.lookup(&k) != 0;
}

static __always_inline struct flow_val *flow_get(struct flow_key *key) {
    struct flow_val *v = flows.lookup(key);
    if (v)
        return v;
    u32 zero = 0;
    struct flow_val *tmpl = flow_zero.lookup(&zero);
    if (!tmpl)
        return 0;
    tmpl->created_ns = bpf_ktime_get_ns();  // the entry is born with its incarnation stamp
    if (flows.insert(key, tmpl) == 0)
        stat_inc(ST_FLOWS_CREATED);
    v = flows.lookup(key);
    if (!v)
        stat_inc(ST_FLOW_FAILED);
    return v;
}

static __always_inline void hist_add(u64 *slots, u64 *sum, u64 value) {
    u32 slot = log2_slot(value);
    if (slot < FM_SLOTS)
        __sync_fetch_and_add(&slots[slot], 1);
    __sync_fetch_and_add(sum, value);
}

static __always_inline u32 sock_home(u64 sk) {
    return (u32)((sk * 0x9E3779B97F4A7C15ULL) >> 32) & (SOCK_MAX - 1);  // SOCK_MAX: a power of two
}

// The slot a state lives in (the state is the slot's first member).
static __always_inline struct sock_slot *slot_of(struct sock_state *st) {
    return (struct sock_slot *)st;
}

// Its index in `socks`: the socket's home slot plus its probe distance.
static __always_inline u32 slot_index(u64 sk, struct sock_state *st) {
    return (sock_home(sk) + st->probe) & (SOCK_MAX - 1);
}

#if !FLOWMON_COMPAT
// Fold marks, per CPU: bit i of word i / 64 says slot i got something pending since the last fold, and
// bit w % 64 of group word MARK_WORDS + w / 64 says word w has a bit set. A slot is marked when one of its
// pending words goes from nothing to something and the slot has no mark outstanding (`marked`, on the
// words' cache line), so a socket costs one mark per fold period, and the fold visits the marked slots
// instead of reading every slot: before, that was 4 MB of 65,536 slots read twice a second by the agent,
// 2 ms of CPU per poll, and the workload's caches flushed. Per CPU, so that a mark never writes another
// CPU's cache line; user space runs the fold on each CPU (BPF_F_TEST_RUN_ON_CPU), on that CPU's copy.
// Ordering: an event adds to a word (an atomic that returns the old value: fully ordered) and then reads
// `marked`; the fold clears `marked` (likewise) and then takes the words. So an event that still saw the
// mark added before the take, and one whose add came after the take sees no mark and sets one.
#define MARK_WORDS ((SOCK_MAX + 63) / 64)
#define MARK_GROUPS ((MARK_WORDS + 63) / 64)
BPF_PERCPU_ARRAY(fold_marks, u64, MARK_WORDS + MARK_GROUPS);

static __always_inline void mark_pending(u32 i) {
    u32 w = i / 64;
    u64 *word = fold_marks.lookup(&w);
    if (!word || __sync_fetch_and_or(word, 1ULL << (i & 63)))
        return;  // a word that had a bit already has its group's bit too (or its marker is setting it)
    u32 g = MARK_WORDS + w / 64;
    u64 *group = fold_marks.lookup(&g);
    if (group)
        __sync_fetch_and_or(group, 1ULL << (w & 63));
}

// A pending word went from nothing to something (`before`: its old value): the slot needs a fold.
static __always_inline void mark_if_first(struct sock_slot *slot, u64 before, u32 i) {
    if ((before & ~FM_GEN_MASK) || slot->marked)
        return;
    slot->marked = 1;
    mark_pending(i);
}
#endif

static __always_inline struct sock_state *sock_find(u64 sk) {
    u32 i = sock_home(sk);
    struct sock_slot *home = socks.lookup(&i);
    if (!home)
        return 0;
    if (home->st.sk == sk)
        return &home->st;
    if (!home->displaced)
        return 0;  // the common miss (an untraced socket) reads one slot
#pragma unroll
    for (u32 p = 1; p < SOCK_PROBES; p++) {
        u32 j = (i + p) & (SOCK_MAX - 1);
        struct sock_slot *slot = socks.lookup(&j);
        if (slot && slot->st.sk == sk)
            return &slot->st;
    }
    return 0;
}

// Store a new socket's state; a slot is claimed with compare-and-swap, so two CPUs never share one.
static __always_inline struct sock_state *sock_insert(u64 sk, struct sock_state *init) {
    u32 i = sock_home(sk);
#pragma unroll
    for (u32 p = 0; p < SOCK_PROBES; p++) {
        u32 j = (i + p) & (SOCK_MAX - 1);
        struct sock_slot *slot = socks.lookup(&j);
        if (!slot)
            return 0;
        // the same pointer still stored (its close was never seen): reuse the slot
        int mine = slot->st.sk == sk;
        if (!mine && (slot->st.sk != 0 || __sync_val_compare_and_swap(&slot->st.sk, 0, FM_SK_CLAIMED) != 0))
            continue;
        if (p && !mine) {
            struct sock_slot *home = socks.lookup(&i);
            if (home)
                __sync_fetch_and_add(&home->displaced, 1);
        }
        u64 gen = (slot->tx_word + FM_GEN_ONE) & FM_GEN_MASK;  // a new generation for the slot
        slot->tx_word = slot->rx_word = slot->open_word = gen;
        init->sk = FM_SK_CLAIMED;
        init->probe = p;
        slot->st = *init;
        asm volatile("" ::: "memory");  // the state is complete before the socket can be found
        slot->st.sk = sk;
        return &slot->st;
    }
    stat_inc(ST_SOCK_FULL);
    return 0;
}

static __always_inline void sock_remove(u64 sk, struct sock_state *st) {
    u8 p = st->probe;
    st->sk = 0;
    if (p) {
        u32 i = sock_home(sk);
        struct sock_slot *home = socks.lookup(&i);
        if (home)
            __sync_fetch_and_add(&home->displaced, (u32)-1);
    }
}

// This socket's own direction (tx: what it sent) in its flow: the client sends c2s, the server s2c.
static __always_inline u64 *dir_bytes(struct flow_val *v, u8 reporter, int tx) {
    return (reporter == FM_ROLE_CLIENT) == tx ? &v->c2s_bytes : &v->s2c_bytes;
}

// Default path: bytes and opens wait in the second half of the socket's slot and reach the flow at close,
// or when user space runs flowmon_fold before it reads `flows`: one flow update per short connection
// instead of one per event. Each word carries the slot's generation, so a fold racing a close and the slot's reuse
// can tell whose counters it took.
static __always_inline void take_pending(struct sock_state *st, u64 *tx, u64 *rx, u64 *open) {
#if FLOWMON_COMPAT
    *tx = *rx = *open = 0;  // the compat path adds to the flow as events happen
#else
    struct sock_slot *slot = slot_of(st);
    *tx = __sync_fetch_and_and(&slot->tx_word, FM_GEN_MASK);
    *rx = __sync_fetch_and_and(&slot->rx_word, FM_GEN_MASK);
    *open = __sync_fetch_and_and(&slot->open_word, FM_GEN_MASK);
#endif
}

static __always_inline void credit_pending(struct flow_val *v, u8 reporter, u64 tx, u64 rx, u64 open) {
    tx &= ~FM_GEN_MASK;
    rx &= ~FM_GEN_MASK;
    if (tx)
        __sync_fetch_and_add(dir_bytes(v, reporter, 1), tx);
    if (rx)
        __sync_fetch_and_add(dir_bytes(v, reporter, 0), rx);
    if (open & FM_OPEN_PENDING) {
        __sync_fetch_and_add(&v->opened, 1);
        if (open & FM_HAS_LATENCY)
            hist_add(v->latency_slots, &v->latency_sum_us, open & FM_LATENCY_MAX);
    }
}

// A connection reached ESTABLISHED (its key is final now): opened, connect latency, SYN retransmits.
static __always_inline void count_open(struct sock_state *st, u64 now) {
    u64 open = FM_OPEN_PENDING;
    if (st->start_ns) {
        u64 latency_us = (now - st->start_ns) / 1000;
        open |= FM_HAS_LATENCY | (latency_us < FM_LATENCY_MAX ? latency_us : FM_LATENCY_MAX);
    }
#if FLOWMON_COMPAT
    if (!st->retrans) {
        struct flow_val *v = flow_get(&st->key);
        if (v)
            credit_pending(v, st->key.reporter, 0, 0, open);
        return;
    }
#else
    struct sock_slot *slot = slot_of(st);
    mark_if_first(slot, __sync_fetch_and_or(&slot->open_word, open), slot_index(st->sk, st));
    if (!st->retrans)
        return;
    open = 0;
#endif
    struct flow_val *v = flow_get(&st->key);
    if (!v)
        return;
    credit_pending(v, st->key.reporter, 0, 0, open);
    __sync_fetch_and_add(&v->retrans_c2s, st->retrans);  // only a client retransmits while connecting
    __sync_fetch_and_add(&v->syn_retrans, st->retrans);
    st->retrans = 0;
}

#if !FLOWMON_COMPAT
// Closes add to a per-CPU copy of their flow first, and user space moves the copies into `flows` before
// each read (flowmon_flush_closes on each CPU that has some). A close used to add to the shared flow
// entry itself, whose cache lines both CPUs of a churning pair updated in turn: ~600 ns per request
// (docs/BENCHMARKS.md). Direct-mapped by a hash of the key: a close whose slot holds another flow moves
// that one into `flows` first, so many flows closing on one CPU cost about what they did before.
// An entry keeps its key after a flush (only the eviction above rewrites it, and only a close does that,
// which never nests on one CPU): a flush that interrupts a close (it runs in an interrupt when asked
// from another CPU) sees either the old flow's counters under its key or none. A close that interrupts
// a flush (asked from this CPU: it runs with softirqs allowed) finds CC_FLUSHING set and adds to the
// flow directly.
#ifndef CLOSE_SLOTS
#define CLOSE_SLOTS 64  // a power of two, at most 64 (one bit each in CC_DIRTY)
#endif
#define FLOW_WORDS (sizeof(struct flow_val) / 8)
struct close_entry {
    struct flow_key key;  // family 0: never used
    struct flow_val v;    // what closes on this CPU added since the last flush (created_ns unused)
};
BPF_PERCPU_ARRAY(close_cache, struct close_entry, CLOSE_SLOTS);
// 0 dirty: bit i says copy i got something since the last flush (user space reads it to pick the
// CPUs); 1 flushing: flowmon_flush_closes is running on this CPU
#define CC_DIRTY 0
#define CC_FLUSHING 1
BPF_PERCPU_ARRAY(close_flags, u64, 2);

static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b) {
    const u64 *x = (const u64 *)a, *y = (const u64 *)b;  // 40 bytes, 8-aligned in every map value
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

static __always_inline u32 close_slot(const struct flow_key *key) {
    const u64 *x = (const u64 *)key;
    u64 h = x[0];
#pragma unroll
    for (int i = 1; i < 5; i++)
        h = h * 0x9E3779B97F4A7C15ULL + x[i];
    return (u32)((h * 0x9E3779B97F4A7C15ULL) >> 32) & (CLOSE_SLOTS - 1);
}

// Moves an entry's counters into its flow, word by word (each taken atomically). 0: its flow could not
// be stored (counted in ST_FLOW_FAILED); the counters stay for the next try.
static __always_inline int close_entry_flush(struct close_entry *e) {
    u64 *src = (u64 *)&e->v;
    u64 any = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 1; i < FLOW_WORDS; i++)
        any |= src[i];
    if (!any)
        return 1;
    struct flow_key key = e->key;
    struct flow_val *v = flow_get(&key);
    if (!v)
        return 0;
    u64 *dst = (u64 *)v;
#pragma clang loop unroll(disable)
    for (u32 i = 1; i < FLOW_WORDS; i++) {
        if (!src[i])
            continue;
        u64 x = __sync_fetch_and_and(&src[i], 0);
        if (x)
            __sync_fetch_and_add(&dst[i], x);
    }
    return 1;
}

// Where a close adds: this CPU's copy of the flow (`copy`: its index), or the flow itself (`copy` -1)
// while a flush runs under us or when the copy's slot could not be freed.
static __always_inline struct flow_val *close_target(struct flow_key *key, int *copy) {
    *copy = -1;
    u32 idx = CC_FLUSHING;
    u64 *flushing = close_flags.lookup(&idx);
    if (!flushing || *flushing)
        return flow_get(key);
    idx = close_slot(key);
    struct close_entry *e = close_cache.lookup(&idx);
    if (!e)
        return flow_get(key);
    if (!flow_key_eq(&e->key, key)) {
        if (!close_entry_flush(e))
            return flow_get(key);
        e->key = *key;
    }
    *copy = idx;
    return &e->v;
}

// After the close's counters are in (a flush that interrupted it before then took only what was in):
// copy i has something for the next flush.
static __always_inline void close_added(int copy) {
    u32 idx = CC_DIRTY;
    u64 *dirty = close_flags.lookup(&idx);
    u64 bit = 1ULL << (copy & 63);
    if (dirty && !(*dirty & bit))
        __sync_fetch_and_or(dirty, bit);
}
#endif

// A socket closes: what it still had pending, closed and its last srtt sample, or a failed connect.
static __always_inline void count_close(struct sock_state *st, int oldstate) {
    int client = st->key.reporter == FM_ROLE_CLIENT;
    int failed = !st->established && client && oldstate == FM_TCP_SYN_SENT;
    if (!st->established && !failed && !st->retrans)
        return;
    u64 tx, rx, open;
    take_pending(st, &tx, &rx, &open);
#if FLOWMON_COMPAT
    struct flow_val *v = flow_get(&st->key);
#else
    int copy;
    struct flow_val *v = close_target(&st->key, &copy);
#endif
    if (!v)
        return;
    credit_pending(v, st->key.reporter, tx, rx, open);
    if (st->established) {
        __sync_fetch_and_add(&v->closed, 1);
        if (st->has_srtt)
            hist_add(v->rtt_slots, &v->rtt_sum_us, st->srtt_us);
        if (st->min_rtt_us)
            hist_add(v->min_rtt_slots, &v->min_rtt_sum_us, st->min_rtt_us);
    } else if (failed) {
        if (st->rst_received)
            __sync_fetch_and_add(&v->failed_refused, 1);
        else
            __sync_fetch_and_add(&v->failed_timeout, 1);
    }
    if (st->retrans) {
        __sync_fetch_and_add(&v->retrans_c2s, st->retrans);
        __sync_fetch_and_add(&v->syn_retrans, st->retrans);
    }
#if !FLOWMON_COMPAT
    if (copy >= 0)
        close_added(copy);
#endif
}

#if FLOWMON_COMPAT
// Compat: a client socket waits here (by its NAT-stable client end) for a traced local server socket.
BPF_HASH(conn_peers, struct rst_key, u64, SOCK_MAX);

static __always_inline void peer_key_for(struct rst_key *k, struct flow_key *key, u16 client_port) {
    __builtin_memcpy(k->client, key->client, 16);
    k->family = key->family;
    k->client_port = client_port;
}

// The server socket of a connection whose client is traced here: link both, so that each credits what
// it sends (exact, from snd_nxt) to the other's received bytes instead of summing tcp_probe's data_len.
// Nothing was received by either before this point (the server sends only once ESTABLISHED; the client's
// early data is counted from its snd_nxt at its first probe, which comes after this).
static __always_inline void link_peer(struct sock_state *srv) {
    struct rst_key k = {};
    peer_key_for(&k, &srv->key, srv->client_port);
    u64 *csk = conn_peers.lookup(&k);
    if (!csk)
        return;
    u64 client_sk = *csk;
    conn_peers.delete(&k);
    struct sock_state *cli = sock_find(client_sk);
    if (!cli || !cli->established)
        return;
    slot_of(cli)->peer_key = srv->key;
    cli->peer_local = 1;
    slot_of(srv)->peer_key = cli->key;
    srv->peer_local = 1;
}
#endif

// The flow key of the socket a state change is about: its local end (saddr/sport) is the client when it
// sent the SYN, the server when it was accepted. Returns the family (IPv4-mapped addresses become IPv4).
// Takes the tracepoint's fields one by one: BCC defines the args struct only inside the probe.
static __always_inline u16 local_key(struct flow_key *key, u8 role, u16 family, const u8 *saddr,
                                     const u8 *saddr_v6, const u8 *daddr, const u8 *daddr_v6, u16 sport,
                                     u16 dport) {
    u8 *local = role == FM_ROLE_CLIENT ? key->client : key->server;
    u8 *remote = role == FM_ROLE_CLIENT ? key->server : key->client;
    u16 fam = copy_addr(local, saddr, saddr_v6, family);
    copy_addr(remote, daddr, daddr_v6, family);
    key->family = fam;
    key->server_port = role == FM_ROLE_CLIENT ? dport : sport;
    key->reporter = role;
    return fam;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    // Half of a connection's ~10 transitions (FIN_WAIT*, CLOSE_WAIT, LAST_ACK, SYN_RECV, ...) need nothing.
    int newstate = args->newstate;
    if (newstate != FM_TCP_SYN_SENT && newstate != FM_TCP_ESTABLISHED && newstate != FM_TCP_CLOSE)
        return 0;
    if (args->protocol != FM_IPPROTO_TCP)
        return 0;
    int oldstate = args->oldstate;
    u64 sk = (u64)args->skaddr;

    if (newstate == FM_TCP_SYN_SENT && oldstate == FM_TCP_CLOSE) {
        // connect(): the client. The source port is not chosen yet; the flow key does not need it.
        struct sock_state st = {};
        u16 family = local_key(&st.key, FM_ROLE_CLIENT, args->family, args->saddr, args->saddr_v6,
                               args->daddr, args->daddr_v6, args->sport, args->dport);
        if (!is_traced(family, st.key.client, st.key.server_port))
            return 0;
        st.start_ns = bpf_ktime_get_ns();
        st.per_conn = is_nat_peer(family, st.key.server);
        if (!st.per_conn)  // a Service IP stays exact: conntrack resolves it per connection
            st.key.peer_fold = fold_peer(st.key.server, family);
        sock_insert(sk, &st);
        return 0;
    }
    if (newstate == FM_TCP_ESTABLISHED) {
        if (oldstate == FM_TCP_SYN_SENT) {
            struct sock_state *st = sock_find(sk);
            if (!st)
                return 0;
            u64 now = bpf_ktime_get_ns();
            st->established = 1;
            st->rtt_epoch = rtt_epoch_now();
            st->client_port = args->sport;
            if (st->per_conn)
                st->key.client_port = args->sport;
            count_open(st, now);
#if FLOWMON_COMPAT
            struct rst_key k = {};
            peer_key_for(&k, &st->key, st->client_port);
            conn_peers.update(&k, &sk);  // full: the pair stays on the approximate data_len path
#endif
        } else if (oldstate == FM_TCP_SYN_RECV) {
            // The accepted child socket: the server.
            struct sock_state st = {};
            u16 family = local_key(&st.key, FM_ROLE_SERVER, args->family, args->saddr, args->saddr_v6,
                                   args->daddr, args->daddr_v6, args->sport, args->dport);
            if (!is_traced(family, st.key.server, st.key.server_port))
                return 0;
            st.key.peer_fold = fold_peer(st.key.client, family);
            st.established = 1;
            st.rtt_epoch = rtt_epoch_now();
            st.client_port = args->dport;
            struct sock_state *srv = sock_insert(sk, &st);
            if (!srv)
                return 0;
            count_open(srv, 0);  // no connect latency on the server side
#if FLOWMON_COMPAT
            link_peer(srv);  // only once stored: a full table links nothing
#endif
        }
        return 0;
    }
    if (newstate == FM_TCP_CLOSE) {
        struct sock_state *st = sock_find(sk);
        if (!st)
            return 0;
        if (st->per_conn && st->key.client_port == 0)
            st->key.client_port = args->sport;  // a failed connect: the port was chosen after SYN_SENT
        count_close(st, oldstate);
        if (st->established && (oldstate == FM_TCP_ESTABLISHED || oldstate == FM_TCP_CLOSE_WAIT ||
                                oldstate == FM_TCP_FIN_WAIT1)) {
            u32 zero = 0;
            struct closed_ring *ring = last_closed.lookup(&zero);
            if (ring) {
                // not atomic (Debian's LLVM cannot use xadd's result): a rare collision loses a slot
                u32 slot = ring->next & (CLOSED_RING - 1);
                ring->next = slot + 1;
                struct closed_sock *lc = &ring->slots[slot];
                lc->sk = sk;
                lc->ts_ns = bpf_ktime_get_ns();
                lc->key = st->key;
                lc->client_port = st->client_port;
            }
        }
#if FLOWMON_COMPAT
        if (st->key.reporter == FM_ROLE_CLIENT && st->established && !st->peer_local) {
            struct rst_key k = {};
            peer_key_for(&k, &st->key, st->client_port);
            conn_peers.delete(&k);  // the server was not traced here
        }
#endif
        sock_remove(sk, st);
    }
    return 0;
}

#if !FLOWMON_COMPAT
// Bytes the application wrote and read: exact, including sendfile/splice-to-socket (sock_sendmsg), added
// to the socket's pending counters (its slot's second half) until close or the next fold.
static __always_inline void count_bytes(u64 sk, int tx, int ret) {
    struct sock_state *st = sock_find(sk);
    if (!st)
        return;
    struct sock_slot *slot = slot_of(st);
    u64 *word = tx ? &slot->tx_word : &slot->rx_word;
    mark_if_first(slot, __sync_fetch_and_add(word, (u64)ret), slot_index(sk, st));
}

#if FLOWMON_RAW
RAW_TRACEPOINT_PROBE(sock_send_length) {
    int ret = (int)ctx->args[1];
    if (ret > 0)
        count_bytes(ctx->args[0], 1, ret);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length) {
    int ret = (int)ctx->args[1];
    if (ret > 0 && !((int)ctx->args[2] & FM_MSG_PEEK))
        count_bytes(ctx->args[0], 0, ret);
    return 0;
}
#else
TRACEPOINT_PROBE(sock, sock_send_length) {
    int ret = args->ret;
    if (ret > 0 && args->protocol == FM_IPPROTO_TCP)
        count_bytes((u64)args->sk, 1, ret);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    int ret = args->ret;
    if (ret > 0 && !(args->flags & FM_MSG_PEEK) && args->protocol == FM_IPPROTO_TCP)
        count_bytes((u64)args->sk, 0, ret);
    return 0;
}
#endif
#endif

// Every segment received in ESTABLISHED. Default path: srtt sampling only. Compat path: also bytes
// (sent = advance of snd_nxt, wrap-safe and never counted twice; received = the local peer's sent bytes
// when the peer is traced here, otherwise the payload of received segments, data_len).
#if !FLOWMON_COMPAT
// Per CPU, the sockets (by cookie: never reused, unlike socket pointers) that have nothing to do in
// tcp_probe until the next sampling epoch. A hit returns without touching the socket's slot, which lives
// on the socket's own CPU while tcp_probe runs in the softirq of whichever CPU sent the segment: per
// keep-alive request 503 -> 430 ns of kernel time (tcp_probe 189 -> 143, and the receiver's next
// sock_recv_length 173 -> 145), at a cost of ~50 ns per churn request, whose sockets mostly end before
// a hit (docs/BENCHMARKS.md). Direct-mapped: a collision only means one more slot read.
#define QUIET_SLOTS 1024
struct quiet_entry {
    u64 cookie;
    u64 epoch;
};
BPF_PERCPU_ARRAY(rtt_quiet, struct quiet_entry, QUIET_SLOTS);
#endif

TRACEPOINT_PROBE(tcp, tcp_probe) {
    u64 sk = (u64)args->skaddr;
    u64 epoch = rtt_epoch_now();
#if !FLOWMON_COMPAT
    u64 cookie = args->sock_cookie;
    u32 qi = (u32)((cookie * 0x9E3779B97F4A7C15ULL) >> 40) & (QUIET_SLOTS - 1);
    struct quiet_entry *quiet = rtt_quiet.lookup(&qi);
    if (quiet && quiet->cookie == cookie && quiet->epoch == epoch)
        return 0;
#endif
    struct sock_state *st = sock_find(sk);
    if (!st) {
        u32 idx = CFG_ADOPT;
        u64 *on = cfg.lookup(&idx);
        if (!on || !*on)
            return 0;
        struct tuple_key t = {};
        u16 lport, rport;
        u16 family = copy_sockaddr(t.local, &lport, args->saddr);
        copy_sockaddr(t.remote, &rport, args->daddr);
        t.family = family;
        t.local_port = lport;
        t.remote_port = rport;
        u8 *role = adopt.lookup(&t);
        if (!role)
            return 0;
        struct sock_state fresh = {};
        fresh.key.family = family;
        fresh.key.reporter = *role;
        if (*role == FM_ROLE_CLIENT) {
            __builtin_memcpy(fresh.key.client, t.local, 16);
            __builtin_memcpy(fresh.key.server, t.remote, 16);
            fresh.key.server_port = rport;
        } else {
            __builtin_memcpy(fresh.key.client, t.remote, 16);
            __builtin_memcpy(fresh.key.server, t.local, 16);
            fresh.key.server_port = lport;
        }
        adopt.delete(&t);
        if (!is_traced(family, t.local, fresh.key.server_port))
            return 0;
        fresh.key.peer_fold = fold_peer(*role == FM_ROLE_CLIENT ? fresh.key.server : fresh.key.client, family);
        fresh.established = 1;
        fresh.client_port = *role == FM_ROLE_CLIENT ? lport : rport;
        fresh.rtt_epoch = epoch;
        st = sock_insert(sk, &fresh);
        if (!st)
            return 0;
        count_open(st, 0);
        stat_inc(ST_ADOPTED);
    }
#if FLOWMON_COMPAT
    u32 una = args->snd_una;
    u32 nxt = args->snd_nxt;
    if (!st->seq_init) {
        // Before this segment is processed snd_una is still the first unacknowledged byte we sent.
        st->seq_init = 1;
        st->seq_hw = una;
    }
    s32 adv = (s32)(nxt - st->seq_hw);
    u32 data_len = st->peer_local ? 0 : args->data_len;
    if (adv > 0 || data_len) {
        struct flow_val *fv = flow_get(&st->key);
        if (fv) {
            if (adv > 0)
                __sync_fetch_and_add(dir_bytes(fv, st->key.reporter, 1), adv);
            if (data_len)
                __sync_fetch_and_add(dir_bytes(fv, st->key.reporter, 0), data_len);
        }
    }
    if (adv > 0) {
        st->seq_hw = nxt;
        if (st->peer_local) {
            struct flow_val *pv = flow_get(&slot_of(st)->peer_key);  // our tx is the peer's rx: same direction
            if (pv)
                __sync_fetch_and_add(dir_bytes(pv, st->key.reporter, 1), adv);
        }
    }
#endif
    // srtt sampling, read-only on most segments (no cache-line writes shared with the send path): the
    // first srtt is kept for the sample taken at close; then one sample per sampling epoch goes straight
    // to the flow's histogram and refreshes the value kept for close.
    u32 srtt = args->srtt;
    if (srtt == 0)
        return 0;
    if (!st->has_srtt) {
        st->srtt_us = srtt;
        st->has_srtt = 1;
        return 0;  // the interval started at ESTABLISHED: no periodic sample due yet in most cases
    }
#if !FLOWMON_COMPAT
    if (quiet) {  // the first srtt is kept: nothing more is due for this socket in this epoch
        quiet->cookie = cookie;
        quiet->epoch = epoch;
    }
#endif
    if (st->rtt_epoch == epoch)
        return 0;
    st->rtt_epoch = epoch;
    st->srtt_us = srtt;
    struct flow_val *v = flow_get(&st->key);
    if (v)
        hist_add(v->rtt_slots, &v->rtt_sum_us, srtt);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 sk = (u64)args->skaddr;
    struct sock_state *st = sock_find(sk);
    if (!st)
        return 0;
#if !FLOWMON_COMPAT
    // -EBUSY: the original is still in a host queue, nothing was sent (and RetransSegs does not count
    // it). Other errors (a full veth backlog, a qdisc drop) were sent and lost locally: counted.
    if (args->err == -16)
        return 0;
#endif
    if (!st->established) {
        __sync_fetch_and_add(&st->retrans, 1);  // a SYN: the NAT per-connection key is not final yet
        return 0;
    }
    struct flow_val *v = flow_get(&st->key);
    if (v)
        __sync_fetch_and_add(st->key.reporter == FM_ROLE_CLIENT ? &v->retrans_c2s : &v->retrans_s2c, 1);
    return 0;
}

static __always_inline void rst_key_for(struct rst_key *k, struct flow_key *key, u16 client_port,
                                         u8 sender) {
    __builtin_memcpy(k->client, key->client, 16);
    k->family = key->family;
    k->client_port = client_port;
    k->sender = sender;
}

// An RST sent by a traced socket is counted on that socket (its own direction). The classic tracepoint
// carries `enum sk_rst_reason` on 6.10+, which older kernel headers cannot compile; the socket pointer
// is all we need, so the raw tracepoint is used where the kernel has raw tracepoints.
static __always_inline int on_send_reset(u64 sk) {
    if (!sk)
        return 0;
    struct rst_key k = {};
    struct sock_state *st = sock_find(sk);
    if (st) {
        if (!st->established)
            return 0;
        struct flow_val *v = flow_get(&st->key);
        if (v)
            __sync_fetch_and_add(st->key.reporter == FM_ROLE_CLIENT ? &v->resets_c2s : &v->resets_s2c, 1);
        rst_key_for(&k, &st->key, st->client_port, st->key.reporter);
    } else {
        // tcp_disconnect (SO_LINGER 0, abort) moves to CLOSE first, then sends the RST.
        u32 zero = 0;
        struct closed_ring *ring = last_closed.lookup(&zero);
        if (!ring)
            return 0;
        struct closed_sock *lc = 0;
        u64 now = bpf_ktime_get_ns();
#pragma unroll
        for (int i = 0; i < CLOSED_RING; i++) {
            if (ring->slots[i].sk == sk && now - ring->slots[i].ts_ns < CLOSED_MATCH_NS)
                lc = &ring->slots[i];
        }
        if (!lc)
            return 0;
        lc->sk = 0;  // one RST per abrupt close
        struct flow_key key = lc->key;
        struct flow_val *v = flow_get(&key);
        if (v)
            __sync_fetch_and_add(key.reporter == FM_ROLE_CLIENT ? &v->resets_c2s : &v->resets_s2c, 1);
        rst_key_for(&k, &key, lc->client_port, key.reporter);
    }
    if (rst_pending.lookup(&k))
        rst_pending.delete(&k);  // the receiver saw it first: it is ours, not the receiver's
    else {
        u64 now = bpf_ktime_get_ns();
        rst_sent.update(&k, &now);
    }
    return 0;
}

#if FLOWMON_RAW_RESET
RAW_TRACEPOINT_PROBE(tcp_send_reset) {
    return on_send_reset(ctx->args[0]);
}
#else
TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    return on_send_reset((u64)args->skaddr);
}
#endif

// An RST received: while connecting it means refused; on an open connection it is counted for the
// peer's direction unless a traced local socket sent it (then that socket counted it).
TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sk = (u64)args->skaddr;
    struct sock_state *st = sock_find(sk);
    if (!st)
        return 0;
    if (!st->established) {
        st->rst_received = 1;
        return 0;
    }
    u8 sender = st->key.reporter == FM_ROLE_CLIENT ? FM_ROLE_SERVER : FM_ROLE_CLIENT;
    if (st->key.peer_fold) {
        // A folded peer is outside the cluster, no traced socket here: the RST is the peer's. Counted now,
        // since the pending key (the client's address, zeroed) would mix distinct external clients.
        struct flow_val *v = flow_get(&st->key);
        if (v)
            __sync_fetch_and_add(sender == FM_ROLE_CLIENT ? &v->resets_c2s : &v->resets_s2c, 1);
        return 0;
    }
    struct rst_key k = {};
    rst_key_for(&k, &st->key, st->client_port, sender);
    if (rst_sent.lookup(&k)) {
        rst_sent.delete(&k);
        return 0;
    }
    struct rst_pending_val p = {};
    p.key = st->key;
    p.ts_ns = bpf_ktime_get_ns();
    p.to_client = sender == FM_ROLE_SERVER;
    if (rst_pending.update(&k, &p) != 0)
        stat_inc(ST_RST_FULL);
    return 0;
}

#if !FLOWMON_COMPAT
// Counters a fold took from a slot that a new socket took meanwhile belong to that socket: given back
// (and the slot marked again).
static __always_inline u64 own_part(u64 *word, u64 taken, u64 gen, int *gave) {
    if ((taken & FM_GEN_MASK) == gen)
        return taken;
    if (taken & ~FM_GEN_MASK) {
        __sync_fetch_and_add(word, taken & ~FM_GEN_MASK);
        *gave = 1;
    }
    return 0;
}

static __always_inline void fold_socket(struct sock_slot *slot, u32 i) {
    __sync_fetch_and_and(&slot->marked, 0);  // its mark is taken: what is added from now on marks again
    struct sock_state *st = &slot->st;
    u64 sk = st->sk;
    if (sk <= FM_SK_CLAIMED || !st->established)
        return;
    u64 gen = slot->tx_word & FM_GEN_MASK;
    if (((slot->tx_word | slot->rx_word | slot->open_word) & ~FM_GEN_MASK) == 0)
        return;  // nothing pending (its close took it)
    struct flow_key key = st->key;
    if (st->sk != sk || (slot->tx_word & FM_GEN_MASK) != gen)
        return;  // closed or replaced while the key was read: its close took the counters
    int gave = 0;
    u64 tx = own_part(&slot->tx_word, __sync_fetch_and_and(&slot->tx_word, FM_GEN_MASK), gen, &gave);
    u64 rx = own_part(&slot->rx_word, __sync_fetch_and_and(&slot->rx_word, FM_GEN_MASK), gen, &gave);
    u64 open = own_part(&slot->open_word, __sync_fetch_and_and(&slot->open_word, FM_GEN_MASK), gen, &gave);
    if (gave) {  // the new socket's counters wait for the next fold
        slot->marked = 1;
        mark_pending(i);
    }
    if (((tx | rx | open) & ~FM_GEN_MASK) == 0)
        return;
    struct flow_val *v = flow_get(&key);
    if (v)
        credit_pending(v, key.reporter, tx, rx, open);
}

// Index of the lowest set bit of v (v != 0), without a branch: the bits below it, counted (SWAR).
// Branches here would multiply the paths the verifier walks through the fold's loop.
static __always_inline u32 lowest_bit(u64 v) {
    u64 x = (v & -v) - 1;
    x -= (x >> 1) & 0x5555555555555555ULL;
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (u32)((x * 0x0101010101010101ULL) >> 56);
}

// Run by user space on each CPU that has marks (BPF_PROG_TEST_RUN with BPF_F_TEST_RUN_ON_CPU, never
// attached) before each read of `flows`: moves the pending counters of the slots this CPU marked into
// their flows, so a long-lived connection's bytes are as fresh as the read. Each step takes one group
// word, one bitmap word or visits one slot, from group args[0] on. Returns MARK_GROUPS when done;
// otherwise it ran out of steps (the verifier walks every step), gave back what it took and did not
// visit, and returns the group to run again from. It runs in an interrupt on that CPU: an event it
// interrupted finishes its mark afterwards, which the ordering above allows for.
#ifndef FOLD_STEPS
#define FOLD_STEPS 32
#endif
int flowmon_fold(struct bpf_raw_tracepoint_args *ctx) {
    u32 group = (u32)ctx->args[0];  // 0, or what the last run returned
    u64 groups = 0, words = 0;
    u32 w = 0;
#pragma clang loop unroll(disable)
    for (u32 n = 0; n < FOLD_STEPS; n++) {
        if (words) {
            u32 i = w * 64 + lowest_bit(words);
            words &= words - 1;
            struct sock_slot *slot = socks.lookup(&i);
            if (slot)
                fold_socket(slot, i);
        } else if (groups) {
            w = (group - 1) * 64 + lowest_bit(groups);
            groups &= groups - 1;
            u64 *m = fold_marks.lookup(&w);
            words = m ? __sync_fetch_and_and(m, 0) : 0;
        } else {
            // past the last group the lookup fails: no range check on `group`, which would give the
            // verifier one more state to walk per iteration
            u32 g = MARK_WORDS + group;
            u64 *m = fold_marks.lookup(&g);
            if (!m)
                return MARK_GROUPS;
            groups = __sync_fetch_and_and(m, 0);
            group++;
        }
    }
    if (!words && !groups)
        return group;
    if (words) {
        u64 *m = fold_marks.lookup(&w);
        if (m)
            __sync_fetch_and_or(m, words);
        groups |= 1ULL << (w & 63);
    }
    u32 g = MARK_WORDS + group - 1;
    u64 *m = fold_marks.lookup(&g);
    if (m)
        __sync_fetch_and_or(m, groups);
    return group - 1;
}

// Run by user space on each CPU whose CC_DIRTY is set, after the fold and before each read of `flows`:
// moves this CPU's copies of closed connections' counters into their flows, FLUSH_PER_RUN copies per
// run (the verifier follows one path through every word of each). Returns 1 while copies still wait:
// user space runs it again.
#define FLUSH_PER_RUN 8
int flowmon_flush_closes(struct bpf_raw_tracepoint_args *ctx) {
    u32 idx = CC_FLUSHING;
    u64 *flushing = close_flags.lookup(&idx);
    idx = CC_DIRTY;
    u64 *dirty = close_flags.lookup(&idx);
    if (!flushing || !dirty)
        return 0;
    *flushing = 1;
    asm volatile("" ::: "memory");
    u64 bits = __sync_fetch_and_and(dirty, 0);  // a close that adds from now on sets its bit again
    u64 failed = 0;
#pragma clang loop unroll(disable)
    for (u32 n = 0; n < FLUSH_PER_RUN && bits; n++) {
        u64 bit = bits & -bits;
        u32 i = lowest_bit(bits);
        bits &= bits - 1;
        struct close_entry *e = close_cache.lookup(&i);
        if (e && !close_entry_flush(e))
            failed |= bit;  // its flow could not be stored: try again at the next read
    }
    if (bits | failed)
        __sync_fetch_and_or(dirty, bits | failed);
    asm volatile("" ::: "memory");
    *flushing = 0;
    return bits != 0;
}
#endif

// --- An srtt for every connection: BPF_PROG_TYPE_SOCK_OPS on the cgroup v2 root --------------------------
// tcp_probe runs only in a sampling window, so a connection that lives between two windows had no srtt.
// This program, linked to the cgroup v2 root by user space (agent/flowmon_agent/kernel/program.py), sees
// every TCP socket of the node: at ESTABLISHED it asks for state callbacks, and at the change to CLOSE
// it gives the socket's final smoothed RTT and min RTT to the socket's state, whose close (the
// inet_sock_set_state tracepoint, which tcp_set_state fires right after this callback, on the same CPU)
// adds the sample to the flow. It reads only the UAPI context `struct bpf_sock_ops` (stable, no kernel
// struct layout) and always returns 1 (it decides nothing for the socket). Not loaded where no cgroup v2
// is mounted: then close samples come from tcp_probe's windows only, as before.
#define FM_SOCK_OPS_ACTIVE_ESTABLISHED_CB 4
#define FM_SOCK_OPS_PASSIVE_ESTABLISHED_CB 5
#define FM_SOCK_OPS_STATE_CB 10
#define FM_SOCK_OPS_STATE_CB_FLAG 4

int flowmon_sockops(struct bpf_sock_ops *skops) {
    u32 op = skops->op;
    if (op == FM_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == FM_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | FM_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (op != FM_SOCK_OPS_STATE_CB || skops->args[1] != FM_TCP_CLOSE)
        return 1;
    // The context's socket pointer is a typed pointer the verifier allows no arithmetic on; copied out of
    // the stack it is the plain integer sock_find hashes (the value inet_sock_set_state gives). Allowed
    // with CAP_PERFMON; the stack, unlike a scratch map, is not shared with a softirq on this CPU.
    // BCC #defines bpf_probe_read_kernel to bpf_probe_read (helper 4, refused in sock_ops) when it cannot
    // find the symbol in /proc/kallsyms, which shows zero addresses without CAP_SYSLOG (the agent's
    // container): here the real helper, present on every kernel that has skops->sk (5.10; helper 5.5).
#pragma push_macro("bpf_probe_read_kernel")
#undef bpf_probe_read_kernel
    volatile u64 ptr = (u64)skops->sk;
    u64 sk = 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), (void *)&ptr);
#pragma pop_macro("bpf_probe_read_kernel")
    struct sock_state *st = sock_find(sk);
    if (!st || !st->established)
        return 1;
    u32 srtt = skops->srtt_us >> 3;  // the kernel keeps srtt << 3
    if (!srtt)
        return 1;
    st->srtt_us = srtt;
    st->has_srtt = 1;
    u32 min_rtt = skops->rtt_min;  // the kernel's windowed min (tcp_min_rtt_wlen, 5 min): ~0 before a sample
    if (min_rtt != 0xFFFFFFFF)
        st->min_rtt_us = min_rtt ? min_rtt : 1;
    return 1;
}
