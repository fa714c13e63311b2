//! Helpers shared by vipgate's crates.
//!
//! Without features the crate does no I/O and allocates nothing; it only does arithmetic on
//! byte slices the caller owns, which is what the sans-IO cores use:
//!
//! - [`checksum`]: the RFC 1071 one's-complement sum and the RFC 1624 incremental update
//!   that NAT rewrites and MSS clamping use instead of recomputing whole checksums;
//! - [`mss`]: finding and lowering the MSS option of a TCP SYN in place;
//! - [`drop_reasons!`] and [`DropCounters`]: a closed enum of drop reasons with one counter
//!   each, indexed by discriminant (serialisable as a map with the feature `serde`);
//! - [`Reconfigured`]: the outcome every core's and driver's `reconfigure` returns;
//! - `serde_ms` (feature `serde`): `Duration` status fields as whole milliseconds;
//! - `task` (feature `tasks`, the one part that needs tokio): a watch over a driver's
//!   long-lived tasks, so one that dies is noticed and its part restarted.
#![warn(missing_docs)]

pub mod checksum;
mod drop_reasons;
pub mod mss;
mod reconfigured;
#[cfg(feature = "serde")]
pub mod serde_ms;
#[cfg(feature = "tasks")]
pub mod task;

pub use drop_reasons::{DropCounters, Reason};
pub use reconfigured::Reconfigured;
