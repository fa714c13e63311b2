//! Helpers shared by vipgate's crates.
//!
//! Without features the crate does no I/O and allocates nothing; it only does arithmetic on
//! byte slices the caller owns, which is what the sans-IO cores use:
//!
//! - [`checksum`]: the RFC 1071 one's-complement sum and the RFC 1624 incremental update
//!   that NAT rewrites and MSS clamping use instead of recomputing whole checksums;
//! - [`mss`]: finding and lowering the MSS option of a TCP SYN in place;
//! - [`Reconfigured`]: the outcome every core's and driver's `reconfigure` returns;
//! - `task` (feature `tasks`, the one part that needs tokio): a watch over a driver's
//!   long-lived tasks, so one that dies is noticed and its part restarted.
#![warn(missing_docs)]

pub mod checksum;
pub mod mss;
mod reconfigured;
#[cfg(feature = "tasks")]
pub mod task;

pub use reconfigured::Reconfigured;
