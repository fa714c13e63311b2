//! Backend selection for load-balanced virtual services: the schedulers of LVS (`rr`, `wrr`,
//! `lc`, `wlc`, `sh`, `mh`), persistence, draining and the sorry server.
//!
//! This crate is pure: it does no I/O, reads no clock (every call that needs time takes
//! `now`), spawns nothing and does not know about packets. It does **not** rewrite or track
//! flows (natgw's flow table pins a flow to the backend picked here), run health checks
//! (natgw's checker reports verdicts through [`Pool::set_health`]) or parse configuration.
//! IPv4 only, like the gateway it serves.
//!
//! ```text
//!  new flow ─► Pool::schedule(now, client)
//!                 │ persistence template for client/netmask → eligible backend? ─► it
//!                 │ else scheduler (rr | wrr | lc | wlc | sh | mh) over eligible backends
//!                 │ else sorry server, else refuse
//!                 ▼
//!              Decision::{Backend{id, addr}, Sorry(addr), Refuse}
//!  flow events ─► established(..) / transition(..) / closed(..)  (feed lc / wlc, hold templates)
//!  operator    ─► set_weight(addr, w) (0 = drain), set_health(id, up/down), reconfigure(cfg)
//! ```
//!
//! A backend is *eligible* for new flows when it is healthy, has a weight above 0 and is still
//! configured. Existing flows are never moved: that is the flow table's job, and why draining
//! works.
//!
//! ```
//! use std::net::SocketAddrV4;
//! use balance::{BackendConfig, Decision, Pool, PoolConfig, SchedulerKind};
//! # fn now() -> std::time::Instant { std::time::Instant::now() }
//!
//! let backend = |ip: [u8; 4], weight| BackendConfig { addr: SocketAddrV4::new(ip.into(), 80), weight };
//! let mut pool = Pool::new(PoolConfig {
//!     scheduler: SchedulerKind::Wrr,
//!     backends: vec![backend([10, 0, 0, 101], 5), backend([10, 0, 0, 102], 1)],
//!     ..PoolConfig::default()
//! })?;
//! let client = SocketAddrV4::new([198, 51, 100, 200].into(), 40_000);
//! let Decision::Backend { addr, .. } = pool.schedule(now(), client) else { unreachable!() };
//! assert_eq!(addr.ip().octets(), [10, 0, 0, 101]);
//! # Ok::<(), balance::PoolError>(())
//! ```
#![warn(missing_docs)]

mod backend;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod hash;
mod lc;
pub mod mh;
mod persist;
mod pool;
mod rr;
mod sh;
mod wrr;

pub use backend::{Backend, BackendId, BackendState, BackendStats, ConnState, Health};
pub use error::PoolError;
pub use persist::{MAX_TEMPLATES, Persistence};
pub use pool::{
    BackendConfig, Decision, Direction, MAX_BACKENDS, MAX_WEIGHT, Pool, PoolConfig, PoolStats,
    SchedulerKind, UnknownScheduler,
};

#[cfg(test)]
mod tests;
