//! The map key and value exactly as `bpf/kpath.c` lays them out (`struct flow_key`,
//! `struct flow_value`), and their `Pod` impls: the one place of this crate with `unsafe`.
//!
//! Invariant: each struct is `repr(C)`, has the C struct's size (asserted at compile time)
//! and no implicit padding (every gap is an explicit field), so any byte pattern is a valid
//! value and no uninitialised byte reaches the kernel.

/// `flow_value.flags`: deliver unchanged to the real server in `daddr` (`FLOW_DIRECT_ROUTE`).
pub(crate) const FLOW_DIRECT_ROUTE: u32 = 1;
/// `flow_value.flags`: the flow's FINs take the slow path (`FLOW_FIN_TO_CORE`).
pub(crate) const FLOW_FIN_TO_CORE: u32 = 2;
/// `flow_value.tcp_valid`: the sequence fields hold a segment (`TCP_VALID`).
pub(crate) const TCP_VALID: u16 = 1;
/// `flow_value.tcp_valid`: `tcp_fin_end` holds a FIN (`TCP_FIN`).
pub(crate) const TCP_FIN: u16 = 2;

/// `struct flow_key`: the packet's 5-tuple (network byte order, as in the packet) and the
/// direction of the program that saw it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawFlowKey {
    pub(crate) saddr: [u8; 4],
    pub(crate) daddr: [u8; 4],
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
    pub(crate) proto: u8,
    pub(crate) dir: u8,
    pub(crate) pad: u16,
}

/// `struct flow_value`: the rewrite (written by userspace) and what the program reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawFlowValue {
    pub(crate) saddr: [u8; 4],
    pub(crate) daddr: [u8; 4],
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
    pub(crate) flags: u32,
    pub(crate) last_seen_ns: u64,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) tcp_seq_end: u32,
    pub(crate) tcp_ack: u32,
    pub(crate) tcp_window: u16,
    pub(crate) tcp_valid: u16,
    pub(crate) tcp_fin_end: u32,
}

/// The key's 16 bytes as two words, two writes to the hasher. Derived, it would be a length
/// and the bytes for each array field, a write per integer field: eleven writes, and the sync
/// round hashes every entry of the flow map each time (`FlowReports`), which made hashing a
/// fifth of the daemon's time at 10,000 new connections/s. Every field is in a word, so keys
/// equal by `Eq` hash alike.
impl std::hash::Hash for RawFlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [s0, s1, s2, s3] = self.saddr;
        let [d0, d1, d2, d3] = self.daddr;
        let [sp0, sp1] = self.sport;
        let [dp0, dp1] = self.dport;
        let [p0, p1] = self.pad.to_ne_bytes();
        state.write_u64(u64::from_ne_bytes([s0, s1, s2, s3, d0, d1, d2, d3]));
        state.write_u64(u64::from_ne_bytes([
            sp0, sp1, dp0, dp1, self.proto, self.dir, p0, p1,
        ]));
    }
}

const _: () = assert!(size_of::<RawFlowKey>() == 16);
const _: () = assert!(size_of::<RawFlowValue>() == 56);

// SAFETY: `RawFlowKey` is `repr(C)`, `Copy`, 'static, made only of integers and byte arrays
// whose sizes add up to the struct's size (asserted above), so it has no padding and every
// bit pattern is valid: exactly what `Pod` requires.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawFlowKey {}

// SAFETY: as for `RawFlowKey`: `repr(C)`, integers and byte arrays only, fields laid out
// without gaps (the 8-byte fields start at offset 16; the trailing `tcp_fin_end` makes the size a
// multiple of 8, asserted above).
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawFlowValue {}

/// `OP_MAX_SLOTS`: the longest one-packet schedule.
pub(crate) const OP_MAX_SLOTS: usize = 1024;

/// `struct op_endpoint`: a UDP endpoint (a VIP or a backend), network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct RawOpEndpoint {
    pub(crate) addr: [u8; 4],
    pub(crate) port: [u8; 2],
    pub(crate) pad: u16,
}

/// `struct op_schedule`: a one-packet service's cycle of backend endpoints.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawOpSchedule {
    pub(crate) nslots: u32,
    pub(crate) cursor: u32,
    pub(crate) slots: [RawOpEndpoint; OP_MAX_SLOTS],
}

/// `struct op_counts`: what the program moved for one backend endpoint (one CPU's share).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawOpCounts {
    pub(crate) in_packets: u64,
    pub(crate) in_bytes: u64,
    pub(crate) out_packets: u64,
    pub(crate) out_bytes: u64,
}

const _: () = assert!(size_of::<RawOpEndpoint>() == 8);
const _: () = assert!(size_of::<RawOpSchedule>() == 8 + 8 * OP_MAX_SLOTS);
const _: () = assert!(size_of::<RawOpCounts>() == 32);

// SAFETY: `repr(C)`, byte arrays and one u16 adding up to the asserted size: no padding, every
// bit pattern valid.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawOpEndpoint {}

// SAFETY: `repr(C)`, two u32 then an array of 8-byte, 4-aligned `RawOpEndpoint`s: no padding
// (size asserted above), every bit pattern valid.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawOpSchedule {}

// SAFETY: `repr(C)`, four u64: no padding, every bit pattern valid.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawOpCounts {}

/// `PUBLISHED_MAX`: how many published listeners the program knows at once.
pub(crate) const PUBLISHED_MAX: usize = 1024;
/// `INSIDE_NETS_MAX`: how many inside networks the program knows.
pub(crate) const INSIDE_NETS_MAX: usize = 256;

/// `struct published_key`: a published listener's public endpoint, network byte order; the
/// same layout as `struct op_endpoint`.
pub(crate) type RawPublishedKey = RawOpEndpoint;

/// `struct published`: where a published listener's SYNs go, and whose decision it is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawPublished {
    pub(crate) inside_addr: [u8; 4],
    pub(crate) inside_port: [u8; 2],
    pub(crate) pad: u16,
    pub(crate) listener: u32,
    pub(crate) generation: u32,
}

/// `TCP_HDR_MAX`: the longest TCP header, options included.
pub(crate) const TCP_HDR_MAX: usize = 60;

/// `struct opened`: one flow the program opened or its SYN-ACK, as the ring buffer carries it
/// (92 bytes),
/// decoded from the record's bytes rather than cast (a ring item has no alignment promise
/// to Rust).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawOpened {
    pub(crate) client_addr: [u8; 4],
    pub(crate) public_addr: [u8; 4],
    pub(crate) inside_addr: [u8; 4],
    pub(crate) client_port: [u8; 2],
    pub(crate) public_port: [u8; 2],
    pub(crate) inside_port: [u8; 2],
    pub(crate) tcp_len: u16,
    pub(crate) listener: u32,
    pub(crate) generation: u32,
    pub(crate) kind: u32,
    pub(crate) tcp: [u8; TCP_HDR_MAX],
}

/// The size of `struct opened`.
pub(crate) const OPENED_SIZE: usize = 32 + TCP_HDR_MAX;
/// `struct opened.kind`: a SYN executed (`OPENED_SYN`).
pub(crate) const OPENED_SYN: u32 = 0;
/// `struct opened.kind`: the SYN-ACK of such a flow executed (`OPENED_SYN_ACK`).
pub(crate) const OPENED_SYN_ACK: u32 = 1;

/// `struct handshake`: a client ACK of a flow the program opened, as its ring buffer
/// carries it (20 bytes), decoded from the record's bytes like [`RawOpened`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawHandshake {
    pub(crate) client_addr: [u8; 4],
    pub(crate) public_addr: [u8; 4],
    pub(crate) inside_addr: [u8; 4],
    pub(crate) client_port: [u8; 2],
    pub(crate) public_port: [u8; 2],
    pub(crate) inside_port: [u8; 2],
}

/// The size of `struct handshake`.
pub(crate) const HANDSHAKE_SIZE: usize = 20;

const _: () = assert!(size_of::<RawPublished>() == 16);

// SAFETY: `repr(C)`, byte arrays, a u16 and two u32 laid out without gaps (size asserted
// above): no padding, every bit pattern valid.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawPublished {}

impl RawHandshake {
    /// The record in `bytes` (a ring buffer item), if it has the record's size.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; HANDSHAKE_SIZE] = bytes.try_into().ok()?;
        let four = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let two = |i: usize| [b[i], b[i + 1]];
        Some(RawHandshake {
            client_addr: four(0),
            public_addr: four(4),
            inside_addr: four(8),
            client_port: two(12),
            public_port: two(14),
            inside_port: two(16),
        })
    }
}

impl RawOpened {
    /// The record in `bytes` (a ring buffer item), if it has the record's size.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; OPENED_SIZE] = bytes.try_into().ok()?;
        let four = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let two = |i: usize| [b[i], b[i + 1]];
        let mut tcp = [0; TCP_HDR_MAX];
        tcp.copy_from_slice(&b[32..]);
        Some(RawOpened {
            client_addr: four(0),
            public_addr: four(4),
            inside_addr: four(8),
            client_port: two(12),
            public_port: two(14),
            inside_port: two(16),
            tcp_len: u16::from_ne_bytes(two(18)),
            listener: u32::from_ne_bytes(four(20)),
            generation: u32::from_ne_bytes(four(24)),
            kind: u32::from_ne_bytes(four(28)),
            tcp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RawFlowKey;
    use std::hash::{BuildHasher as _, RandomState};

    #[test]
    fn every_field_of_a_flow_key_moves_its_hash() {
        let hasher = RandomState::new();
        let key = RawFlowKey {
            saddr: [192, 168, 101, 10],
            daddr: [198, 51, 100, 200],
            sport: [0x9c, 0x40],
            dport: [0, 80],
            proto: 6,
            dir: 0,
            pad: 0,
        };
        assert_eq!(hasher.hash_one(key), hasher.hash_one(key));
        let changed = [
            RawFlowKey {
                saddr: [192, 168, 101, 11],
                ..key
            },
            RawFlowKey {
                daddr: [198, 51, 100, 201],
                ..key
            },
            RawFlowKey {
                sport: [0x9c, 0x41],
                ..key
            },
            RawFlowKey {
                dport: [0, 81],
                ..key
            },
            RawFlowKey { proto: 17, ..key },
            RawFlowKey { dir: 1, ..key },
            RawFlowKey { pad: 1, ..key },
        ];
        for other in changed {
            assert_ne!(hasher.hash_one(key), hasher.hash_one(other), "{other:?}");
        }
    }
}
