//! VRRPv3 (RFC 5798) for IPv4, interoperable with keepalived: a sans-IO codec and state
//! machine, plus (behind the default `driver` feature) a tokio driver with a raw IP protocol
//! 112 socket, rtnetlink address management and gratuitous ARP.
//!
//! What this crate does **not** do: VRRP for IPv6, VRRPv2 or its authentication, virtual MAC
//! addresses (`use_vmac`: the interface's own MAC is used, as keepalived does by default),
//! accept mode, or running health checks (the caller reports service health).
//!
//! ```text
//!  raw socket ──bytes──> wire::parse_ipv4 ──ReceivedAdvert──> SyncGroup / VrrpInstance
//!  timers ───now──────────────────────────handle_timeout────>        │
//!  tracking ──fault / penalty────────────────────────────────>        │
//!                         Action::{SendAdvert, Transition, AddAddresses,
//!          driver <────── RemoveAddresses, GratuitousArp} + poll_timeout()
//! ```
//!
//! ```text
//!            startup (priority 255)
//!  Initialize ───────────────────────────> Master <──┐ master down timer / preempt
//!      │ startup                           │  ▲      │
//!      └──────────────> Backup ────────────┘  │      │
//!                         ▲  higher priority advert  │
//!                         └──────────────────────────┘
//!  any ── tracked fault ──> Fault ── recovered ──> Backup;  shutdown ──> Initialize
//! ```
#![warn(missing_docs)]

pub mod arp;
pub mod error;
pub mod instance;
pub mod sync_group;
pub mod track;
pub mod wire;

#[cfg(feature = "driver")]
pub mod driver;

pub use error::{ReconfigureError, WireError};
pub use instance::{
    Action, Counters, DropReason, InstanceConfig, Reason, ReceivedAdvert, State, Transition,
    VirtualAddress, VrrpInstance,
};
pub use sync_group::SyncGroup;
pub use track::Tracker;
pub use wire::{VrrpPacket, VrrpRepr};

/// Entry points for the cargo-fuzz targets and the corpus replay test.
#[doc(hidden)]
pub mod fuzzing {
    use crate::wire::{VrrpPacket, VrrpRepr, parse_ipv4};

    /// Parses `data` as an IPv4 packet carrying an advert; whatever parses must emit an advert
    /// that parses back to the same meaning. Never panics on any input.
    pub fn check_advert(data: &[u8]) {
        let Ok((env, repr)) = parse_ipv4(data) else {
            return;
        };
        let bytes = repr.to_bytes(env.src, env.dst);
        let again =
            VrrpPacket::new_checked(&bytes[..]).and_then(|p| VrrpRepr::parse(&p, env.src, env.dst));
        assert_eq!(again, Ok(repr), "emit/parse round trip");
    }
}
