//! Linux plumbing shared by vipgate's drivers, so each driver keeps only its own domain
//! (natgw's steering rule set, gre's per-tunnel routes, vrrp's virtual addresses):
//!
//! - [`netlink`]: one rtnetlink connection, links, IPv4 addresses and routes, the kernel's
//!   route lookup, and the one [`netlink::NetlinkError`] every request fails with; the
//!   add/delete helpers are idempotent (an entry already there, or already gone, is fine),
//!   because a daemon restarted after a crash finds its own leftovers;
//! - [`tun`]: opening a TUN device (multi-queue, offload) with the fallback ladder a kernel
//!   that refuses a feature needs;
//! - [`sync`]: the poison-tolerant lock the drivers' shared state uses;
//! - [`timer`]: the deadline sleep of the drivers' timer loops.
//!
//! Linux-only, and only the drivers (`driver` feature of gre, natgw and vrrp) and the binary
//! depend on it: the sans-IO cores never see it.
#![warn(missing_docs)]

pub mod netlink;
pub mod sync;
pub mod timer;
pub mod tun;
