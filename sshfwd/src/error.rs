//! Errors of the forwarding client and server drivers.

use std::path::PathBuf;

/// Why a forwarding client or server could not start or went down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshFwdError {
    /// A listening socket could not be bound (port in use, permission, bad address).
    #[error("cannot listen on {addr} for {what}: {error}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// Which forward wanted it (`-L 8585:web:80`).
        what: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// TCP connection to the SSH server failed.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// Connecting took too long.
    #[error("connection to {0} timed out")]
    Timeout(String),
    /// Host key refused by known_hosts policy (the message says why).
    #[error("{0}")]
    HostKey(String),
    /// No identity was accepted.
    #[error("permission denied (publickey) for {user}@{host}: tried {tried}")]
    AuthFailed {
        /// Login name.
        user: String,
        /// Server.
        host: String,
        /// What was offered.
        tried: String,
    },
    /// An identity file could not be loaded.
    #[error("cannot load identity {path}: {why}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The server refused a remote forward (with `exit_on_forward_failure`).
    #[error("remote port forwarding failed for listen {0}: the server refused it")]
    RemoteForwardRefused(String),
    /// A file (known_hosts, authorized_keys, host key) could not be read or written.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A key or policy file others could change or read (StrictModes).
    #[error("{path}: insecure: {why}")]
    Insecure {
        /// The file.
        path: PathBuf,
        /// Owner or mode problem.
        why: String,
    },
    /// Bad configuration detected at start.
    #[error("{0}")]
    Config(String),
    /// The SSH protocol layer failed.
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
}
