//! SSH port forwarding for vipgate: an OpenSSH-compatible `-L` / `-R` / `-D` client that keeps
//! its forwards alive across reconnects (what `ssh` + autossh do), and a forwarding-only server.
//!
//! What this crate does NOT do: shells, command execution, subsystems (sftp), X11 or agent
//! forwarding, password or keyboard-interactive authentication, certificates, `ProxyJump`.
//! The SSH protocol itself is russh's; this crate adds policy and plumbing.
//!
//! ```text
//!   pure (no I/O)                           driver (feature "driver": tokio + russh)
//!   spec       -L/-R/-D text  ------------>  client::Tunnel  -- one SSH connection per
//!   options    -o / ssh_config ----------->                     destination, supervisor
//!   known_hosts  key lookup + policy <-----                     reconnects with backoff
//!   backoff    reconnect delays  <---------                     and restores every forward
//!   socks      SOCKS4a/5 parsing <---------  forward: listeners, copy loops, -D
//!   policy     permit lists, authorized_keys <- server: forwarding-only sshd
//! ```
#![warn(missing_docs)]

pub mod backoff;
pub mod known_hosts;
pub mod options;
pub mod pattern;
pub mod policy;
pub mod socks;
pub mod spec;

#[cfg(feature = "driver")]
pub mod client;
#[cfg(feature = "driver")]
mod copy;
#[cfg(feature = "driver")]
pub mod error;
#[cfg(feature = "driver")]
mod forward;

#[cfg(feature = "driver")]
pub use copy::ForwardCounters;
#[cfg(feature = "driver")]
pub mod server;
