// Smallest useful program: counts sock:inet_sock_set_state events into an array map.
// Used by the foundation smoke test to prove the BCC toolchain works on this host.
BPF_ARRAY(events_seen, u64, 1);

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    int zero = 0;
    u64 *count = events_seen.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
