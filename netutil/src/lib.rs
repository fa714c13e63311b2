//! Helpers shared by vipgate's crates.
//!
//! Without features the crate does no I/O and allocates nothing; it only does arithmetic on
//! byte slices the caller owns, which is what the sans-IO cores use:
//!
//! - [`bytes`]: big-endian 16-bit words at byte offsets;
//! - [`checksum`]: the RFC 1071 one's-complement sum and the RFC 1624 incremental update
//!   that NAT rewrites and MSS clamping use instead of recomputing whole checksums;
//! - [`ipv4`]: a read/write view of an IPv4 header whose setters keep its checksum right;
//! - [`mss`]: finding and lowering the MSS option of a TCP SYN in place;
//! - [`drop_reasons!`] and [`DropCounters`]: a closed enum of drop reasons with one counter
//!   each, indexed by discriminant (serialisable as a map with the feature `serde`);
//! - [`vnet`]: the virtio-net header in front of every packet on a TUN with offload;
//! - [`Reconfigured`]: the outcome every core's and driver's `reconfigure` returns;
//! - `serde_ms` (feature `serde`): `Duration` status fields as whole milliseconds;
//! - `task` (feature `tasks`, the one part that needs tokio): a watch over a driver's
//!   long-lived tasks, so one that dies is noticed and its part restarted.
#![warn(missing_docs)]

pub mod bytes;
pub mod checksum;
mod drop_reasons;
pub mod ipv4;
pub mod mss;
mod reconfigured;
#[cfg(feature = "serde")]
pub mod serde_ms;
#[cfg(feature = "tasks")]
pub mod task;
pub mod vnet;

pub use drop_reasons::{DropCounters, Reason};
pub use reconfigured::Reconfigured;
