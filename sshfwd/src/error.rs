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
    /// TCP connection to the SSH server (or a jump host) failed; worded as ssh words it.
    #[error("connect to host {host} port {port}: {}", strerror(error))]
    Connect {
        /// The host as configured.
        host: String,
        /// Its port.
        port: u16,
        /// The OS error.
        error: std::io::Error,
    },
    /// Connecting took too long (`ConnectTimeout`).
    #[error("connect to host {host} port {port}: Connection timed out")]
    Timeout {
        /// The host as configured.
        host: String,
        /// Its port.
        port: u16,
    },
    /// Host key refused by known_hosts policy (the message says why).
    #[error("{0}")]
    HostKey(String),
    /// No identity was accepted; worded as ssh words it, with the methods the server said
    /// could continue (`publickey,password`).
    #[error("{user}@{host}: Permission denied ({methods}). Tried: {tried}")]
    AuthFailed {
        /// Login name.
        user: String,
        /// Server.
        host: String,
        /// The server's last list of methods that can continue, comma-separated.
        methods: String,
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
    #[error("Error: remote port forwarding failed for listen port {0}")]
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

/// An OS error as strerror(3) words it, without Rust's " (os error N)" suffix: what ssh prints.
fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worded_as_ssh() {
        let e = SshFwdError::Connect {
            host: "10.0.0.1".into(),
            port: 2222,
            error: std::io::Error::from_raw_os_error(111),
        };
        assert_eq!(
            e.to_string(),
            "connect to host 10.0.0.1 port 2222: Connection refused"
        );
        let e = SshFwdError::RemoteForwardRefused("9000".into());
        assert_eq!(
            e.to_string(),
            "Error: remote port forwarding failed for listen port 9000"
        );
    }
}
