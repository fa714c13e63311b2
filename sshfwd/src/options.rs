//! The OpenSSH client options vipgate understands, from `-o Key=Value` and from an ssh_config
//! file (`-F`). Pure: the caller reads the file and passes its text.
//!
//! Semantics follow ssh_config(5): keywords are case-insensitive, `Key value` and `Key=value`
//! are both accepted, the first value obtained for a scalar wins (so `-o` and command-line
//! flags, applied first, override the file), while `IdentityFile` and the forward keywords
//! accumulate. `Host` blocks match the name given on the command line with wildcards and `!`.
//! Unsupported keywords are errors, never silently ignored: a forward that a user believes is
//! configured but is not is worse than a refusal to start.

use crate::known_hosts::StrictHostKeyChecking;
use crate::pattern::{ListMatch, match_list};
use crate::spec::{DynamicSpec, ForwardSpec};

/// The keywords accepted in `-o` and in `-F` files (besides `Host`).
pub const SUPPORTED: &[&str] = &[
    "HostName",
    "User",
    "Port",
    "IdentityFile",
    "IdentitiesOnly",
    "LocalForward",
    "RemoteForward",
    "DynamicForward",
    "UserKnownHostsFile",
    "StrictHostKeyChecking",
    "ServerAliveInterval",
    "ServerAliveCountMax",
    "ExitOnForwardFailure",
    "GatewayPorts",
    "BatchMode",
    "Ciphers",
];

/// Ciphers russh can negotiate.
pub const CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
];

/// Options gathered from the command line, `-o` and the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOptions {
    /// Real host name to connect to (`HostName`).
    pub host_name: Option<String>,
    /// Login name (`User`, `-l`, `user@`).
    pub user: Option<String>,
    /// Port (`Port`, `-p`).
    pub port: Option<u16>,
    /// Identity files in order (`IdentityFile`, `-i`).
    pub identity_files: Vec<String>,
    /// Only use the identity files, not the agent (`IdentitiesOnly`).
    pub identities_only: Option<bool>,
    /// `-L` / `LocalForward`.
    pub local_forwards: Vec<ForwardSpec>,
    /// `-R` / `RemoteForward`.
    pub remote_forwards: Vec<ForwardSpec>,
    /// `-D` / `DynamicForward`.
    pub dynamic_forwards: Vec<DynamicSpec>,
    /// `UserKnownHostsFile`.
    pub user_known_hosts_file: Option<String>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<StrictHostKeyChecking>,
    /// `ServerAliveInterval` in seconds; 0 disables.
    pub server_alive_interval: Option<u32>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<u32>,
    /// `ExitOnForwardFailure`.
    pub exit_on_forward_failure: Option<bool>,
    /// `GatewayPorts`: local listeners with no bind address listen on all addresses.
    pub gateway_ports: Option<bool>,
    /// `BatchMode`: never prompt (passphrases).
    pub batch_mode: Option<bool>,
    /// `Ciphers`, `-c`.
    pub ciphers: Option<Vec<String>>,
}

/// Why an option was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// Keyword not in [`SUPPORTED`].
    #[error("unsupported option '{0}' (vipgate ssh understands: {list})", list = SUPPORTED.join(", "))]
    Unsupported(String),
    /// Keyword without a value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("bad value '{value}' for {keyword}: {why}")]
    BadValue {
        /// The keyword.
        keyword: String,
        /// The value given.
        value: String,
        /// What was expected.
        why: String,
    },
    /// An error in a config file, with its line number.
    #[error("line {line}: {source}")]
    AtLine {
        /// 1-based line.
        line: usize,
        /// What went wrong.
        source: Box<OptionError>,
    },
}

fn yes_no(keyword: &str, value: &str) -> Result<bool, OptionError> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(bad(keyword, value, "expected yes or no")),
    }
}

fn bad(keyword: &str, value: &str, why: &str) -> OptionError {
    OptionError::BadValue {
        keyword: keyword.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// Splits `Key=Value`, `Key Value` or `Key = Value`; strips one pair of double quotes.
fn split_keyword(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    let end = line.find(|c: char| c.is_whitespace() || c == '=')?;
    let (k, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    let rest = rest
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(rest);
    Some((k, rest))
}

/// Joins ssh_config's two-argument forward form (`8080 host:80`) into `-L` syntax.
fn forward_arg(value: &str) -> String {
    let parts: Vec<&str> = value.split_whitespace().collect();
    parts.join(":")
}

impl SshOptions {
    /// Applies one keyword (first value wins for scalars).
    ///
    /// # Errors
    /// [`OptionError`] for unknown keywords and bad values.
    pub fn apply(&mut self, keyword: &str, value: &str) -> Result<(), OptionError> {
        let canonical = SUPPORTED
            .iter()
            .find(|k| k.eq_ignore_ascii_case(keyword))
            .ok_or_else(|| OptionError::Unsupported(keyword.to_string()))?;
        if value.is_empty() {
            return Err(OptionError::MissingValue((*canonical).to_string()));
        }
        let k = *canonical;
        match k {
            "HostName" => set(&mut self.host_name, value.to_string()),
            "User" => set(&mut self.user, value.to_string()),
            "Port" => {
                let p = value
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(k, value, "expected a port 1-65535"))?;
                set(&mut self.port, p);
            }
            "IdentityFile" => self.identity_files.push(value.to_string()),
            "IdentitiesOnly" => set(&mut self.identities_only, yes_no(k, value)?),
            "LocalForward" => {
                let spec = ForwardSpec::parse_local(&forward_arg(value))
                    .map_err(|e| bad(k, value, &e.to_string()))?;
                self.local_forwards.push(spec);
            }
            "RemoteForward" => {
                let spec = ForwardSpec::parse_remote(&forward_arg(value))
                    .map_err(|e| bad(k, value, &e.to_string()))?;
                self.remote_forwards.push(spec);
            }
            "DynamicForward" => {
                let spec = DynamicSpec::parse(value).map_err(|e| bad(k, value, &e.to_string()))?;
                self.dynamic_forwards.push(spec);
            }
            "UserKnownHostsFile" => {
                // OpenSSH allows several files; the first is the one written to and read here.
                let first = value.split_whitespace().next().unwrap_or(value);
                set(&mut self.user_known_hosts_file, first.to_string());
            }
            "StrictHostKeyChecking" => {
                let v = value
                    .parse::<StrictHostKeyChecking>()
                    .map_err(|why| bad(k, value, &why))?;
                set(&mut self.strict_host_key_checking, v);
            }
            "ServerAliveInterval" => {
                let v = value
                    .parse::<u32>()
                    .map_err(|_| bad(k, value, "expected seconds"))?;
                set(&mut self.server_alive_interval, v);
            }
            "ServerAliveCountMax" => {
                let v = value
                    .parse::<u32>()
                    .map_err(|_| bad(k, value, "expected a count"))?;
                set(&mut self.server_alive_count_max, v);
            }
            "ExitOnForwardFailure" => set(&mut self.exit_on_forward_failure, yes_no(k, value)?),
            "GatewayPorts" => set(&mut self.gateway_ports, yes_no(k, value)?),
            "BatchMode" => set(&mut self.batch_mode, yes_no(k, value)?),
            "Ciphers" => {
                let list: Vec<String> = value.split(',').map(|c| c.trim().to_string()).collect();
                if let Some(unknown) = list.iter().find(|c| !CIPHERS.contains(&c.as_str())) {
                    return Err(bad(
                        k,
                        value,
                        &format!(
                            "unsupported cipher '{unknown}' (supported: {})",
                            CIPHERS.join(",")
                        ),
                    ));
                }
                set(&mut self.ciphers, list);
            }
            _ => return Err(OptionError::Unsupported(keyword.to_string())),
        }
        Ok(())
    }

    /// Applies one `-o` argument (`Key=Value` or `Key Value`).
    ///
    /// # Errors
    /// As [`SshOptions::apply`].
    pub fn apply_dash_o(&mut self, arg: &str) -> Result<(), OptionError> {
        let (k, v) =
            split_keyword(arg).ok_or_else(|| OptionError::MissingValue(arg.trim().to_string()))?;
        self.apply(k, v)
    }

    /// Applies the `Host` blocks of an ssh_config text that match `host` (the name typed on the
    /// command line). Lines before the first `Host` apply to every host.
    ///
    /// # Errors
    /// The first bad line, as [`OptionError::AtLine`]; unsupported keywords are reported even in
    /// blocks that do not match, so a typo never hides until the day it matters.
    pub fn apply_config(&mut self, text: &str, host: &str) -> Result<(), OptionError> {
        let mut active = true;
        for (i, raw) in text.lines().enumerate() {
            let at = |e: OptionError| OptionError::AtLine {
                line: i + 1,
                source: Box::new(e),
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = split_keyword(line)
                .ok_or_else(|| at(OptionError::MissingValue(line.to_string())))?;
            if k.eq_ignore_ascii_case("Host") {
                active = match_list(v.split_whitespace(), host) == ListMatch::Match;
                continue;
            }
            if k.eq_ignore_ascii_case("Match") || k.eq_ignore_ascii_case("Include") {
                return Err(at(OptionError::Unsupported(k.to_string())));
            }
            if active {
                self.apply(k, v).map_err(at)?;
            } else {
                SshOptions::default().apply(k, v).map_err(at)?;
            }
        }
        Ok(())
    }
}

fn set<T>(slot: &mut Option<T>, v: T) {
    if slot.is_none() {
        *slot = Some(v);
    }
}

/// Expands a leading `~/` with the given home directory.
#[must_use]
pub fn expand_tilde(path: &str, home: Option<&str>) -> String {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => format!("{}/{rest}", h.trim_end_matches('/')),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dash_o_forms_and_first_wins() {
        let mut o = SshOptions::default();
        o.apply_dash_o("ServerAliveInterval=5").unwrap();
        o.apply_dash_o("serveraliveinterval 9").unwrap();
        o.apply_dash_o("StrictHostKeyChecking = accept-new")
            .unwrap();
        o.apply_dash_o("ExitOnForwardFailure=yes").unwrap();
        o.apply_dash_o("UserKnownHostsFile=\"/tmp/kh\"").unwrap();
        assert_eq!(o.server_alive_interval, Some(5));
        assert_eq!(o.exit_on_forward_failure, Some(true));
        assert_eq!(o.user_known_hosts_file.as_deref(), Some("/tmp/kh"));
        let e = o.apply_dash_o("ProxyJump=bastion").unwrap_err();
        assert!(
            e.to_string().starts_with("unsupported option 'ProxyJump'"),
            "{e}"
        );
        assert!(o.apply_dash_o("BatchMode=maybe").is_err());
        assert!(o.apply_dash_o("Ciphers=3des-cbc").is_err());
        assert!(o.apply_dash_o("Port=0").is_err());
    }

    #[test]
    fn config_blocks() {
        let cfg = "\
# global
ServerAliveInterval 15

Host web*  !web9
  HostName 10.0.0.5
  User ops
  Port 2222
  IdentityFile ~/.ssh/id_web
  LocalForward 8080 localhost:80
  LocalForward 127.0.0.1:8443 [::1]:443
  RemoteForward 0 localhost:22
  DynamicForward 1080

Host *
  User nobody
  Port 22
";
        let mut o = SshOptions::default();
        o.apply_dash_o("Port=2200").unwrap();
        o.apply_config(cfg, "web1").unwrap();
        assert_eq!(o.host_name.as_deref(), Some("10.0.0.5"));
        assert_eq!(o.user.as_deref(), Some("ops"));
        assert_eq!(o.port, Some(2200), "-o given first wins");
        assert_eq!(o.server_alive_interval, Some(15));
        assert_eq!(o.local_forwards.len(), 2);
        assert_eq!(o.local_forwards[0].to_string(), "8080:localhost:80");
        assert_eq!(o.remote_forwards[0].to_string(), "0:localhost:22");
        assert_eq!(o.dynamic_forwards[0].port, 1080);
        let mut o9 = SshOptions::default();
        o9.apply_config(cfg, "web9").unwrap();
        assert_eq!(o9.user.as_deref(), Some("nobody"));
        assert!(o9.local_forwards.is_empty());
        let err = SshOptions::default()
            .apply_config("Host x\n  ProxyCommand nc %h %p\n", "y")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("line 2: unsupported option 'ProxyCommand'"),
            "{err}"
        );
    }

    #[test]
    fn tilde() {
        assert_eq!(expand_tilde("~/.ssh/id", Some("/root")), "/root/.ssh/id");
        assert_eq!(expand_tilde("/abs", Some("/root")), "/abs");
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,120}", host in ".{0,10}") {
            let _ = SshOptions::default().apply_config(&text, &host);
            let _ = SshOptions::default().apply_dash_o(&text);
        }
    }
}
