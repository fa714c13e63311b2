//! `vipgate check`: every problem of a file on stderr, or the one-screen summary (or with
//! `--dump` the effective config) of a valid one on stdout.

use crate::config::{self, SiteConfig};
use std::fmt::Write;
use std::path::Path;
use std::process::ExitCode;

/// Checks `path` (with `host`, against this host too). Problems and warnings go to stderr
/// (`quiet`: nothing is printed); a valid file prints its summary, or with `dump` the
/// effective config, to stdout.
///
/// # Errors
/// Only when the valid config cannot be written out as TOML.
pub(crate) fn run(path: &Path, quiet: bool, dump: bool, host: bool) -> anyhow::Result<ExitCode> {
    let loaded = if host {
        config::load_on_host(path)
    } else {
        config::load(path)
    };
    match loaded {
        Ok(site) => {
            if !quiet {
                for w in &site.warnings {
                    eprintln!("{w}");
                }
                if dump {
                    print!("{}", effective_toml(&site)?);
                } else {
                    print!("{}", summary(&site));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if !quiet {
                eprintln!("{errors}");
                let n = errors.diagnostics.len();
                eprintln!(
                    "{}: {n} problem{}",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The effective config as TOML: what the file says plus every default, re-readable by
/// `vipgate check` and `vipgate run` (keys without a default and left out stay out).
///
/// # Errors
/// When a value cannot be written as TOML.
pub(crate) fn effective_toml(site: &SiteConfig) -> anyhow::Result<String> {
    Ok(toml::to_string(site)?)
}

/// `Wrr` -> `wrr`: enum values as the config spells them.
fn lower(value: impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

/// What a valid file configures, one line per part.
pub(crate) fn summary(site: &SiteConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", site.path.display());
    if !site.included.is_empty() {
        let files: Vec<String> = site
            .included
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let _ = writeln!(out, "  include  {}", files.join(", "));
    }
    let d = &site.daemon;
    let _ = writeln!(
        out,
        "  daemon   control {}, metrics {}",
        d.control.get_ref().display(),
        d.metrics
            .as_ref()
            .map_or("off".to_string(), |m| m.get_ref().to_string())
    );
    for t in &site.gre {
        let ka = t
            .keepalive
            .as_ref()
            .map_or("keepalive off".to_string(), |k| {
                format!(
                    "keepalive {} x {}",
                    k.interval.get_ref(),
                    k.retries.get_ref()
                )
            });
        let routes: Vec<String> = t.routes.iter().map(|r| r.get_ref().to_string()).collect();
        let _ = writeln!(
            out,
            "  gre      {} {} -> {} ({}), inner {}{}, routes [{}], {ka}",
            t.name.get_ref(),
            t.local,
            t.remote,
            lower(t.encap),
            t.address,
            t.key.map(|k| format!(", key {k}")).unwrap_or_default(),
            routes.join(", ")
        );
    }
    if let Some(n) = &site.nat {
        let statics: Vec<String> = n
            .statics
            .iter()
            .map(|s| {
                format!(
                    "{} {} -> {}",
                    s.proto.get_ref(),
                    s.outside_port.get_ref(),
                    s.inside
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  nat      overload {} on {}, inside [{}], {} ACL rule(s), static [{}]",
            n.address,
            n.outside.get_ref(),
            n.inside.join(", "),
            n.acl.len(),
            statics.join(", ")
        );
    }
    for s in &site.service {
        let backends: Vec<String> = s
            .backends
            .get_ref()
            .iter()
            .map(|b| format!("{} w{}", b.address.get_ref(), b.weight.get_ref()))
            .collect();
        let _ = writeln!(
            out,
            "  service  {} {} {}{}, backends [{}]{}",
            s.name.get_ref(),
            match s.service_ports() {
                Some(Ok(ports)) => format!("{}:{}", s.listen.get_ref().ip(), ports.display()),
                _ => s.listen.get_ref().to_string(),
            },
            lower(s.scheduler),
            s.persistence
                .map(|p| format!(", persistence {p}"))
                .unwrap_or_default()
                + if s.direct_route() {
                    ", direct routing"
                } else {
                    ""
                },
            backends.join(", "),
            s.health
                .as_ref()
                .map(|h| format!(", health {} every {}", lower(h.kind), h.interval.get_ref()))
                .unwrap_or_default()
        );
    }
    for h in &site.http {
        let pools: Vec<String> = h
            .pool
            .iter()
            .map(|p| format!("{} {} x{}", p.name.get_ref(), p.scheduler, p.backends.len()))
            .collect();
        let _ = writeln!(
            out,
            "  http     {} {}, {} routes, pools [{}]",
            h.name.get_ref(),
            h.listen.get_ref(),
            h.route.len(),
            pools.join(", ")
        );
    }
    for v in &site.vrrp {
        let addrs: Vec<String> = v
            .addresses
            .get_ref()
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(
            out,
            "  vrrp     {} on {} vrid {} priority {} advert {}{}, [{}]",
            v.name.get_ref(),
            v.interface,
            v.vrid.get_ref(),
            v.priority.get_ref(),
            v.advert_interval.get_ref(),
            if v.preempt { "" } else { ", nopreempt" },
            addrs.join(", ")
        );
    }
    for s in &site.ssh {
        let _ = writeln!(
            out,
            "  ssh      {}: {} local, {} remote, {} dynamic forward(s)",
            s.destination.get_ref(),
            s.local.len(),
            s.remote.len(),
            s.dynamic.len()
        );
    }
    if let Some(s) = &site.sshd {
        let _ = writeln!(
            out,
            "  sshd     listen {}, authorized_keys {}",
            s.listen.get_ref(),
            s.authorized_keys.display()
        );
    }
    if let Some(s) = &site.sync {
        let peers: Vec<String> = s
            .peers
            .get_ref()
            .iter()
            .map(|p| p.get_ref().to_string())
            .collect();
        let _ = writeln!(
            out,
            "  sync     {}:{} with [{}], following vrrp {}",
            s.listen.get_ref(),
            s.port.get_ref(),
            peers.join(", "),
            s.vrrp.get_ref()
        );
    }
    if site.is_empty() {
        let _ = writeln!(
            out,
            "  (nothing to run: no gre, nat, service, http, vrrp, ssh or sshd section)"
        );
    }
    out
}
