//! `[daemon]`: where the control socket and the metrics endpoint live.

use super::Validator;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use toml::Spanned;

/// Default control socket path (DESIGN.md).
pub(crate) const DEFAULT_CONTROL: &str = "/run/vipgate/vipgate.sock";

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DaemonSection {
    /// Unix socket `vipgate status` / `show` talk to. Default `/run/vipgate/vipgate.sock`.
    #[serde(default = "default_control")]
    pub(crate) control: Spanned<PathBuf>,
    /// Optional Prometheus endpoint (`host:port`), off by default.
    #[serde(default)]
    pub(crate) metrics: Option<Spanned<SocketAddr>>,
    /// After setup keep only CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE. Default true.
    #[serde(default = "default_true")]
    pub(crate) drop_privileges: bool,
    /// Run as this user (keeping the three capabilities). Default: stay uid 0.
    #[serde(default)]
    pub(crate) user: Option<Spanned<String>>,
    /// With `user`: run with this group instead of the user's primary group.
    #[serde(default)]
    pub(crate) group: Option<Spanned<String>>,
    /// Members of this group may use the read-only control operations (`status`, `show`);
    /// the socket is then 0660 and its directory 0750. Default: none (socket 0600).
    #[serde(default)]
    pub(crate) control_group: Option<Spanned<String>>,
}

fn default_true() -> bool {
    true
}

fn default_control() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_CONTROL))
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            control: default_control(),
            metrics: None,
            drop_privileges: true,
            user: None,
            group: None,
            control_group: None,
        }
    }
}

impl DaemonSection {
    /// Values serde accepts but the daemon would trip over: a control path that is not a
    /// socket (start-up would refuse it) or sits in a world-writable directory, unknown
    /// users or groups, and (a warning) a metrics endpoint reachable from other hosts.
    pub(crate) fn validate(&self, v: &mut Validator) {
        let control = self.control.get_ref();
        match std::fs::symlink_metadata(control) {
            Ok(m) if !m.file_type().is_socket() => v.error_at(
                &self.control,
                format!(
                    "`control` = {}: something that is not a socket is there; \
                     vipgate only ever replaces a stale socket",
                    control.display()
                ),
            ),
            _ => {}
        }
        if let Some(dir) = control.parent()
            && let Ok(m) = std::fs::metadata(dir)
            && m.permissions().mode() & 0o002 != 0
        {
            v.error_at(
                &self.control,
                format!(
                    "`control`: its directory {} is world-writable; anyone could replace the socket",
                    dir.display()
                ),
            );
        }
        if let Some(user) = &self.user {
            if !self.drop_privileges {
                v.error_at(user, "`user` needs `drop_privileges = true` (the default)");
            }
            if let Err(e) = crate::privileges::resolve(user.get_ref(), None) {
                v.error_at(user, format!("`user`: {e}"));
            }
        }
        if let Some(group) = &self.group {
            if self.user.is_none() {
                v.error_at(group, "`group` needs `user`");
            }
            check_group(group, "group", v);
        }
        if let Some(group) = &self.control_group {
            check_group(group, "control_group", v);
        }
        if let Some(m) = &self.metrics
            && !m.get_ref().ip().is_loopback()
        {
            v.warn_at(
                m,
                format!(
                    "`metrics` = {} is reachable from other hosts and has no authentication; \
                     bind 127.0.0.1 unless a firewall guards it",
                    m.get_ref()
                ),
            );
        }
    }
}

fn check_group(group: &Spanned<String>, key: &str, v: &mut Validator) {
    match nix::unistd::Group::from_name(group.get_ref()) {
        Ok(Some(_)) => {}
        Ok(None) => v.error_at(
            group,
            format!("`{key}`: no such group {:?}", group.get_ref()),
        ),
        Err(e) => v.error_at(
            group,
            format!("`{key}`: looking up {:?}: {e}", group.get_ref()),
        ),
    }
}
