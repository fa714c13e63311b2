// SPDX-License-Identifier: MIT OR GPL-2.0
//
// vipgate kernel fast path: a TC classifier that executes the NAT core's decisions.
//
// The program never decides. The userspace core (natgw's Gateway) handles the first packets
// of every flow through nat0 as before; once a flow is established the driver installs both
// directions of its translation into `kpath_flows`. For a packet that hits an entry this
// program rewrites addresses and ports in place (checksums updated incrementally, address
// changes folded into the pseudo-header with BPF_F_PSEUDO_HDR so GSO super-packets with a
// partial checksum stay whole), decrements the TTL as the router it is, and redirects the
// packet to the egress interface the kernel's FIB names (the neighbour is resolved by
// bpf_redirect_neigh). Routing uses the main table (BPF_FIB_LOOKUP_DIRECT): the policy rules
// of the slow path would send the packet into nat0.
//
// Direct routing (LVS-DR, an entry with FLOW_DIRECT_ROUTE): the core decided that the client's
// packets to a VIP go, unchanged, to a real server on a directly connected network; the entry's
// daddr is that server. A hit on the outside interface only takes one off the TTL and is
// redirected with the server as the next hop, so the kernel writes the server's MAC as the
// destination and the egress interface's own as the source. The packets the core handles
// itself (SYN, FIN, RST) come back out of nat0 unchanged; kpath_deliver, at nat0's ingress,
// sends them the same way (without it they would be routed to the VIP, into nat0 again).
//
// Invariants:
// - Anything the program is not sure of returns TC_ACT_OK untouched, so the packet takes the
//   slow path through nat0 and the core sees it: no entry, not IPv4, IP options, fragments,
//   TTL <= 1, protocols other than TCP/UDP (ICMP and ICMP errors included), TCP segments
//   with SYN or RST (the core sees every opening and judges every RST against its window;
//   the exceptions are an outside SYN to a listener the core published and the inside
//   server's SYN-ACK answering it, below, both reported to the core before they are sent),
//   a FIN of a direct-routing flow (its core tracks the client's flags alone) or of a flow
//   whose entry says FLOW_FIN_TO_CORE, a FIB miss or a packet that would need fragmenting.
//   A packet is never rewritten and then passed on.
// - Any other FIN of a translated flow is carried like any segment and reported (tcp_fin_end): the
//   core feeds it to its state tracking at the next sync, which judges it against the window
//   as if it had crossed the core, ends the flow's eligibility and removes its entries. So
//   the close of a short connection costs no trip through nat0, and the entries of a closed
//   flow live at most two sync rounds.
// - A direct-routing entry is delivered to its real server only if the FIB reaches that
//   server without a gateway (directly connected); kpath_deliver drops a packet it cannot
//   deliver (counted) rather than let it loop through nat0.
// - Per flow entry the program only writes the counters and the TCP sequence tracking
//   fields; the rewrite fields are the core's and are written only by userspace.
// - Counters are best effort under concurrency for the TCP tracking fields (last writer
//   wins between CPUs); packet and byte counters are atomic.
//
// One-packet UDP services (ipvsadm -o): the core schedules every datagram on its own and keeps
// no flow, so there is no flow entry to hit. Instead the core installs each such service's
// *schedule* (kpath_op_schedules, keyed by the VIP endpoint): the cycle of backend endpoints
// its own scheduler gives (rr: the live backends in turn; wrr: the smooth weighted sequence),
// and the VIP of each backend endpoint (kpath_op_backends). A UDP datagram with no flow entry
// arriving on the outside interface for a VIP with a schedule goes to the slot the service's
// cursor names, shared by every CPU and advanced atomically (so the shares are the core's,
// in the core's order, as IPVS's rr under its lock); a datagram
// from a backend endpoint arriving on an inside interface leaves from its VIP. The core
// replaces a schedule with one map update (the hash map is not preallocated: an update links
// a new element and frees the old one after an RCU grace period, so a datagram sees either
// table whole). Per backend the program counts packets and bytes each way (per CPU,
// kpath_op_counts, entries made by the core), which the core reads and adds to its own.
// A service the core cannot express as a cycle (hashing or load-based schedulers,
// persistence, thresholds, slow start, no live backend) has no schedule: the slow path.
//
// The license string must be GPL compatible because bpf_fib_lookup is a GPL-only helper.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static inline __attribute__((always_inline))

// Helper calls by their stable UAPI numbers.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 off, const void *from, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 off, __u64 from, __u64 to,
                                   __u64 size) = (void *)BPF_FUNC_l3_csum_replace;
static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 off, __u64 from, __u64 to,
                                   __u64 flags) = (void *)BPF_FUNC_l4_csum_replace;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen,
                              __u32 flags) = (void *)BPF_FUNC_fib_lookup;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen,
                                  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
static long (*bpf_skb_load_bytes)(const struct __sk_buff *skb, __u32 off, void *to,
                                  __u32 len) = (void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_change_head;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
                                   __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_delete_elem;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size,
                                    __u64 flags) = (void *)BPF_FUNC_ringbuf_reserve;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)BPF_FUNC_ringbuf_submit;
static void (*bpf_ringbuf_discard)(void *data, __u64 flags) = (void *)BPF_FUNC_ringbuf_discard;

#define PIN_BY_NAME 1

// Which side the packet arrived on: the program attached to the inside interfaces sees
// outbound packets, the one attached to the outside interface inbound ones.
#define DIR_OUTBOUND 0
#define DIR_INBOUND 1

// flow_value.flags: deliver unchanged to the real server in daddr (LVS-DR).
#define FLOW_DIRECT_ROUTE 1
// flow_value.flags: the core wants this flow's FINs (a virtual service counts a connection
// inactive the moment its close begins, and schedules by those counts).
#define FLOW_FIN_TO_CORE 2

// flow_value.tcp_valid bits.
#define TCP_VALID 1 // tcp_seq_end, tcp_ack and tcp_window hold a segment
#define TCP_FIN 2   // tcp_fin_end holds a FIN
// A flow the program opened: on the inbound entry, its client's first ACK is yet to be
// reported; on the outbound entry, the inside server's SYN-ACK may be executed.
#define TCP_OPENING 4

// The flow map key: the packet's 5-tuple as it arrives, and its direction. 16 bytes.
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

// The core's decision for one direction of a flow, plus what the program reports back.
// 56 bytes; the layout is mirrored by kpath::FlowValue (src/pod.rs).
struct flow_value {
	// The rewrite (written by userspace only).
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 flags;
	// Reported by the program.
	__u64 last_seen_ns; // bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last packet
	__u64 packets;      // wire packets (segments of a GSO super-packet counted one by one)
	__u64 bytes;        // IP bytes
	__u32 tcp_seq_end;  // TCP: highest seq + payload length sent in this direction
	__u32 tcp_ack;      // TCP: highest ack sent in this direction
	__u16 tcp_window;   // TCP: window field of the segment carrying tcp_ack (unscaled)
	__u16 tcp_valid;    // TCP: TCP_VALID once the fields above hold a segment, | TCP_FIN
	__u32 tcp_fin_end;  // TCP: seq + payload + 1 of the last FIN sent in this direction
};

// Global counters, one array slot each (per CPU; the loader sums them).
enum counter {
	CNT_FAST_PACKETS,
	CNT_FAST_BYTES,
	CNT_SLOW_NO_ENTRY,
	CNT_SLOW_UNPARSED, // not IPv4, IP options, fragments, other protocols, short headers
	CNT_SLOW_TCP_FLAGS, // SYN, RST; FIN of a direct-routing or FLOW_FIN_TO_CORE flow
	CNT_SLOW_TTL,
	CNT_SLOW_FIB,
	CNT_DR_UNDELIVERABLE, // kpath_deliver: no direct route to the real server, dropped
	CNT_OP_IN,  // one-packet datagrams scheduled to a backend
	CNT_OP_OUT, // one-packet answers sent from their VIP
	CNT_SYN_OPENED,    // SYNs to a published listener executed here (a flow opened)
	CNT_SYN_RING_FULL, // SYNs to a published listener left to the slow path: ring buffer full
	CNT_SYN_RACE,      // SYNs left to the slow path: an entry of their flow appeared meanwhile
	CNT_HANDSHAKE_REPORTED,  // client ACKs of opened flows reported in kpath_handshakes
	CNT_HANDSHAKE_RING_FULL, // such ACKs not reported: ring full (the sync round reports them)
	CNT_SYNACK_SENT,      // SYN-ACKs of opened flows executed here (reported in kpath_opened)
	CNT_SYNACK_RING_FULL, // such SYN-ACKs left to the slow path: ring buffer full
	CNT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
	__uint(pinning, PIN_BY_NAME);
} kpath_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, PIN_BY_NAME);
} kpath_counters SEC(".maps");

// Longest schedule: a cycle of up to 1024 picks covers rr over any realistic number of backends
// and wrr whose weights (divided by their gcd) add up to 1024 or less; 8 KiB a service.
#define OP_MAX_SLOTS 1024
// One-packet services with a schedule, each with its own cursor.
#define OP_MAX_SERVICES 256
// Backend endpoints of those services.
#define OP_MAX_BACKENDS 4096

// A UDP endpoint: a VIP or a backend. 8 bytes.
struct op_endpoint {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

// A one-packet service's schedule, mirrored by kpath::pod::RawOpSchedule.
struct op_schedule {
	__u32 nslots; // 1..=OP_MAX_SLOTS
	__u32 cursor; // the service's index in kpath_op_cursors
	struct op_endpoint slots[OP_MAX_SLOTS];
};

// Per backend endpoint and CPU: what the program moved.
struct op_counts {
	__u64 in_packets;  // datagrams to the backend
	__u64 in_bytes;    // their IP bytes
	__u64 out_packets; // answers from the backend
	__u64 out_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, OP_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct op_endpoint);
	__type(value, struct op_schedule);
} kpath_op_schedules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, OP_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u64); // 64 bits: the fetch-and-add the ISA has without 32-bit subregisters
} kpath_op_cursors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, OP_MAX_BACKENDS);
	__type(key, struct op_endpoint);
	__type(value, struct op_endpoint);
} kpath_op_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, OP_MAX_BACKENDS);
	__type(key, struct op_endpoint);
	__type(value, struct op_counts);
} kpath_op_counts SEC(".maps");

INLINE void count(__u32 which, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&kpath_counters, &which);
	if (c)
		*c += n;
}

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_TTL_OFF (IP_OFF + 8)
#define IP_ADDR_OFF (IP_OFF + 12)
#define L4_OFF (IP_OFF + 20)
#define TCP_CSUM_OFF (L4_OFF + 16)
#define UDP_CSUM_OFF (L4_OFF + 6)

// TCP flags byte (offset 13 of the header).
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04

INLINE int seq_after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

INLINE int slow(__u32 reason)
{
	count(reason, 1);
	return TC_ACT_OK;
}

// Asks the main table (BPF_FIB_LOOKUP_DIRECT, not the policy rules: those steer the gateway's
// traffic into nat0, the slow path the packet is leaving) for the egress towards `daddr`;
// fills `fib` (its ipv4_dst becomes the next hop). False on a miss or when a plain packet
// would need fragmenting (a GSO super-packet is segmented to the egress MTU).
INLINE int route(struct __sk_buff *skb, struct iphdr *ip, __be32 saddr, __be32 daddr,
		 struct bpf_fib_lookup *fib)
{
	fib->family = 2; // AF_INET
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->tot_len = skb->gso_segs > 1 ? 0 : __builtin_bswap16(ip->tot_len);
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = skb->ifindex; // at ingress: the device it arrived on
	return bpf_fib_lookup(skb, fib, sizeof(*fib),
			      BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_SKIP_NEIGH) ==
	       BPF_FIB_LKUP_RET_SUCCESS;
}

// Sends the packet out of `ifindex` to the real server `server` (its MAC from the neighbour
// table, resolved if needed; the source MAC is the interface's own).
INLINE int redirect_to_server(__u32 ifindex, __be32 server)
{
	struct bpf_redir_neigh nh = {};
	nh.nh_family = 2; // AF_INET
	nh.ipv4_nh = server;
	return bpf_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

// Rewrites the packet of `old` (as it arrived) to the new endpoints: transport checksum
// (addresses through the pseudo-header), IP checksum, TTL (already decremented in
// `ttl_proto`), fields.
INLINE void translate(struct __sk_buff *skb, __u32 csum_off, __u64 csum_flags,
		      const struct flow_key *old, __be32 new_saddr, __be32 new_daddr,
		      __be16 new_sport, __be16 new_dport, __u16 old_ttl_word, __u8 ttl_proto[2])
{
	if (old->saddr != new_saddr) {
		bpf_l4_csum_replace(skb, csum_off, old->saddr, new_saddr,
				    csum_flags | BPF_F_PSEUDO_HDR | sizeof(new_saddr));
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, old->saddr, new_saddr, sizeof(new_saddr));
	}
	if (old->daddr != new_daddr) {
		bpf_l4_csum_replace(skb, csum_off, old->daddr, new_daddr,
				    csum_flags | BPF_F_PSEUDO_HDR | sizeof(new_daddr));
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, old->daddr, new_daddr, sizeof(new_daddr));
	}
	if (old->sport != new_sport)
		bpf_l4_csum_replace(skb, csum_off, old->sport, new_sport, csum_flags | sizeof(new_sport));
	if (old->dport != new_dport)
		bpf_l4_csum_replace(skb, csum_off, old->dport, new_dport, csum_flags | sizeof(new_dport));

	bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl_word, *(__u16 *)ttl_proto, 2);
	__u8 new_ttl = ttl_proto[0];
	bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, 1, 0);
	__be32 addrs[2] = {new_saddr, new_daddr};
	bpf_skb_store_bytes(skb, IP_ADDR_OFF, addrs, sizeof(addrs), 0);
	__be16 ports[2] = {new_sport, new_dport};
	bpf_skb_store_bytes(skb, L4_OFF, ports, sizeof(ports), 0);
}

// A UDP datagram with no flow entry: a one-packet service's datagram to its VIP (inbound) or
// an answer from one of its backend endpoints (outbound), if the core installed a schedule
// for it; anything else takes the slow path. A datagram whose TTL runs out takes the slow path
// before it takes a slot; one whose backend has no route (a FIB miss: the real server's network
// is gone) has taken its slot and goes to the core, which schedules it on its own.
INLINE int one_packet(struct __sk_buff *skb, struct iphdr *ip, const struct flow_key *key,
		      __u8 dir)
{
	struct op_endpoint new_ep;
	struct op_endpoint backend = {};
	if (ip->ttl <= 1)
		return slow(CNT_SLOW_TTL);
	if (dir == DIR_INBOUND) {
		struct op_endpoint vip = {.addr = key->daddr, .port = key->dport};
		struct op_schedule *s = bpf_map_lookup_elem(&kpath_op_schedules, &vip);
		if (!s)
			return slow(CNT_SLOW_NO_ENTRY);
		__u32 n = s->nslots;
		__u32 which = s->cursor;
		__u64 *cursor = bpf_map_lookup_elem(&kpath_op_cursors, &which);
		if (!cursor || n == 0 || n > OP_MAX_SLOTS)
			return slow(CNT_SLOW_NO_ENTRY);
		// One cursor for every CPU, taken atomically: the datagrams of one socket may be
		// handled on any CPU (a veth's NAPI polls where it was scheduled), and rr means the
		// next backend whichever CPU asks.
		__u32 i = __sync_fetch_and_add(cursor, 1) % n;
		// The compiler knows i < n <= OP_MAX_SLOTS and would drop the check the verifier
		// needs to bound the slot's offset: hide what it knows.
		asm volatile("" : "+r"(i));
		if (i >= OP_MAX_SLOTS)
			return slow(CNT_SLOW_NO_ENTRY);
		new_ep = s->slots[i];
		backend = new_ep;
	} else {
		backend.addr = key->saddr;
		backend.port = key->sport;
		struct op_endpoint *vip = bpf_map_lookup_elem(&kpath_op_backends, &backend);
		if (!vip)
			return slow(CNT_SLOW_NO_ENTRY);
		new_ep = *vip;
	}
	__be32 new_saddr = dir == DIR_INBOUND ? key->saddr : new_ep.addr;
	__be16 new_sport = dir == DIR_INBOUND ? key->sport : new_ep.port;
	__be32 new_daddr = dir == DIR_INBOUND ? new_ep.addr : key->daddr;
	__be16 new_dport = dir == DIR_INBOUND ? new_ep.port : key->dport;
	struct bpf_fib_lookup fib = {};
	if (!route(skb, ip, new_saddr, new_daddr, &fib))
		return slow(CNT_SLOW_FIB);

	__u16 old_ttl_word = *(__u16 *)&ip->ttl;
	__u8 ttl_proto[2];
	ttl_proto[0] = ip->ttl - 1;
	ttl_proto[1] = IPPROTO_UDP;
	__u64 ip_len = skb->len - ETH_HLEN;
	__u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	struct op_counts *c = bpf_map_lookup_elem(&kpath_op_counts, &backend);
	if (c) {
		if (dir == DIR_INBOUND) {
			c->in_packets += segs;
			c->in_bytes += ip_len;
		} else {
			c->out_packets += segs;
			c->out_bytes += ip_len;
		}
	}
	count(dir == DIR_INBOUND ? CNT_OP_IN : CNT_OP_OUT, segs);
	translate(skb, UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0, key, new_saddr, new_daddr, new_sport,
		  new_dport, old_ttl_word, ttl_proto);
	count(CNT_FAST_PACKETS, segs);
	count(CNT_FAST_BYTES, ip_len);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

// Published listeners (a decision stated in advance, natgw's Gateway::published_listeners):
// the TCP static forwards whose every SYN from the outside the core would answer by opening a
// flow to one inside endpoint, source address and port preserved. The core states the set;
// the driver mirrors it into kpath_published (empty unless the driver enables it). An inbound
// SYN (no ACK, no RST, no FIN) with no flow entry, to a published public endpoint, from a
// source outside the inside networks (kpath_inside_nets: the core treats an inside source as
// a hairpin, which the publication does not cover) is executed here: a ring buffer record
// reporting the new flow is reserved first (a full ring leaves the SYN to the slow path,
// counted, so no flow exists that userspace is not told of), then both directions' entries
// are inserted (BPF_NOEXIST: a racing CPU's insert wins and this SYN takes the slow path),
// the record is submitted and the SYN is rewritten and redirected like any hit. A SYN with
// a payload (TCP Fast Open) is not executed (the record carries the TCP
// header only, from which the core rebuilds the SYN to adopt the flow). Everything
// else about the SYN's flow (the SYN-ACK, RSTs, expiry, counters) stays the core's, which
// adopts the reported flow into its table or, refusing it, removes both entries.

#define PUBLISHED_MAX 1024
#define INSIDE_NETS_MAX 256
// 5041 records of 92 bytes (104 with the ring's header, rounded up to 8), two a connection
// (its SYN's and its SYN-ACK's): a burst of new connections between two reads of the ring.
#define OPENED_RING_BYTES (512 * 1024)
#define TCP_HDR_MAX 60

// The public endpoint of a published listener: 8 bytes.
struct published_key {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

// A published listener, mirrored by kpath::pod::RawPublished. 16 bytes.
struct published {
	__be32 inside_addr;
	__be16 inside_port;
	__u16 pad;
	__u32 listener; // the core's listener id
	__u32 generation; // the publication this entry belongs to (the driver's counter)
};

// An inside network, as an LPM trie key.
struct inside_net {
	__u32 prefixlen;
	__be32 addr;
};

// What a record of kpath_opened reports.
#define OPENED_SYN 0     // a flow opened: its SYN, executed
#define OPENED_SYN_ACK 1 // the inside server's SYN-ACK of such a flow, executed

// One flow opened by the program, or its SYN-ACK, mirrored by kpath::pod::RawOpened. 92
// bytes. The segment's TCP header goes whole (options included: the core's tracking needs its
// window scale), as it arrived, so that the core can track it as if it had crossed it. Both
// kinds share one ring so that the driver reads a flow's SYN before its SYN-ACK.
struct opened {
	__be32 client_addr;
	__be32 public_addr;
	__be32 inside_addr;
	__be16 client_port;
	__be16 public_port;
	__be16 inside_port;
	__u16 tcp_len; // bytes of tcp used, 20..=60
	__u32 listener;   // OPENED_SYN: the published entry's; 0 otherwise
	__u32 generation; // likewise
	__u32 kind;       // OPENED_SYN or OPENED_SYN_ACK
	__u8 tcp[TCP_HDR_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PUBLISHED_MAX);
	__type(key, struct published_key);
	__type(value, struct published);
} kpath_published SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, INSIDE_NETS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct inside_net);
	__type(value, __u8);
} kpath_inside_nets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, OPENED_RING_BYTES);
} kpath_opened SEC(".maps");

// The client's first ACK of a flow the program opened, carried by its inbound entry (marked
// TCP_OPENING by open_published): the core keeps an adopted flow half-open until it learns of
// that ACK, and its half-open bounds withdraw the publication, so a flow the core cannot
// establish promptly costs the next SYNs the kernel path. The record names the flow; the
// driver feeds the entries' reports to the core at once, whose tracking judges the ACK (the
// program only says it saw one). A full ring loses nothing: the next sync round reports the
// entries as for any flow.
#define HANDSHAKE_RING_BYTES (64 * 1024)

// One reported ACK, mirrored by kpath::pod::RawHandshake. 20 bytes (32 in the ring: its
// 8-byte header, rounded up to 8).
struct handshake {
	__be32 client_addr;
	__be32 public_addr;
	__be32 inside_addr;
	__be16 client_port;
	__be16 public_port;
	__be16 inside_port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, HANDSHAKE_RING_BYTES);
} kpath_handshakes SEC(".maps");

#define TH_ACK 0x10

// Reports the ACK `v`'s inbound entry (of `key`) carried, if it is its flow's first since the
// program opened it. Not atomic (BPF's fetching atomics are 32 and 64 bits wide, the flag
// lives in a 16-bit field): two CPUs carrying ACKs of one flow at once may both report it,
// which the driver tolerates.
INLINE void report_handshake(const struct flow_key *key, struct flow_value *v)
{
	v->tcp_valid &= ~TCP_OPENING;
	struct handshake *rec = bpf_ringbuf_reserve(&kpath_handshakes, sizeof(*rec), 0);
	if (!rec) {
		count(CNT_HANDSHAKE_RING_FULL, 1);
		return;
	}
	rec->client_addr = key->saddr;
	rec->public_addr = key->daddr;
	rec->inside_addr = v->daddr;
	rec->client_port = key->sport;
	rec->public_port = key->dport;
	rec->inside_port = v->dport;
	rec->pad = 0;
	bpf_ringbuf_submit(rec, 0);
	count(CNT_HANDSHAKE_REPORTED, 1);
}

// Copies the packet's TCP header (`*len` bytes, 20..=60) into `rec` as it arrived. The rest
// of the record's header room is zeroed first (constant offsets: the daemon's verifier,
// without CAP_PERFMON, allows no variable ones into ring memory), so no stale ring bytes
// reach userspace. The compiler knows the caller's bounds and could drop what the verifier
// needs: they are restated on a value it cannot see through. False: not copied.
INLINE int copy_tcp_header(struct __sk_buff *skb, struct opened *rec, __u32 *len)
{
	__builtin_memset(rec->tcp, 0, TCP_HDR_MAX);
	__u32 n = *len;
	asm volatile("" : "+r"(n));
	if (n < 20 || n > TCP_HDR_MAX || bpf_skb_load_bytes(skb, L4_OFF, rec->tcp, n))
		return 0;
	*len = n;
	return 1;
}

// The inside server's SYN-ACK (SYN and ACK only, no payload) of a flow the program opened
// (its outbound entry `v` of `key` marked TCP_OPENING): executed here, reported first in
// kpath_opened (after its flow's SYN) so that the core tracks it as if it had crossed it.
// Its entry's counters and sequence tracking are left alone: the core counts the SYN-ACK
// from the record. A full ring, a payload, or a route or TTL the hit path would refuse leave
// it to the slow path, as before.
INLINE int answer_opened(struct __sk_buff *skb, struct iphdr *ip, const struct flow_key *key,
			 struct flow_value *v, __u32 tcp_len)
{
	if (tcp_len < 20 || tcp_len > TCP_HDR_MAX ||
	    __builtin_bswap16(ip->tot_len) != 20 + tcp_len)
		return slow(CNT_SLOW_TCP_FLAGS);
	if (ip->ttl <= 1)
		return slow(CNT_SLOW_TTL);
	// A copy: the driver may replace the entry while this segment is handled.
	struct flow_value rw = *v;
	struct bpf_fib_lookup fib = {};
	if (!route(skb, ip, rw.saddr, rw.daddr, &fib))
		return slow(CNT_SLOW_FIB);
	struct opened *rec = bpf_ringbuf_reserve(&kpath_opened, sizeof(*rec), 0);
	if (!rec)
		return slow(CNT_SYNACK_RING_FULL);
	__u32 len = tcp_len;
	if (!copy_tcp_header(skb, rec, &len)) {
		bpf_ringbuf_discard(rec, 0);
		return slow(CNT_SLOW_UNPARSED);
	}
	rec->client_addr = key->daddr;
	rec->public_addr = rw.saddr;
	rec->inside_addr = key->saddr;
	rec->client_port = key->dport;
	rec->public_port = rw.sport;
	rec->inside_port = key->sport;
	rec->tcp_len = len;
	rec->listener = 0;
	rec->generation = 0;
	rec->kind = OPENED_SYN_ACK;
	bpf_ringbuf_submit(rec, 0);

	__u64 ip_len = skb->len - ETH_HLEN;
	__u16 old_ttl_word = *(__u16 *)&ip->ttl;
	__u8 ttl_proto[2];
	ttl_proto[0] = ip->ttl - 1;
	ttl_proto[1] = IPPROTO_TCP;
	translate(skb, TCP_CSUM_OFF, 0, key, rw.saddr, rw.daddr, rw.sport, rw.dport, old_ttl_word,
		  ttl_proto);
	count(CNT_SYNACK_SENT, 1);
	count(CNT_FAST_PACKETS, 1);
	count(CNT_FAST_BYTES, ip_len);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

// An inbound SYN with no flow entry (see the comment on kpath_published): executes the
// published decision, or leaves the SYN to the slow path exactly as before.
INLINE int open_published(struct __sk_buff *skb, struct iphdr *ip, const struct flow_key *key,
			  __u32 tcp_len)
{
	struct published_key pk = {.addr = key->daddr, .port = key->dport};
	struct published *found = bpf_map_lookup_elem(&kpath_published, &pk);
	if (!found)
		return slow(CNT_SLOW_TCP_FLAGS);
	// A copy: the driver may replace the entry while this SYN is handled.
	struct published pub = *found;
	struct inside_net src = {.prefixlen = 32, .addr = key->saddr};
	if (bpf_map_lookup_elem(&kpath_inside_nets, &src))
		return slow(CNT_SLOW_TCP_FLAGS);
	if (tcp_len < 20 || tcp_len > TCP_HDR_MAX)
		return slow(CNT_SLOW_UNPARSED);
	// A SYN carrying data (TCP Fast Open) is the core's: the record carries the header only.
	// (tot_len, not skb->len: a short frame carries Ethernet padding.)
	if (__builtin_bswap16(ip->tot_len) != 20 + tcp_len)
		return slow(CNT_SLOW_TCP_FLAGS);
	if (ip->ttl <= 1)
		return slow(CNT_SLOW_TTL);
	struct bpf_fib_lookup fib = {};
	if (!route(skb, ip, key->saddr, pub.inside_addr, &fib))
		return slow(CNT_SLOW_FIB);

	// Reserved before the entries exist: a flow is opened only if it can be reported.
	struct opened *rec = bpf_ringbuf_reserve(&kpath_opened, sizeof(*rec), 0);
	if (!rec)
		return slow(CNT_SYN_RING_FULL);
	__u32 len = tcp_len;
	if (!copy_tcp_header(skb, rec, &len)) {
		bpf_ringbuf_discard(rec, 0);
		return slow(CNT_SLOW_UNPARSED);
	}
	__u64 ip_len = skb->len - ETH_HLEN;
	struct flow_value in_v = {
		.saddr = key->saddr,
		.daddr = pub.inside_addr,
		.sport = key->sport,
		.dport = pub.inside_port,
		.last_seen_ns = bpf_ktime_get_ns(),
		.packets = 1,
		.bytes = ip_len,
		.tcp_valid = TCP_OPENING,
	};
	if (bpf_map_update_elem(&kpath_flows, key, &in_v, BPF_NOEXIST)) {
		bpf_ringbuf_discard(rec, 0);
		return slow(CNT_SYN_RACE);
	}
	struct flow_key out_k = {
		.saddr = pub.inside_addr,
		.daddr = key->saddr,
		.sport = pub.inside_port,
		.dport = key->sport,
		.proto = IPPROTO_TCP,
		.dir = DIR_OUTBOUND,
	};
	// TCP_OPENING here: the inside server's SYN-ACK may be executed (answer_opened).
	struct flow_value out_v = {
		.saddr = key->daddr,
		.daddr = key->saddr,
		.sport = key->dport,
		.dport = key->sport,
		.tcp_valid = TCP_OPENING,
	};
	if (bpf_map_update_elem(&kpath_flows, &out_k, &out_v, BPF_NOEXIST)) {
		bpf_map_delete_elem(&kpath_flows, key);
		bpf_ringbuf_discard(rec, 0);
		return slow(CNT_SYN_RACE);
	}
	rec->client_addr = key->saddr;
	rec->public_addr = key->daddr;
	rec->inside_addr = pub.inside_addr;
	rec->client_port = key->sport;
	rec->public_port = key->dport;
	rec->inside_port = pub.inside_port;
	rec->tcp_len = len;
	rec->listener = pub.listener;
	rec->generation = pub.generation;
	rec->kind = OPENED_SYN;
	bpf_ringbuf_submit(rec, 0);

	__u16 old_ttl_word = *(__u16 *)&ip->ttl;
	__u8 ttl_proto[2];
	ttl_proto[0] = ip->ttl - 1;
	ttl_proto[1] = IPPROTO_TCP;
	translate(skb, TCP_CSUM_OFF, 0, key, key->saddr, pub.inside_addr, key->sport,
		  pub.inside_port, old_ttl_word, ttl_proto);
	count(CNT_SYN_OPENED, 1);
	count(CNT_FAST_PACKETS, 1);
	count(CNT_FAST_BYTES, ip_len);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

INLINE int handle(struct __sk_buff *skb, __u8 dir)
{
	// Headers must be in the linear part; pull them if a GSO skb keeps them paged.
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + L4_OFF + sizeof(struct tcphdr) > data_end) {
		if (skb->len < L4_OFF + sizeof(struct udphdr))
			return slow(CNT_SLOW_UNPARSED);
		bpf_skb_pull_data(skb, L4_OFF + sizeof(struct tcphdr));
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != __constant_htons(ETH_P_IP))
		return slow(CNT_SLOW_UNPARSED);
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return slow(CNT_SLOW_UNPARSED);
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & __constant_htons(0x3fff)))
		return slow(CNT_SLOW_UNPARSED);

	struct flow_key key = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.proto = ip->protocol,
		.dir = dir,
	};
	__u32 csum_off;
	__u64 csum_flags = 0;
	__u32 payload = 0;
	__u32 seq = 0, ack = 0;
	__u16 window = 0;
	__u32 fin = 0;
	int opening = 0, answering = 0;
	__u32 tcp_len = 0;
	__u8 tcp_flags = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return slow(CNT_SLOW_UNPARSED);
		__u8 flags = ((__u8 *)tcp)[13];
		tcp_flags = flags;
		// A bare SYN from the outside may open a published listener's flow (below, once
		// no entry is known); every other SYN and every RST is the core's.
		opening = dir == DIR_INBOUND &&
			  (flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) == TH_SYN;
		// And an inside server's SYN-ACK may answer a flow the program opened (below).
		answering = dir == DIR_OUTBOUND &&
			    (flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) == (TH_SYN | TH_ACK);
		if ((flags & (TH_SYN | TH_RST)) && !opening && !answering)
			return slow(CNT_SLOW_TCP_FLAGS);
		fin = flags & TH_FIN;
		key.sport = tcp->source;
		key.dport = tcp->dest;
		csum_off = TCP_CSUM_OFF;
		tcp_len = tcp->doff * 4;
		__u32 hdrs = 20 + tcp_len;
		__u32 tot = __builtin_bswap16(ip->tot_len);
		// A GSO super-packet's tot_len may not cover it whole; skb->len does.
		__u32 ip_len = skb->len - ETH_HLEN;
		if (ip_len > tot)
			tot = ip_len;
		payload = tot > hdrs ? tot - hdrs : 0;
		seq = __builtin_bswap32(tcp->seq);
		ack = __builtin_bswap32(tcp->ack_seq);
		window = __builtin_bswap16(tcp->window);
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return slow(CNT_SLOW_UNPARSED);
		key.sport = udp->source;
		key.dport = udp->dest;
		csum_off = UDP_CSUM_OFF;
		csum_flags = BPF_F_MARK_MANGLED_0;
	} else {
		return slow(CNT_SLOW_UNPARSED);
	}

	struct flow_value *v = bpf_map_lookup_elem(&kpath_flows, &key);
	if (opening)
		return v ? slow(CNT_SLOW_TCP_FLAGS) : open_published(skb, ip, &key, tcp_len);
	if (!v)
		return key.proto == IPPROTO_UDP ? one_packet(skb, ip, &key, dir)
						: slow(CNT_SLOW_NO_ENTRY);
	if (answering)
		return (v->tcp_valid & TCP_OPENING) && !(v->flags & FLOW_DIRECT_ROUTE)
			       ? answer_opened(skb, ip, &key, v, tcp_len)
			       : slow(CNT_SLOW_TCP_FLAGS);
	if (fin && (v->flags & (FLOW_DIRECT_ROUTE | FLOW_FIN_TO_CORE)))
		return slow(CNT_SLOW_TCP_FLAGS);
	if (ip->ttl <= 1)
		return slow(CNT_SLOW_TTL);

	// Direct routing leaves addresses and ports as they are; daddr names the next hop.
	int direct = v->flags & FLOW_DIRECT_ROUTE;
	__be32 next_hop = v->daddr;
	__be32 new_saddr = direct ? key.saddr : v->saddr;
	__be32 new_daddr = direct ? key.daddr : v->daddr;
	__be16 new_sport = direct ? key.sport : v->sport;
	__be16 new_dport = direct ? key.dport : v->dport;

	// Route the translated packet before touching it: a miss leaves it for the slow path.
	struct bpf_fib_lookup fib = {};
	if (!route(skb, ip, new_saddr, next_hop, &fib))
		return slow(CNT_SLOW_FIB);
	// A real server must be on the segment: the route to it names no gateway.
	if (direct && fib.ipv4_dst != next_hop)
		return slow(CNT_SLOW_FIB);

	__u16 old_ttl_word = *(__u16 *)&ip->ttl;
	__u8 new_ttl = ip->ttl - 1;
	__u64 ip_len = skb->len - ETH_HLEN;
	__u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;

	// Report first (the entry pointer stays valid across the packet helpers below).
	__sync_fetch_and_add(&v->packets, segs);
	__sync_fetch_and_add(&v->bytes, ip_len);
	v->last_seen_ns = bpf_ktime_get_ns();
	if (key.proto == IPPROTO_TCP) {
		// A FIN takes one sequence number, as conntrack's td_end counts it.
		__u32 end = seq + payload + (fin ? 1 : 0);
		__u16 valid = v->tcp_valid;
		if (!(valid & TCP_VALID) || seq_after(end, v->tcp_seq_end))
			v->tcp_seq_end = end;
		if (!(valid & TCP_VALID) || !seq_after(v->tcp_ack, ack)) {
			v->tcp_ack = ack;
			v->tcp_window = window;
		}
		if (fin)
			v->tcp_fin_end = end;
		v->tcp_valid = valid | TCP_VALID | (fin ? TCP_FIN : 0);
		if ((valid & TCP_OPENING) && dir == DIR_INBOUND && (tcp_flags & TH_ACK))
			report_handshake(&key, v);
	}

	__u8 ttl_proto[2];
	ttl_proto[0] = new_ttl;
	ttl_proto[1] = key.proto;
	if (direct) {
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl_word, *(__u16 *)ttl_proto, 2);
		bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, 1, 0);
		count(CNT_FAST_PACKETS, segs);
		count(CNT_FAST_BYTES, ip_len);
		return redirect_to_server(fib.ifindex, next_hop);
	}

	translate(skb, csum_off, csum_flags, &key, new_saddr, new_daddr, new_sport, new_dport,
		  old_ttl_word, ttl_proto);
	count(CNT_FAST_PACKETS, segs);
	count(CNT_FAST_BYTES, ip_len);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

// Attached to the ingress of every inside interface.
SEC("classifier/outbound")
int kpath_outbound(struct __sk_buff *skb)
{
	return handle(skb, DIR_OUTBOUND);
}

// Attached to the ingress of the outside interface.
SEC("classifier/inbound")
int kpath_inbound(struct __sk_buff *skb)
{
	return handle(skb, DIR_INBOUND);
}

// Attached to the ingress of nat0 (a TUN: no link-layer header, the IP header at offset 0):
// what the core wrote back. A packet of a direct-routing flow is delivered to its real server
// unchanged (the kernel already took one off its TTL when it forwarded it into nat0); every
// other packet continues into the stack untouched, as before.
SEC("classifier/deliver")
int kpath_deliver(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + sizeof(struct iphdr) + 4 > data_end) {
		if (skb->len < sizeof(struct iphdr) + 4)
			return TC_ACT_OK;
		bpf_skb_pull_data(skb, sizeof(struct iphdr) + 4);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct iphdr *ip = data;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	// Options are left to the stack: the core never direct-routes a packet it could not
	// parse, and a fragment past the first carries no ports.
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & __constant_htons(0x1fff)))
		return TC_ACT_OK;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	__be16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return TC_ACT_OK;
	struct flow_key key = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = ports[0],
		.dport = ports[1],
		.proto = ip->protocol,
		.dir = DIR_INBOUND,
	};
	struct flow_value *v = bpf_map_lookup_elem(&kpath_flows, &key);
	if (!v || !(v->flags & FLOW_DIRECT_ROUTE))
		return TC_ACT_OK;
	__be32 server = v->daddr;
	struct bpf_fib_lookup fib = {};
	if (!route(skb, ip, ip->saddr, server, &fib) || fib.ipv4_dst != server) {
		count(CNT_DR_UNDELIVERABLE, 1);
		return TC_ACT_SHOT;
	}
	// bpf_redirect_neigh takes a frame with a link-layer header, which a TUN packet lacks:
	// room for one (the neighbour code writes it).
	if (bpf_skb_change_head(skb, ETH_HLEN, 0)) {
		count(CNT_DR_UNDELIVERABLE, 1);
		return TC_ACT_SHOT;
	}
	return redirect_to_server(fib.ifindex, server);
}

char _license[] SEC("license") = "Dual MIT/GPL";
