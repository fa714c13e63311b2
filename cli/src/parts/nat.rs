//! `vipgate run` / `show nat` / `nat clear` for the PAT gateway (crate `natgw`).
//!
//! Parts built on the gateway (virtual services) reach the running driver through
//! [`super::wiring::Wiring::nat`]: it is started before them and stopped after them.
//!
//! A public address of `[nat]` (the overload address, or a `[[nat.static]]` forward's own
//! address) that a `[[vrrp]]` instance lists is not made live at start: a PAT gateway pair
//! shares it, and a backup answering ARP for it would steal the master's replies. The VRRP
//! master makes it live (route into the TUN, proxy neighbour) through the
//! [`vrrp::driver::AddressHook`] this part hands over in [`StartCtx::wiring`], and withdraws
//! it on leaving MASTER, as the services do for their VIPs (`lb.rs`). The forwards on such an
//! address follow it: they answer wherever the address is live.

use super::wiring::{self, SharedWiring};
use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::nat::NatSection;
use crate::config::{SiteConfig, lower};
use crate::control::ControlOp;
use anyhow::Context;
use natgw::driver::{NatDriver, NatStatus};
use natgw::{AclRule, Proto};
use netutil::Reconfigured;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vrrp::driver::AddressHook;

/// At most this many translations go into one `show nat` answer.
const SHOW_LIMIT: usize = 65_536;

/// A fresh seed for port randomisation and hash keys (RFC 6056: unpredictable ports).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b) ^ u64::from(std::process::id())
}

/// Starts the gateway described by `[nat]`.
///
/// # Errors
/// Kernel settings, interfaces, TUN or netlink problems, with what to fix.
pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let Some(nat) = &site.nat else {
        return Ok(Vec::new());
    };
    let (mut driver_cfg, gateway_cfg) = lower::nat(nat, &site.path, random_seed());
    let deferred = vrrp_owned(site);
    driver_cfg.deferred_public.clone_from(&deferred);
    let driver = NatDriver::start(driver_cfg, gateway_cfg)
        .await
        .context("starting the PAT gateway")?;
    let driver = Arc::new(driver);
    let (vip_tx, vip_rx) = mpsc::unbounded_channel();
    let mover = tokio::spawn(super::lb::move_vips(Arc::clone(&driver), vip_rx));
    {
        let mut wiring = wiring::lock(&ctx.wiring);
        wiring.nat = Some(Arc::clone(&driver));
        wiring.gateway = Some(Arc::clone(&driver));
        for addr in &deferred {
            let hook: Arc<dyn AddressHook> = Arc::new(super::lb::VipHook {
                vip: *addr,
                tx: vip_tx.clone(),
            });
            wiring.hooks.insert(*addr, hook);
        }
    }
    if !deferred.is_empty() {
        tracing::info!(addresses = ?deferred, "PAT public addresses wait for their VRRP master");
    }
    Ok(vec![Box::new(NatPart {
        driver,
        wiring: Arc::clone(&ctx.wiring),
        started: nat.clone(),
        deferred,
        summary: SummaryCache::default(),
        mover,
        _vip_requests: vip_tx,
    })])
}

/// The public addresses of `[nat]` (overload and forwards' own) that a `[[vrrp]]` instance
/// moves, each once.
fn vrrp_owned(site: &SiteConfig) -> Vec<Ipv4Addr> {
    let Some(nat) = &site.nat else {
        return Vec::new();
    };
    let mut out: Vec<Ipv4Addr> = Vec::new();
    let publics = std::iter::once(nat.address).chain(nat.statics.iter().filter_map(|s| s.address));
    for a in publics {
        let moved = site
            .vrrp
            .iter()
            .any(|v| v.addresses.get_ref().iter().any(|n| n.addr() == a));
        if moved && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

struct NatPart {
    driver: Arc<NatDriver>,
    /// Where the gateway is offered to the virtual services; withdrawn at stop.
    wiring: SharedWiring,
    /// The `[nat]` the part was started with (to tell live changes from restarts).
    started: NatSection,
    /// The public addresses VRRP moves (their hooks were handed over at start).
    deferred: Vec<Ipv4Addr>,
    summary: SummaryCache,
    /// Makes the VRRP-owned public addresses live or withdraws them (aborted at stop).
    mover: JoinHandle<()>,
    /// Held so the mover's channel stays open while the part runs, hooks or none.
    _vip_requests: mpsc::UnboundedSender<(Ipv4Addr, bool)>,
}

/// A part's last summary, reused for a second: however often metrics are scraped or
/// `vipgate status` runs, the packet-loop lock is taken for them at most once per second
/// (review §2.3). Callers wait on the cache's own lock meanwhile, not on the packet loop's.
#[derive(Default)]
pub(crate) struct SummaryCache(Mutex<Option<(std::time::Instant, Value)>>);

impl SummaryCache {
    /// How long a summary is reused.
    pub(crate) const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

    /// The cached summary, or a fresh one from `fresh` when it is older than [`Self::MAX_AGE`].
    pub(crate) fn get(&self, fresh: impl FnOnce() -> Value) -> Value {
        let mut cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = clock();
        if let Some((at, v)) = &*cached
            && now.saturating_duration_since(*at) < Self::MAX_AGE
        {
            return v.clone();
        }
        let v = fresh();
        *cached = Some((now, v.clone()));
        v
    }
}

#[allow(clippy::disallowed_methods)] // the one clock read of the summary cache
fn clock() -> std::time::Instant {
    std::time::Instant::now()
}

fn acl_text(r: &AclRule) -> String {
    let mut s = String::from(match r.action {
        natgw::AclAction::Permit => "permit",
        natgw::AclAction::Deny => "deny",
    });
    if let Some(p) = r.proto {
        let _ = write!(s, " {p}");
    }
    let ports = |r: &Option<std::ops::RangeInclusive<u16>>| match r {
        Some(r) if r.start() == r.end() => format!(" port {}", r.start()),
        Some(r) => format!(" ports {}-{}", r.start(), r.end()),
        None => String::new(),
    };
    let _ = write!(
        s,
        " src {}{} dst {}{}",
        r.src.map_or("any".into(), |n| n.to_string()),
        ports(&r.src_ports),
        r.dst.map_or("any".into(), |n| n.to_string()),
        ports(&r.dst_ports)
    );
    s
}

/// `show nat --json`: the status with at most [`SHOW_LIMIT`] translations (`flows` says how
/// many there are).
fn status_json(mut s: NatStatus) -> Value {
    if let Some(t) = &mut s.translations {
        t.truncate(SHOW_LIMIT);
    }
    serde_json::to_value(s).unwrap_or_default()
}

impl NatPart {
    /// `Part::reconfigure`: every check and change here is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        let Some(nat) = &site.nat else {
            return Ok(Reconfigured::restart("[nat] is gone"));
        };
        if nat.inside != self.started.inside
            || nat.outside.get_ref() != self.started.outside.get_ref()
            || *nat.table.get_ref() != *self.started.table.get_ref()
            || nat.rule_priority.get_ref() != self.started.rule_priority.get_ref()
            || nat.queues.as_ref().map(toml::Spanned::get_ref)
                != self.started.queues.as_ref().map(toml::Spanned::get_ref)
            || nat.datapath.as_ref().map(toml::Spanned::get_ref)
                != self.started.datapath.as_ref().map(toml::Spanned::get_ref)
        {
            // Steering (interfaces, table, rules), the TUN queues and the data path are set up
            // at start: restart.
            return Ok(Reconfigured::restart(
                "interfaces, routing table, rule priority, queues or datapath changed",
            ));
        }
        if vrrp_owned(site) != self.deferred {
            // The hooks VRRP holds were made at start, for the addresses it moved then.
            return Ok(Reconfigured::restart(
                "the public addresses [[vrrp]] moves changed",
            ));
        }
        Ok(self
            .driver
            .reconfigure(lower::gateway(nat, random_seed()))?)
    }
}

impl Part for NatPart {
    fn kind(&self) -> Kind {
        Kind::Nat
    }

    fn name(&self) -> String {
        "nat".into()
    }

    fn status(&self) -> Value {
        status_json(self.driver.snapshot())
    }

    /// Counters and table usage without walking the table: every metrics scrape and
    /// `vipgate status` call this, and the packet loop waits while the gateway is locked.
    fn dead_task(&self) -> Option<String> {
        self.driver.dead_task()
    }

    fn summary(&self) -> Value {
        self.summary.get(|| status_json(self.driver.summary()))
    }

    fn control(&self, op: &ControlOp) -> anyhow::Result<Value> {
        match op {
            ControlOp::NatClear => Ok(json!({ "cleared": self.driver.clear() })),
            _ => anyhow::bail!("nat does not support `{op}`"),
        }
    }

    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(self.reconfigure_now(site))
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            {
                let mut wiring = wiring::lock(&self.wiring);
                if wiring
                    .nat
                    .as_ref()
                    .is_some_and(|d| Arc::ptr_eq(d, &self.driver))
                {
                    wiring.nat = None;
                }
            }
            self.mover.abort();
            if let Err(e) = self.driver.stop().await {
                tracing::warn!(error = %e, "the nat packet loop had failed");
            }
        })
    }
}

/// Human text for `vipgate show nat`, in the layout of IOS `show ip nat translations`.
pub(crate) fn render(items: &[Value]) -> String {
    super::render_each(items, render_gateway)
}

fn render_gateway(out: &mut String, it: &NatStatus) {
    let row = |out: &mut String, cols: [&dyn std::fmt::Display; 7]| {
        let [
            pro,
            global,
            local,
            outside_local,
            outside_global,
            state,
            expires,
        ] = cols;
        let _ = writeln!(
            out,
            "{pro:<5} {global:<22} {local:<22} {outside_local:<22} {outside_global:<22} {state:<12} {expires:>8}",
        );
    };
    row(
        out,
        [
            &"Pro",
            &"Inside global",
            &"Inside local",
            &"Outside local",
            &"Outside global",
            &"State",
            &"Expires",
        ],
    );
    for e in &it.statics {
        row(
            out,
            [
                &e.proto.name(),
                &e.public,
                &e.inside,
                &"---",
                &"---",
                &"static",
                &"-",
            ],
        );
    }
    let translations = it.translations.as_deref().unwrap_or_default();
    for t in translations {
        let state = match (t.proto, t.established) {
            (Proto::Tcp, true) => "established",
            (Proto::Tcp, false) => "transitory",
            _ => "active",
        };
        let expires = format!("{}s", t.expires_in.as_secs());
        row(
            out,
            [
                &t.proto.name(),
                &t.public,
                &t.inside,
                &t.outside,
                &t.outside,
                &state,
                &expires,
            ],
        );
    }
    if it.translations.is_some() && it.flows > translations.len() {
        let _ = writeln!(
            out,
            "... (first {} of {} shown; --json has the same limit)",
            translations.len(),
            it.flows
        );
    }
    let _ = writeln!(
        out,
        "\nTable: {} flows, {} mappings, limit {}, {} KiB",
        it.flows,
        it.mappings,
        it.capacity,
        it.table_bytes / 1024
    );
    let addrs: Vec<String> = it
        .public_addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(
        out,
        "Public addresses: {} (TUN queues: {})",
        addrs.join(", "),
        it.tun_queues
    );
    let fast = &it.fast_path;
    let _ = writeln!(
        out,
        "Data path: {} ({}); kernel fast path: {} flows, {} packets, {} bytes",
        it.datapath, it.datapath_reason, fast.flows, fast.packets, fast.bytes
    );
    if fast.map_capacity > 0 {
        let _ = writeln!(
            out,
            "Kernel flow map: {} entries (two per flow, one per direct-routing flow)",
            fast.map_capacity
        );
    }
    if fast.adopted + fast.adoption_dropped > 0 {
        let _ = writeln!(
            out,
            "Kernel path at start: {} flows of the previous run adopted, {} dropped",
            fast.adopted, fast.adoption_dropped
        );
    }
    if fast.published_listeners > 0 || fast.syn_opened + fast.syn_ring_full > 0 {
        let _ = writeln!(
            out,
            "Kernel-opened flows (published listeners: {}): {} SYNs executed, {} adopted by the core, {} refused, {} not yet on the fast path (half-open, or closed first); {} SYNs left to the core (ring full)",
            fast.published_listeners,
            fast.syn_opened,
            fast.opened_adopted,
            fast.opened_refused,
            fast.opened_pending,
            fast.syn_ring_full
        );
        let _ = writeln!(
            out,
            "Their handshakes: {} SYN-ACKs sent by the kernel ({} left to the core: ring full), {} client ACKs reported by the kernel, {} fed to the core at once, {} left to the sync round (ring full)",
            fast.syn_acks_sent,
            fast.syn_ack_ring_full,
            fast.handshakes_reported,
            fast.handshakes_fed,
            fast.handshake_ring_full
        );
    }
    let _ = writeln!(out, "ACL (first match wins):");
    for (i, r) in it.acl.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:>3} {:<60} ({} matches)",
            i + 1,
            acl_text(&r.rule),
            r.counters.hits
        );
    }
    let c = &it.counters;
    let _ = writeln!(
        out,
        "      implicit deny of inside traffic ({} matches)",
        c.acl_implicit_denies
    );
    let g = &c.gateway;
    let _ = writeln!(
        out,
        "Packets: translated out {}, in {}, hairpinned {}, icmp errors {}, passed through {}",
        g.translated_out, g.translated_in, g.hairpinned, g.icmp_errors, g.passed_through
    );
    let _ = writeln!(
        out,
        "Flows: created {} (adopted mid-stream {}, opened in the kernel {}), removed {}, early drops {}",
        g.flows_created,
        g.flows_adopted,
        g.flows_opened_by_data_path,
        g.flows_removed,
        g.early_drops
    );
    if g.direct_routed > 0 {
        let _ = writeln!(
            out,
            "Direct-routed (to virtual services' real servers, unchanged): {}",
            g.direct_routed
        );
    }
    let _ = writeln!(out, "Drops: {}", super::drops_text(&g.drops));
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw::driver::{Datapath, FastPathCounters, NatCounters};
    use natgw::{GatewayStats, StaticEntry, Translation};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;

    fn snapshot(flows: usize) -> NatStatus {
        let public = Ipv4Addr::new(198, 51, 100, 1);
        let inside = SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 10), 80);
        NatStatus {
            translations: Some(
                (0..flows)
                    .map(|i| Translation {
                        proto: Proto::Tcp,
                        inside,
                        public: SocketAddrV4::new(public, 8001),
                        outside: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 1024 + i as u16),
                        established: true,
                        expires_in: Duration::from_secs(60),
                        listener: Some(natgw::ListenerId(0)),
                    })
                    .collect(),
            ),
            statics: vec![StaticEntry {
                proto: Proto::Tcp,
                public: SocketAddrV4::new(public, 8001),
                inside,
            }],
            half_open: 0,
            acl: Vec::new(),
            counters: NatCounters {
                gateway: GatewayStats {
                    translated_out: 7,
                    ..GatewayStats::default()
                },
                acl_implicit_denies: 3,
            },
            flows,
            mappings: 1,
            capacity: 65_536,
            table_bytes: 4096,
            public_addresses: vec![public],
            tun_queues: 1,
            datapath: Datapath::Tun,
            datapath_reason: "configured: datapath = \"tun\"".into(),
            fast_path: FastPathCounters::default(),
        }
    }

    #[test]
    fn summary_has_every_key_of_status_but_the_translations() {
        let full = status_json(snapshot(3));
        let mut summary_of_same = snapshot(3);
        summary_of_same.translations = None;
        let summary = status_json(summary_of_same);
        assert_eq!(full["translations"].as_array().map(Vec::len), Some(3));
        assert!(summary.get("translations").is_none());
        let mut without = full.clone();
        without
            .as_object_mut()
            .expect("an object")
            .remove("translations");
        assert_eq!(without, summary);
        assert_eq!(summary["flows"], 3);
        assert_eq!(summary["counters"]["translated_out"], 7);
        assert_eq!(summary["counters"]["acl_implicit_denies"], 3);
        assert_eq!(summary["counters"]["drops"]["table_full"], 0);
        assert_eq!(summary["datapath"], "tun");
        assert_eq!(summary["fast_path"]["flows"], 0);
    }

    #[test]
    fn show_lists_static_forwards_like_ios() {
        let text = render(&[status_json(snapshot(1))]);
        let line = text
            .lines()
            .find(|l| l.contains("static"))
            .expect("a static line");
        assert!(line.contains("198.51.100.1:8001") && line.contains("192.168.101.10:80"));
        assert!(line.contains("---"));
    }
}
