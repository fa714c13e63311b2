//! SSH port forwarding for vipgate: an OpenSSH-compatible `-L` / `-R` / `-D` client that keeps
//! its forwards alive across reconnects (what `ssh` + autossh do), and a forwarding-only server.
//!
//! It also connects through `ProxyJump` hosts (each hop's host key checked) and opens
//! `direct-tcpip` streams for `ssh -W`. Passwords and keyboard-interactive answers come from
//! a [`PasswordPrompt`] the caller provides. What this crate does NOT do: shells, command
//! execution, subsystems (sftp), X11 or agent forwarding, `ProxyCommand`. OpenSSH certificates are accepted and presented in both roles
//! (policy in [`cert`]).
//! The SSH protocol itself is russh's; this crate adds policy and plumbing.
//!
//! ```text
//!   pure (no I/O, always built)               driver (feature "driver": tokio + russh)
//!   spec         -L/-R/-D text  ------------>  SshClient: one SSH connection (or a pool)
//!   options      -o / ssh_config ----------->    per destination; supervisors reconnect
//!   config       ClientConfig, ServerConfig ->   with backoff and restore every forward
//!   reload       ReloadPlan (old -> new) --->    (reconfigure executes the plan)
//!   backoff      reconnect delays  <---------
//!   known_hosts  key lookup + policy <-------  handler: host keys, -R channels
//!   socks        SOCKS4a/5 parsing <---------  forward: -L/-D listeners, SOCKS, -R ends
//!   policy, startups: permit lists, <--------  SshServer: forwarding-only sshd
//!     authorized_keys, MaxStartups
//! ```
//!
//! The modules at the top are pure: they parse, decide and diff, never open a socket, read a
//! clock or spawn, and build with `--no-default-features` (that is how the CLI's config
//! lowering and the fuzz targets use them). Everything that does I/O is in the private
//! `driver` module, whose types are re-exported here. The driver decides nothing a pure
//! module can: `SshClient::reconfigure` only executes the plan [`ReloadPlan::between`]
//! computes, and host keys are judged by [`known_hosts::decide`].
#![warn(missing_docs)]

pub mod backoff;
pub mod cert;
pub mod config;
pub mod known_hosts;
pub mod options;
pub mod pattern;
pub mod policy;
pub mod reload;
#[cfg(feature = "serde")]
mod serde_secs;
pub mod sockpath;
pub mod socks;
pub mod spec;
pub mod startups;

#[cfg(feature = "driver")]
mod driver;
#[cfg(feature = "driver")]
pub mod error;

pub use config::{
    Algorithms, AllocatedPort, ClientConfig, ClientCounts, ForwardCounts, ForwardKind,
    ForwardState, ForwardStatus, JumpHop, Keepalive, PasswordPrompt, PendingForward, Prompt,
    ServerConfig, ServerCounts, ServerLimits, ServerStatus, SshClientStatus, TunnelState,
};
pub use reload::{NeedsRestart, ReloadPlan};

#[cfg(feature = "driver")]
pub use driver::{
    ConfigFiles, ForwardCounters, HostKeyInfo, ServerCounters, SshClient, SshServer,
    check_file_mode, identity_is_encrypted, load_or_generate_host_key, read_config_file,
};
#[cfg(feature = "driver")]
pub use error::SshFwdError;

/// Entry points for the fuzz targets in `fuzz/` and the corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::{known_hosts, options, policy, socks, spec, startups};

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

    /// ssh_config files and `-o` arguments. The input is the top file, then more files each
    /// introduced by a line `--- NAME`; `Include` patterns match those names.
    pub fn options_parse(text: &str) {
        struct Named(Vec<options::ConfigText>);
        impl options::IncludeLoader for Named {
            fn load(
                &mut self,
                pattern: &str,
            ) -> Result<Vec<options::ConfigText>, options::OptionError> {
                Ok(self
                    .0
                    .iter()
                    .filter(|f| crate::pattern::wildcard_match_exact(pattern, &f.name))
                    .cloned()
                    .collect())
            }
        }
        let mut parts = text.split("\n--- ");
        let top = options::ConfigText {
            name: "config".to_string(),
            text: parts.next().unwrap_or_default().to_string(),
        };
        let files = parts
            .map(|p| {
                let (name, body) = p.split_once('\n').unwrap_or((p, ""));
                options::ConfigText {
                    name: name.trim().to_string(),
                    text: body.to_string(),
                }
            })
            .collect();
        let ctx = options::MatchContext {
            original_host: "host.example".to_string(),
            local_user: "ops".to_string(),
        };
        let mut o = options::SshOptions::default();
        if o.apply_config(&top, &ctx, &mut Named(files)).is_ok() {
            let _ = o.target_host("host.example");
            for list in [&o.kex_algorithms, &o.macs, &o.host_key_algorithms]
                .into_iter()
                .flatten()
            {
                let _ = list.select(&["curve25519-sha256", "hmac-sha2-256"]);
            }
        }
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

    /// authorized_keys text plus connection metadata through the server's real decisions.
    ///
    /// Input: a header line `peer user now_local now_utc open_host:port listen_host:port`
    /// (whitespace separated; missing fields take defaults), then the authorized_keys text.
    /// Invariants checked: an expired key never authorizes, a cert-authority line never
    /// authorizes a plain key, a peer matching a `!` pattern of `from=` never passes (also
    /// spelled as an IPv4-mapped IPv6 address), and the resolved-address check never lets a
    /// loopback or link-local address through a list that does not name it.
    pub fn auth_policy(text: &str) {
        use std::net::IpAddr;
        let (header, keys_text) = text.split_once('\n').unwrap_or((text, ""));
        let mut f = header.split_whitespace();
        let peer: IpAddr = f
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(IpAddr::from([10, 0, 0, 5]));
        let _user = f.next().unwrap_or("ops");
        let mut time = || f.next().and_then(|t| t.parse::<u64>().ok());
        let now = policy::Now {
            local: time().unwrap_or(20_260_615_120_000),
            utc: time().unwrap_or(20_260_615_100_000),
        };
        let target = |t: Option<&str>| -> (String, u16) {
            t.and_then(|t| t.rsplit_once(':'))
                .map(|(h, p)| (h.to_string(), p.parse().unwrap_or(0)))
                .unwrap_or_else(|| ("127.0.0.1".to_string(), 80))
        };
        let (open_host, open_port) = target(f.next());
        let (listen_host, listen_port) = target(f.next());
        let (keys, _) = policy::parse_authorized_keys(keys_text);
        let mapped = match peer {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        };
        for k in &keys {
            let ok = k.usable_at(peer, now).is_ok();
            if ok {
                assert!(
                    !k.options.cert_authority,
                    "cert-authority authorized a plain key"
                );
                assert!(
                    k.options.expiry.is_none_or(|e| !e.expired(now)),
                    "expired key authorized"
                );
                let negated = k
                    .options
                    .from
                    .iter()
                    .flatten()
                    .filter_map(|p| p.strip_prefix('!'));
                for pat in negated {
                    let single = policy::KeyOptions {
                        from: Some(vec![pat.to_string()]),
                        ..policy::KeyOptions::default()
                    };
                    assert!(!single.allows_from(peer), "peer passed its negation {pat}");
                }
            }
            if let Some(m) = mapped {
                assert_eq!(
                    k.options.allows_from(peer),
                    k.options.allows_from(m),
                    "mapped and plain spellings disagree"
                );
            }
            let _ = k.options.allows_open(&open_host, open_port);
            let _ = k.options.allows_listen(&listen_host, listen_port);
            let list = policy::PermitList::Only(k.options.permit_open.clone());
            let names_it = |a: IpAddr| {
                k.options.permit_open.iter().any(|e| {
                    e.host
                        .as_deref()
                        .and_then(|h| h.parse::<IpAddr>().ok())
                        .is_some_and(|h| startups::canonical_ip(h) == startups::canonical_ip(a))
                })
            };
            for special in [
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([169, 254, 169, 254]),
                IpAddr::from([0, 0, 0, 0]),
                peer,
            ] {
                if policy::is_special(special) && list.allows_resolved(special, open_port) {
                    assert!(
                        names_it(special),
                        "special address {special} passed unnamed"
                    );
                }
            }
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
