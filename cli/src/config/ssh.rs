//! `[[ssh]]` (forwarding client, like `ssh -N -L ... -R ...` under autossh) and `[sshd]`
//! (the forwarding-only server).

use super::{HumanDuration, Validator, check_unique};
use serde::{Deserialize, Serialize};
use sshfwd::spec::{DynamicSpec, ForwardSpec};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// OpenSSH `StrictHostKeyChecking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StrictHostKeyChecking {
    /// Unknown hosts are refused.
    #[default]
    Yes,
    /// Unknown hosts are recorded; changed keys are still refused.
    AcceptNew,
}

/// One `[[ssh]]` destination with all its forwards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SshSection {
    /// `[user@]host[:port]`.
    pub(crate) destination: Spanned<String>,
    /// Private key file.
    #[serde(default)]
    pub(crate) identity: Option<PathBuf>,
    /// known_hosts file. Default `~/.ssh/known_hosts`.
    #[serde(default)]
    pub(crate) known_hosts: Option<PathBuf>,
    #[serde(default)]
    pub(crate) strict_host_key_checking: StrictHostKeyChecking,
    /// `-L` specs.
    #[serde(default)]
    pub(crate) local: Vec<Spanned<String>>,
    /// `-R` specs.
    #[serde(default)]
    pub(crate) remote: Vec<Spanned<String>>,
    /// `-D` specs.
    #[serde(default)]
    pub(crate) dynamic: Vec<Spanned<String>>,
    /// `ServerAliveInterval`. Default 15 s.
    #[serde(default = "d_alive")]
    pub(crate) server_alive_interval: HumanDuration,
    /// `ServerAliveCountMax`. Default 3.
    #[serde(default = "d_alive_max")]
    pub(crate) server_alive_count_max: u32,
    /// `ExitOnForwardFailure`. Default true (a daemon should not half-start).
    #[serde(default = "d_true")]
    pub(crate) exit_on_forward_failure: bool,
}

fn d_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}
fn d_alive_max() -> u32 {
    3
}
fn d_true() -> bool {
    true
}

/// `[sshd]`: the forwarding-only server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SshdSection {
    /// Listen address. Default `0.0.0.0:2222`.
    #[serde(default = "d_listen")]
    pub(crate) listen: SocketAddr,
    /// Host key; an ed25519 key is generated there on first start.
    pub(crate) host_key: PathBuf,
    /// authorized_keys file (OpenSSH format, `permitopen=`/`permitlisten=`/`from=` honoured).
    pub(crate) authorized_keys: PathBuf,
    /// `host:port` patterns clients may open (-L); empty = any.
    #[serde(default)]
    pub(crate) permit_open: Vec<String>,
    /// `[addr:]port` patterns clients may listen on (-R); empty = any.
    #[serde(default)]
    pub(crate) permit_listen: Vec<String>,
}

fn d_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 2222))
}

pub(crate) fn validate_all(dests: &[SshSection], v: &mut Validator) {
    check_unique(
        dests
            .iter()
            .map(|d| (d.destination.get_ref().clone(), d.destination.span())),
        "ssh destination",
        v,
    );
    for d in dests {
        let dest = d.destination.get_ref();
        let host = dest.rsplit_once('@').map_or(dest.as_str(), |(_, h)| h);
        if host.is_empty() || dest.chars().any(char::is_whitespace) {
            v.error_at(
                &d.destination,
                format!("destination `{dest}` is not [user@]host[:port]"),
            );
        }
        for s in &d.local {
            if let Err(e) = ForwardSpec::parse_local(s.get_ref()) {
                v.error_at(s, e.to_string());
            }
        }
        for s in &d.remote {
            if let Err(e) = ForwardSpec::parse_remote(s.get_ref()) {
                v.error_at(s, e.to_string());
            }
        }
        for s in &d.dynamic {
            if let Err(e) = DynamicSpec::parse(s.get_ref()) {
                v.error_at(s, e.to_string());
            }
        }
        if d.local.is_empty() && d.remote.is_empty() && d.dynamic.is_empty() {
            v.error_at(
                &d.destination,
                "this destination has no local, remote or dynamic forwards",
            );
        }
    }
}
