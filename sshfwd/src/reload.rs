//! What a reload changes on a running destination: the difference between the config it runs
//! and the new one, as a plan `SshClient::reconfigure` executes without deciding
//! anything itself.
//!
//! Invariants: a plan never needs a new SSH connection (anything that identifies the
//! connection, from the destination to the reconnect schedule, is a [`NeedsRestart`]
//! instead); listeners are matched by [`ListenAddress`], so one whose address stays is kept
//! (and retargeted if its forward changed) rather than closed and bound again; `-R` forwards
//! are matched by their whole spec; every list is free of duplicates.

use std::fmt;

use crate::config::{ClientConfig, Keepalive};
use crate::spec::{ForwardSpec, ListenAddress, LocalForward};

/// The changes that take a running destination from one config to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// `-L` / `-D` listeners to open, in config order.
    pub bind: Vec<LocalForward>,
    /// Listeners to close (connections already accepted carry on).
    pub close: Vec<ListenAddress>,
    /// Listeners kept on their address whose forward changes (`-L` target, or `-L` ↔ `-D`).
    pub retarget: Vec<(ListenAddress, LocalForward)>,
    /// `-R` forwards to cancel on the server.
    pub cancel_remote: Vec<ForwardSpec>,
    /// `-R` forwards to request from the server, in config order.
    pub request_remote: Vec<ForwardSpec>,
    /// New keepalive settings, when they change.
    pub keepalive: Option<Keepalive>,
}

/// A change the running connection cannot take: the destination must reconnect with the new
/// config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsRestart {
    /// The setting that changed (`identity`, `port`, ...), the first one in config order.
    pub what: &'static str,
}

impl fmt::Display for NeedsRestart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} changed", self.what)
    }
}

impl ReloadPlan {
    /// The plan from `old` (what runs) to `new`.
    ///
    /// # Errors
    /// [`NeedsRestart`] naming the first setting that identifies the connection and changed:
    /// host, port, user, identities, certificates, passphrase, agent use, known_hosts file, host key policy,
    /// ciphers and other algorithms, address family, bind address, agent socket, jump hosts, connection count, `gateway_ports` (it moves every default listener),
    /// `connect_timeout`, the reconnect schedule, the probe interval or password
    /// authentication (its methods or `password_file`).
    pub fn between(old: &ClientConfig, new: &ClientConfig) -> Result<ReloadPlan, NeedsRestart> {
        let needs_restart = [
            ("host", old.host != new.host),
            ("port", old.port != new.port),
            ("user", old.user != new.user),
            ("identity", old.identities != new.identities),
            ("certificate", old.certificates != new.certificates),
            ("passphrase", old.passphrase != new.passphrase),
            ("use_agent", old.use_agent != new.use_agent),
            ("known_hosts", old.known_hosts != new.known_hosts),
            (
                "strict_host_key_checking",
                old.strict_host_key_checking != new.strict_host_key_checking,
            ),
            ("ciphers", old.ciphers != new.ciphers),
            ("algorithms", old.algorithms != new.algorithms),
            ("address_family", old.address_family != new.address_family),
            ("bind_address", old.bind_address != new.bind_address),
            ("agent_socket", old.agent_socket != new.agent_socket),
            ("jump", old.jump != new.jump),
            (
                "connections",
                old.connections.max(1) != new.connections.max(1),
            ),
            ("gateway_ports", old.gateway_ports != new.gateway_ports),
            (
                "connect_timeout",
                old.connect_timeout != new.connect_timeout,
            ),
            ("reconnect schedule", old.backoff != new.backoff),
            (
                "probe",
                old.probe_interval != new.probe_interval || old.probe_target != new.probe_target,
            ),
            (
                "password authentication",
                old.password_authentication != new.password_authentication
                    || old.kbd_interactive_authentication != new.kbd_interactive_authentication
                    || old.prompt != new.prompt,
            ),
        ];
        if let Some((what, _)) = needs_restart.iter().find(|(_, changed)| *changed) {
            return Err(NeedsRestart { what });
        }

        let mut plan = ReloadPlan::default();
        let gateway_ports = new.gateway_ports;
        let listening = |cfg: &ClientConfig| -> Vec<(ListenAddress, LocalForward)> {
            cfg.local_forwards()
                .into_iter()
                .map(|f| (f.listen_address(gateway_ports), f))
                .collect()
        };
        let (was, wanted) = (listening(old), listening(new));
        for (address, fwd) in &wanted {
            if !was.iter().any(|(a, _)| a == address) {
                plan.bind.push(fwd.clone());
            }
        }
        for (address, fwd) in &was {
            // The first forward of the new config on this address takes the listener over.
            match wanted.iter().find(|(a, _)| a == address) {
                None => push_new(&mut plan.close, address.clone()),
                Some((_, next)) if next != fwd => {
                    if !plan.retarget.iter().any(|(a, _)| a == address) {
                        plan.retarget.push((address.clone(), next.clone()));
                    }
                }
                Some(_) => {}
            }
        }

        for spec in &old.remote {
            if !new.remote.contains(spec) {
                push_new(&mut plan.cancel_remote, spec.clone());
            }
        }
        for spec in &new.remote {
            if !old.remote.contains(spec) {
                push_new(&mut plan.request_remote, spec.clone());
            }
        }

        plan.keepalive = Some(new.keepalive()).filter(|ka| *ka != old.keepalive());
        Ok(plan)
    }
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::backoff::BackoffConfig;
    use crate::known_hosts::StrictHostKeyChecking;
    use crate::spec::DynamicSpec;

    fn base() -> ClientConfig {
        ClientConfig::new(
            "203.0.113.5",
            22,
            "ops",
            PathBuf::from("/etc/vipgate/known_hosts"),
        )
    }

    fn local(text: &str) -> ForwardSpec {
        ForwardSpec::parse_local(text).unwrap()
    }

    fn remote(text: &str) -> ForwardSpec {
        ForwardSpec::parse_remote(text).unwrap()
    }

    fn dynamic(text: &str) -> DynamicSpec {
        DynamicSpec::parse(text).unwrap()
    }

    fn tcp(host: &str, port: u16) -> ListenAddress {
        ListenAddress::Tcp {
            host: host.to_string(),
            port,
        }
    }

    fn plan(old: &ClientConfig, new: &ClientConfig) -> ReloadPlan {
        ReloadPlan::between(old, new).unwrap()
    }

    #[test]
    fn the_same_config_plans_nothing() {
        let mut cfg = base();
        cfg.local = vec![local("8585:127.0.0.1:80"), local("/tmp/a.sock:web:80")];
        cfg.remote = vec![remote("0:localhost:22")];
        cfg.dynamic = vec![dynamic("1080")];
        assert_eq!(plan(&cfg, &cfg.clone()), ReloadPlan::default());
    }

    #[test]
    fn local_forwards_are_added_and_removed_by_address() {
        let mut old = base();
        old.local = vec![local("8585:127.0.0.1:80"), local("8586:127.0.0.1:81")];
        let mut new = base();
        new.local = vec![local("8586:127.0.0.1:81"), local("8587:127.0.0.1:82")];
        let p = plan(&old, &new);
        assert_eq!(
            p.bind,
            vec![LocalForward::Local(local("8587:127.0.0.1:82"))]
        );
        assert_eq!(p.close, vec![tcp("127.0.0.1", 8585)]);
        assert!(p.retarget.is_empty());
        assert!(p.cancel_remote.is_empty() && p.request_remote.is_empty());
        assert_eq!(p.keepalive, None);
    }

    #[test]
    fn a_new_target_on_the_same_address_retargets_the_listener() {
        let mut old = base();
        old.local = vec![local("8585:127.0.0.1:80")];
        let mut new = base();
        // `localhost` and no bind address both listen on 127.0.0.1.
        new.local = vec![local("localhost:8585:127.0.0.1:8080")];
        let p = plan(&old, &new);
        assert!(p.bind.is_empty() && p.close.is_empty());
        assert_eq!(
            p.retarget,
            vec![(
                tcp("127.0.0.1", 8585),
                LocalForward::Local(local("localhost:8585:127.0.0.1:8080"))
            )]
        );
    }

    #[test]
    fn a_second_forward_on_a_kept_address_is_left_out() {
        let mut old = base();
        old.local = vec![local("8585:127.0.0.1:80")];
        let mut new = base();
        new.local = vec![local("8585:127.0.0.1:80"), local("8585:127.0.0.1:81")];
        // The first forward on an address owns its listener; there is no second one to bind.
        let p = plan(&old, &new);
        assert!(p.retarget.is_empty() && p.close.is_empty());
        assert!(p.bind.is_empty());
    }

    #[test]
    fn a_duplicate_new_address_is_bound_twice_so_the_bind_error_names_it() {
        let old = base();
        let mut new = base();
        new.local = vec![local("8585:127.0.0.1:80"), local("8585:127.0.0.1:81")];
        assert_eq!(plan(&old, &new).bind.len(), 2);
    }

    #[test]
    fn unix_socket_listeners_match_by_path() {
        let mut old = base();
        old.local = vec![local("/tmp/a.sock:web:80"), local("/tmp/b.sock:web:80")];
        let mut new = base();
        new.local = vec![local("/tmp/a.sock:web:8080"), local("/tmp/c.sock:web:80")];
        let p = plan(&old, &new);
        assert_eq!(
            p.bind,
            vec![LocalForward::Local(local("/tmp/c.sock:web:80"))]
        );
        assert_eq!(p.close, vec![ListenAddress::Unix("/tmp/b.sock".into())]);
        assert_eq!(
            p.retarget,
            vec![(
                ListenAddress::Unix("/tmp/a.sock".into()),
                LocalForward::Local(local("/tmp/a.sock:web:8080"))
            )]
        );
    }

    #[test]
    fn dynamic_forwards_share_the_address_space_of_local_ones() {
        let mut old = base();
        old.dynamic = vec![dynamic("1080"), dynamic("[::1]:1081")];
        let mut new = base();
        new.dynamic = vec![dynamic("1082")];
        // -D 1080 becomes an -L on the same port: the listener is kept and retargeted.
        new.local = vec![local("1080:127.0.0.1:80")];
        let p = plan(&old, &new);
        assert_eq!(p.bind, vec![LocalForward::Dynamic(dynamic("1082"))]);
        assert_eq!(p.close, vec![tcp("::1", 1081)]);
        assert_eq!(
            p.retarget,
            vec![(
                tcp("127.0.0.1", 1080),
                LocalForward::Local(local("1080:127.0.0.1:80"))
            )]
        );
    }

    #[test]
    fn remote_forwards_are_matched_by_their_whole_spec() {
        let mut old = base();
        old.remote = vec![remote("9000:localhost:22"), remote("0:localhost:80")];
        let mut new = base();
        new.remote = vec![
            remote("0:localhost:80"),
            remote("9000:localhost:2222"),
            remote("9000:localhost:2222"),
            remote("/run/far.sock:localhost:80"),
        ];
        let p = plan(&old, &new);
        assert_eq!(p.cancel_remote, vec![remote("9000:localhost:22")]);
        assert_eq!(
            p.request_remote,
            vec![
                remote("9000:localhost:2222"),
                remote("/run/far.sock:localhost:80")
            ]
        );
        assert!(p.bind.is_empty() && p.close.is_empty() && p.retarget.is_empty());
    }

    #[test]
    fn removing_every_remote_forward_cancels_each_once() {
        let mut old = base();
        old.remote = vec![remote("9000:localhost:22"), remote("9000:localhost:22")];
        let p = plan(&old, &base());
        assert_eq!(p.cancel_remote, vec![remote("9000:localhost:22")]);
        assert!(p.request_remote.is_empty());
    }

    #[test]
    fn keepalive_changes_are_live() {
        let old = base();
        let mut new = base();
        new.server_alive_interval = Some(Duration::from_secs(5));
        assert_eq!(
            plan(&old, &new).keepalive,
            Some(Keepalive {
                interval: Some(Duration::from_secs(5)),
                count_max: 3
            })
        );
        new.server_alive_interval = None;
        new.server_alive_count_max = 7;
        assert_eq!(
            plan(&old, &new).keepalive,
            Some(Keepalive {
                interval: None,
                count_max: 7
            })
        );
    }

    #[test]
    fn settings_used_only_at_start_need_no_plan() {
        let old = base();
        let mut new = base();
        new.name = "renamed".into();
        new.exit_on_forward_failure = false;
        new.fail_fast = false;
        assert_eq!(plan(&old, &new), ReloadPlan::default());
    }

    #[test]
    fn what_identifies_the_connection_needs_a_restart() {
        type Change = fn(&mut ClientConfig);
        let cases: [(&str, Change); 18] = [
            ("host", |c| c.host = "198.51.100.7".into()),
            ("port", |c| c.port = 2222),
            ("user", |c| c.user = "root".into()),
            ("identity", |c| {
                c.identities = vec!["/etc/vipgate/id".into()]
            }),
            ("passphrase", |c| c.passphrase = Some("secret".into())),
            ("use_agent", |c| c.use_agent = false),
            ("known_hosts", |c| c.known_hosts = "/tmp/kh".into()),
            ("strict_host_key_checking", |c| {
                c.strict_host_key_checking = StrictHostKeyChecking::Yes;
            }),
            ("ciphers", |c| {
                c.ciphers = vec!["aes128-gcm@openssh.com".into()]
            }),
            ("algorithms", |c| {
                c.algorithms.kex = Some(crate::options::AlgorithmList("curve25519-sha256".into()));
            }),
            ("address_family", |c| {
                c.address_family = crate::options::AddressFamily::Inet6;
            }),
            ("bind_address", |c| {
                c.bind_address = Some(std::net::IpAddr::from([127, 0, 0, 2]));
            }),
            ("agent_socket", |c| {
                c.agent_socket = Some("/tmp/agent".into())
            }),
            ("jump", |c| {
                c.jump = vec![crate::config::JumpHop {
                    host: "bastion".into(),
                    port: 22,
                    user: "ops".into(),
                    identities: Vec::new(),
                }];
            }),
            ("connections", |c| c.connections = 4),
            ("gateway_ports", |c| c.gateway_ports = true),
            ("connect_timeout", |c| {
                c.connect_timeout = Duration::from_secs(3)
            }),
            ("reconnect schedule", |c| {
                c.backoff = BackoffConfig {
                    max: Duration::from_secs(5),
                    ..BackoffConfig::default()
                };
            }),
        ];
        for (what, change) in cases {
            let old = base();
            let mut new = base();
            // A forward change alongside does not hide the restart.
            new.local = vec![local("8585:127.0.0.1:80")];
            change(&mut new);
            let err = ReloadPlan::between(&old, &new).unwrap_err();
            assert_eq!(err, NeedsRestart { what });
            assert_eq!(err.to_string(), format!("{what} changed"));
        }
    }

    #[test]
    fn the_first_changed_setting_is_the_reason_and_zero_connections_mean_one() {
        let old = base();
        let mut new = base();
        new.port = 2222;
        new.identities = vec!["/etc/vipgate/id".into()];
        assert_eq!(ReloadPlan::between(&old, &new).unwrap_err().what, "port");
        let mut zero = base();
        zero.connections = 0;
        assert_eq!(plan(&old, &zero), ReloadPlan::default());
    }
}
