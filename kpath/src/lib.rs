//! Kernel fast path of the PAT gateway: a TC eBPF program (`bpf/kpath.c`, shipped compiled as
//! `bpf/kpath.o`) that executes the NAT core's per-flow decisions, and its loader.
//!
//! The program never decides. natgw's core handles the first packets of every flow through
//! `nat0`; once a flow is established the driver installs both directions of its
//! [`Translation`](https://docs.rs/natgw) here ([`entries`] turns one into the two map
//! entries). Later packets of the flow are rewritten on the interfaces themselves and
//! redirected, its FINs included (reported in [`TcpProgress::fin_end`] for the core to
//! judge) unless the core wants them ([`Rewrite::fin_to_core`]); everything the program is not sure of (no entry, fragments, IP options, TCP
//! SYN/RST, ICMP, a FIB miss, TTL ≤ 1) passes untouched to the slow path, which stays
//! fully featured.
//!
//! Direct routing (LVS-DR): for a flow of a direct-routing service the core installs one entry
//! ([`direct_route_entry`]) at the client's first packet. The inbound program delivers the
//! client's later packets unchanged to the real server (its MAC, found by the kernel's
//! neighbour table); a third program, attached to `nat0`'s ingress
//! ([`KernelPath::attach_delivery`]), does the same for the packets the core wrote back after
//! handling them (the SYN, FIN, RST).
//!
//! Published listeners: the core states in advance which TCP static forwards' SYNs from the
//! outside it would all answer the same way ([`KernelPath::set_published`], from natgw's
//! `Gateway::published_listeners`). The inbound program executes such a SYN when no entry of
//! its flow exists and its source is not in the inside networks
//! ([`KernelPath::set_inside_networks`]): it installs both directions' entries, carries the
//! SYN and reports the flow in a bounded ring buffer ([`KernelPath::take_opened`]); a full
//! ring leaves the SYN to the slow path (counted), so every flow it opens is reported. The
//! first ACK from the client such a flow's inbound entry carries is reported in a second
//! bounded ring ([`KernelPath::take_handshakes`]), so that the core, which keeps the flow
//! half-open until it learns of that ACK, can judge it at once; a full ring loses nothing
//! but time (counted: the entry's report tells the same at the next sync round).
//!
//! One-packet UDP services (ipvsadm `-o`): the core keeps no flow for them, so it installs each
//! service's *schedule* instead ([`KernelPath::set_one_packet_schedule`]): the cycle of backend
//! endpoints its own scheduler gives, which the inbound program walks with one cursor for every CPU,
//! one slot per datagram; and each backend endpoint's VIP
//! ([`KernelPath::set_one_packet_backend`]), from which the outbound program sends that
//! endpoint's answers. Per backend endpoint the program counts what it moved
//! ([`KernelPath::one_packet_counts`]) for the core to add to its own counters.
//!
//! Invariants:
//! - Each map entry is keyed by the packet's 5-tuple as it arrives and its direction; the
//!   value is the rewrite (new source and destination endpoints) plus what the program
//!   reports back ([`FlowReport`]: last-seen time, packet and byte counters, the highest TCP
//!   sequence end and acknowledgement per direction so the core's window tracking stays true).
//! - The maps and the tcx links are pinned under `<pin root>/<site>/`; [`KernelPath::load`]
//!   adopts maps already pinned there and attaching adopts a pinned link (a restarted daemon
//!   keeps its flows, and the programs never stop forwarding them: see the loader's module
//!   docs); [`KernelPath::leave`] keeps all of it for the next run, [`KernelPath::unload`]
//!   removes the programs' links, the pins and any `clsact` qdisc it added, leaving nothing
//!   behind.
//! - The shipped object is the build of the shipped source: a test checks the recorded hash
//!   of the sources and, where clang is present, that rebuilding gives the same bytes.

mod batch;
mod gre;
mod gre_pod;
mod loader;
mod pod;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

pub use gre::{
    GRE_OBJECT, GreEgress, GrePassCounters, GrePath, GreProgram, GreTunnelEntry, GreTunnelStats,
    MAX_GRE_TUNNELS,
};
pub use loader::{AttachMode, KernelPath, LoadOptions, TestRun, ensure_bpffs};

/// The compiled program (`bpf/kpath.o`, rebuilt by `bpf/build.sh`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/kpath.o");

/// Errors of the kernel path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KpathError {
    /// The object could not be loaded (the verifier's or the kernel's answer inside).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {program}: {source}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// The loader's error.
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// The loader's error.
        source: aya::maps::MapError,
    },
    /// Reading a map's entries in batches failed.
    #[error("map {map}: batch lookup: {source}")]
    Batch {
        /// The map's name.
        map: &'static str,
        /// The system call's error.
        source: std::io::Error,
    },
    /// The object lacks a program or map this crate expects (a stale object).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// A `clsact` qdisc could not be added or removed.
    #[error("clsact qdisc on {iface}: {reason}")]
    Qdisc {
        /// The interface.
        iface: String,
        /// What failed.
        reason: String,
    },
    /// The pin directory could not be created or removed.
    #[error("pin directory {path}: {source}")]
    Pins {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tcx link could not be pinned, or a stale pin removed.
    #[error("link pin {path}: {reason}")]
    LinkPin {
        /// The pin.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// The site name cannot name a pin directory.
    #[error("site name {0:?} is not a valid pin directory name")]
    SiteName(String),
    /// A GRE tunnel slot past the maps' size.
    #[error("GRE tunnel slot {0} is not below {max}", max = gre::MAX_GRE_TUNNELS)]
    GreSlot(u32),
    /// A one-packet schedule that is empty or longer than [`MAX_ONE_PACKET_SLOTS`].
    #[error("a one-packet schedule has 1 to {max} slots, not {0}", max = MAX_ONE_PACKET_SLOTS)]
    ScheduleSize(usize),
    /// A one-packet schedule's cursor index past [`MAX_ONE_PACKET_SERVICES`].
    #[error("one-packet cursor {0} is not below {max}", max = MAX_ONE_PACKET_SERVICES)]
    OnePacketCursor(u32),
    /// The number of possible CPUs (the per-CPU counters' width) is unknown.
    #[error("reading the possible CPUs: {0}")]
    PossibleCpus(std::io::Error),
    /// More published listeners than the program's map holds ([`MAX_PUBLISHED_LISTENERS`]).
    #[error("{0} published listeners, the program holds {max}", max = MAX_PUBLISHED_LISTENERS)]
    PublishedCount(usize),
    /// More inside networks than the program's map holds ([`MAX_INSIDE_NETWORKS`]), or a
    /// prefix length past 32.
    #[error("inside networks: {0}")]
    InsideNetworks(String),
}

/// How many published listeners the program knows at once.
pub const MAX_PUBLISHED_LISTENERS: usize = pod::PUBLISHED_MAX;

/// How many inside networks the program knows (a SYN from one of them is the core's).
pub const MAX_INSIDE_NETWORKS: usize = pod::INSIDE_NETS_MAX;

/// How many opened-flow records the ring buffer holds between two reads (its 512 KiB over
/// 104 bytes a record, the ring's 8-byte header included, rounded up to 8; a flow takes two,
/// its SYN's and its SYN-ACK's): a SYN or SYN-ACK that finds it full takes the slow path.
pub const OPENED_RING_RECORDS: usize = 512 * 1024 / 104;

/// How many handshake records the ring buffer holds between two reads (its 64 KiB over 32
/// bytes a record, header and alignment included, less one: the kernel refuses the record
/// that would fill the ring exactly): a client ACK that finds it full is not reported there
/// (counted), and its flow waits for the next sync round.
pub const HANDSHAKE_RING_RECORDS: usize = 64 * 1024 / 32 - 1;

/// The first ACK from the client of a flow the program opened ([`OpenedFlow`]), which the
/// flow's inbound entry carried: the core may establish the flow now, from the entries'
/// reports. The same flow may be reported twice (two CPUs carrying its ACKs at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedHandshake {
    /// The outside client.
    pub client: SocketAddrV4,
    /// The listener's public endpoint.
    pub public: SocketAddrV4,
    /// The inside endpoint.
    pub inside: SocketAddrV4,
}

/// A listener whose SYNs the program executes: natgw's `PublishedListener` as the program
/// holds it, with the core's listener id and the driver's generation of the publication,
/// both carried back in each [`OpenedFlow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPublished {
    /// The public endpoint a SYN is addressed to.
    pub public: SocketAddrV4,
    /// The inside endpoint the SYN goes to, source address and port preserved.
    pub inside: SocketAddrV4,
    /// The core's id of the listener.
    pub listener: u32,
    /// The publication the entry belongs to, so that a record from before a withdrawal is
    /// told from one after.
    pub generation: u32,
}

/// A flow the program opened by executing a published listener's SYN: both directions'
/// entries ([`entries`] with `inside`, `public`, `client`) are in the flow map, the SYN has
/// been carried, and the core has yet to adopt the flow (or refuse it and remove them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFlow {
    /// The outside client.
    pub client: SocketAddrV4,
    /// The listener's public endpoint.
    pub public: SocketAddrV4,
    /// The inside endpoint.
    pub inside: SocketAddrV4,
    /// [`KernelPublished::listener`] of the entry the SYN matched.
    pub listener: u32,
    /// [`KernelPublished::generation`] of that entry.
    pub generation: u32,
    /// What the record reports.
    pub kind: OpenedKind,
    /// The segment's TCP header as it arrived (options included: 20 to 60 bytes), for the
    /// core to track it as if it had crossed it.
    pub tcp_header: Vec<u8>,
}

/// What a record of the ring of opened flows reports; a flow's SYN comes before its SYN-ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenedKind {
    /// The client's SYN, executed: the flow is open (its entries exist).
    Syn,
    /// The inside server's SYN-ACK of such a flow, executed (`listener` and `generation`
    /// are 0).
    SynAck,
}

/// The longest one-packet schedule (`OP_MAX_SLOTS` in the program): a cycle of up to 1024
/// picks covers rr over any realistic backend set and wrr whose weights, divided by their
/// gcd, add up to 1024 or less, in 8 KiB a service.
pub const MAX_ONE_PACKET_SLOTS: usize = pod::OP_MAX_SLOTS;

/// How many one-packet services may have a schedule at once (each has its own cursor,
/// `0..MAX_ONE_PACKET_SERVICES`).
pub const MAX_ONE_PACKET_SERVICES: u32 = 256;

/// How many backend endpoints of one-packet services the program knows at once.
pub const MAX_ONE_PACKET_BACKENDS: usize = 4096;

/// What the program moved for one backend endpoint of a one-packet service, summed over
/// CPUs since the endpoint was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnePacketCounts {
    /// Datagrams sent to the backend.
    pub in_packets: u64,
    /// Their IP bytes.
    pub in_bytes: u64,
    /// Answers sent from the VIP.
    pub out_packets: u64,
    /// Their IP bytes.
    pub out_bytes: u64,
}

/// Transport protocols the program rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP (segments without SYN or RST; a direct-routing flow's without FIN either).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// Which program sees a packet: the one on the inside interfaces (outbound) or the one on
/// the outside interface (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Arrived on an inside interface.
    Outbound,
    /// Arrived on the outside interface.
    Inbound,
}

impl Direction {
    /// The program name in the object.
    #[must_use]
    pub fn program(self) -> &'static str {
        match self {
            Direction::Outbound => "kpath_outbound",
            Direction::Inbound => "kpath_inbound",
        }
    }
}

/// A map key: a packet's 5-tuple as it arrives, and its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// Source endpoint of the arriving packet.
    pub src: SocketAddrV4,
    /// Destination endpoint of the arriving packet.
    pub dst: SocketAddrV4,
    /// Which program sees it.
    pub direction: Direction,
}

/// The rewrite of one direction of a flow: the endpoints the packet leaves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rewrite {
    /// New source endpoint.
    pub src: SocketAddrV4,
    /// New destination endpoint.
    pub dst: SocketAddrV4,
    /// Direct routing: the packet leaves unchanged, and `dst`'s address is the real server
    /// (on a directly connected network) whose MAC it is sent to.
    pub direct_route: bool,
    /// TCP: the flow's FINs take the slow path, for a core that must see its close at once
    /// (see [`fins_to_core`]); otherwise the program carries them and reports them
    /// ([`TcpProgress::fin_end`]).
    pub fin_to_core: bool,
}

/// `entries` with FINs left to the slow path (see [`Rewrite::fin_to_core`]).
#[must_use]
pub fn fins_to_core(mut entries: [(FlowKey, Rewrite); 2]) -> [(FlowKey, Rewrite); 2] {
    for (_, r) in &mut entries {
        r.fin_to_core = true;
    }
    entries
}

/// Both map entries of one translation, as the core decided it: outbound packets from
/// `inside` to `outside` leave from `public`; inbound packets from `outside` to `public` are
/// delivered to `inside`.
#[must_use]
pub fn entries(
    proto: Proto,
    inside: SocketAddrV4,
    public: SocketAddrV4,
    outside: SocketAddrV4,
) -> [(FlowKey, Rewrite); 2] {
    [
        (
            FlowKey {
                proto,
                src: inside,
                dst: outside,
                direction: Direction::Outbound,
            },
            Rewrite {
                src: public,
                dst: outside,
                direct_route: false,
                fin_to_core: false,
            },
        ),
        (
            FlowKey {
                proto,
                src: outside,
                dst: public,
                direction: Direction::Inbound,
            },
            Rewrite {
                src: outside,
                dst: inside,
                direct_route: false,
                fin_to_core: false,
            },
        ),
    ]
}

/// The one map entry of a direct-routing flow, as the core decided it: the client's packets to
/// `vip` (arriving on the outside interface, or written back to `nat0` by the core) are
/// delivered unchanged to `server`, on a directly connected network.
#[must_use]
pub fn direct_route_entry(
    proto: Proto,
    client: SocketAddrV4,
    vip: SocketAddrV4,
    server: Ipv4Addr,
) -> (FlowKey, Rewrite) {
    (
        FlowKey {
            proto,
            src: client,
            dst: vip,
            direction: Direction::Inbound,
        },
        Rewrite {
            src: client,
            dst: SocketAddrV4::new(server, vip.port()),
            direct_route: true,
            fin_to_core: false,
        },
    )
}

/// What the program reports for one direction of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowReport {
    /// CLOCK_MONOTONIC time of the last packet on the fast path (zero: none yet).
    pub last_seen: Duration,
    /// Wire packets rewritten (a GSO super-packet counts its segments).
    pub packets: u64,
    /// IP bytes rewritten.
    pub bytes: u64,
    /// TCP: the sender's progress, once a segment took the fast path.
    pub tcp: Option<TcpProgress>,
}

/// The TCP sequence space one direction covered on the fast path: what the core's window
/// tracking (conntrack's `td_end`, `td_maxend`) needs to stay true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpProgress {
    /// Highest sequence number sent plus payload length.
    pub seq_end: u32,
    /// Highest acknowledgement number sent.
    pub ack: u32,
    /// The window field of the segment carrying `ack` (unscaled).
    pub window: u16,
    /// The sequence number after the last FIN this direction sent on the fast path (its
    /// sequence number plus payload plus one), if it sent one: the core judges it and
    /// moves the flow's state as if the FIN had crossed it.
    pub fin_end: Option<u32>,
}

/// The program's global counters (summed over CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets rewritten and redirected in the kernel (GSO segments counted one by one).
    pub fast_packets: u64,
    /// IP bytes rewritten and redirected in the kernel.
    pub fast_bytes: u64,
    /// Passed to the slow path: no flow entry.
    pub slow_no_entry: u64,
    /// Passed to the slow path: not plain IPv4 TCP/UDP (IP options, fragments, ICMP, ...).
    pub slow_unparsed: u64,
    /// Passed to the slow path: TCP SYN or RST, or the FIN of a direct-routing flow.
    pub slow_tcp_flags: u64,
    /// Passed to the slow path: TTL would expire.
    pub slow_ttl: u64,
    /// Passed to the slow path: no route, or the packet would need fragmenting (or, for a
    /// direct-routing entry, the real server is not on a directly connected network).
    pub slow_fib: u64,
    /// Dropped at `nat0`: a direct-routing packet whose real server is not reachable on a
    /// directly connected network.
    pub direct_route_undeliverable: u64,
    /// One-packet datagrams scheduled to a backend in the kernel.
    pub one_packet_in: u64,
    /// One-packet answers sent from their VIP in the kernel.
    pub one_packet_out: u64,
    /// SYNs to a published listener executed in the kernel: flows the program opened.
    pub syn_opened: u64,
    /// SYNs to a published listener left to the slow path because the ring buffer of
    /// opened flows was full (userspace did not drain it in time).
    pub syn_ring_full: u64,
    /// SYNs to a published listener left to the slow path because an entry of their flow
    /// appeared between the lookup and the insert (another CPU, the driver).
    pub syn_race: u64,
    /// First client ACKs of flows the program opened, reported in the handshake ring.
    pub handshakes_reported: u64,
    /// Such ACKs left unreported because the handshake ring was full (the flow's sync round
    /// reports them).
    pub handshake_ring_full: u64,
    /// Inside servers' SYN-ACKs of flows the program opened, executed in the kernel (each
    /// reported in the ring of opened flows as [`OpenedKind::SynAck`]).
    pub syn_acks_sent: u64,
    /// Such SYN-ACKs left to the slow path because the ring was full.
    pub syn_ack_ring_full: u64,
}

fn octets(a: Ipv4Addr) -> [u8; 4] {
    a.octets()
}

fn op_endpoint(e: SocketAddrV4) -> pod::RawOpEndpoint {
    pod::RawOpEndpoint {
        addr: e.ip().octets(),
        port: e.port().to_be_bytes(),
        pad: 0,
    }
}

impl FlowKey {
    fn raw(&self) -> pod::RawFlowKey {
        pod::RawFlowKey {
            saddr: octets(*self.src.ip()),
            daddr: octets(*self.dst.ip()),
            sport: self.src.port().to_be_bytes(),
            dport: self.dst.port().to_be_bytes(),
            proto: self.proto.number(),
            dir: match self.direction {
                Direction::Outbound => 0,
                Direction::Inbound => 1,
            },
            pad: 0,
        }
    }

    fn from_raw(raw: &pod::RawFlowKey) -> Option<Self> {
        Some(FlowKey {
            proto: Proto::from_number(raw.proto)?,
            src: SocketAddrV4::new(raw.saddr.into(), u16::from_be_bytes(raw.sport)),
            dst: SocketAddrV4::new(raw.daddr.into(), u16::from_be_bytes(raw.dport)),
            direction: if raw.dir == 0 {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
        })
    }
}

impl Rewrite {
    fn raw(&self) -> pod::RawFlowValue {
        pod::RawFlowValue {
            saddr: octets(*self.src.ip()),
            daddr: octets(*self.dst.ip()),
            sport: self.src.port().to_be_bytes(),
            dport: self.dst.port().to_be_bytes(),
            flags: if self.direct_route {
                pod::FLOW_DIRECT_ROUTE
            } else {
                0
            } | if self.fin_to_core {
                pod::FLOW_FIN_TO_CORE
            } else {
                0
            },
            ..pod::RawFlowValue::default()
        }
    }

    fn from_raw(raw: &pod::RawFlowValue) -> Self {
        Rewrite {
            src: SocketAddrV4::new(raw.saddr.into(), u16::from_be_bytes(raw.sport)),
            dst: SocketAddrV4::new(raw.daddr.into(), u16::from_be_bytes(raw.dport)),
            direct_route: raw.flags & pod::FLOW_DIRECT_ROUTE != 0,
            fin_to_core: raw.flags & pod::FLOW_FIN_TO_CORE != 0,
        }
    }
}

/// What the program reported for every flow entry, read in one walk of the map
/// ([`KernelPath::reports`]).
#[derive(Debug, Default)]
pub struct FlowReports {
    entries: std::collections::HashMap<pod::RawFlowKey, pod::RawFlowValue>,
}

impl FlowReports {
    /// The report of `key`'s entry, if the map held one during the walk.
    #[must_use]
    pub fn get(&self, key: &FlowKey) -> Option<FlowReport> {
        self.entries.get(&key.raw()).map(FlowReport::from_raw)
    }

    /// How many entries the walk read.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the walk read no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FlowReport {
    fn from_raw(raw: &pod::RawFlowValue) -> Self {
        FlowReport {
            last_seen: Duration::from_nanos(raw.last_seen_ns),
            packets: raw.packets,
            bytes: raw.bytes,
            tcp: (raw.tcp_valid & pod::TCP_VALID != 0).then_some(TcpProgress {
                seq_end: raw.tcp_seq_end,
                ack: raw.tcp_ack,
                window: raw.tcp_window,
                fin_end: (raw.tcp_valid & pod::TCP_FIN != 0).then_some(raw.tcp_fin_end),
            }),
        }
    }
}
