"""DNS seen on the node: queries and answers of every pod, matched, counted and turned into names.

`codes` (qtype and rcode names), `parse` (a DNS message from untrusted bytes: header, question, rcode,
A/AAAA answers; anything else is `Malformed`, never an exception), `tracker` (`DnsTracker`: queries
matched to answers, latency, timeouts, counters per client/server/rcode/qtype, the IP→name table; pure,
bounded, with an injectable clock), `capture` (`DnsCapture`: loads `bpf/dns.c`, a cgroup-skb program on
the cgroup v2 root, and feeds the tracker from its ring buffer in bounded batches).
Imports nothing of flowmon outside `flowmon_agent.dns` except `flowmon_agent.kernel.loader`.
"""
