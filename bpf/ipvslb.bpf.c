// SPDX-License-Identifier: GPL-2.0
// ipvslb connection tracer, loaded by ipvslb/tracer.py with bcc.
//
// Reports the fate of every TCP connect to a managed VIP:port and the real backend IPVS
// chose for it. Only sockets whose destination is in `vips` are tracked: any other
// connection costs one hash lookup and emits nothing. Kernel includes are kept to the
// minimum (bcc 0.26 cannot parse <net/sock.h> of 6.12+), so the one IPVS struct we read is
// declared here; its layout has been stable from 4.x to 7.x.
//
// Build-time constants (passed by the loader as -D flags): CAPACITY (tracked connections),
// RINGBUF_PAGES (power of two).
#include <uapi/linux/ptrace.h>

#ifndef CAPACITY
#define CAPACITY 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif

#define AF_INET 2
#define AF_INET6 10
#define PROTO_TCP 6
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
    struct tuple tuple;
    struct backend backend;
    u32 retransmits;
    u8 reset;
    u8 established;
    // IPVS moved this connect to another backend (expire_nodest_conn) while resending its
    // SYN: that resend is the new backend's first SYN, not a retransmit against it.
    u8 rescheduled;
    u8 pad;
};

// Fixed layout decoded by ipvslb/tracer.py (struct format "<QQQ16s16s16sHHHHBBBBI").
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
    u32 pad;
};

BPF_HASH(vips, struct vip_key, u8, 4096);
BPF_TABLE("lru_hash", u64, struct conn, conns, CAPACITY);
BPF_TABLE("lru_hash", struct tuple, u64, socks, CAPACITY);
// The client port is not assigned yet when a socket enters SYN_SENT; the kprobe, which runs
// in the same thread while the first SYN goes out, completes the tuple through this map.
BPF_TABLE("lru_hash", u64, u64, connecting, 4096);
BPF_PERCPU_ARRAY(lost, u64, 1);
// options[0] = 1: report CLOSED after established. Off by default: health needs no closes,
// and forgetting a connection once it is established halves the records and map work.
BPF_ARRAY(options, u32, 1);
BPF_PERCPU_ARRAY(scratch, struct record, 1);
BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);

static __always_inline void emit(struct record *r) {
    if (records.ringbuf_output(r, sizeof(*r), 0) != 0) {
        int zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
    }
}

static __always_inline struct record *new_record(u8 kind, u64 sock, struct conn *c) {
    int zero = 0;
    struct record *r = scratch.lookup(&zero);
    if (!r)
        return 0;
    __builtin_memset(r, 0, sizeof(*r));
    r->ts = bpf_ktime_get_ns();
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
    }
    return r;
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

static __always_inline void forget(u64 sock, struct conn *c) {
    socks.delete(&c->tuple);
    conns.delete(&sock);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sock = (u64)args->skaddr;
    if (args->newstate == TCP_SYN_SENT) {
        // bcc defines the args struct only inside the probe, so the connect start is here.
        struct vip_key key = {};
        struct conn c = {};
        key.port = args->dport;
        key.protocol = PROTO_TCP;
        key.family = args->family;
        if (args->family == AF_INET) {
            __builtin_memcpy(key.addr, args->daddr, 4);
            __builtin_memcpy(c.tuple.caddr, args->saddr, 4);
        } else {
            __builtin_memcpy(key.addr, args->daddr_v6, 16);
            __builtin_memcpy(c.tuple.caddr, args->saddr_v6, 16);
        }
        if (!vips.lookup(&key))
            return 0;
        c.start_ns = bpf_ktime_get_ns();
        __builtin_memcpy(c.tuple.vaddr, key.addr, 16);
        c.tuple.cport = args->sport;
        c.tuple.vport = args->dport;
        c.tuple.protocol = PROTO_TCP;
        c.tuple.family = args->family;
        conns.update(&sock, &c);
        u64 tid = bpf_get_current_pid_tgid();
        connecting.update(&tid, &sock);
        return 0;
    }
    struct conn *c = conns.lookup(&sock);
    if (!c)
        return 0;
    c->tuple.cport = args->sport;
    struct record *r;
    if (args->newstate == TCP_ESTABLISHED && !c->established) {
        c->established = 1;
        r = new_record(ESTABLISHED, sock, c);
        if (r) {
            r->connect_ns = r->ts - c->start_ns;
            emit(r);
        }
        int zero = 0;
        u32 *report_closed = options.lookup(&zero);
        if (!report_closed || !*report_closed)
            forget(sock, c);
    } else if (args->newstate == TCP_CLOSE) {
        // After a RST the RESET record already ended this connect attempt.
        if (!c->reset) {
            r = new_record(c->established ? CLOSED : CLOSED_SYN_SENT, sock, c);
            if (r) {
                r->connect_ns = r->ts - c->start_ns;
                emit(r);
            }
        }
        forget(sock, c);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 sock = (u64)args->skaddr;
    struct conn *c = conns.lookup(&sock);
    if (!c || c->established)
        return 0;
    c->tuple.cport = args->sport;
    if (c->rescheduled) {
        c->rescheduled = 0;
        return 0;
    }
    c->retransmits++;
    struct record *r = new_record(SYN_RETRANSMIT, sock, c);
    if (r) {
        r->connect_ns = r->ts - c->start_ns;
        emit(r);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sock = (u64)args->skaddr;
    struct conn *c = conns.lookup(&sock);
    if (!c || c->established)
        return 0;
    c->tuple.cport = args->sport;
    c->reset = 1;
    struct record *r = new_record(RESET, sock, c);
    if (r) {
        r->connect_ns = r->ts - c->start_ns;
        emit(r);
    }
    return 0;
}

// Attached by the loader (not auto-attached) so that it can fall back to reading the IPVS
// connection table when kprobes are unavailable.
int trace_ip_vs_conn_new(struct pt_regs *ctx, const struct ip_vs_conn_param *p, int dest_af,
                         const union nf_inet_addr *daddr, __be16 dport, unsigned int flags) {
    if (flags & IP_VS_CONN_F_TEMPLATE)
        return 0;
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

    struct vip_key key = {};
    __builtin_memcpy(key.addr, t.vaddr, 16);
    key.port = t.vport;
    key.protocol = t.protocol;
    key.family = t.family;
    if (!vips.lookup(&key))
        return 0;

    struct backend b = {};
    if (dest_af == AF_INET)
        bpf_probe_read_kernel(b.addr, 4, daddr);
    else
        bpf_probe_read_kernel(b.addr, 16, daddr);
    b.port = bpf_ntohs(dport);
    b.family = dest_af;

    u64 zero_sock = 0, sock = 0;
    struct conn *c = 0;
    u64 *known = socks.lookup(&t);  // a SYN retransmit that IPVS rescheduled
    if (known) {
        sock = *known;
        c = conns.lookup(&sock);
        if (c) {
            c->retransmits = 0;
            c->rescheduled = 1;
        }
    } else {
        u64 tid = bpf_get_current_pid_tgid();
        u64 *started = connecting.lookup(&tid);
        if (started) {
            sock = *started;
            connecting.delete(&tid);
            c = conns.lookup(&sock);
            if (c && (c->tuple.vport != t.vport || !same_addr(c->tuple.vaddr, t.vaddr)))
                c = 0;
            if (c) {
                c->tuple.cport = t.cport;
                socks.update(&c->tuple, &sock);
            }
        }
    }
    struct record *r;
    if (c) {
        c->backend = b;
        r = new_record(CONNECT, sock, c);
        if (r)
            r->connect_ns = r->ts - c->start_ns;
    } else {
        // UDP, or a connection we did not see start: report the tuple as IPVS knows it.
        r = new_record(BACKEND, zero_sock, 0);
        if (r) {
            __builtin_memcpy(r->caddr, t.caddr, 16);
            __builtin_memcpy(r->vaddr, t.vaddr, 16);
            __builtin_memcpy(r->baddr, b.addr, 16);
            r->cport = t.cport;
            r->vport = t.vport;
            r->bport = b.port;
            r->bfamily = b.family;
            r->family = t.family;
            r->protocol = t.protocol;
        }
    }
    if (r)
        emit(r);
    return 0;
}
