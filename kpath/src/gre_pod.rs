//! The GRE program's map keys and values exactly as `bpf/gre.c` lays them out (`struct
//! gre_tx`, `struct gre_rx_key`, `struct gre_rx`, `struct gre_stats`), and their `Pod` impls.
//!
//! Invariant: each struct is `repr(C)`, has the C struct's size (asserted at compile time)
//! and no implicit padding, so any byte pattern is a valid value and no uninitialised byte
//! reaches the kernel.

/// `struct gre_tx`: what encapsulation needs, keyed by the TUN's ifindex.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawGreTx {
    pub(crate) local: [u8; 4],
    pub(crate) remote: [u8; 4],
    pub(crate) key: [u8; 4],
    pub(crate) has_key: u16,
    pub(crate) l2: u16,
    pub(crate) mtu: u32,
    pub(crate) slot: u32,
    pub(crate) egress_ifindex: u32,
    pub(crate) egress_mtu: u32,
    pub(crate) udp: u32,
}

/// `struct gre_rx_key`: (remote, local, key) of an arriving GRE packet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct RawGreRxKey {
    pub(crate) remote: [u8; 4],
    pub(crate) local: [u8; 4],
    pub(crate) key: [u8; 4],
    pub(crate) has_key: u16,
    pub(crate) udp: u16,
}

/// `struct gre_rx`: where a matching packet goes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawGreRx {
    pub(crate) tun_ifindex: u32,
    pub(crate) slot: u32,
}

/// `struct gre_stats`: one tunnel's counters on one CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawGreStats {
    pub(crate) tx_packets: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) rx_packets: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_passed: u64,
    pub(crate) rx_passed: u64,
}

const _: () = assert!(size_of::<RawGreTx>() == 36);
const _: () = assert!(size_of::<RawGreRxKey>() == 16);
const _: () = assert!(size_of::<RawGreRx>() == 8);
const _: () = assert!(size_of::<RawGreStats>() == 48);

// SAFETY: `repr(C)`, `Copy`, 'static, made only of integers and byte arrays laid out without
// gaps (12 bytes of arrays, two u16, five u32: 36, asserted above), so every bit pattern is
// valid and there is no padding: what `Pod` requires.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawGreTx {}

// SAFETY: as above: three 4-byte arrays and two u16, 16 bytes, no padding.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawGreRxKey {}

// SAFETY: as above: two u32, 8 bytes, no padding.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawGreRx {}

// SAFETY: as above: six u64, 48 bytes, no padding.
#[allow(unsafe_code)]
unsafe impl aya::Pod for RawGreStats {}
