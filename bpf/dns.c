// flowmon DNS capture: every UDP datagram to or from the DNS port at a socket of this node, handed to
// user space with its addresses and the first DNS_CAPTURE_BYTES of its payload; user space parses it.
//
// Hook: BPF_PROG_TYPE_CGROUP_SKB on the cgroup v2 root, ingress and egress; the product's entry points
// are bpf/skb.c's (one program per direction for UDP and DNS), this file's own are the benches'. Every
// socket of the node belongs to a cgroup below the root, so one attachment sees every pod's packets,
// whatever its network namespace. The program reads only the packet through `__sk_buff` and bpf_skb_load_bytes (stable UAPI,
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
//   DNS_MODE 3: the product: transactions in the kernel (below), only what the kernel cannot
//   vouch for and answers with addresses copied to the ring. Measurement variants for
//   bench/dns_overhead.py, kept here so that they share every line before the port match: 0 counts
//   matches only (the floor of this hook), 1 copies every datagram to the ring (user space parses and
//   tracks: the product until 2026-12-06), 2 walks the question in the kernel and hands over a small
//   record without payload.
//   DNS_PENDING_MAX, DNS_SERIES_MAX, DNS_BUCKETS and DNS_LE_<i> (latency bounds, ns): the transaction part below.
//   DNS_ANSWERS_MAX, DNS_ANSWER_TTL_MAX (s), DNS_ANSWER_SEED (a random u64 per load), DNS_ANSWERS_ONCE:
//   answers with addresses handed over once per TTL (below).

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
#define DNS_MODE 3
#endif

#define DNS_PAYLOAD_ROOM 4096 // a power of two >= DNS_CAPTURE_BYTES: indexes are masked with it - 1

enum dns_count {
    DNS_SEEN = 0,       // datagrams to or from the DNS port
    DNS_HANDED = 1,     // records written to the ring
    DNS_RING_FULL = 2,  // records lost: the ring was full
    DNS_NOT_WALKED = 3, // IPv6 packets with extension headers (port unknown)
    DNS_KEPT = 4,       // DNS_MODE 3: datagrams counted in the kernel, nothing handed over
    DNS_RETRANSMITTED = 5,   // a query seen again while its first copy waits (latency from the first)
    DNS_PENDING_FULL = 6,    // queries not tracked: dns_pending was full
    DNS_SERIES_OVERFLOW = 7, // requests or latencies folded into an overflow key: a counter map was full
    DNS_ANSWERS_HANDED = 8,       // answers with addresses handed over for their names
    DNS_ANSWERS_DEDUPLICATED = 9, // ... not handed over: user space has them (dns_answers), counted in kept
    DNS_ANSWERS_UNWALKED = 10,    // ... handed over without a key: the kernel could not walk their records
    DNS_COUNT_MAX = 11,
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
    u8 kind;            // DNS_RECORD_PACKET or DNS_RECORD_NAMES (below)
    u8 pad[5];
    u64 answer_hash;    // DNS_RECORD_NAMES: its key in dns_answers (with daddr, family); 0: none
    u32 answers_at;     // the kernel's own: where the answer records start (DNS_MODE 3)
    u32 pad2;
    u8 payload[DNS_PAYLOAD_ROOM]; // the first `captured` bytes are written and handed over
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

#if DNS_MODE == 3
// (here, not in a header: BCC rewrites map calls only in the main file)
// --- DNS transactions kept in the kernel (DNS_MODE 3, the product), as TCP flows are: a query waits in
// `dns_pending`, its answer completes it and is counted in `dns_requests` (per vantage, client, server,
// rcode, qtype) and `dns_latency` (per vantage, client, server: the Prometheus buckets, count, sum).
// User space reads both maps each poll and sweeps pending queries past their deadline as `timeout`
// (agent/flowmon_agent/dns/kernel_counts.py), so the clock of timeouts stays user space's (injectable).
//
// The kernel keeps only what it can vouch for: a QUERY (opcode 0) with one question whose name is plain
// labels within the bytes copied, counts the payload can hold (the parser's `counts_exceed_payload`
// rule), and, for a query, no records. Anything else (malformed, other opcodes, several questions) and
// an answer that matches no pending query (late after a timeout, or never asked) is handed to user space
// whole, where the parser names the reason: rare on a healthy node. An answer with addresses (NOERROR,
// ancount > 0, question A or AAAA) is also copied once, where its client receives it, for the IP→name
// table. When a monitor wants query-name suffixes (dns_config[0]), queries and their answers go to user
// space as in DNS_MODE 1; an answer to a query the kernel still holds is counted here either way.
//
// Bounded: DNS_PENDING_MAX pending queries (a query that finds the map full is counted, not tracked);
// DNS_SERIES_MAX keys in each counter map, past which a pair folds into its `overflow` key.

#ifndef DNS_PENDING_MAX
#define DNS_PENDING_MAX 16384
#endif
#ifndef DNS_SERIES_MAX
#define DNS_SERIES_MAX 4096
#endif
#ifndef DNS_BUCKETS
#define DNS_BUCKETS 13
#endif
#define DNS_HEADER 12
#define DNS_MAX_NAME 255
#define DNS_VANTAGE_CLIENT 0
#define DNS_VANTAGE_SERVER 1
#define DNS_RECORD_PACKET 0 // a record for the tracker (DnsTracker.observe)
#define DNS_RECORD_NAMES 1  // an answer already counted here: only its names are wanted

struct dns_txn_key {
    u8 client[16];
    u8 server[16];
    u16 client_port;
    u16 server_port;
    u16 id;
    u8 family;
    u8 vantage;
};

struct dns_txn {
    u64 ts_ns;
    u64 qtype;
};

struct dns_series_key {
    u8 client[16];  // zero with overflow = 1
    u8 server[16];
    u8 family;
    u8 vantage;
    u8 rcode;
    u8 overflow;
    u16 qtype;      // 0: a type without a label of its own (`other`, dns/codes.py)
    u16 pad;
};

struct dns_pair_key {
    u8 client[16];
    u8 server[16];
    u8 family;
    u8 vantage;
    u8 overflow;
    u8 pad[5];
};

struct dns_latency_val {
    u64 buckets[DNS_BUCKETS]; // observations in (bound[i-1], bound[i]]; above the last: count only
    u64 count;
    u64 sum_ns;
};

BPF_HASH(dns_pending, struct dns_txn_key, struct dns_txn, DNS_PENDING_MAX);
BPF_HASH(dns_requests, struct dns_series_key, u64, DNS_SERIES_MAX);
BPF_HASH(dns_latency, struct dns_pair_key, struct dns_latency_val, DNS_SERIES_MAX);
BPF_ARRAY(dns_config, u64, 1); // [0]: 1 = hand every query and answer to user space (qname suffixes)

// The qtypes with a label of their own (dns/codes.py QTYPE_NAMES): any other keys as 0, so a client
// cannot add series by asking for 65,536 types.
static __always_inline u16 labelled_qtype(u16 qtype) {
    // a bit per labelled type below 66 (no switch: a jump table is an indirect jump BPF cannot load)
    const u64 low = (1ULL << 1) | (1ULL << 2) | (1ULL << 5) | (1ULL << 6) | (1ULL << 12) | (1ULL << 15) |
                    (1ULL << 16) | (1ULL << 28) | (1ULL << 33) | (1ULL << 35) | (1ULL << 43) |
                    (1ULL << 46) | (1ULL << 48);
    if (qtype < 64)
        return (low >> qtype) & 1 && qtype != 0 ? qtype : 0;
    return qtype == 64 || qtype == 65 || qtype == 255 || qtype == 257 ? qtype : 0;
}

// The latency bucket of ns: bounds are integer cflags DNS_LE_<i> (ns), from the contract's buckets.
#define DNS_LE_CHECK(i)                                                                                    \
    if (i < DNS_BUCKETS && ns <= (u64)DNS_LE_##i)                                                          \
        return i;
#ifndef DNS_LE_0
#define DNS_LE_0 500000
#define DNS_LE_1 1000000
#define DNS_LE_2 2500000
#define DNS_LE_3 5000000
#define DNS_LE_4 10000000
#define DNS_LE_5 25000000
#define DNS_LE_6 50000000
#define DNS_LE_7 100000000
#define DNS_LE_8 250000000
#define DNS_LE_9 500000000
#define DNS_LE_10 1000000000
#define DNS_LE_11 2500000000
#define DNS_LE_12 5000000000
#endif
#ifndef DNS_LE_13
#define DNS_LE_13 0
#define DNS_LE_14 0
#define DNS_LE_15 0
#endif
static __always_inline u32 latency_bucket(u64 ns) {
    DNS_LE_CHECK(0) DNS_LE_CHECK(1) DNS_LE_CHECK(2) DNS_LE_CHECK(3) DNS_LE_CHECK(4) DNS_LE_CHECK(5)
    DNS_LE_CHECK(6) DNS_LE_CHECK(7) DNS_LE_CHECK(8) DNS_LE_CHECK(9) DNS_LE_CHECK(10) DNS_LE_CHECK(11)
    DNS_LE_CHECK(12) DNS_LE_CHECK(13) DNS_LE_CHECK(14) DNS_LE_CHECK(15)
    return DNS_BUCKETS; // above every bound: +Inf only
}

// Walk the one question: its type (and in *end the offset after it), or -1 when the kernel cannot vouch
// for the name (a pointer, a label type other than plain, over 255 octets, or past the bytes copied).
// `payload`: the scratch copy.
static __always_inline int question_type(u8 *payload, u32 captured, u32 *end) {
    u32 pos = DNS_HEADER, octets = 1;
    for (int i = 0; i < 128; i++) { // a name has at most 127 labels
        if (pos >= captured)
            return -1;
        u32 at = pos;
        asm volatile("%0 &= 4095" : "+r"(at)); // DNS_PAYLOAD_ROOM - 1, kept after the compiler's view
        u8 len = payload[at];
        if (len & 0xc0)
            return -1;
        if (len == 0) {
            if (pos + 5 > captured)
                return -1; // type and class must be there
            u32 type_at = pos + 1;
            asm volatile("%0 &= 4095" : "+r"(type_at));
            u16 hi = payload[type_at];
            type_at += 1;
            asm volatile("%0 &= 4095" : "+r"(type_at));
            *end = pos + 5;
            return (hi << 8) | payload[type_at];
        }
        octets += len + 1;
        if (octets > DNS_MAX_NAME)
            return -1;
        pos += 1 + len;
    }
    return -1;
}

static __always_inline void count_request(struct dns_txn_key *t, u8 rcode, u16 qtype) {
    struct dns_series_key k = {.family = t->family, .vantage = t->vantage, .rcode = rcode, .qtype = qtype};
    __builtin_memcpy(k.client, t->client, 16);
    __builtin_memcpy(k.server, t->server, 16);
    u64 one = 1, *n = dns_requests.lookup(&k);
    if (!n && dns_requests.insert(&k, &one) == 0)
        return;
    if (!n) {
        n = dns_requests.lookup(&k); // inserted by another CPU meanwhile
        if (!n) {
            count(DNS_SERIES_OVERFLOW);
            struct dns_series_key o = {.family = t->family, .vantage = t->vantage, .rcode = rcode,
                                       .overflow = 1, .qtype = qtype};
            n = dns_requests.lookup_or_try_init(&o, &(u64){0});
            if (!n)
                return;
        }
    }
    __sync_fetch_and_add(n, 1);
}

static __always_inline void observe_latency(struct dns_txn_key *t, u64 ns) {
    struct dns_pair_key k = {.family = t->family, .vantage = t->vantage};
    __builtin_memcpy(k.client, t->client, 16);
    __builtin_memcpy(k.server, t->server, 16);
    struct dns_latency_val *v = dns_latency.lookup(&k);
    if (!v) {
        struct dns_latency_val zero = {};
        dns_latency.insert(&k, &zero);
        v = dns_latency.lookup(&k);
        if (!v) {
            struct dns_pair_key o = {.family = t->family, .vantage = t->vantage, .overflow = 1};
            v = dns_latency.lookup_or_try_init(&o, &zero);
            if (!v)
                return;
        }
    }
    u32 b = latency_bucket(ns);
    if (b < DNS_BUCKETS)
        __sync_fetch_and_add(&v->buckets[b], 1);
    __sync_fetch_and_add(&v->count, 1);
    __sync_fetch_and_add(&v->sum_ns, ns);
}

// What to do with a packet after the kernel's look: hand it to user space or not, and as what.
#define DNS_KEEP -1 // counted here, nothing to hand over

// --- Answers with addresses, handed to user space once per TTL (the IP→name table, dns/names.py) ------
// An answer is keyed by its client and a hash of its bytes from offset 2 to the end of its answer
// section, each record's TTL left out: the id differs per query and a cache counts TTLs down, and neither
// changes what user space learns. `dns_answers` holds per key when user space's copy runs out: the time
// it was handed over plus the smallest TTL of its records (capped at DNS_ANSWER_TTL_MAX, the name table's
// cap). A repeat before then is counted (answers_deduplicated, and kept) and not copied; a changed answer
// (other addresses, another order) hashes differently and is handed over. User space deletes a key when
// the names it taught leave its table (expired by its clock, evicted) or did not parse, and the kernel
// when the ring had no room for it: the next copy is handed over. Only answers the kernel can walk get a
// key: whole in the bytes copied, at most DNS_ANSWER_RECORDS records, each owner name a compression
// pointer back to after the header; any other is handed over every time (answers_unwalked). An LRU map:
// an evicted key costs one more hand-over. The hash is FNV-1a from a random basis per load
// (DNS_ANSWER_SEED), so a pod cannot aim at another answer's key.

#ifndef DNS_ANSWERS_MAX
#define DNS_ANSWERS_MAX 8192
#endif
#ifndef DNS_ANSWER_TTL_MAX
#define DNS_ANSWER_TTL_MAX 86400
#endif
#ifndef DNS_ANSWER_SEED
#define DNS_ANSWER_SEED 0xcbf29ce484222325ULL
#endif
#ifndef DNS_ANSWERS_ONCE
#define DNS_ANSWERS_ONCE 1 // 0: every answer with addresses handed over (bench/dns_overhead.py's before)
#endif
#define DNS_ANSWER_RECORDS 8
#define DNS_RECORD_TAIL 10 // type, class, TTL, rdlength
#define DNS_TTL_SIZE 4

struct dns_answer_key {
    u8 client[16];
    u64 hash;
    u8 family;
    u8 pad[7];
};
BPF_TABLE("lru_hash", struct dns_answer_key, u64, dns_answers, DNS_ANSWERS_MAX); // value: expiry, ns

static __always_inline u8 byte_at(u8 *payload, u32 pos) {
    asm volatile("%0 &= 4095" : "+r"(pos)); // DNS_PAYLOAD_ROOM - 1
    return payload[pos];
}

static __always_inline void put_byte(u8 *payload, u32 pos, u8 value) {
    asm volatile("%0 &= 4095" : "+r"(pos));
    payload[pos] = value;
}

// The offset after the record owner name at pos, or 0 when the kernel does not walk it: only a
// compression pointer back to after the header (what resolvers write: the question's name, or a CNAME's
// target) is; a name of labels here would be a second label walk per record, too much for the verifier.
static __always_inline u32 skip_owner(u8 *payload, u32 pos, u32 captured) {
    if (pos + 2 > captured)
        return 0;
    u8 hi = byte_at(payload, pos);
    if ((hi & 0xc0) != 0xc0)
        return 0;
    u32 target = ((hi & 0x3f) << 8) | byte_at(payload, pos + 1);
    return target >= DNS_HEADER && target < pos ? pos + 2 : 0; // the parser's rule: strictly backwards
}

// The key hash of the answer whose records start at pos (0: not walked), its smallest TTL in *ttl_min.
// The TTLs are zeroed in the scratch copy while it is hashed (8 bytes a step: the verifier walks each
// step of each path) and put back before returning. A/AAAA data of the wrong size is the parser's to
// find (bad_rdata: user space then gives the key back).
static __always_inline u64 answer_hash(u8 *p, u32 captured, u32 pos, u16 an, u32 *ttl_min) {
    u32 ttl_at[DNS_ANSWER_RECORDS] = {}, ttl_raw[DNS_ANSWER_RECORDS] = {};
    int records = 0, walked = 1;
    for (int r = 0; r < DNS_ANSWER_RECORDS; r++) {
        if (r >= an)
            break;
        pos = skip_owner(p, pos, captured);
        if (pos == 0 || pos + DNS_RECORD_TAIL > captured) {
            walked = 0; // (not a return: the TTLs zeroed so far are put back below)
            break;
        }
        ttl_at[r] = pos + 4;
        for (int b = 0; b < DNS_TTL_SIZE; b++) {
            ttl_raw[r] = (ttl_raw[r] << 8) | byte_at(p, pos + 4 + b);
            put_byte(p, pos + 4 + b, 0);
        }
        pos += DNS_RECORD_TAIL + ((byte_at(p, pos + 8) << 8) | byte_at(p, pos + 9));
        records = r + 1;
    }
    u64 hash = 0;
    if (walked && an <= DNS_ANSWER_RECORDS && pos <= captured) { // (after the walk: before, the compiler
        hash = (u64)DNS_ANSWER_SEED;                             // drops the walk's own bound)
        for (int i = 0; i < DNS_CAPTURE_BYTES / 8; i++) {
            u32 at = 2 + i * 8; // the id (bytes 0-1) left out
            if (at >= pos)
                break;
            asm volatile("%0 &= 4095" : "+r"(at));
            if (at > DNS_PAYLOAD_ROOM - 8)
                break;
            u64 word;
            __builtin_memcpy(&word, p + at, 8);
            if (pos - at < 8)
                word &= (1ULL << ((pos - at) * 8)) - 1; // the bytes after the answers are not its
            hash = (hash ^ word) * 0x100000001b3ULL;
        }
        hash = hash ? hash : 1; // 0 says "no key"
    }
    u32 low = DNS_ANSWER_TTL_MAX;
    for (int r = 0; r < DNS_ANSWER_RECORDS; r++) {
        if (r >= records)
            break;
        u32 ttl = ttl_raw[r];
        for (int b = 0; b < DNS_TTL_SIZE; b++)
            put_byte(p, ttl_at[r] + b, ttl >> (24 - 8 * b));
        if (ttl >= 0x80000000)
            ttl = 0; // RFC 2181 8: as the parser reads it
        low = ttl < low ? ttl : low;
    }
    *ttl_min = low;
    return hash;
}

// An answer with addresses at its client: DNS_KEEP when user space already has it, else DNS_RECORD_NAMES
// (with its key in ev->answer_hash when it has one).
static __always_inline int hand_answer_once(struct dns_event *ev, u16 an, u64 now) {
    if (!DNS_ANSWERS_ONCE) {
        count(DNS_ANSWERS_HANDED);
        return DNS_RECORD_NAMES;
    }
    // read back from the map, not kept in registers: what the verifier learnt about them on each path
    // of the question walk is forgotten, so that those paths merge here (else each walks the answer)
    u32 captured = *(volatile u16 *)&ev->captured, wire = *(volatile u16 *)&ev->payload_len;
    u32 records_at = *(volatile u32 *)&ev->answers_at;
    u32 ttl = 0;
    u64 hash = 0;
    if (captured >= wire && captured <= DNS_CAPTURE_BYTES) // whole answers only
        hash = answer_hash(ev->payload, captured, records_at, an, &ttl);
    if (!hash) {
        count(DNS_ANSWERS_UNWALKED);
        count(DNS_ANSWERS_HANDED);
        return DNS_RECORD_NAMES;
    }
    struct dns_answer_key k = {.hash = hash, .family = ev->family};
    __builtin_memcpy(k.client, ev->daddr, 16);
    u64 *expires = dns_answers.lookup(&k);
    if (expires && *expires > now) {
        count(DNS_ANSWERS_DEDUPLICATED);
        return DNS_KEEP;
    }
    if (ttl > 0) {
        u64 until = now + (u64)ttl * 1000000000ULL;
        dns_answers.update(&k, &until);
        ev->answer_hash = hash;
    }
    count(DNS_ANSWERS_HANDED);
    return DNS_RECORD_NAMES;
}

// The ring had no room for an answer with a key: forget the key, so that its next copy is handed over.
static __always_inline void forget_answer(struct dns_event *ev) {
    if (ev->kind != DNS_RECORD_NAMES || !ev->answer_hash)
        return;
    struct dns_answer_key k = {.hash = ev->answer_hash, .family = ev->family};
    __builtin_memcpy(k.client, ev->daddr, 16);
    dns_answers.delete(&k);
}


// The transaction step of one DNS datagram whose payload (its first `captured` bytes, `wire` on the
// wire) is in ev->payload; returns DNS_KEEP or the kind of record to hand over.
static __always_inline int transact(struct dns_event *ev, u32 captured, u32 wire, u64 now) {
    ev->answer_hash = 0;
    if (captured < DNS_HEADER || captured > DNS_CAPTURE_BYTES)
        return DNS_RECORD_PACKET;
    u8 *p = ev->payload;
    u16 id = (p[0] << 8) | p[1];
    u8 flags_hi = p[2], flags_lo = p[3];
    u16 qd = (p[4] << 8) | p[5], an = (p[6] << 8) | p[7], ns = (p[8] << 8) | p[9], ar = (p[10] << 8) | p[11];
    u8 response = flags_hi >> 7, opcode = (flags_hi >> 3) & 0xf;
    if (opcode != 0 || qd != 1)
        return DNS_RECORD_PACKET;
    if (captured >= wire && 5 + ((u64)an + ns + ar) * 11 > captured - DNS_HEADER)
        return DNS_RECORD_PACKET; // the parser's counts_exceed_payload (checked on whole payloads only)
    int qtype = question_type(p, captured, &ev->answers_at);
    if (qtype < 0)
        return DNS_RECORD_PACKET;
    u32 zero = 0;
    u64 *copy_all = dns_config.lookup(&zero);

    struct dns_txn_key t = {.family = ev->family, .id = id};
    if (!response) {
        if (an != 0 || (copy_all && *copy_all))
            return DNS_RECORD_PACKET; // records in a query: the parser's to judge
        t.vantage = ev->egress ? DNS_VANTAGE_CLIENT : DNS_VANTAGE_SERVER;
        __builtin_memcpy(t.client, ev->saddr, 16);
        __builtin_memcpy(t.server, ev->daddr, 16);
        t.client_port = ev->sport;
        t.server_port = ev->dport;
        struct dns_txn q = {.ts_ns = now, .qtype = labelled_qtype(qtype)};
        int err = dns_pending.insert(&t, &q);
        if (err == -17) // EEXIST: a retransmission; latency runs from the first copy
            count(DNS_RETRANSMITTED);
        else if (err)
            count(DNS_PENDING_FULL);
        return DNS_KEEP;
    }
    t.vantage = ev->egress ? DNS_VANTAGE_SERVER : DNS_VANTAGE_CLIENT;
    __builtin_memcpy(t.client, ev->daddr, 16);
    __builtin_memcpy(t.server, ev->saddr, 16);
    t.client_port = ev->dport;
    t.server_port = ev->sport;
    struct dns_txn *q = dns_pending.lookup(&t);
    if (!q)
        return DNS_RECORD_PACKET; // unmatched here: user space may hold the query, or count it
    u64 started = q->ts_ns;
    u16 asked = q->qtype;
    if (dns_pending.delete(&t) != 0)
        return DNS_KEEP; // a user-space sweep (timeout) or another CPU took it first
    u8 rcode = flags_lo & 0xf;
    count_request(&t, rcode, asked);
    observe_latency(&t, now > started ? now - started : 0);
    if (t.vantage == DNS_VANTAGE_CLIENT && rcode == 0 && an > 0 && (qtype == 1 || qtype == 28))
        return hand_answer_once(ev, an, now);
    return DNS_KEEP;
}
#endif

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

static __always_inline int capture(struct __sk_buff *skb, struct fm_udp_packet *pkt, u8 egress);

// The standalone entry points' walk (bench/dns_overhead.py's variants); the product's is bpf/skb.c's,
// which walks the headers once for UDP accounting and this capture.
static __always_inline int walk_then_capture(struct __sk_buff *skb, u8 egress) {
    struct fm_udp_packet pkt = {};
    int walked = fm_walk_udp(skb, &pkt);
    if (walked == FM_NOT_WALKED)
        count(DNS_NOT_WALKED);
    if (walked != FM_UDP)
        return 1;
    return capture(skb, &pkt, egress);
}

// One UDP datagram, its headers walked by the caller.
static __always_inline int capture(struct __sk_buff *skb, struct fm_udp_packet *pkt, u8 egress) {
    struct fm_udp udp = pkt->udp;
    u32 l4 = pkt->l4;
    u8 family = pkt->family;
    u8 *saddr = pkt->saddr, *daddr = pkt->daddr;
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
    ev->kind = 0;
    __builtin_memset(ev->pad, 0, sizeof(ev->pad));

    u32 offset = l4 + FM_UDP_HEADER;
    u32 len = skb->len > offset ? skb->len - offset : 0;
    if (len > DNS_CAPTURE_BYTES)
        len = DNS_CAPTURE_BYTES;
    if (len > 0 && bpf_skb_load_bytes(skb, offset, ev->payload, len) < 0)
        len = 0;
    ev->captured = len;
#if DNS_MODE == 3
    int kind = transact(ev, len, ev->payload_len, ev->ts_ns);
    if (kind == DNS_KEEP) {
        count(DNS_KEPT);
        return 1;
    }
    ev->kind = kind;
#endif
    u64 size = offsetof(struct dns_event, payload) + len;
    if (dns_events.ringbuf_output(ev, size, wake_flags()) < 0) {
        count(DNS_RING_FULL);
#if DNS_MODE == 3
        forget_answer(ev);
#endif
    } else
        count(DNS_HANDED);
    return 1;
}

int dns_ingress(struct __sk_buff *skb) {
    return walk_then_capture(skb, 0);
}

int dns_egress(struct __sk_buff *skb) {
    return walk_then_capture(skb, 1);
}
