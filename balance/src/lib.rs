//! Backend selection for load-balanced virtual services: the fourteen schedulers of LVS (`rr`,
//! `wrr`, `lc`, `wlc`, `lblc`, `lblcr`, `dh`, `sh`, `sed`, `nq`, `fo`, `ovf`, `mh`, `twos`),
//! persistence, connection thresholds, slow start, draining and the sorry server.
//!
//! This crate is pure: it does no I/O, reads no clock (every call that needs time takes
//! `now`), spawns nothing and does not know about packets. It does **not** rewrite or track
//! flows (natgw's flow table pins a flow to the backend picked here), run health checks
//! (natgw's checker reports verdicts through [`Pool::set_health`]) or parse configuration.
//! IPv4 only, like the gateway it serves.
//!
//! ```text
//!  new flow ─► Pool::schedule(now, client, dest)
//!                 │ service at max_connections? ─► sorry server, else refuse
//!                 │ persistence template for client/netmask → available backend? ─► it
//!                 │ else scheduler over available backends (effective weights)
//!                 │ else sorry server, else refuse
//!                 ▼
//!              Decision::{Backend{id, addr}, Sorry(addr), Refuse}
//!  flow events ─► established(..) / transition(..) / closed(..)  (feed lc / wlc, hold templates)
//!  operator    ─► set_weight(addr, w) (0 = drain), set_weights(..) (canary_weights: a share),
//!                 set_health(id, up/down), reconfigure(cfg)
//!  flow sync   ─► set_sync_journal(on), take_template_changes(now), export_templates(now)
//!                 (master); install_template(now, image) (a backup that became master)
//!                 take_locality_changes(now), export_locality(now) (master);
//!                 install_locality(now, image) (a backup, as the entries arrive)
//! ```
//!
//! A backend is *eligible* for new flows when it is healthy, has a weight above 0 and is still
//! configured, and *available* when it is also not overloaded: it reached its upper connection
//! threshold (`max_connections`) and has not yet dropped under the lower one. Existing flows are
//! never moved: that is the flow table's job, and why draining works.
//!
//! Slow start: a backend coming up after the pool was built (health recovered, weight raised
//! from 0, added by reconfigure) has an *effective weight* that ramps linearly from 1 to its
//! weight over `slow_start`, timed from the next call that passes `now`. Schedulers that weigh
//! at each decision (`wrr`, `wlc`, `lblc`, `lblcr`, `sed`, `nq`, `fo`, `ovf`, `twos`) use it;
//! `rr` and `lc` ignore weights and the hash tables (`dh`, `sh`, `mh`) are built from the
//! configured weights, so that a ramp does not reshuffle clients.
//!
//! ```
//! use std::net::SocketAddrV4;
//! use balance::{BackendConfig, Decision, Pool, PoolConfig, SchedulerKind};
//! # fn now() -> std::time::Instant { std::time::Instant::now() }
//!
//! let backend = |ip: [u8; 4], weight| BackendConfig::new(SocketAddrV4::new(ip.into(), 80), weight);
//! let mut pool = Pool::new(PoolConfig {
//!     scheduler: SchedulerKind::Wrr,
//!     backends: vec![backend([10, 0, 0, 101], 5), backend([10, 0, 0, 102], 1)],
//!     ..PoolConfig::default()
//! })?;
//! let client = SocketAddrV4::new([198, 51, 100, 200].into(), 40_000);
//! let vip = [198, 51, 100, 10].into();
//! let Decision::Backend { addr, .. } = pool.schedule(now(), client, vip) else { unreachable!() };
//! assert_eq!(addr.ip().octets(), [10, 0, 0, 101]);
//! # Ok::<(), balance::PoolError>(())
//! ```
#![warn(missing_docs)]

mod backend;
mod canary;
mod dh;
mod error;
mod expected;
mod failover;
#[doc(hidden)]
pub mod fuzzing;
mod hash;
mod lc;
mod locality;
pub mod mh;
mod persist;
mod pool;
mod rr;
mod sh;
mod twos;
mod wrr;

pub use backend::{AdminState, Backend, BackendId, BackendState, BackendStats, ConnState, Health};
pub use canary::{CanaryError, CanaryWeights, canary_weights};
pub use error::PoolError;
pub use locality::{
    LOCALITY_EXPIRY, LOCALITY_RECLAIM_IDLE, LocalityImage, LocalityRefused, MAX_LOCALITY_ENTRIES,
};
pub use persist::{MAX_TEMPLATES, Persistence, TemplateChange, TemplateImage, TemplateRefused};
pub use pool::{
    BackendConfig, Decision, Direction, MAX_BACKENDS, MAX_WEIGHT, Pool, PoolConfig, PoolStats,
    SchedulerKind, UnknownScheduler,
};

#[cfg(test)]
mod tests;
