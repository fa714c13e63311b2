//! `[[service]]`: load-balanced virtual services (ipvsadm `-A -t VIP:port -s wrr -p 300` +
//! `-a -r RS -m -w N`, keepalived `virtual_server`).

use super::nat::NatSection;
use super::{HumanDuration, Validator, check_unique};
use serde::{Deserialize, Serialize};
use std::net::SocketAddrV4;
use std::time::Duration;
use toml::Spanned;

/// Scheduler, as ipvsadm names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scheduler {
    /// Round robin.
    Rr,
    /// Smooth weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections (ipvsadm's default).
    #[default]
    Wlc,
    /// Source hashing.
    Sh,
    /// Maglev hashing.
    Mh,
}

/// Health check kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HealthKind {
    /// TCP connect.
    #[default]
    Tcp,
    /// HTTP GET `path`, expecting `status`.
    Http,
}

/// `health = { kind = "tcp", interval = "2s", timeout = "1s", rise = 2, fall = 4 }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthSection {
    #[serde(default)]
    pub(crate) kind: HealthKind,
    /// Default 2 s (Alteon, HAProxy).
    #[serde(default = "d_interval")]
    pub(crate) interval: Spanned<HumanDuration>,
    /// Default 1 s.
    #[serde(default = "d_timeout")]
    pub(crate) timeout: Spanned<HumanDuration>,
    /// Successes to come up. Default 2.
    #[serde(default = "d_rise")]
    pub(crate) rise: Spanned<u32>,
    /// Failures to go down. Default 4 (Alteon).
    #[serde(default = "d_fall")]
    pub(crate) fall: Spanned<u32>,
    /// HTTP path. Default `/`.
    #[serde(default = "d_path")]
    pub(crate) path: String,
    /// Expected HTTP status. Default 200.
    #[serde(default = "d_status")]
    pub(crate) status: u16,
}

fn d_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(2)))
}
fn d_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn d_rise() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn d_fall() -> Spanned<u32> {
    Spanned::new(0..0, 4)
}
fn d_path() -> String {
    "/".into()
}
fn d_status() -> u16 {
    200
}

/// One real server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendSection {
    pub(crate) address: Spanned<SocketAddrV4>,
    /// 0 drains; at most 65535. Default 1.
    #[serde(default = "d_weight")]
    pub(crate) weight: Spanned<u32>,
}

fn d_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// One `[[service]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceSection {
    pub(crate) name: Spanned<String>,
    /// Virtual address and port (the VIP).
    pub(crate) listen: Spanned<SocketAddrV4>,
    /// Default `wlc`, as ipvsadm.
    #[serde(default)]
    pub(crate) scheduler: Scheduler,
    /// Client affinity timeout (ipvsadm `-p`); off when absent.
    #[serde(default)]
    pub(crate) persistence: Option<HumanDuration>,
    /// Health checks; without them every backend counts as up.
    #[serde(default)]
    pub(crate) health: Option<HealthSection>,
    pub(crate) backends: Spanned<Vec<BackendSection>>,
    /// Used when every backend is down; without it new connections get a TCP RST.
    #[serde(default)]
    pub(crate) sorry: Option<SocketAddrV4>,
}

pub(crate) fn validate_all(
    services: &[ServiceSection],
    nat: Option<&NatSection>,
    v: &mut Validator,
) {
    check_unique(
        services
            .iter()
            .map(|s| (s.name.get_ref().clone(), s.name.span())),
        "service name",
        v,
    );
    check_unique(
        services
            .iter()
            .map(|s| (*s.listen.get_ref(), s.listen.span())),
        "service listen address",
        v,
    );
    for s in services {
        if s.backends.get_ref().is_empty() {
            v.error_at(
                &s.backends,
                format!("service `{}` has no backends", s.name.get_ref()),
            );
        }
        check_unique(
            s.backends
                .get_ref()
                .iter()
                .map(|b| (*b.address.get_ref(), b.address.span())),
            "backend",
            v,
        );
        for b in s.backends.get_ref() {
            if *b.weight.get_ref() > 65535 {
                v.error_at(
                    &b.weight,
                    format!(
                        "weight {} is over 65535 (ipvsadm's limit)",
                        b.weight.get_ref()
                    ),
                );
            }
        }
        if let Some(h) = &s.health {
            if *h.rise.get_ref() == 0 {
                v.error_at(&h.rise, "rise must be at least 1");
            }
            if *h.fall.get_ref() == 0 {
                v.error_at(&h.fall, "fall must be at least 1");
            }
            if h.timeout.get_ref() > h.interval.get_ref() {
                v.error_at(&h.timeout, "health timeout must not exceed the interval");
            }
        }
        if let Some(nat) = nat {
            let l = s.listen.get_ref();
            if *l.ip() == nat.address
                && nat
                    .statics
                    .iter()
                    .any(|st| *st.outside_port.get_ref() == l.port())
            {
                v.error_at(
                    &s.listen,
                    format!("{l} is also a [[nat.static]] port forward"),
                );
            }
        }
    }
}
