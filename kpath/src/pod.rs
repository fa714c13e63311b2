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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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
