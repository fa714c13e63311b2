//! `[daemon]`: where the control socket and the metrics endpoint live.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default control socket path (DESIGN.md).
pub(crate) const DEFAULT_CONTROL: &str = "/run/vipgate/vipgate.sock";

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DaemonSection {
    /// Unix socket `vipgate status` / `show` talk to. Default `/run/vipgate/vipgate.sock`.
    #[serde(default = "default_control")]
    pub(crate) control: PathBuf,
    /// Optional Prometheus endpoint (`host:port`), off by default.
    #[serde(default)]
    pub(crate) metrics: Option<SocketAddr>,
    /// After setup keep only CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE. Default true.
    #[serde(default = "default_true")]
    pub(crate) drop_privileges: bool,
}

fn default_true() -> bool {
    true
}

fn default_control() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL)
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            control: default_control(),
            metrics: None,
            drop_privileges: true,
        }
    }
}
