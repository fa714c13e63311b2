//! GRE site-to-site tunnels in userspace: RFC 2784 with RFC 2890 keys and sequence numbers,
//! GRE-in-UDP (RFC 8086), and Cisco-compatible keepalives.
//!
//! ```text
//!  LAN -> kernel route -> TUN gre-NAME --read--> Tunnel::encapsulate --> raw IP proto 47
//!                                                (MSS clamp, ICMP          or UDP 4754
//!                                                 frag-needed, key/seq)       |
//!  LAN <- kernel route <- TUN gre-NAME <-write-- Tunnel::decapsulate <-- from the peer
//!                                                (source, key, sequence,
//!                                                 keepalive reflect/reply)
//! ```
//!
//! The core ([`wire`], [`Tunnel`] with its [`Demux`], [`GreKeepalive`]) is sans-IO: bytes,
//! `Instant`s (always the first argument) and configuration in; byte ranges of the caller's
//! buffer, events and deadlines out. The `driver` feature adds `driver::GreDriver`: the TUN
//! devices, the underlay sockets, receive coalescing (GRO) and rtnetlink route handling.
//!
//! What this crate does NOT do: outer IPv6, RFC 1701 routing/source-route fields,
//! transparent Ethernet bridging (0x6558, `gretap`), encryption or authentication (GRE
//! keys and sequence numbers are not security, RFC 2890 §3), multipoint GRE (one remote
//! per tunnel), and reorder buffering of sequenced packets (gapped packets are delivered
//! at once, late ones dropped).
#![warn(missing_docs)]

mod gro;
mod keepalive;
mod tunnel;
pub mod wire;

#[cfg(feature = "driver")]
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;

pub use keepalive::{GRE_IN_UDP_PORT, GreKeepalive, KeepaliveConfig, KeepaliveTick};
pub use tunnel::{
    Counters, Demux, DropReason, Encap, HEADROOM, PROBE_BUF_LEN, REFLECT_BURST, REFLECT_RATE,
    Tunnel, TunnelConfig, TunnelEvent, Underlay, Verdict,
};
pub use wire::{GrePacket, GreRepr, WireError};
