//! Lowering: the one step from validated raw sections to the libraries' typed configs.
//!
//! The raw sections keep what the file said (spans, TOML spellings, absent keys as their
//! defaults); the functions here turn one section each into what a driver or core takes
//! (ripgrep's `LowArgs` → `HiArgs`). Invariant: they run only on sections that passed
//! [`super::parse`], so every range was checked while parsing (typed raw fields such as
//! [`super::vrrp::Vrid`]) or by the section's `validate`, and nothing here narrows or
//! refuses a value again. The parts (`crate::parts`) only start, stop, reconfigure and
//! report what these functions build.

use super::SiteConfig;
use super::gre::GreSection;
use super::lb::{HealthKind, HealthSection, ServiceSection};
use super::nat::NatSection;
use super::ssh::SshSection;
use super::vrrp::{VrrpGroupSection, VrrpSection};
use gre::driver::TunnelSpec;
use gre::{KeepaliveConfig, TunnelConfig};
use ipnet::IpNet;
use natgw::driver::{Datapath, DriverConfig};
use natgw::{AclRule, GatewayConfig, StaticEntry, Timeouts};
use sshfwd::ClientConfig;
use sshfwd::backoff::BackoffConfig;
use sshfwd::options::expand_tilde;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;
use vrrp::driver::{
    GroupSpec, MemberSpec, NotifyScripts, ScriptCommand, TrackProcess, TrackScript,
};
use vrrp::{InstanceConfig, VirtualAddress};

/// One `[[gre]]` tunnel as the GRE driver runs it.
pub(crate) fn gre(section: &GreSection) -> TunnelSpec {
    let mut tunnel = TunnelConfig::new(
        section.name.get_ref().clone(),
        section.local,
        section.remote,
    );
    tunnel.inner_address = Some(section.address.addr());
    tunnel.key = section.key;
    tunnel.sequence = section.sequence;
    tunnel.checksum = section.checksum;
    tunnel.underlay = section.encap;
    // 0: the driver derives it from the underlay interface's MTU.
    tunnel.mtu = section.mtu.as_ref().map_or(0, |m| *m.get_ref());
    tunnel.keepalive = section.keepalive.as_ref().map(|k| KeepaliveConfig {
        interval: k.interval.get_ref().0,
        retries: *k.retries.get_ref(),
    });
    TunnelSpec {
        tunnel,
        address: Some((section.address.addr(), section.address.prefix_len())),
        routes: section
            .routes
            .iter()
            .map(|r| IpNet::V4(*r.get_ref()))
            .collect(),
        offload: section.offload,
        datapath: match section.datapath.as_ref().map(|d| d.get_ref().as_str()) {
            Some("tun") => gre::driver::Datapath::Tun,
            _ => gre::driver::Datapath::Kernel,
        },
    }
}

/// The GRE kernel path's pin directory name: the site file's stem (as for the NAT kernel
/// path) with `-gre`, so both paths of one site keep their own pins.
pub(crate) fn gre_pin_site(site_path: &std::path::Path) -> String {
    let mut stem = pin_site_name(site_path);
    stem.truncate(60);
    stem + "-gre"
}

/// `[nat]` as the PAT gateway's driver settings and core config. `seed` keys port
/// randomisation and the table's hashes; it is the caller's, so lowering stays deterministic.
pub(crate) fn nat(
    section: &NatSection,
    site_path: &std::path::Path,
    seed: u64,
) -> (DriverConfig, GatewayConfig) {
    let defaults = DriverConfig::new(section.inside.clone(), section.outside.get_ref().clone());
    let driver = DriverConfig {
        table: *section.table.get_ref(),
        priority: *section.rule_priority.get_ref(),
        queues: section
            .queues
            .as_ref()
            .map_or(defaults.queues, |q| *q.get_ref() as usize),
        datapath: datapath(section.datapath.as_ref()),
        site: pin_site_name(site_path),
        ..defaults
    };
    (driver, gateway(section, seed))
}

/// A validated `datapath` value (absent: the default, the kernel path).
fn datapath(value: Option<&Spanned<String>>) -> Datapath {
    match value.map(|d| d.get_ref().as_str()) {
        Some("tun") => Datapath::Tun,
        _ => Datapath::Kernel,
    }
}

/// A director's gateway (services, no `[nat]`): its interfaces are found at start from the
/// routes; the data path comes from `[lb]`, the pin directory from the site file's name.
pub(crate) fn director(site: &SiteConfig, inside: Vec<String>, outside: String) -> DriverConfig {
    DriverConfig {
        datapath: datapath(site.lb.as_ref().and_then(|lb| lb.datapath.as_ref())),
        site: pin_site_name(&site.path),
        ..DriverConfig::new(inside, outside)
    }
}

/// The kernel path's pin directory name: the site file's stem, limited to the characters a
/// pin directory may use.
fn pin_site_name(path: &std::path::Path) -> String {
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if stem.is_empty() || stem.chars().all(|c| c == '.') {
        "nat".into()
    } else {
        stem
    }
}

/// The core's half of [`nat`]: what a reload hands to a running gateway.
pub(crate) fn gateway(section: &NatSection, seed: u64) -> GatewayConfig {
    let t = &section.timeouts;
    GatewayConfig {
        overload: Some(section.address),
        inside_networks: section.inside_networks.clone(),
        acl: section
            .acl
            .iter()
            .map(|r| AclRule {
                action: r.action,
                src: r.src,
                dst: r.dst,
                proto: r.proto,
                src_ports: r.src_port.map(|p| p.first..=p.last),
                dst_ports: r
                    .dst_port
                    .as_ref()
                    .map(|p| p.get_ref().first..=p.get_ref().last),
            })
            .collect(),
        statics: section
            .statics
            .iter()
            .map(|s| StaticEntry {
                proto: *s.proto.get_ref(),
                // A forward without its own address answers on the overload address.
                public: SocketAddrV4::new(
                    s.address.unwrap_or(section.address),
                    *s.outside_port.get_ref(),
                ),
                inside: s.inside,
            })
            .collect(),
        timeouts: Timeouts {
            udp: t.udp.get_ref().0,
            tcp_established: t.tcp_established.get_ref().0,
            tcp_transitory: t.tcp_transitory.get_ref().0,
            icmp: t.icmp.get_ref().0,
        },
        max_mappings: *section.max_mappings.get_ref() as usize,
        max_per_host: *section.max_mappings_per_host.get_ref() as usize,
        port_range: section.ports.first..=section.ports.last,
        filtering: section.filtering,
        seed,
        compensate_ttl: true,
        // Virtual services are added by the lb part, which starts after the nat part.
        services: Vec::new(),
        // Learnt from the interfaces by the driver.
        local_addresses: Vec::new(),
        max_half_open_per_listener: *section.max_half_open_per_listener.get_ref() as usize,
        max_half_open_per_source: *section.max_half_open_per_source.get_ref() as usize,
        half_open_source_prefix: *section.half_open_source_prefix.get_ref(),
        max_inbound_per_mapping: *section.max_inbound_per_mapping.get_ref() as usize,
    }
}

/// A `health = { ... }` table (of a service or an HTTP pool) as the checker's settings.
pub(crate) fn health(h: &HealthSection) -> natgw::health::HealthConfig {
    natgw::health::HealthConfig {
        kind: match h.kind {
            HealthKind::Tcp => natgw::health::CheckKind::Tcp,
            HealthKind::Udp => natgw::health::CheckKind::Udp {
                send: h
                    .send
                    .as_ref()
                    .map(|x| x.get_ref().clone())
                    .unwrap_or_default(),
                expect: h
                    .expect
                    .as_ref()
                    .map(|x| x.get_ref().clone())
                    .unwrap_or_default(),
            },
            HealthKind::Http | HealthKind::Https => natgw::health::CheckKind::Http {
                path: h.path.get_ref().clone(),
                status: h.status,
                expect: h.expect.as_ref().map(|e| e.get_ref().clone()),
                tls: (h.kind == HealthKind::Https).then(|| natgw::health::TlsCheck {
                    sni: h.sni.as_ref().map(|s| s.get_ref().clone()),
                    verify: h.verify.as_ref().is_none_or(|v| *v.get_ref()),
                    ca_file: h.ca_file.as_ref().map(|c| c.get_ref().clone()),
                }),
            },
        },
        interval: h.interval.get_ref().0,
        timeout: h.timeout.get_ref().0,
        rise: *h.rise.get_ref(),
        fall: *h.fall.get_ref(),
        port: h.port.as_ref().map(|p| *p.get_ref()),
        agent: h.agent_port.as_ref().map(|p| natgw::health::AgentConfig {
            port: *p.get_ref(),
            interval: h.agent_interval.as_ref().unwrap_or(&h.interval).get_ref().0,
        }),
    }
}

/// One `[[service]]` as the gateway's virtual service.
pub(crate) fn service(section: &ServiceSection) -> natgw::ServiceConfig {
    let health = section.health.as_ref().map(health);
    // Validation refused ports that cannot run.
    let ports = section.service_ports().and_then(Result::ok);
    natgw::ServiceConfig {
        forward: if section.direct_route() {
            natgw::Forward::DirectRoute
        } else {
            natgw::Forward::Nat
        },
        proto: section.proto(),
        one_packet: section.one_packet(),
        name: section.name.get_ref().clone(),
        listen: match &ports {
            Some(p) => SocketAddrV4::new(*section.listen.get_ref().ip(), p.first()),
            None => *section.listen.get_ref(),
        },
        ports,
        pool: balance::PoolConfig {
            scheduler: section.scheduler,
            persistence: section.persistence.as_ref().map(|p| balance::Persistence {
                timeout: p.0,
                netmask: *section.persistence_netmask.get_ref(),
            }),
            sorry: section.sorry.as_ref().map(|s| *s.get_ref()),
            hash_port: section.hash_port,
            fallback: section.fallback.as_ref().is_some_and(|f| *f.get_ref()),
            max_connections: section.max_connections,
            slow_start: section.slow_start.as_ref().map(|d| d.get_ref().0),
            backends: section
                .backends
                .get_ref()
                .iter()
                .map(|b| balance::BackendConfig {
                    addr: *b.address.get_ref(),
                    weight: *b.weight.get_ref(),
                    max_connections: b.max_connections,
                    // 0: no lower threshold.
                    min_connections: b.min_connections.as_ref().map_or(0, |m| *m.get_ref()),
                })
                .collect(),
            ..balance::PoolConfig::default()
        },
        health,
    }
}

/// One `[[vrrp]]` instance as a member of its sync group. What other parts provide at start
/// (tracked services' health, VIP hooks) is left empty: `parts::vrrp` adds it.
pub(crate) fn vrrp(section: &VrrpSection) -> MemberSpec {
    let mut config = InstanceConfig::new(
        section.name.get_ref(),
        section.vrid.get_ref().get(),
        // Unspecified: the driver reads the interface's first address that is not a VIP.
        section.primary_address.unwrap_or(Ipv4Addr::UNSPECIFIED),
    );
    config.priority = section.priority.get_ref().get();
    config.advert_interval = section.advert_interval.get_ref().0;
    config.preempt = section.preempt;
    config.preempt_delay = section.preempt_delay.map_or(Duration::ZERO, |d| d.0);
    config.addresses = section
        .addresses
        .get_ref()
        .iter()
        .map(|n| VirtualAddress {
            address: n.addr(),
            prefix_len: n.prefix_len(),
        })
        .collect();
    // "0s": one burst only.
    config.garp_repeat_delay = Some(section.garp_repeat_delay.get_ref().0).filter(|d| !d.is_zero());
    config.reassert_interval = section.reassert_interval.get_ref().0;
    config.max_learnt_advert_interval = section
        .max_learnt_advert_interval
        .as_ref()
        .map(|d| d.get_ref().0);
    let mut spec = MemberSpec::new(config, &section.interface);
    spec.unicast_peers = section.unicast_peers.clone();
    spec.peers = section
        .peers
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default();
    spec.track_interfaces = section
        .track_interfaces
        .iter()
        .map(|t| (t.get_ref().name.clone(), t.get_ref().weight))
        .collect();
    spec.track_scripts = section
        .track_scripts
        .iter()
        .filter_map(|t| {
            let interval = t.interval.get_ref().0;
            Some(TrackScript {
                command: ScriptCommand::parse(t.command.get_ref())?,
                interval,
                timeout: t.timeout.as_ref().map_or(interval, |d| d.get_ref().0),
                rise: *t.rise.get_ref(),
                fall: *t.fall.get_ref(),
                weight: t.weight.get_ref().get(),
            })
        })
        .collect();
    spec.track_processes = section
        .track_processes
        .iter()
        .map(|p| TrackProcess {
            name: p.name.get_ref().clone(),
            parameters: p.parameters.as_ref().map(|v| v.get_ref().clone()),
            param_match: p
                .param_match
                .as_ref()
                .and_then(|r| super::vrrp::param_match_rule(r.get_ref()))
                .unwrap_or_default(),
            quorum: *p.quorum.get_ref(),
            quorum_max: p.quorum_max.as_ref().map_or(u32::MAX, |m| *m.get_ref()),
            delay: p.delay.as_ref().map_or(Duration::ZERO, |d| d.get_ref().0),
            weight: p.weight.get_ref().get(),
        })
        .collect();
    spec.notify = NotifyScripts {
        notify: script(section.notify.as_ref()),
        master: script(section.notify_master.as_ref()),
        backup: script(section.notify_backup.as_ref()),
        fault: script(section.notify_fault.as_ref()),
        stop: script(section.notify_stop.as_ref()),
    };
    spec.notify_timeout = section.notify_timeout.get_ref().0;
    spec.garp_count = section.garp_count.get_ref().get();
    spec.garp_lower_prio_repeat = section
        .garp_lower_prio_repeat
        .as_ref()
        .map_or(spec.garp_count, |r| r.get_ref().get());
    spec
}

/// A `[[vrrp_group]]` as the driver's group settings.
pub(crate) fn vrrp_group(section: &VrrpGroupSection) -> GroupSpec {
    GroupSpec {
        name: section.name.get_ref().clone(),
        notify: NotifyScripts {
            notify: script(section.notify.as_ref()),
            master: script(section.notify_master.as_ref()),
            backup: script(section.notify_backup.as_ref()),
            fault: script(section.notify_fault.as_ref()),
            stop: None,
        },
        notify_timeout: section.notify_timeout.get_ref().0,
    }
}

/// A validated script key (see `vrrp::check_script`): program, then its own arguments.
fn script(value: Option<&Spanned<String>>) -> Option<ScriptCommand> {
    value.and_then(|v| ScriptCommand::parse(v.get_ref()))
}

/// `$HOME`, when set and not empty.
pub(crate) fn home() -> Option<String> {
    std::env::var("HOME").ok().filter(|h| !h.is_empty())
}

/// The login name a destination without `user@` uses, as OpenSSH takes it.
pub(crate) fn default_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_string())
}

/// `~/.ssh/known_hosts`.
pub(crate) fn default_known_hosts() -> PathBuf {
    PathBuf::from(expand_tilde("~/.ssh/known_hosts", home().as_deref()))
}

/// One `[[ssh]]` destination as the SSH client runs it, but for the passphrase of an
/// encrypted identity: that file is read by the part when it starts, not here.
pub(crate) fn ssh_client(d: &SshSection) -> ClientConfig {
    let dest = d.destination.get_ref();
    let home = home();
    let known_hosts = d.known_hosts.clone().unwrap_or_else(default_known_hosts);
    let user = dest.user.clone().unwrap_or_else(default_user);
    let mut cfg = ClientConfig::new(&dest.host, dest.port.unwrap_or(22), &user, known_hosts);
    cfg.name = dest.text.clone();
    cfg.identities = d
        .identity
        .iter()
        .map(|p| PathBuf::from(expand_tilde(&p.display().to_string(), home.as_deref())))
        .collect();
    cfg.certificates = d
        .certificate
        .iter()
        .map(|p| PathBuf::from(expand_tilde(&p.display().to_string(), home.as_deref())))
        .collect();
    cfg.use_agent = d.use_agent;
    cfg.strict_host_key_checking = d.strict_host_key_checking;
    cfg.local = d.local.iter().map(|s| s.get_ref().0.clone()).collect();
    cfg.remote = d.remote.iter().map(|s| s.get_ref().0.clone()).collect();
    cfg.dynamic = d.dynamic.iter().map(|s| s.get_ref().0.clone()).collect();
    cfg.gateway_ports = d.gateway_ports;
    let alive = d.server_alive_interval.0;
    cfg.server_alive_interval = (!alive.is_zero()).then_some(alive);
    cfg.server_alive_count_max = d.server_alive_count_max;
    cfg.exit_on_forward_failure = d.exit_on_forward_failure;
    cfg.ciphers = d.ciphers.iter().map(|c| c.get_ref().clone()).collect();
    cfg.connections = d.connections.get();
    cfg.connect_timeout = d.connect_timeout.0;
    cfg.backoff = BackoffConfig {
        initial: d.reconnect_min.0,
        max: d.reconnect_max.0,
        ..BackoffConfig::default()
    };
    cfg.probe_interval = d.probe.then_some(d.probe_interval.0);
    cfg.probe_target = d
        .probe_target
        .as_ref()
        .and_then(|t| super::ssh::parse_host_port(t.get_ref()));
    cfg.fail_fast = true;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SiteConfig, parse};
    use std::path::Path;

    fn example(name: &str) -> SiteConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("example file");
        parse(&path, &text).unwrap_or_else(|e| panic!("{name} must validate: {e}"))
    }

    #[test]
    fn gre_sections_lower_to_tunnel_specs() {
        let hq = example("branch-hq.toml");
        let spec = gre(&hq.gre[0]);
        let section = &hq.gre[0];
        assert_eq!(spec.tunnel.name, *section.name.get_ref());
        assert_eq!(
            (spec.tunnel.local, spec.tunnel.remote),
            (section.local, section.remote)
        );
        assert_eq!(spec.tunnel.inner_address, Some(section.address.addr()));
        assert_eq!(
            spec.address,
            Some((section.address.addr(), section.address.prefix_len()))
        );
        assert_eq!(spec.routes.len(), section.routes.len());
        assert_eq!(spec.tunnel.key, section.key);
        let reference = example("reference.toml");
        let spec = gre(&reference.gre[0]);
        let keepalive = spec
            .tunnel
            .keepalive
            .expect("reference.toml has a keepalive");
        assert_eq!(keepalive.retries, 3);
        assert!(spec.offload, "offload defaults to on");
        assert_eq!(
            spec.datapath,
            gre::driver::Datapath::Kernel,
            "the kernel path is the default"
        );
        assert_eq!(gre_pin_site(Path::new("/etc/vipgate/hq.toml")), "hq-gre");
    }

    #[test]
    fn nat_lowers_to_driver_and_gateway_configs() {
        let site = example("pat-gateway.toml");
        let section = site.nat.as_ref().expect("pat-gateway.toml has [nat]");
        let (driver, gw) = nat(section, &site.path, 7);
        assert_eq!(driver.inside, section.inside);
        assert_eq!(
            driver.site, "pat-gateway",
            "pins are named after the site file"
        );
        assert_eq!(
            driver.datapath,
            Datapath::Kernel,
            "the kernel path is the default"
        );
        assert_eq!(driver.outside, *section.outside.get_ref());
        assert_eq!(driver.table, *section.table.get_ref());
        assert_eq!(driver.tun, "nat0");
        assert_eq!(gw.seed, 7);
        assert_eq!(gw.overload, Some(section.address));
        assert_eq!(gw.statics.len(), section.statics.len());
        assert_eq!(gw.acl.len(), section.acl.len());
        assert!(gw.services.is_empty(), "services join from the lb part");
        // A static forward without its own address answers on the overload address.
        for (entry, st) in gw.statics.iter().zip(&section.statics) {
            assert_eq!(*entry.public.ip(), st.address.unwrap_or(section.address));
        }
        // The same section lowers to the same core config (given the same seed).
        assert_eq!(format!("{gw:?}"), format!("{:?}", gateway(section, 7)));
    }

    #[test]
    fn services_lower_with_their_pool_and_health() {
        let site = example("director1.toml");
        let section = &site.service[0];
        let svc = service(section);
        assert_eq!(svc.name, *section.name.get_ref());
        assert_eq!(svc.listen, *section.listen.get_ref());
        let weights: Vec<u32> = svc.pool.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 2]);
        let reference = example("reference.toml");
        let svc = service(&reference.service[0]);
        assert!(svc.health.is_some(), "reference.toml checks its backends");
    }

    #[test]
    fn vrrp_sections_lower_to_member_specs_with_defaults_written_out() {
        let site = example("director1.toml");
        let spec = vrrp(&site.vrrp[0]);
        assert_eq!(spec.config.vrid, 51);
        assert_eq!(spec.config.priority, 150);
        assert_eq!(spec.interface, site.vrrp[0].interface);
        assert_eq!(spec.garp_count, 5);
        assert_eq!(spec.garp_lower_prio_repeat, 5, "defaults to garp_count");
        assert_eq!(spec.config.garp_repeat_delay, Some(Duration::from_secs(5)));
        assert!(spec.track_services.is_empty() && spec.hooked.is_empty());
        let reference = example("reference.toml");
        let spec = vrrp(&reference.vrrp[0]);
        assert_eq!(
            spec.config.addresses,
            [VirtualAddress {
                address: Ipv4Addr::new(198, 51, 100, 10),
                prefix_len: 24
            }]
        );
    }

    #[test]
    fn vrrp_tuning_keys_reach_the_spec() {
        let text = "[[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = 7\npriority = 254\n\
                    addresses = [\"10.0.0.1/24\"]\ngarp_count = 3\ngarp_lower_prio_repeat = 0\n\
                    garp_repeat_delay = \"0s\"\ntrack_interfaces = [\"eth1\", { name = \"eth2\", weight = 20 }]\n";
        let site = parse(Path::new("site.toml"), text).expect("valid");
        let spec = vrrp(&site.vrrp[0]);
        assert_eq!((spec.config.vrid, spec.config.priority), (7, 254));
        assert_eq!((spec.garp_count, spec.garp_lower_prio_repeat), (3, 0));
        assert_eq!(spec.config.garp_repeat_delay, None);
        assert_eq!(
            spec.track_interfaces,
            [("eth1".to_owned(), 0), ("eth2".to_owned(), 20)]
        );
    }
}
