//! Errors of pool construction and operator changes.
//!
//! Picking a backend never fails with an error: "nobody can take this flow" is an ordinary
//! outcome ([`Decision::Refuse`](crate::Decision::Refuse)), not an error.

use std::net::SocketAddrV4;

/// Why a pool configuration or an operator change was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The same backend address is listed twice in one pool.
    #[error("backend {0} is listed twice")]
    DuplicateBackend(SocketAddrV4),
    /// More backends (live plus removed ones still holding connections) than a pool can index.
    #[error("too many backends (at most {max})")]
    TooManyBackends {
        /// The limit.
        max: usize,
    },
    /// A weight above [`MAX_WEIGHT`](crate::MAX_WEIGHT) (ipvsadm's range is 0..=65535).
    #[error("weight {0} is out of range (0..=65535)")]
    WeightOutOfRange(u32),
    /// A persistence netmask longer than 32 bits.
    #[error("persistence netmask /{0} is longer than /32")]
    BadNetmask(u8),
    /// A persistence timeout of zero (leave persistence off instead).
    #[error("persistence timeout must be longer than zero")]
    ZeroPersistence,
    /// No backend with this address (or id) is in the pool.
    #[error("no backend {0} in this pool")]
    UnknownBackend(SocketAddrV4),
    /// A lower connection threshold without an upper one, or above it.
    #[error(
        "backend {backend}: min_connections {min} needs a max_connections at least as large (got {max})"
    )]
    BadThresholds {
        /// The backend.
        backend: SocketAddrV4,
        /// Its lower threshold.
        min: u32,
        /// Its upper threshold (0: none).
        max: u32,
    },
    /// A Maglev table size that is not a prime of at least 7 (every skip must be coprime with it).
    #[error("maglev table size {0} is not a prime >= 7")]
    BadTableSize(u32),
}
