//! The tokio + russh driver (feature `driver`): the forwarding client ([`SshClient`]) and
//! the forwarding-only server ([`SshServer`]).
//!
//! ```text
//!  certs.rs    certificate files, and a verified certificate's fields for crate::cert
//!  config_files.rs  ssh_config files on disk: -F, ~/.ssh/config, Include globs
//!  client.rs   SshClient: start, reconfigure (executes a ReloadPlan), status, stop;
//!              per-slot supervisors that connect, authenticate, request -R, reconnect
//!  session.rs  Shared (pool, -R forwards, status) + pick: what every task below reads
//!  handler.rs  russh's client callbacks: known_hosts check/record, -R channels
//!  forward.rs  -L / -D listeners, SOCKS, the local end of -R channels
//!  copy.rs     socket <-> channel copy loops and their counters
//!  worker.rs   one thread (current-thread runtime) per SSH connection
//!  server.rs   SshServer: the forwarding-only sshd
//!  unixsock.rs its unix socket forwards on the file system (bind, connect, cleanup)
//! ```
//!
//! Imports go one way: `client` uses `forward`, `handler` and `session`; `handler` uses
//! `forward` and `session`; `forward` uses `session`; all use `copy`. Decisions that need no
//! I/O (specs, known_hosts policy, permit lists, backoff, the reload plan) stay in the pure
//! modules at the crate root.

mod certs;
mod client;
mod config_files;
mod copy;
mod forward;
mod handler;
mod server;
mod session;
mod unixsock;
mod worker;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use client::{SshClient, identity_is_encrypted};
pub use config_files::{ConfigFiles, read_config_file};
pub use copy::ForwardCounters;
pub use server::{
    HostKeyInfo, ServerCounters, SshServer, check_file_mode, load_or_generate_host_key,
};

/// Locks a mutex whose holder may have panicked: what it guards (lists, counters, status)
/// stays usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
