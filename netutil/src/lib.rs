//! Pure packet helpers shared by vipgate's protocol cores.
//!
//! This crate does no I/O and allocates nothing; it only does arithmetic on byte slices
//! the caller owns:
//!
//! - [`checksum`]: the RFC 1071 one's-complement sum and the RFC 1624 incremental update
//!   that NAT rewrites and MSS clamping use instead of recomputing whole checksums;
//! - [`mss`]: finding and lowering the MSS option of a TCP SYN in place.
#![warn(missing_docs)]

pub mod checksum;
pub mod mss;
