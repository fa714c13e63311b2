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
pub mod startups;

#[cfg(feature = "driver")]
pub mod client;
#[cfg(feature = "driver")]
mod copy;
#[cfg(feature = "driver")]
pub mod error;
#[cfg(feature = "driver")]
mod forward;
#[cfg(feature = "driver")]
mod worker;

#[cfg(feature = "driver")]
pub use copy::ForwardCounters;
#[cfg(feature = "driver")]
pub mod server;

/// Entry points for the fuzz targets in `fuzz/` and the corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::{known_hosts, options, policy, socks, spec};

    /// `-L`/`-R`/`-D` parsers; an accepted `-L`/`-R` must round-trip through Display.
    pub fn spec_parse(text: &str) {
        let parsed = [
            spec::ForwardSpec::parse_local(text),
            spec::ForwardSpec::parse_remote(text),
        ];
        for s in parsed.into_iter().flatten() {
            let again =
                spec::ForwardSpec::parse_remote(&s.to_string()).expect("display output parses");
            assert_eq!(again, s);
        }
        let _ = spec::DynamicSpec::parse(text);
    }

    /// ssh_config text and `-o` arguments.
    pub fn options_parse(text: &str) {
        let _ = options::SshOptions::default().apply_config(text, "host.example");
        let _ = options::SshOptions::default().apply_dash_o(text);
    }

    /// known_hosts text looked up for a fixed host and key.
    pub fn known_hosts_check(text: &str) {
        let _ = known_hosts::check(text, "127.0.0.1", 2222, "ssh-ed25519", &[0, 0, 0, 11]);
        let _ = known_hosts::known_algorithms(text, "example.com", 22);
    }

    /// authorized_keys text.
    pub fn authorized_keys_parse(text: &str) {
        let (keys, _) = policy::parse_authorized_keys(text);
        for k in keys {
            let _ = k
                .options
                .allows_from(std::net::IpAddr::from([127, 0, 0, 1]));
        }
    }

    /// SOCKS4/4a/5 bytes: first message, then a SOCKS5 request.
    pub fn socks_parse(data: &[u8]) {
        if let Ok(Some((_, n))) = socks::parse_hello(data) {
            assert!(n <= data.len());
        }
        if let Ok(Some((_, n))) = socks::parse_socks5_request(data) {
            assert!(n <= data.len());
        }
    }
}
