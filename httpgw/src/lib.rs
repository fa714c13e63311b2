//! An HTTP/1.1 and HTTP/2 (over TLS, chosen by ALPN) reverse proxy for vipgate: routing rules on host, path, method and headers,
//! forwarding to pools balanced by the `balance` crate's schedulers, redirects and prefix
//! stripping, request hygiene (ambiguous framing refused, hop-by-hop fields stripped,
//! `X-Forwarded-*` set), TLS termination with the certificate picked by SNI, and protocol
//! switches (WebSocket) passed through as tunnels.
//!
//! ```text
//!   pure (no I/O, always built)                 driver (feature "driver": tokio + hyper)
//!   framing   raw bytes ─► HeadGuard ─────────►  client socket read through the guard;
//!             (CL+TE, bad chunking: refused)       refused head answered 400/431, closed
//!   hygiene   head checks, X-Forwarded-*  ◄────  hyper parses the head
//!   route     first matching rule         ◄────  Gateway::decide per request
//!   gateway   pools (balance), counters  ─────►  pooled upstream client (hyper-util),
//!             Verdict::{Forward, Respond}        limits (413, 431, 503, 502, 504);
//!                                                a 101 to an upgrade: splice both ways
//!   sni       name → certificate index   ◄────  tls: rustls handshake (timeout, counted)
//! ```
//!
//! A TLS client that chooses `h2` by ALPN is served by hyper's HTTP/2 server instead; its
//! requests take the same path from `Gateway::decide` on (to HTTP/1.1 backends), after
//! `hygiene::check_h2_head` holds their heads to the bounds the framing guard puts on
//! HTTP/1.1 ones. Streams per connection, the header list size and reset streams are bounded
//! (`Limits::max_streams`, [`ResetBudget`]: rapid reset is answered with `GOAWAY`).
//!
//! The modules at the top are pure: they parse, decide and count, never open a socket, read a
//! clock or spawn, and build with `--no-default-features` (that is how the CLI's config
//! lowering and the fuzz target use them). HTTP itself is parsed by `httparse` and hyper;
//! nothing here parses HTTP by hand.
#![warn(missing_docs)]

mod error;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
mod gateway;
pub mod health;
pub mod hygiene;
pub mod latency;
pub mod route;
pub mod sni;

#[cfg(feature = "driver")]
mod driver;

pub use error::{CommandError, ConfigError};
pub use gateway::{
    Alpn, Answer, AttemptFailure, BackendStatus, CertFiles, Changes, CookieMode, CookiePrefix,
    Gateway, GatewayConfig, GatewayStatus, Handshake, Limits, Outcome, PoolSpec, PoolStatus,
    Reload, ResetBudget, Retried, RouteStatus, StatusClasses, StickyCookie, TlsConfig, TlsSession,
    TlsStatus, Upstream, Verdict, client_closed,
};

#[cfg(feature = "driver")]
pub use driver::{HttpGateway, LiveReload, StartError, tls};

#[cfg(test)]
mod tests;
