//! Typed errors of the configuration the gateway is built from, and of the operator's
//! commands to a running one.

/// An operator command the gateway cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// No pool of that name.
    #[error("no pool `{0}`")]
    UnknownPool(String),
    /// The pool refused (no such backend).
    #[error("pool `{pool}`: {source}")]
    Pool {
        /// Pool name.
        pool: String,
        /// Why.
        source: balance::PoolError,
    },
}

/// A gateway configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A host pattern that is neither a host name nor `*.suffix`.
    #[error("bad host pattern {0:?} (expected a host name or *.suffix)")]
    BadHostPattern(String),
    /// A path that does not start with `/` or holds a space or control character.
    #[error("bad path {0:?} (must start with / and hold no space or control character)")]
    BadPath(String),
    /// A path regex that does not parse, is too long or compiles too large.
    #[error("bad path regex {pattern:?}: {why}")]
    BadPathRegex {
        /// The pattern (its first 64 characters).
        pattern: String,
        /// What is wrong.
        why: String,
    },
    /// A header name that is not a valid token.
    #[error("bad header name {0:?}")]
    BadHeaderName(String),
    /// A sticky cookie name that is not a token of at most 64 characters.
    #[error("bad cookie name {0:?} (1 to 64 token characters: letters, digits, !#$%&'*+-.^_`|~)")]
    BadCookieName(String),
    /// `nocache` asked of a prefix-mode cookie, which the proxy never sets itself.
    #[error(
        "cookie {0:?} in prefix mode: nocache applies to insert mode only (the application sets its cookie)"
    )]
    NocacheWithPrefix(String),
    /// A header rule naming a field the proxy manages.
    #[error(
        "{0:?} cannot be set, added or deleted by a rule (hop-by-hop, Upgrade, Host and Content-Length are the proxy's)"
    )]
    ReservedHeader(String),
    /// A header rule value that is too long or holds a control or non-ASCII character.
    #[error("bad header value {0:?} (at most 4096 bytes of visible ASCII, spaces and tabs)")]
    BadHeaderValue(String),
    /// A redirect status that is not a redirect.
    #[error("redirect status {0} is not one of 301, 302, 303, 307, 308")]
    BadRedirectStatus(u16),
    /// A redirect target that cannot be a `Location` header.
    #[error("bad redirect target {0:?} (empty, or holds a space or control character)")]
    BadLocation(String),
    /// A pool's health check or ejection settings that the gateway cannot run.
    #[error("pool `{pool}`: {why}")]
    BadHealth {
        /// Pool name.
        pool: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A route names a pool index that does not exist.
    #[error("route {route:?} forwards to pool #{pool}, which does not exist")]
    NoSuchPool {
        /// Route name.
        route: String,
        /// Pool index.
        pool: usize,
    },
    /// An empty ALPN list, or one naming a protocol twice.
    #[error("the ALPN list must name h2 and/or http/1.1, each once")]
    BadAlpn,
    /// Two pools share a name.
    #[error("pool {0:?} is defined twice")]
    DuplicatePool(String),
    /// A limit outside what the gateway can enforce.
    #[error("{what} must be between {min} and {max}, not {value}")]
    LimitOutOfRange {
        /// Which limit.
        what: &'static str,
        /// Given value.
        value: u64,
        /// Lowest accepted.
        min: u64,
        /// Highest accepted.
        max: u64,
    },
    /// The balance crate refused a pool.
    #[error("pool {pool:?}: {source}")]
    Pool {
        /// Pool name.
        pool: String,
        /// Why.
        source: balance::PoolError,
    },
}
