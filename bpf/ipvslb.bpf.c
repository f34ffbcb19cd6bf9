// SPDX-License-Identifier: GPL-2.0
// ipvslb connection tracer, loaded by ipvslb/tracer/loader.py with bcc.
//
// Reports the fate of every TCP connect to a managed VIP:port and the real backend IPVS
// chose for it, and the ICMP unreachables backends send for UDP flows to a VIP. Only sockets whose destination is in `vips` are tracked: any other
// connection costs a read of its remote port and an array read (or, if its remote port is a
// VIP's, one hash lookup) and emits nothing.
//
// The tracepoints are attached raw: the program gets the kernel's own arguments (a socket
// pointer and states) instead of a perf record that a classic tracepoint fills, for every
// TCP state change on the host, before any program runs. Kernel includes are kept to the
// minimum (bcc 0.26 cannot parse <net/sock.h> of 6.12+), so where the fields of struct sock
// are comes from the running kernel's BTF, through the loader.
//
// Build-time constants (passed by the loader as -D flags): CAPACITY (tracked connections),
// RINGBUF_PAGES (power of two), and the offsets in struct sock of the fields read:
// SKC_DADDR, SKC_RCV_SADDR, SKC_DPORT, SKC_FAMILY, SKC_STATE, SKC_V6_DADDR,
// SKC_V6_RCV_SADDR, SK_PROTOCOL, INET_SPORT, and SK_HEAD_LEN, the length of the struct's
// head that holds the first five (see ipvslb/tracer/loader.py); SKB_HEAD and SKB_NETWORK_HEADER in
// struct sk_buff; RECORD_SIZE, PAIR_SIZE, PAIR_STATS_SIZE and VIP_KEY_SIZE, the sizes of the
// structs shared with ipvslb/tracer/records.py as it packs and unpacks them.
#include <uapi/linux/ptrace.h>

#ifndef CAPACITY
#define CAPACITY 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif
#ifndef SK_PROTOCOL
#error "the loader passes the offsets of struct sock's fields (ipvslb/tracer/loader.py)"
#endif
#ifndef RECORD_SIZE
#error "the loader passes the sizes of the structs records.py decodes (ipvslb/tracer/loader.py)"
#endif

#define AF_INET 2
#define AF_INET6 10
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4     // path MTU discovery, not a failure
#define ICMPV6_DEST_UNREACH 1  // (ICMPv6's "packet too big" is a type of its own)
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define IP_VS_CONN_F_TEMPLATE 0x1000

enum record_kind {
    CONNECT = 1,          // a client socket's SYN to a VIP, with the backend IPVS chose
    BACKEND = 2,          // IPVS chose a backend for a flow with no tracked socket (UDP)
    ESTABLISHED = 3,
    SYN_RETRANSMIT = 4,
    RESET = 5,            // RST received while SYN_SENT
    CLOSED_SYN_SENT = 6,  // gave up (timeout or close) before any answer
    CLOSED = 7,           // closed after having been established
    // Established, learned late: the kernel skipped this program at the transition (see
    // missed_established). The connect succeeded; how long it took is unknown.
    ESTABLISHED_UNTIMED = 8,
    UNREACHABLE = 9,      // ICMP destination unreachable from the backend of a UDP flow
};

union nf_inet_addr { u32 all[4]; };

struct ip_vs_conn_param {
    void *ipvs;
    const union nf_inet_addr *caddr;
    const union nf_inet_addr *vaddr;
    __be16 cport;
    __be16 vport;
    __u16 protocol;
    u16 af;
};

// Layout encoded by ipvslb/tracer/records.py (VIP_KEY, "<16sHBB").
struct vip_key {
    u8 addr[16];
    u16 port;
    u8 protocol;
    u8 family;
};

struct tuple {
    u8 caddr[16];
    u8 vaddr[16];
    u16 cport;
    u16 vport;
    u8 protocol;
    u8 family;
    u16 pad;
};

struct backend {
    u8 addr[16];
    u16 port;
    u8 family;
    u8 pad;
};

struct conn {
    u64 start_ns;
    u32 tid;              // the thread that started the connect (checked by the kprobe)
    u32 retransmits;
    struct tuple tuple;
    struct backend backend;
    u8 reset;
    u8 established;
    u8 counted;           // not timed: its success is counted in `pair_counts`, not reported
    u8 pad;
    u32 slot;             // when counted: its pair's slot in `pair_counts`
};

// One (VIP, backend) pair. Layout encoded by ipvslb/tracer/records.py ("<16s16sHHBBBx").
struct pair {
    u8 vaddr[16];
    u8 baddr[16];
    u16 vport;
    u16 bport;
    u8 family;
    u8 bfamily;
    u8 protocol;
    u8 pad;
};

// Read by ipvslb/tracer/paircounts.py through the memory mapping of `pair_counts` ("<QQQ").
struct pair_stats {
    u64 last_timed_ns;    // start of the last connect reported with CONNECT and ESTABLISHED
    u64 counted;          // connects established without records (monotonic)
    u64 last_counted_ns;  // when the last of them was established
};

// Fixed layout decoded by ipvslb/tracer/records.py (RECORD, "<QQQ16s16s16sHHHHBBBBB3x").
struct record {
    u64 ts;
    u64 sock;
    u64 connect_ns;
    u8 caddr[16];
    u8 vaddr[16];
    u8 baddr[16];
    u16 cport;
    u16 vport;
    u16 bport;
    u16 retransmits;
    u8 kind;
    u8 family;
    u8 protocol;
    u8 bfamily;
    u8 icmp_code;         // UNREACHABLE: the ICMP (IPv4) or ICMPv6 code
    u8 pad[3];
};

// A struct changed here but not in records.py (or there but not here) fails the compile.
_Static_assert(sizeof(struct record) == RECORD_SIZE, "struct record differs from RECORD in ipvslb/tracer/records.py");
_Static_assert(sizeof(struct pair) == PAIR_SIZE, "struct pair differs from PAIR in ipvslb/tracer/records.py");
_Static_assert(sizeof(struct pair_stats) == PAIR_STATS_SIZE,
               "struct pair_stats differs from PAIR_STATS in ipvslb/tracer/records.py");
_Static_assert(sizeof(struct vip_key) == VIP_KEY_SIZE, "struct vip_key differs from VIP_KEY in ipvslb/tracer/records.py");

BPF_HASH(vips, struct vip_key, u8, 4096);
// The ports of the TCP entries in `vips`, by port: every TCP state change on the host passes
// the tracepoints, and a socket whose remote port is no VIP's costs a read of that port and
// one array read (which the verifier inlines) instead of a hash lookup.
BPF_ARRAY(vip_ports, u8, 65536);
BPF_TABLE("lru_hash", u64, struct conn, conns, CAPACITY);
// The client port is not assigned yet when a socket enters SYN_SENT; the kprobe, which runs
// in the same thread while the first SYN goes out, finds the socket here. An array slot per
// thread (by thread id modulo the size) rather than a hash entry: it is written and read
// once per connect, and a plain store is far cheaper than a hash update and delete. A slot
// two threads share is caught by the thread id kept in the connection.
#define CONNECTING_SLOTS 4096
BPF_ARRAY(connecting, u64, CONNECTING_SLOTS);
// IPVS choices for TCP tuples with no connect waiting in `connecting`: a SYN retransmit
// that IPVS rescheduled to another backend (expire_nodest_conn), or a connection the
// tracer did not see start. The next event of a connection that has retransmitted claims it.
BPF_TABLE("lru_hash", struct tuple, struct backend, unclaimed, 1024);
BPF_PERCPU_ARRAY(lost, u64, 1);
// Successes counted in the kernel instead of reported, per (VIP, backend): see OPT_SAMPLE.
// The reader gives each pair a slot in `pair_counts` once a timed connect has shown the pair
// to it, and reads the counts through the array's memory mapping: no system call per read
// (docs/decisions/sampled-connects.md). Until a pair has a slot, every
// connect to it is timed. Array elements are looked up inline, so a counted success costs
// no hash lookup either: the connection keeps its pair's slot.
#define PAIR_SLOTS 4096
BPF_HASH(pair_slots, struct pair, u32, PAIR_SLOTS);
BPF_F_TABLE("array", int, struct pair_stats, pair_counts, PAIR_SLOTS, BPF_F_MMAPABLE);
// options[0] = 1: report CLOSED after established. Off by default: health needs no closes,
// and forgetting a connection once it is established halves the records and map work.
// options[1] = wakeup interval in microseconds, 0 = wake the reader for every record. Routine
// records (connect, established, closed) wake the reader at most once per interval, and the
// reader drains on a timer while records keep coming: a wakeup per record would cost the
// traced host a context switch per connect. Failure evidence always wakes the reader.
// options[2] = sample interval in microseconds, 0 = report every connect. A connect to a
// (VIP, backend) pair is timed (CONNECT and ESTABLISHED records) when none to that pair was
// timed within the interval; the others that succeed are only counted in `pair_counts`. The
// daemon then decodes a few records per pair and interval instead of two per connect, and
// still times enough connects for the adaptive deadline. Failure evidence (reset, SYN
// retransmit, closed in SYN_SENT) is reported for every connect, timed or not.
#define OPT_REPORT_CLOSED 0
#define OPT_WAKEUP_INTERVAL_US 1
#define OPT_SAMPLE_INTERVAL_US 2
BPF_ARRAY(options, u32, 3);
BPF_ARRAY(last_wakeup, u64, 1);
BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);

static __always_inline int to_vip_port(u16 port) {
    int index = port;
    u8 *used = vip_ports.lookup(&index);
    return used && *used;
}

static __always_inline u32 option(int index) {
    u32 *value = options.lookup(&index);
    return value ? *value : 0;
}

static __always_inline void count_lost(void) {
    int zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        (*n)++;
}

// Reserves a record in the ring buffer (no copy through a scratch buffer); commit() sends it.
static __always_inline struct record *new_record(u8 kind, u64 sock, struct conn *c, u64 now) {
    struct record *r = records.ringbuf_reserve(sizeof(struct record));
    if (!r) {
        count_lost();
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->ts = now;
    r->kind = kind;
    r->sock = sock;
    if (c) {
        __builtin_memcpy(r->caddr, c->tuple.caddr, 16);
        __builtin_memcpy(r->vaddr, c->tuple.vaddr, 16);
        __builtin_memcpy(r->baddr, c->backend.addr, 16);
        r->cport = c->tuple.cport;
        r->vport = c->tuple.vport;
        r->bport = c->backend.port;
        r->bfamily = c->backend.family;
        r->family = c->tuple.family;
        r->protocol = c->tuple.protocol;
        r->retransmits = c->retransmits;
        r->connect_ns = now - c->start_ns;
    }
    return r;
}

static __always_inline void commit(struct record *r, int urgent) {
    u64 flags = 0;
    u32 interval_us = option(OPT_WAKEUP_INTERVAL_US);
    if (interval_us) {
        int zero = 0;
        u64 *last = last_wakeup.lookup(&zero);
        flags = BPF_RB_NO_WAKEUP;
        if (last && (urgent || r->ts - *last >= (u64)interval_us * 1000)) {
            *last = r->ts;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    records.ringbuf_submit(r, flags);
}

static __always_inline void report(u8 kind, u64 sock, struct conn *c, int urgent) {
    struct record *r = new_record(kind, sock, c, bpf_ktime_get_ns());
    if (r)
        commit(r, urgent);
}

static __always_inline void pair_of(struct pair *p, struct conn *c) {
    __builtin_memcpy(p->vaddr, c->tuple.vaddr, 16);
    __builtin_memcpy(p->baddr, c->backend.addr, 16);
    p->vport = c->tuple.vport;
    p->bport = c->backend.port;
    p->family = c->tuple.family;
    p->bfamily = c->backend.family;
    p->protocol = c->tuple.protocol;
}

// Whether this connect, whose backend was just chosen, is counted rather than timed.
static __always_inline int count_only(struct conn *c, u64 now) {
    u32 interval_us = option(OPT_SAMPLE_INTERVAL_US);
    if (!interval_us)
        return 0;
    struct pair p = {};
    pair_of(&p, c);
    u32 *slot = pair_slots.lookup(&p);
    if (!slot)
        return 0;  // the reader learns the pair from this connect's records
    int index = *slot;
    struct pair_stats *s = pair_counts.lookup(&index);
    if (!s)
        return 0;
    if (now - s->last_timed_ns < (u64)interval_us * 1000) {
        c->slot = index;
        return 1;
    }
    s->last_timed_ns = now;
    return 0;
}

static __always_inline void count_success(struct conn *c, u64 now) {
    int index = c->slot;
    struct pair_stats *s = pair_counts.lookup(&index);
    if (!s)
        return;
    __sync_fetch_and_add(&s->counted, 1);
    s->last_counted_ns = now;
}

// Two 8-byte words, not a loop over bytes: LLVM 19 (Debian 13's bcc) turned that loop into
// 16 compare-and-branch steps, 2^16 paths that the verifier gave up on (E2BIG).
static __always_inline int same_addr(const u8 *a, const u8 *b) {
    u64 a0, a1, b0, b1;
    __builtin_memcpy(&a0, a, 8);
    __builtin_memcpy(&a1, a + 8, 8);
    __builtin_memcpy(&b0, b, 8);
    __builtin_memcpy(&b1, b + 8, 8);
    return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

// The kernel does not run a program inside itself: a raw tracepoint that fires while the same
// program runs on that CPU (a softirq interrupting it, say) skips it and counts the skip in
// its recursion_misses. (A classic tracepoint was skipped while *any* kprobe or tracepoint
// program ran on the CPU, ours or another tool's.) A skipped ESTABLISHED
// leaves its connection looking unanswered. It shows as soon as the connection is seen in
// a state other than SYN_SENT: that connect succeeded. Counted connects are counted, timed
// ones get ESTABLISHED_UNTIMED, so the daemon does not take them for failures.
static __always_inline void missed_established(u64 sock, struct conn *c) {
    c->established = 1;
    if (c->counted)
        count_success(c, bpf_ktime_get_ns());
    else
        report(ESTABLISHED_UNTIMED, sock, c, 0);
}

// The same, from a hook where the connection's story ends unless closes are reported.
static __always_inline void missed_established_forget(u64 sock, struct conn *c) {
    missed_established(sock, c);
    if (!option(OPT_REPORT_CLOSED))
        conns.delete(&sock);
}

// The first SK_HEAD_LEN bytes of a struct sock: they hold the IPv4 addresses, the remote
// port, the family and the state, so one read per event gets what the common path needs.
struct sk_head {
    u8 bytes[SK_HEAD_LEN];
};

static __always_inline void read_head(u64 sock, struct sk_head *head) {
    bpf_probe_read_kernel(head, sizeof(*head), (void *)sock);
}

static __always_inline u16 head_u16(const struct sk_head *head, int offset) {
    u16 value;
    __builtin_memcpy(&value, head->bytes + offset, sizeof(value));
    return value;
}

// A field beyond the head, by its offset (from the kernel's BTF).
static __always_inline u16 sk_u16(u64 sock, int offset) {
    u16 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), (void *)(sock + offset));
    return value;
}

// The local port, in host order, of a tracked connection that does not know it yet (0 until
// the connect has chosen one; the kprobe usually sets it first).
static __always_inline void learn_client_port(u64 sock, struct conn *c) {
    if (!c->tuple.cport)
        c->tuple.cport = bpf_ntohs(sk_u16(sock, INET_SPORT));
}

// IPVS's choice for a connection the kprobe could not match with its socket: a SYN
// retransmit that IPVS moved to another backend, or (rarely) a connect whose thread slot was
// taken. Only connections that retransmitted or lack a backend look here, so the common
// path pays nothing. Returns whether a choice was claimed.
static __always_inline int claim_backend(u64 sock, struct conn *c) {
    if (!c->retransmits && c->backend.family)
        return 0;
    struct backend *chosen = unclaimed.lookup(&c->tuple);
    if (!chosen)
        return 0;
    c->backend = *chosen;
    c->retransmits = 0;
    c->counted = 0;  // a rescued connect is always timed on its new backend
    unclaimed.delete(&c->tuple);
    // The connect is timed again on its new backend, from now.
    report(CONNECT, sock, c, 0);
    return 1;
}

// TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
RAW_TRACEPOINT_PROBE(inet_sock_set_state) {
    u64 sock = ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    struct sk_head head;
    read_head(sock, &head);
    u16 dport = bpf_ntohs(head_u16(&head, SKC_DPORT));
    if (!to_vip_port(dport))
        return 0;
    if (newstate == TCP_SYN_SENT) {
        // Not only TCP changes state through here (MPTCP, SCTP, DCCP do too). Only TCP
        // sockets are tracked, so the later states of a tracked one need not ask again.
        if (sk_u16(sock, SK_PROTOCOL) != PROTO_TCP)
            return 0;
        struct vip_key key = {};
        struct conn c = {};
        u16 family = head_u16(&head, SKC_FAMILY);
        key.port = dport;
        key.protocol = PROTO_TCP;
        key.family = family;
        if (family == AF_INET) {
            __builtin_memcpy(key.addr, head.bytes + SKC_DADDR, 4);
            __builtin_memcpy(c.tuple.caddr, head.bytes + SKC_RCV_SADDR, 4);
        } else {
            bpf_probe_read_kernel(key.addr, 16, (void *)(sock + SKC_V6_DADDR));
            bpf_probe_read_kernel(c.tuple.caddr, 16, (void *)(sock + SKC_V6_RCV_SADDR));
        }
        if (!vips.lookup(&key)) {
            // A connect starts here, so an entry under this socket is left from an earlier
            // connection whose close the kernel skipped (see missed_established): the
            // same socket connecting again, or a new one in the same memory. Not this one's.
            conns.delete(&sock);
            return 0;
        }
        u64 tid = bpf_get_current_pid_tgid();
        c.start_ns = bpf_ktime_get_ns();
        c.tid = (u32)tid;
        __builtin_memcpy(c.tuple.vaddr, key.addr, 16);
        c.tuple.vport = dport;  // the client port is learnt later: not chosen yet
        c.tuple.protocol = PROTO_TCP;
        c.tuple.family = family;
        conns.update(&sock, &c);
        u32 slot = (u32)tid % CONNECTING_SLOTS;
        connecting.update(&slot, &sock);
        return 0;
    }
    // Only ESTABLISHED and CLOSE end a connect: other states cost no lookup. A CLOSE is
    // looked at whatever state it leaves: when the kernel skipped this program at the
    // transition to ESTABLISHED (see missed_established), the close is where that shows.
    if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE)
        return 0;
    struct conn *c = conns.lookup(&sock);
    if (!c)
        return 0;
    learn_client_port(sock, c);
    if (!c->established)
        claim_backend(sock, c);
    if (newstate == TCP_ESTABLISHED && !c->established) {
        c->established = 1;
        if (c->counted)
            count_success(c, bpf_ktime_get_ns());
        else
            report(ESTABLISHED, sock, c, 0);
        if (!option(OPT_REPORT_CLOSED))
            conns.delete(&sock);
    } else if (newstate == TCP_CLOSE) {
        if (!c->established && !c->reset && oldstate != TCP_SYN_SENT)
            missed_established(sock, c);
        // After a RST the RESET record already ended this connect attempt.
        if (!c->established && !c->reset)
            report(CLOSED_SYN_SENT, sock, c, 1);
        else if (c->established && option(OPT_REPORT_CLOSED))
            report(CLOSED, sock, c, 0);
        conns.delete(&sock);
    }
    return 0;
}

// The tracked connection of a socket that is still connecting to a VIP, for the hooks that
// only matter in SYN_SENT, or 0. A tracked socket already past SYN_SENT was established
// while the kernel skipped this program (a data retransmit, a reset after establishing:
// not a refusal); that is reported here.
static __always_inline struct conn *still_connecting(u64 sock) {
    struct sk_head head;
    read_head(sock, &head);
    if (!to_vip_port(bpf_ntohs(head_u16(&head, SKC_DPORT))))
        return 0;
    struct conn *c = conns.lookup(&sock);
    if (!c || c->established)
        return 0;
    learn_client_port(sock, c);
    if (head.bytes[SKC_STATE] != TCP_SYN_SENT) {
        missed_established_forget(sock, c);
        return 0;
    }
    return c;
}

// TP_PROTO(const struct sock *sk, const struct sk_buff *skb, ...): TCP sockets only.
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb) {
    u64 sock = ctx->args[0];
    struct conn *c = still_connecting(sock);
    if (!c)
        return 0;
    if (claim_backend(sock, c))
        return 0;  // this resend is the new backend's first SYN, not a retransmit against it
    c->retransmits++;
    report(SYN_RETRANSMIT, sock, c, 1);
    return 0;
}

// TP_PROTO(struct sock *sk): TCP sockets only.
RAW_TRACEPOINT_PROBE(tcp_receive_reset) {
    u64 sock = ctx->args[0];
    struct conn *c = still_connecting(sock);
    if (!c)
        return 0;
    claim_backend(sock, c);
    c->reset = 1;
    report(RESET, sock, c, 1);
    return 0;
}

// Attached by the loader (not auto-attached) so that it can fall back to reading the IPVS
// connection table when kprobes are unavailable.
int trace_ip_vs_conn_new(struct pt_regs *ctx, const struct ip_vs_conn_param *p, int dest_af,
                         const union nf_inet_addr *daddr, __be16 dport, unsigned int flags) {
    if (flags & IP_VS_CONN_F_TEMPLATE)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct ip_vs_conn_param param = {};
    bpf_probe_read_kernel(&param, sizeof(param), p);
    struct tuple t = {};
    if (param.af == AF_INET) {
        bpf_probe_read_kernel(t.caddr, 4, param.caddr);
        bpf_probe_read_kernel(t.vaddr, 4, param.vaddr);
    } else {
        bpf_probe_read_kernel(t.caddr, 16, param.caddr);
        bpf_probe_read_kernel(t.vaddr, 16, param.vaddr);
    }
    t.cport = bpf_ntohs(param.cport);
    t.vport = bpf_ntohs(param.vport);
    t.protocol = param.protocol;
    t.family = param.af;

    struct backend b = {};
    if (dest_af == AF_INET)
        bpf_probe_read_kernel(b.addr, 4, daddr);
    else
        bpf_probe_read_kernel(b.addr, 16, daddr);
    b.port = bpf_ntohs(dport);
    b.family = dest_af;

    // The common case: this thread's connect, which entered SYN_SENT a moment ago.
    u64 tid = bpf_get_current_pid_tgid();
    u32 slot = (u32)tid % CONNECTING_SLOTS;
    u64 *waiting = connecting.lookup(&slot);
    if (waiting && *waiting && t.protocol == PROTO_TCP) {
        u64 sock = *waiting;
        struct conn *c = conns.lookup(&sock);
        if (c && c->tid == (u32)tid && !c->backend.family && c->tuple.vport == t.vport &&
            same_addr(c->tuple.vaddr, t.vaddr)) {
            *waiting = 0;
            c->tuple.cport = t.cport;
            c->backend = b;
            if (count_only(c, now)) {
                c->counted = 1;
                return 0;
            }
            struct record *r = new_record(CONNECT, sock, c, now);
            if (r)
                commit(r, 0);
            return 0;
        }
    }

    struct vip_key key = {};
    __builtin_memcpy(key.addr, t.vaddr, 16);
    key.port = t.vport;
    key.protocol = t.protocol;
    key.family = t.family;
    if (!vips.lookup(&key))
        return 0;
    if (t.protocol == PROTO_TCP)
        unclaimed.update(&t, &b);
    // UDP, or a connection we did not see start: report the tuple as IPVS knows it.
    struct record *r = new_record(BACKEND, 0, 0, now);
    if (!r)
        return 0;
    __builtin_memcpy(r->caddr, t.caddr, 16);
    __builtin_memcpy(r->vaddr, t.vaddr, 16);
    __builtin_memcpy(r->baddr, b.addr, 16);
    r->cport = t.cport;
    r->vport = t.vport;
    r->bport = b.port;
    r->bfamily = b.family;
    r->family = t.family;
    r->protocol = t.protocol;
    commit(r, 0);
    return 0;
}

// The head of struct ip_vs_conn (include/net/ip_vs.h), unchanged from 4.x to 6.x.
struct ip_vs_conn_head {
    void *c_list[2];
    __be16 cport;
    __be16 dport;
    __be16 vport;
    u16 af;
    union nf_inet_addr caddr;
    union nf_inet_addr vaddr;
    union nf_inet_addr daddr;
    u32 flags;
    u16 protocol;
    u16 daf;
};

// IPVS rewrites an ICMP error that answers a flow it forwarded (ip_vs_out_icmp, inout = 1:
// coming back from the backend) so that the client sees it come from the VIP; `cp` is that
// flow, so the backend is known for sure. An error IPVS generates itself (no destination)
// has no flow and never comes here. Attached by the loader, for IPv4 and IPv6.
static __always_inline void copy_addr(u8 *to, const union nf_inet_addr *from, u16 family) {
    __builtin_memcpy(to, from, 4);
    if (family != AF_INET)
        __builtin_memcpy(to + 4, (const u8 *)from + 4, 12);
}

// The IPVS connection `cp` read into `c`, and its service's key into `key`: true when it is
// a UDP connection to a traced service.
static __always_inline int traced_udp(const struct ip_vs_conn_head *cp, struct ip_vs_conn_head *c,
                                      struct vip_key *key) {
    bpf_probe_read_kernel(c, sizeof(*c), cp);
    if (c->protocol != PROTO_UDP)
        return 0;
    copy_addr(key->addr, &c->vaddr, c->af);
    key->port = bpf_ntohs(c->vport);
    key->protocol = PROTO_UDP;
    key->family = c->af;
    return vips.lookup(key) != NULL;
}

static __always_inline int report_unreachable(const struct ip_vs_conn_head *cp, u8 code) {
    struct ip_vs_conn_head c = {};
    struct vip_key key = {};
    if (!traced_udp(cp, &c, &key))
        return 0;
    struct record *r = new_record(UNREACHABLE, 0, 0, bpf_ktime_get_ns());
    if (!r)
        return 0;
    copy_addr(r->caddr, &c.caddr, c.af);
    __builtin_memcpy(r->vaddr, key.addr, 16);
    copy_addr(r->baddr, &c.daddr, c.daf);
    r->cport = bpf_ntohs(c.cport);
    r->vport = key.port;
    r->bport = bpf_ntohs(c.dport);
    r->family = c.af;
    r->bfamily = c.daf;
    r->protocol = PROTO_UDP;
    r->icmp_code = code;
    commit(r, 1);
    return 0;
}

static __always_inline u8 *network_header(u64 skb) {
    u64 head = 0;
    u16 offset = 0;
    bpf_probe_read_kernel(&head, sizeof(head), (void *)(skb + SKB_HEAD));
    bpf_probe_read_kernel(&offset, sizeof(offset), (void *)(skb + SKB_NETWORK_HEADER));
    return (u8 *)(head + offset);
}

// void ip_vs_nat_icmp(struct sk_buff *skb, struct ip_vs_protocol *pp, struct ip_vs_conn *cp,
//                     int inout): the outer IPv4 header is at the network header.
int trace_ip_vs_nat_icmp(struct pt_regs *ctx, u64 skb, void *pp, const struct ip_vs_conn_head *cp,
                         int inout) {
    if (!inout)
        return 0;
    u8 *ip = network_header(skb);
    u8 ihl = 0;
    bpf_probe_read_kernel(&ihl, 1, ip);
    u8 icmp[2] = {};  // type, code
    bpf_probe_read_kernel(icmp, 2, ip + (ihl & 0xf) * 4);
    if (icmp[0] != ICMP_DEST_UNREACH || icmp[1] == ICMP_FRAG_NEEDED)
        return 0;
    return report_unreachable(cp, icmp[1]);
}

// The same for IPv6: an ICMPv6 header right after the fixed header (an error that carries
// extension headers before it is not looked at).
int trace_ip_vs_nat_icmp_v6(struct pt_regs *ctx, u64 skb, void *pp, const struct ip_vs_conn_head *cp,
                            int inout) {
    if (!inout)
        return 0;
    u8 *ip6 = network_header(skb);
    u8 next = 0;
    bpf_probe_read_kernel(&next, 1, ip6 + 6);
    u8 icmp[2] = {};
    bpf_probe_read_kernel(icmp, 2, ip6 + 40);
    if (next != PROTO_ICMPV6 || icmp[0] != ICMPV6_DEST_UNREACH)
        return 0;
    return report_unreachable(cp, icmp[1]);
}

// UDP packets per (VIP, backend), counted where IPVS rewrites them for a masquerading
// service: requests in udp_dnat_handler, replies in udp_snat_handler. IPVS's own
// per-destination counters reach user space only when its rate estimator runs (every 2 s);
// these are current at every read, so a backend that falls silent is judged a reply window
// after its silence, not 2-4 s later. Read (not memory-mapped: a few entries, 4 reads per
// window) by the tracer's udp_counts().
struct udp_stats {
    u64 sent;
    u64 received;
};
_Static_assert(sizeof(struct udp_stats) == UDP_STATS_SIZE,
               "struct udp_stats differs from UDP_STATS in ipvslb/tracer/records.py");
BPF_HASH(udp_counts, struct pair, struct udp_stats, PAIR_SLOTS);

static __always_inline int count_udp(const struct ip_vs_conn_head *cp, int reply) {
    struct ip_vs_conn_head c = {};
    struct vip_key key = {};
    if (!traced_udp(cp, &c, &key))
        return 0;
    struct pair p = {};
    __builtin_memcpy(p.vaddr, key.addr, 16);
    copy_addr(p.baddr, &c.daddr, c.daf);
    p.vport = key.port;
    p.bport = bpf_ntohs(c.dport);
    p.family = c.af;
    p.bfamily = c.daf;
    p.protocol = PROTO_UDP;
    struct udp_stats zero = {};
    struct udp_stats *s = udp_counts.lookup_or_try_init(&p, &zero);
    if (!s)
        return 0;
    if (reply)
        __sync_fetch_and_add(&s->received, 1);
    else
        __sync_fetch_and_add(&s->sent, 1);
    return 0;
}

// static int udp_dnat_handler(struct sk_buff *skb, struct ip_vs_protocol *pp,
//                             struct ip_vs_conn *cp, struct ip_vs_iphdr *iph): to the backend.
int trace_udp_dnat_handler(struct pt_regs *ctx, u64 skb, void *pp, const struct ip_vs_conn_head *cp) {
    return count_udp(cp, 0);
}

// udp_snat_handler, same arguments: a reply from the backend, rewritten to come from the VIP.
int trace_udp_snat_handler(struct pt_regs *ctx, u64 skb, void *pp, const struct ip_vs_conn_head *cp) {
    return count_udp(cp, 1);
}
