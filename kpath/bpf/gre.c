// SPDX-License-Identifier: MIT OR GPL-2.0
//
// vipgate GRE kernel data path: two TC classifiers that carry a tunnel's plain traffic without
// the TUN round trip, keeping GSO super-packets whole.
//
// - gre_encap, at the egress of the tunnel's TUN device: an IPv4 or IPv6 packet routed into
//   the tunnel gets the outer IPv4 + GRE header in front (bpf_skb_adjust_room with
//   ENCAP_L3_IPV4 | ENCAP_L4_GRE, so a GSO skb becomes an SKB_GSO_GRE super-packet that the
//   kernel segments as late as possible) and is redirected out of the underlay interface the
//   FIB names, or on a host that does not forward the one userspace recorded
//   (bpf_redirect_neigh resolves the next hop; it takes an Ethernet frame, so the TUN's
//   packet gets a placeholder header first, bpf_skb_change_head).
// - gre_decap, at the ingress of the underlay interface: a GRE packet from a tunnel's remote
//   to its local address with the tunnel's key (or none, for a keyless tunnel), no other
//   GRE flag, and a plain IPv4 or IPv6 packet inside is stripped to that packet and redirected into
//   the TUN device's ingress (BPF_F_INGRESS), so the kernel sees it arrive on the tunnel.
//
// The programs never decide what userspace would decide differently. Anything else returns
// TC_ACT_OK untouched and takes the TUN path, where the core keeps every check and counter:
// TCP SYNs (the core clamps their MSS), packets over the tunnel MTU (frag-needed or outer
// fragmentation), IP options and IPv6 extension headers, fragments, keepalive probes and replies, GRE checksums,
// sequence numbers, versions and RFC 1701 bits, unknown sources and keys, malformed inner
// packets, a FIB miss. A packet is never modified and then passed on.
//
// Invariants:
// - Tunnels are in the maps only while userspace runs them on this path (checksummed and
//   sequenced tunnels never are: GSO cannot fill in a GRE checksum or sequence number per
//   segment with SKB_GSO_GRE). gre_tx_tunnels is keyed by TUN ifindex, gre_rx_tunnels by
//   (remote, local, key); both name the tunnel's slot in gre_stats.
// - gre_stats counts per tunnel what the programs carried (wire packets: the segments of a
//   GSO super-packet one by one; inner bytes as the core counts them, the headers of every
//   segment included) and what they passed to the TUN path; gre_counters counts why.
// - The outer header is what the TUN path's raw socket sends: version 4, IHL 5, TOS 0, DF
//   (the packet fits the underlay's MTU, checked against the FIB, or against the recorded
//   egress MTU where the FIB lookup is refused), TTL 64, protocol 47.
//
// The license string must be GPL compatible because bpf_fib_lookup is a GPL-only helper.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static inline __attribute__((always_inline))

// Helper calls by their stable UAPI numbers.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 off, const void *from, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode,
                                   __u64 flags) = (void *)BPF_FUNC_skb_adjust_room;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen,
                              __u32 flags) = (void *)BPF_FUNC_fib_lookup;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen,
                                  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_csum_level)(struct __sk_buff *skb, __u64 level) = (void *)BPF_FUNC_csum_level;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len,
                                   __u64 flags) = (void *)BPF_FUNC_skb_change_head;

#define PIN_BY_NAME 1
#define MAX_TUNNELS 64

// GRE (RFC 2784/2890) first word: flags and version, then the protocol type.
#define GRE_CSUM 0x8000
#define GRE_KEY 0x2000
#define PROTO_GRE 47
#define ETH_P_IPV4_BE __constant_htons(ETH_P_IP)
#define ETH_P_IPV6_BE __constant_htons(ETH_P_IPV6)
// Decapsulation flags of bpf_skb_adjust_room (Linux 6.6; the build's UAPI headers may be
// older): they set skb->protocol to the inner packet's.
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif
#define GRE_IN_UDP_PORT_BE __constant_htons(4754) // RFC 8086
#define OUTER_TTL 64
#define IP_DF 0x4000
#define TH_SYN 0x02

// Per tunnel, what encapsulation needs. Written by userspace only. 36 bytes.
struct gre_tx {
	__be32 local;
	__be32 remote;
	__be32 key;     // network byte order, as on the wire; meaningful with has_key
	__u16 has_key;
	__u16 l2;       // 1: the device has an Ethernet header (the differential test's veth);
	                // 0: it has none (the TUN)
	__u32 mtu;      // the tunnel MTU: larger inner packets take the TUN path
	__u32 slot;     // index into gre_stats
	// The interface the route to the remote used when the tunnel started, and its MTU; 0
	// when unknown. Used only where the FIB lookup is refused because forwarding is off
	// on the TUN (a host that terminates the tunnel for its own traffic): see encap().
	__u32 egress_ifindex;
	__u32 egress_mtu;
	__u32 udp;      // 1: GRE-in-UDP (RFC 8086, 4754 -> 4754, UDP checksum zero)
};

// The decapsulation key: who sends, to which address, with which key, how. 16 bytes.
struct gre_rx_key {
	__be32 remote;
	__be32 local;
	__be32 key;     // zero for a keyless tunnel
	__u16 has_key;
	__u16 udp;      // 1: GRE-in-UDP to port 4754
};

// Where a matching packet goes. 8 bytes.
struct gre_rx {
	__u32 tun_ifindex;
	__u32 slot;
};

// Per tunnel (per CPU; the loader sums). 48 bytes.
struct gre_stats {
	__u64 tx_packets;  // inner packets encapsulated (segments of a super-packet one by one)
	__u64 tx_bytes;    // inner bytes encapsulated
	__u64 rx_packets;  // inner packets decapsulated
	__u64 rx_bytes;    // inner bytes decapsulated
	__u64 tx_passed;   // left to the TUN path at the TUN's egress
	__u64 rx_passed;   // GRE packets of this tunnel left to the TUN path at the underlay
};

// Why packets took the TUN path (global, per CPU).
enum counter {
	TX_NO_TUNNEL,  // the device is no tunnel of this path (its entry was removed)
	TX_NOT_IP,     // neither IPv4 nor IPv6 routed into the tunnel
	TX_UNUSUAL,    // IP options, fragments, short headers, an already encapsulated skb
	TX_TCP_SYN,    // the core clamps the MSS
	TX_TOO_BIG,    // over the tunnel MTU, or would not fit the underlay's
	TX_NO_ROUTE,   // the FIB has no unicast route to the remote (or forwarding is off and
	               // the egress interface is unknown)
	TX_FAILED,     // a helper refused (untouched, or dropped if it failed after encapsulating)
	RX_NO_TUNNEL,  // GRE whose (source, destination, key, UDP or not) is no tunnel here
	RX_GRE_FLAGS,  // checksum, sequence, routing, version or reserved bits
	RX_NOT_IP,     // keepalive replies (protocol 0), protocol types other than IPv4/IPv6
	RX_UNUSUAL,    // inner IP options, IPv6 extension headers, fragments, lengths that do
	               // not add up
	RX_TCP_SYN,    // the core clamps the MSS
	RX_PROBE,      // an inner packet for the remote: a keepalive probe to reflect
	RX_FAILED,     // a helper refused (the packet is untouched)
	RX_UDP_CSUM,   // GRE-in-UDP with a UDP checksum the device did not verify
	CNT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, __u32);
	__type(value, struct gre_tx);
	__uint(pinning, PIN_BY_NAME);
} gre_tx_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, struct gre_rx_key);
	__type(value, struct gre_rx);
	__uint(pinning, PIN_BY_NAME);
} gre_rx_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_TUNNELS);
	__type(key, __u32);
	__type(value, struct gre_stats);
	__uint(pinning, PIN_BY_NAME);
} gre_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, PIN_BY_NAME);
} gre_counters SEC(".maps");

INLINE int pass(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&gre_counters, &reason);
	if (c)
		*c += 1;
	return TC_ACT_OK;
}

INLINE struct gre_stats *stats(__u32 slot)
{
	return bpf_map_lookup_elem(&gre_stats, &slot);
}

// The tunnel's pass counter too, for `show gre`.
INLINE int pass_tx(__u32 slot, __u32 reason)
{
	struct gre_stats *s = stats(slot);
	if (s)
		s->tx_passed += 1;
	return pass(reason);
}

INLINE int pass_rx(__u32 slot, __u32 reason)
{
	struct gre_stats *s = stats(slot);
	if (s)
		s->rx_passed += 1;
	return pass(reason);
}

// The IPv4 header checksum of a 20-byte header whose checksum field is zero.
INLINE __u16 ipv4_csum(const __u16 *words)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// Wire packets and inner bytes of an skb whose IP packet starts at `ip_off`: a GSO
// super-packet is counted as the segments it becomes, each with its own copy of the headers.
INLINE void wire_size(struct __sk_buff *skb, __u32 ip_off, __u32 hdrs, __u64 *packets,
                      __u64 *bytes)
{
	__u32 len = skb->len - ip_off;
	*packets = 1;
	*bytes = len;
	__u32 mss = skb->gso_size;
	if (mss == 0 || len <= hdrs)
		return;
	__u32 payload = len - hdrs;
	__u32 segs = (payload + mss - 1) / mss;
	if (segs > 1) {
		*packets = segs;
		*bytes = len + (__u64)(segs - 1) * hdrs;
	}
}

// The length of the IPv4 + TCP headers of a plain (no options, unfragmented) IPv4 packet at
// `ip`, or of the IPv4 header alone for another protocol; 0 if the packet is not one the
// programs carry. `avail` bytes of the packet are readable; `len` is its length on the skb.
// A TCP SYN is reported through *syn.
INLINE __u32 plain_ipv4(struct iphdr *ip, void *data_end, __u32 len, int *syn)
{
	if ((void *)(ip + 1) > data_end)
		return 0;
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & __constant_htons(0x3fff)))
		return 0;
	__u32 tot = __builtin_bswap16(ip->tot_len);
	// Exactly the packet: padding or a short packet is for the core to judge.
	if (tot != len)
		return 0;
	if (ip->protocol != IPPROTO_TCP)
		return 20;
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return 0;
	__u32 doff = tcp->doff * 4;
	if (doff < 20 || 20 + doff > tot)
		return 0;
	*syn = (((__u8 *)tcp)[13] & TH_SYN) != 0;
	return 20 + doff;
}

// The same for a plain IPv6 packet at `ip6`: no extension header (a fragment header is one),
// TCP, UDP or ICMPv6, the payload length exactly the packet's. IPv6 routers never fragment,
// so there is nothing else to refuse.
INLINE __u32 plain_ipv6(struct ipv6hdr *ip6, void *data_end, __u32 len, int *syn)
{
	if ((void *)(ip6 + 1) > data_end)
		return 0;
	if (ip6->version != 6 || __builtin_bswap16(ip6->payload_len) + 40 != len)
		return 0;
	if (ip6->nexthdr == IPPROTO_UDP || ip6->nexthdr == 58 /* ICMPv6 */)
		return 40;
	if (ip6->nexthdr != IPPROTO_TCP)
		return 0;
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return 0;
	__u32 doff = tcp->doff * 4;
	if (doff < 20 || 40 + doff > len)
		return 0;
	*syn = (((__u8 *)tcp)[13] & TH_SYN) != 0;
	return 40 + doff;
}

// Headers a program must read directly: outer IPv4, the longest GRE header the fast path
// takes, the longer inner IP header (IPv6) and a TCP header.
#define PULL_LEN (ETH_HLEN + 20 + 8 + 40 + sizeof(struct tcphdr))

// Encapsulates the IPv4 (`v6` 0) or IPv6 (`v6` 1) packet at offset `l2` (a constant: 0 on the
// TUN, ETH_HLEN on an Ethernet device) for tunnel `t`. Packet offsets are constants
// throughout: the verifier refuses variable ones to a loader holding CAP_BPF without
// CAP_PERFMON.
INLINE int encap(struct __sk_buff *skb, struct gre_tx *t, const __u32 l2, const int v6)
{
	__u32 slot = t->slot;
	if (skb->len < l2 + 20)
		return pass_tx(slot, TX_UNUSUAL);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u32 want = l2 + (v6 ? 40 : 20) + sizeof(struct tcphdr);
	if (data + want > data_end) {
		bpf_skb_pull_data(skb, skb->len < want ? skb->len : want);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	int syn = 0;
	__u32 hdrs;
	// The outer IP ID: an IPv4 packet's own (as the TUN path's raw socket sends it); the
	// kernel numbers a super-packet's segments from it.
	__be16 ident = 0;
	if (v6) {
		hdrs = plain_ipv6(data + l2, data_end, skb->len - l2, &syn);
	} else {
		struct iphdr *ip = data + l2;
		hdrs = plain_ipv4(ip, data_end, skb->len - l2, &syn);
		if (hdrs)
			ident = ip->id;
	}
	if (hdrs == 0)
		return pass_tx(slot, TX_UNUSUAL);
	if (syn)
		return pass_tx(slot, TX_TCP_SYN);

	__u32 gre_len = t->has_key ? 8 : 4;
	const int udp = t->udp != 0;
	__u32 overhead = 20 + (udp ? 8 : 0) + gre_len;
	// The size of the largest packet on the wire: one segment of a super-packet.
	__u32 inner_wire = skb->gso_size ? hdrs + skb->gso_size : skb->len - l2;
	if (inner_wire > t->mtu || skb->len - l2 + overhead > 0xffff)
		return pass_tx(slot, TX_TOO_BIG);

	struct bpf_fib_lookup fib = {};
	fib.family = 2; // AF_INET
	fib.l4_protocol = udp ? IPPROTO_UDP : PROTO_GRE;
	if (udp) {
		fib.sport = GRE_IN_UDP_PORT_BE;
		fib.dport = GRE_IN_UDP_PORT_BE;
	}
	fib.tot_len = inner_wire + overhead;
	fib.ipv4_src = t->local;
	fib.ipv4_dst = t->remote;
	fib.ifindex = skb->ifindex;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	__u32 egress = fib.ifindex;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED && t->egress_ifindex) {
		// bpf_fib_lookup answers only for an interface that forwards, and the TUN does
		// not on a host with forwarding off: these are the host's own packets (the kernel
		// forwards nothing into the TUN then). They leave by the interface the route to the
		// remote used at start; bpf_redirect_neigh routes them out of it (an output lookup
		// bound to that interface, which needs no forwarding) and resolves the neighbour.
		if (inner_wire + overhead > t->egress_mtu)
			return pass_tx(slot, TX_TOO_BIG);
		egress = t->egress_ifindex;
	} else if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		return pass_tx(slot, TX_TOO_BIG);
	} else if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		return pass_tx(slot, TX_NO_ROUTE);
	}

	__u64 packets, bytes;
	wire_size(skb, l2, hdrs, &packets, &bytes);

	// FIXED_GSO: the kernel already sized the segments for the tunnel MTU (the route's
	// device is the TUN), so each outer segment fits the underlay as it is. GRE-in-UDP is a
	// UDP tunnel (SKB_GSO_UDP_TUNNEL) whose "inner link-layer header" is the GRE header: the
	// segmentation copies it in front of every inner segment.
	__u64 room = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	room |= udp ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2(gre_len)
		    : BPF_F_ADJ_ROOM_ENCAP_L4_GRE;
	if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, room))
		return pass_tx(slot, TX_FAILED);

	struct gre_hdr {
		__be16 flags;
		__be16 proto;
		__be32 key;
	};
	// IPv4, then GRE or UDP + GRE; `overhead` bytes of it are written.
	struct {
		struct iphdr ip;
		union {
			struct gre_hdr gre;
			struct {
				struct udphdr udp;
				struct gre_hdr gre;
			} in_udp;
		};
	} outer = {};
	outer.ip.version = 4;
	outer.ip.ihl = 5;
	// A super-packet's length is rewritten per segment by the segmentation.
	outer.ip.tot_len = __builtin_bswap16((__u16)(skb->len - l2));
	outer.ip.id = ident;
	outer.ip.frag_off = __constant_htons(IP_DF);
	outer.ip.ttl = OUTER_TTL;
	outer.ip.protocol = udp ? IPPROTO_UDP : PROTO_GRE;
	outer.ip.saddr = t->local;
	outer.ip.daddr = t->remote;
	outer.ip.check = ipv4_csum((__u16 *)&outer.ip);
	struct gre_hdr gre = {
		.flags = t->has_key ? __constant_htons(GRE_KEY) : 0,
		.proto = v6 ? ETH_P_IPV6_BE : ETH_P_IPV4_BE,
		.key = t->key,
	};
	if (udp) {
		outer.in_udp.udp.source = GRE_IN_UDP_PORT_BE;
		outer.in_udp.udp.dest = GRE_IN_UDP_PORT_BE;
		// Rewritten per segment by the segmentation, as the IP length is. The checksum
		// stays zero (allowed over IPv4, RFC 8086 section 6.1): GSO would otherwise
		// need SKB_GSO_UDP_TUNNEL_CSUM, which adjust_room does not set.
		outer.in_udp.udp.len = __builtin_bswap16((__u16)(skb->len - l2 - 20));
		outer.in_udp.gre = gre;
	} else {
		outer.gre = gre;
	}
	// The room is there now: a failure here cannot happen short of a kernel bug, and the
	// packet would then leave malformed, so it is dropped rather than passed.
	if (bpf_skb_store_bytes(skb, l2, &outer, overhead, 0))
		return TC_ACT_SHOT;
	// bpf_redirect_neigh takes an Ethernet frame (it pulls the header and builds the real
	// one for the next hop): the TUN's packet gets a placeholder. Only an allocation failure
	// fails here, and the packet is already encapsulated: dropped, and counted.
	if (l2 == 0) {
		struct ethhdr eth = {.h_proto = ETH_P_IPV4_BE};
		if (bpf_skb_change_head(skb, ETH_HLEN, 0) ||
		    bpf_skb_store_bytes(skb, 0, &eth, ETH_HLEN, 0)) {
			pass_tx(slot, TX_FAILED);
			return TC_ACT_SHOT;
		}
	} else if (v6) {
		// The frame now carries IPv4: say so in its Ethernet header too.
		__be16 proto = ETH_P_IPV4_BE;
		if (bpf_skb_store_bytes(skb, 12, &proto, 2, 0)) {
			pass_tx(slot, TX_FAILED);
			return TC_ACT_SHOT;
		}
	}

	struct gre_stats *s = stats(slot);
	if (s) {
		s->tx_packets += packets;
		s->tx_bytes += bytes;
	}
	return bpf_redirect_neigh(egress, 0, 0, 0);
}

SEC("classifier/gre_encap")
int gre_encap(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct gre_tx *t = bpf_map_lookup_elem(&gre_tx_tunnels, &ifindex);
	if (!t)
		return pass(TX_NO_TUNNEL);
	// The TUN has no link-layer header: the IP header is at offset 0.
	if (skb->protocol == ETH_P_IPV4_BE)
		return t->l2 ? encap(skb, t, ETH_HLEN, 0) : encap(skb, t, 0, 0);
	if (skb->protocol == ETH_P_IPV6_BE)
		return t->l2 ? encap(skb, t, ETH_HLEN, 1) : encap(skb, t, 0, 1);
	return pass_tx(t->slot, TX_NOT_IP);
}

// Decapsulates a GRE packet of tunnel `t` whose GRE header is `gre_len` bytes (a constant:
// 4, or 8 with the key) after the outer IPv4 header and `udp` bytes of UDP header (a
// constant: 0 for raw GRE, 8 for GRE-in-UDP), carrying IPv4 (`v6` 0) or IPv6 (`v6` 1).
INLINE int decap(struct __sk_buff *skb, struct gre_rx *t, __be32 remote, void *data,
                 void *data_end, const __u32 udp, const __u32 gre_len, const int v6)
{
	__u32 slot = t->slot;
	__u32 tun = t->tun_ifindex;
	const __u32 inner_off = ETH_HLEN + 20 + udp + gre_len;
	int syn = 0;
	__u32 hdrs;
	if (v6) {
		hdrs = plain_ipv6(data + inner_off, data_end, skb->len - inner_off, &syn);
	} else {
		struct iphdr *ip = data + inner_off;
		hdrs = plain_ipv4(ip, data_end, skb->len - inner_off, &syn);
		// A packet for the remote inside a packet from it: a keepalive probe (or a
		// forgery the core refuses to reflect). Either way the core's.
		if (hdrs && !syn && ip->daddr == remote)
			return pass_rx(slot, RX_PROBE);
	}
	if (hdrs == 0)
		return pass_rx(slot, RX_UNUSUAL);
	if (syn)
		return pass_rx(slot, RX_TCP_SYN);

	__u64 packets, bytes;
	wire_size(skb, inner_off, hdrs, &packets, &bytes);
	// FIXED_GSO: the inner segments keep their size; a super-packet is delivered whole.
	// DECAP_L3_IPV6 makes skb->protocol the inner packet's (a kernel before 6.6 refuses the
	// flag, and the packet takes the TUN path).
	if (bpf_skb_adjust_room(skb, -(__s32)(20 + udp + gre_len), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | (v6 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV6 : 0)))
		return pass_rx(slot, RX_FAILED);
	if (v6) {
		__be16 proto = ETH_P_IPV6_BE;
		// The room is gone already: a failure here is a kernel bug, and the frame would
		// go on mislabelled, so it is dropped.
		if (bpf_skb_store_bytes(skb, 12, &proto, 2, 0))
			return TC_ACT_SHOT;
	}
	struct gre_stats *s = stats(slot);
	if (s) {
		s->rx_packets += packets;
		s->rx_bytes += bytes;
	}
	return bpf_redirect(tun, BPF_F_INGRESS);
}

// The GRE header `udp` bytes (a constant: 0 or 8) after the outer IPv4 header: which
// tunnel, and whether the programs carry what it holds.
INLINE int classify(struct __sk_buff *skb, struct iphdr *outer, void *data, void *data_end,
                    const __u32 udp)
{
	__be16 *gre = (void *)(outer + 1) + udp;
	__be32 *k = (void *)(gre + 2);
	if ((void *)(gre + 2) > data_end)
		return pass(RX_NO_TUNNEL);
	__u16 flags = __builtin_bswap16(gre[0]);
	struct gre_rx_key key = {
		.remote = outer->saddr,
		.local = outer->daddr,
		.udp = udp != 0,
	};
	if (flags & GRE_KEY) {
		if ((void *)(k + 1) > data_end)
			return pass(RX_NO_TUNNEL);
		key.key = *k;
		key.has_key = 1;
	}
	__be16 proto = gre[1];
	struct gre_rx *t = bpf_map_lookup_elem(&gre_rx_tunnels, &key);
	if (!t)
		return pass(RX_NO_TUNNEL);
	if ((flags & ~GRE_KEY) != 0)
		return pass_rx(t->slot, RX_GRE_FLAGS);
	if (udp) {
		// A UDP checksum is the TUN path's kernel's to verify: taken here only when there
		// is none (zero, as this program sends) or the device verified it.
		struct udphdr *uh = (void *)(outer + 1);
		if ((void *)(uh + 1) > data_end)
			return pass_rx(t->slot, RX_UNUSUAL);
		if (uh->check != 0 && bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY) < 0)
			return pass_rx(t->slot, RX_UDP_CSUM);
	}
	if (proto == ETH_P_IPV4_BE)
		return key.has_key ? decap(skb, t, key.remote, data, data_end, udp, 8, 0)
				   : decap(skb, t, key.remote, data, data_end, udp, 4, 0);
	if (proto == ETH_P_IPV6_BE)
		return key.has_key ? decap(skb, t, key.remote, data, data_end, udp, 8, 1)
				   : decap(skb, t, key.remote, data, data_end, udp, 4, 1);
	return pass_rx(t->slot, RX_NOT_IP);
}

SEC("classifier/gre_decap")
int gre_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + PULL_LEN > data_end) {
		if (skb->len < ETH_HLEN + 20 + 4)
			return TC_ACT_OK; // too short to be GRE: not ours to count
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != ETH_P_IPV4_BE)
		return TC_ACT_OK;
	struct iphdr *outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > data_end)
		return TC_ACT_OK;
	if (outer->protocol == IPPROTO_UDP) {
		// GRE-in-UDP is UDP to port 4754; any other UDP is not ours to look at.
		struct udphdr *uh = (void *)(outer + 1);
		if (outer->ihl != 5 || (void *)(uh + 1) > data_end ||
		    uh->dest != GRE_IN_UDP_PORT_BE)
			return TC_ACT_OK;
	} else if (outer->protocol != PROTO_GRE) {
		return TC_ACT_OK;
	}
	// From here on it is GRE: anything not carried is counted as passed.
	if (outer->version != 4 || outer->ihl != 5 ||
	    (outer->frag_off & __constant_htons(0x3fff)) ||
	    __builtin_bswap16(outer->tot_len) != skb->len - ETH_HLEN)
		return pass(RX_NO_TUNNEL);
	if (outer->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(outer + 1);
		if ((void *)(uh + 1) > data_end ||
		    __builtin_bswap16(uh->len) != skb->len - ETH_HLEN - 20)
			return pass(RX_NO_TUNNEL);
		return classify(skb, outer, data, data_end, 8);
	}
	return classify(skb, outer, data, data_end, 0);
}

char _license[] SEC("license") = "Dual MIT/GPL";
