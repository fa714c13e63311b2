//! `[[service]]` in `vipgate run`, `vipgate show lb` and `vipgate lb weight`.
//!
//! The services run inside a natgw gateway (TUN `nat0`): each is a listener on its VIP:port
//! whose new flows a `balance` pool spreads over the backends. On a host with `[nat]` they
//! join the PAT gateway the nat part started (which stops it after them); on a host without
//! (a director) this part starts a gateway itself, with no overload address and no port
//! forwards, and finds the interfaces from the kernel's routes: the outside interface is the
//! one that reaches the VIPs, the inside interfaces are those that reach the backends. A
//! director's gateway runs on the data path `[lb] datapath` names (default the kernel fast
//! path); a joined one on the PAT gateway's. Each service's status carries the gateway's data
//! path and fast-path counters.
//!
//! Health checks run in a task of their own (natgw's checker); each up/down change is logged
//! and applied to the pool between two packet batches. A reload (SIGHUP, `vipgate reload`)
//! applies weights, backends, schedulers, persistence, sorry server and health settings in
//! place, without touching established flows; adding, removing or moving a service restarts
//! the gateway.
//!
//! A VIP that a `[[vrrp]]` instance lists is not made live at start: the VRRP master makes it
//! live through the [`vrrp::driver::AddressHook`] this part hands over in [`StartCtx::wiring`],
//! together with one health signal per service for `track_services`.

use super::{BoxFuture, Kind, Part, StartCtx, ready, wiring};
use crate::config::{SiteConfig, lower};
use crate::control::ControlOp;
use anyhow::{Context, bail};
use natgw::driver::{DriverConfig, NatDriver};
use natgw::health::probe::{TargetSpec, run_checker};
use natgw::health::{CheckKind, Transition};
use natgw::{BackendKey, GatewayConfig, VirtualService};
use netsys::netlink::Handle;
use netsys::sync::lock_unpoisoned;
use netutil::Reconfigured;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vrrp::VirtualAddress;
use vrrp::driver::AddressHook;

/// What the service parts of one site share: the gateway and the health tasks.
struct Shared {
    driver: Arc<NatDriver>,
    gw: SharedGateway,
    /// Whether this part started the gateway (a director) or joined the nat part's.
    owns_driver: bool,
    /// New health-check target lists (after a reload).
    targets: mpsc::Sender<Vec<TargetSpec<BackendKey>>>,
    tasks: Vec<JoinHandle<()>>,
    /// How the health tasks ended (one ending before `stop` is a dead part).
    watch: netutil::task::TaskWatch,
    /// Held so the VIP mover's channel stays open while the part runs, with or without VRRP
    /// hooks: the mover ending is then always a death, never "nobody will ask again".
    _vip_requests: mpsc::UnboundedSender<(Ipv4Addr, bool)>,
}

/// A task that never fails, in the form [`netutil::task::TaskWatch::spawn`] takes.
async fn infallible(task: impl Future<Output = ()>) -> Result<(), std::convert::Infallible> {
    task.await;
    Ok(())
}

/// One `[[service]]` as a running part.
struct ServicePart {
    name: String,
    shared: Arc<Shared>,
    /// `summary()` (metrics, `vipgate status`) reuses this for a second.
    summary: super::nat::SummaryCache,
}

type SharedGateway = Arc<Mutex<natgw::Gateway>>;

fn lock(gw: &SharedGateway) -> MutexGuard<'_, natgw::Gateway> {
    // As the driver does: a panic under the lock must not stop the gateway.
    lock_unpoisoned(gw)
}

/// Starts (or joins) the gateway with every `[[service]]`, then the health checker.
///
/// # Errors
/// Interfaces that cannot be found, a service the gateway refuses (e.g. its VIP:port is
/// also a port forward), or the gateway failing to start.
pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let services: Vec<natgw::ServiceConfig> = site.service.iter().map(lower::service).collect();
    // VIPs a VRRP instance moves: only its master makes them live (DESIGN.md).
    let vrrp_vips: Vec<Ipv4Addr> = services
        .iter()
        .map(|s| *s.listen.ip())
        .filter(|ip| {
            site.vrrp
                .iter()
                .any(|v| v.addresses.get_ref().iter().any(|a| a.addr() == *ip))
        })
        .collect();
    let joined = wiring::lock(&ctx.wiring).nat.clone();
    let (driver, owns_driver) = match joined {
        Some(driver) if site.nat.is_some() => {
            join_gateway(&driver, &services, &vrrp_vips).await?;
            (driver, false)
        }
        _ => (
            Arc::new(start_gateway(site, services, &vrrp_vips).await?),
            true,
        ),
    };
    let gw = driver.gateway();
    let initial = health_targets(&lock(&gw));
    let (targets_tx, targets_rx) = mpsc::channel(4);
    let (changes_tx, changes_rx) = mpsc::channel(64);
    // Cannot fail: the receiver is still here.
    let _ = targets_tx.send(initial).await;
    let watch = netutil::task::TaskWatch::new();
    let checker = watch.spawn(
        "health checker",
        infallible(run_checker(targets_rx, changes_tx)),
    );
    let mut health = HashMap::new();
    let mut health_rx = HashMap::new();
    for s in lock(&gw).services() {
        let (tx, rx) = watch::channel(s.is_available());
        health.insert(s.name().to_string(), tx);
        health_rx.insert(s.name().to_string(), rx);
    }
    let applier = watch.spawn(
        "health applier",
        infallible(apply_health(gw.clone(), changes_rx, health)),
    );
    let (vip_tx, vip_rx) = mpsc::unbounded_channel();
    let vip_mover = watch.spawn("vip mover", infallible(move_vips(driver.clone(), vip_rx)));
    {
        let mut wiring = wiring::lock(&ctx.wiring);
        wiring.health.extend(health_rx);
        wiring.gateway = Some(driver.clone());
        for vip in &vrrp_vips {
            let hook: Arc<dyn AddressHook> = Arc::new(VipHook {
                vip: *vip,
                tx: vip_tx.clone(),
            });
            wiring.hooks.insert(*vip, hook);
        }
    }
    let shared = Arc::new(Shared {
        driver,
        gw,
        owns_driver,
        targets: targets_tx,
        tasks: vec![checker, applier, vip_mover],
        watch,
        _vip_requests: vip_tx,
    });
    Ok(site
        .service
        .iter()
        .map(|s| {
            Box::new(ServicePart {
                name: s.name.get_ref().clone(),
                shared: shared.clone(),
                summary: super::nat::SummaryCache::default(),
            }) as Box<dyn Part>
        })
        .collect())
}

/// Adds the services to the nat part's gateway (a service already there, from before a
/// restart of this part, takes the new configuration) and makes their VIPs live.
async fn join_gateway(
    driver: &NatDriver,
    services: &[natgw::ServiceConfig],
    deferred: &[Ipv4Addr],
) -> anyhow::Result<()> {
    {
        let gw = driver.gateway();
        let mut gw = lock(&gw);
        for s in services {
            match gw.service_mut(&s.name) {
                Some(running) if running.listen() == s.listen => running
                    .reconfigure(s.clone())
                    .map_err(|e| anyhow::anyhow!("service {}: {e}", s.name))?,
                Some(_) => bail!(
                    "service {}: moving a service to another listen address needs a restart of vipgate",
                    s.name
                ),
                None => {
                    gw.add_service(s.clone())?;
                }
            }
        }
    }
    for s in services
        .iter()
        .filter(|s| !deferred.contains(s.listen.ip()))
    {
        driver
            .add_public_address(*s.listen.ip())
            .await
            .with_context(|| format!("making VIP {} live", s.listen.ip()))?;
    }
    tracing::info!(
        services = services.len(),
        "virtual services added to the PAT gateway"
    );
    Ok(())
}

/// A director's gateway: services only, interfaces found from the routes.
async fn start_gateway(
    site: &SiteConfig,
    services: Vec<natgw::ServiceConfig>,
    deferred: &[Ipv4Addr],
) -> anyhow::Result<NatDriver> {
    let Some(first) = services.first() else {
        bail!("no [[service]] to run");
    };
    let netlink = netsys::netlink::connect().context("opening a netlink socket")?;
    let outside = route_dev(&netlink, *first.listen.ip()).await?;
    let mut inside: Vec<String> = Vec::new();
    for s in &services {
        let out = route_dev(&netlink, *s.listen.ip()).await?;
        if out != outside {
            bail!(
                "service {}: VIP {} is reached through {out}, the others through {outside}; all VIPs must sit on one outside interface",
                s.name,
                s.listen.ip()
            );
        }
        let reals = s
            .pool
            .backends
            .iter()
            .map(|b| *b.addr.ip())
            .chain(s.pool.sorry.map(|a| *a.ip()));
        for ip in reals {
            let dev = route_dev(&netlink, ip).await?;
            if dev == outside {
                bail!(
                    "service {}: backend {ip} is reached through {dev}, the same interface as the VIP; the real servers must sit behind another interface (NAT and direct routing alike)",
                    s.name
                );
            }
            if !inside.contains(&dev) {
                inside.push(dev);
            }
        }
    }
    let count = services.len();
    let gw_cfg = GatewayConfig {
        services,
        ..GatewayConfig::default()
    };
    let driver_cfg = DriverConfig {
        deferred_public: deferred.to_vec(),
        ..lower::director(site, inside.clone(), outside.clone())
    };
    let driver = NatDriver::start(driver_cfg, gw_cfg)
        .await
        .context("starting the gateway for the virtual services")?;
    tracing::info!(%outside, ?inside, services = count, "virtual services running");
    Ok(driver)
}

/// The interface the kernel routes `ip` through (what `ip route get` prints after `dev`).
async fn route_dev(netlink: &Handle, ip: Ipv4Addr) -> anyhow::Result<String> {
    netsys::netlink::route_get(netlink, ip.into())
        .await
        .with_context(|| format!("no route to {ip}"))?
        .map(|link| link.name)
        .with_context(|| format!("the route to {ip} names no interface"))
}

fn health_targets(gw: &natgw::Gateway) -> Vec<TargetSpec<BackendKey>> {
    gw.services()
        .flat_map(VirtualService::health_targets)
        .collect()
}

/// Applies health changes to the pools (between two packet batches: the loop holds the lock
/// per batch).
async fn apply_health(
    gw: SharedGateway,
    mut changes: mpsc::Receiver<Transition<BackendKey>>,
    health: HashMap<String, watch::Sender<bool>>,
) {
    while let Some(t) = changes.recv().await {
        let mut gw = lock(&gw);
        let Some(service) = gw.service_mut(&t.key.service) else {
            continue;
        };
        if let Err(e) = service.set_health(t.key.backend, t.health) {
            tracing::debug!(target = %t.key, error = %e, "health change for a backend no longer configured");
        }
        // track_services: VRRP lowers its priority (or faults) while this is false.
        if let Some(tx) = health.get(&t.key.service) {
            tx.send_if_modified(|v| std::mem::replace(v, service.is_available()) != *v);
        }
    }
}

/// Makes a VRRP-owned VIP live or withdraws it, as the VRRP master state comes and goes.
struct VipHook {
    vip: Ipv4Addr,
    tx: mpsc::UnboundedSender<(Ipv4Addr, bool)>,
}

impl AddressHook for VipHook {
    // Called on the VRRP task: hand the netlink work to `move_vips` instead of blocking it.
    fn activate(&self, _vip: VirtualAddress) {
        let _ = self.tx.send((self.vip, true));
    }
    fn deactivate(&self, _vip: VirtualAddress) {
        let _ = self.tx.send((self.vip, false));
    }
}

async fn move_vips(driver: Arc<NatDriver>, mut rx: mpsc::UnboundedReceiver<(Ipv4Addr, bool)>) {
    while let Some((vip, live)) = rx.recv().await {
        let result = if live {
            driver.add_public_address(vip).await
        } else {
            driver.remove_public_address(vip).await
        };
        match result {
            Ok(()) => {
                tracing::info!(%vip, live, "virtual service address {}", if live { "made live" } else { "withdrawn" })
            }
            Err(e) => {
                tracing::error!(%vip, live, error = %e, "moving a virtual service address failed")
            }
        }
    }
}

impl ServicePart {
    /// Runs `f` on this service (under the gateway lock, between two packet batches).
    fn with_service<R>(&self, f: impl FnOnce(&mut VirtualService) -> R) -> anyhow::Result<R> {
        lock(&self.shared.gw)
            .service_mut(&self.name)
            .map(f)
            .with_context(|| format!("service `{}` is not running", self.name))
    }
}

impl ServicePart {
    /// `Part::reconfigure`: every check and change here is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        if site.nat.is_some() == self.shared.owns_driver {
            return Ok(Reconfigured::restart("[nat] was added or removed"));
        }
        if !site.service.iter().any(|s| *s.name.get_ref() == self.name) {
            return Ok(Reconfigured::restart("the service is gone"));
        }
        // One part applies the whole set (the gateway checks it all or nothing); the others
        // only confirm that their service is still there.
        if site
            .service
            .first()
            .is_some_and(|s| *s.name.get_ref() != self.name)
        {
            return Ok(Reconfigured::Live);
        }
        let services: Vec<natgw::ServiceConfig> = site.service.iter().map(lower::service).collect();
        let applied = {
            let mut gw = lock(&self.shared.gw);
            gw.reconfigure_services(services)
                .map(|outcome| (outcome, health_targets(&gw)))
        };
        match applied {
            Ok((Reconfigured::NeedsRestart(reason), _)) => Ok(Reconfigured::NeedsRestart(reason)),
            Ok((Reconfigured::Live, targets)) => {
                // The checker takes the new list on its next turn; a full channel means a
                // newer list is already queued.
                let _ = self.shared.targets.try_send(targets);
                tracing::info!("services reconfigured in place");
                Ok(Reconfigured::Live)
            }
            Err(e) => Ok(Reconfigured::restart(e.to_string())),
        }
    }
}

impl Part for ServicePart {
    fn kind(&self) -> Kind {
        Kind::Lb
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    /// A health task that ended, or (when this part started the gateway) a packet loop.
    fn dead_task(&self) -> Option<String> {
        self.shared.watch.dead().or_else(|| {
            self.shared
                .owns_driver
                .then(|| self.shared.driver.dead_task())
                .flatten()
        })
    }

    fn status(&self) -> Value {
        let mut status = self
            .with_service(|s| service_json(s))
            .unwrap_or_else(|e| json!({ "name": self.name, "error": format!("{e:#}") }));
        // The gateway's data path (the director's own, or the PAT gateway's it joined).
        let nat = self.shared.driver.summary();
        status["datapath"] = json!(nat.datapath);
        status["datapath_reason"] = json!(nat.datapath_reason);
        status["fast_path"] = json!(nat.fast_path);
        status
    }

    /// The status, taken from the gateway at most once per second.
    fn summary(&self) -> Value {
        self.summary.get(|| self.status())
    }

    fn control(&self, op: &ControlOp) -> anyhow::Result<Value> {
        let ControlOp::LbWeight {
            backend, weight, ..
        } = *op
        else {
            bail!("lb `{}` does not support `{op}`", self.name);
        };
        let before = self.with_service(move |s| {
            let old = s
                .backend_id(backend)
                .and_then(|id| s.pool().backend(id))
                .map(balance::Backend::weight);
            s.set_weight(backend, u32::from(weight)).map(|()| old)
        })??;
        tracing::info!(service = %self.name, %backend, weight, "weight changed by operator");
        Ok(json!({
            "service": self.name,
            "backend": backend.to_string(),
            "weight": weight,
            "previous": before,
        }))
    }

    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(self.reconfigure_now(site))
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let ServicePart { name, shared, .. } = *self;
            // The last service part stops the gateway and the health tasks.
            let Some(shared) = Arc::into_inner(shared) else {
                return;
            };
            shared.watch.stopping();
            for t in &shared.tasks {
                t.abort();
            }
            for t in shared.tasks {
                let _ = t.await;
            }
            // A joined gateway belongs to the nat part, which stops it after this part; its
            // listeners stay until then (the gateway has no way to remove one).
            if shared.owns_driver
                && let Err(e) = shared.driver.stop().await
            {
                tracing::warn!(service = %name, error = %e, "gateway stopped with an error");
            }
        })
    }
}

/// What `show lb --json` prints for one service.
fn service_json(s: &VirtualService) -> Value {
    let pool = s.pool();
    let backends: Vec<Value> = pool
        .backends()
        .map(|(_, b)| {
            let st = b.stats();
            // ipvsadm's names (Uthreshold/Lthreshold): a key with "connections" in it would
            // become a Prometheus counter.
            let threshold = |t: u32| (t != 0).then_some(t);
            json!({
                "address": b.addr().to_string(),
                "weight": b.weight(),
                "effective_weight": b.effective_weight(),
                "slow_start": b.is_ramping(),
                "upper_threshold": threshold(b.max_connections()),
                "lower_threshold": threshold(b.min_connections()),
                "overloaded": b.is_overloaded(),
                "state": b.state().as_str(),
                "health": match b.health() { balance::Health::Up => "up", balance::Health::Down => "down" },
                "active": b.active(),
                "inactive": b.inactive(),
                "counters": {
                    "connections": st.connections,
                    "packets_in": st.packets_in,
                    "packets_out": st.packets_out,
                    "bytes_in": st.bytes_in,
                    "bytes_out": st.bytes_out,
                },
            })
        })
        .collect();
    let health = s.health().map(|h| {
        let (kind, path, status) = match &h.kind {
            CheckKind::Tcp => ("tcp", None, None),
            CheckKind::Http { path, status } => ("http", Some(path.clone()), Some(*status)),
        };
        json!({
            "kind": kind, "path": path, "status": status,
            "interval_ms": h.interval.as_millis() as u64,
            "timeout_ms": h.timeout.as_millis() as u64,
            "rise": h.rise, "fall": h.fall,
        })
    });
    let stats = pool.stats();
    json!({
        "name": s.name(),
        "listen": s.listen().to_string(),
        "protocol": "tcp",
        "forward": match s.forward() {
            natgw::Forward::Nat => "nat",
            natgw::Forward::DirectRoute => "dr",
        },
        "scheduler": pool.scheduler().as_str(),
        "persistence": pool.persistence().map(|p| json!({
            "timeout_s": p.timeout.as_secs(), "netmask": p.netmask,
        })),
        "templates": pool.templates(),
        "sorry": pool.sorry().map(|a| a.to_string()),
        "available": s.is_available(),
        "health": health,
        "counters": {
            "sorry_connections": stats.sorry,
            "refused": stats.refused,
            "persistent_hits": stats.persistent_hits,
            "persist_full": stats.persist_full,
                "locality_full": stats.locality_full,
        },
        "fallback": pool.fallback(),
        "connection_limit": (pool.max_connections() != 0).then_some(pool.max_connections()),
        "open_flows": pool.connections(),
        "slow_start_ms": pool.slow_start().map(|d| d.as_millis() as u64),
        "locality_entries": pool.locality_entries(),
        "backends": backends,
    })
}

/// Human text for `vipgate show lb`, laid out like `ipvsadm -Ln --stats` plus state columns
/// (Forward as ipvsadm names it: Masq for NAT, Route for direct routing).
pub(crate) fn render(items: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Prot LocalAddress:Port Scheduler Flags");
    let _ = writeln!(
        out,
        "  -> RemoteAddress:Port   Forward State     Weight ActiveConn InActConn      Conns     InPkts    OutPkts    InBytes   OutBytes"
    );
    for s in items {
        if let Some(err) = s.get("error").and_then(Value::as_str) {
            let _ = writeln!(out, "{}: {err}", s["name"].as_str().unwrap_or("?"));
            continue;
        }
        let forward = match s["forward"].as_str() {
            Some("dr") => natgw::Forward::DirectRoute,
            _ => natgw::Forward::Nat,
        }
        .ipvsadm_name();
        let mut flags = String::new();
        if let Some(p) = s.get("persistence").filter(|p| !p.is_null()) {
            let _ = write!(flags, " persistent {}", p["timeout_s"]);
            if p["netmask"].as_u64() != Some(32) {
                let _ = write!(flags, " mask /{}", p["netmask"]);
            }
        }
        if s["fallback"].as_bool() == Some(true) {
            flags.push_str(" fallback");
        }
        if let Some(max) = s["connection_limit"].as_u64() {
            let _ = write!(flags, " maxconn {}/{max}", s["open_flows"]);
        }
        if let Some(ms) = s["slow_start_ms"].as_u64() {
            let _ = write!(flags, " slow-start {ms}ms");
        }
        if let Some(h) = s.get("health").filter(|h| !h.is_null()) {
            let _ = write!(
                flags,
                " check {} every {}ms rise {} fall {}",
                h["kind"].as_str().unwrap_or("?"),
                h["interval_ms"],
                h["rise"],
                h["fall"]
            );
        }
        let _ = writeln!(
            out,
            "TCP  {} {}{}  ({})",
            s["listen"].as_str().unwrap_or("?"),
            s["scheduler"].as_str().unwrap_or("?"),
            flags,
            s["name"].as_str().unwrap_or("?"),
        );
        for b in s["backends"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let n = |k: &str| b[k].as_u64().unwrap_or(0);
            let c = |k: &str| b["counters"][k].as_u64().unwrap_or(0);
            // An overloaded backend that is otherwise up shows why it gets nothing; a ramping
            // one shows the weight in effect over the configured one.
            let state = match b["state"].as_str().unwrap_or("?") {
                "up" if b["overloaded"].as_bool() == Some(true) => "overload",
                other => other,
            };
            let weight = match b["effective_weight"].as_u64() {
                Some(e) if e != n("weight") => format!("{e}/{}", n("weight")),
                _ => n("weight").to_string(),
            };
            let mut notes = String::new();
            if let Some(max) = b["upper_threshold"].as_u64() {
                let _ = write!(notes, "  max {max}");
            }
            if let Some(min) = b["lower_threshold"].as_u64() {
                let _ = write!(notes, " min {min}");
            }
            if b["slow_start"].as_bool() == Some(true) {
                notes.push_str("  slow start");
            }
            let _ = writeln!(
                out,
                "  -> {:<21} {:<7} {:<9} {:>6} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}{notes}",
                b["address"].as_str().unwrap_or("?"),
                forward,
                state,
                weight,
                n("active"),
                n("inactive"),
                c("connections"),
                c("packets_in"),
                c("packets_out"),
                human_bytes(c("bytes_in")),
                human_bytes(c("bytes_out")),
            );
        }
        if let Some(sorry) = s["sorry"].as_str() {
            let _ = writeln!(
                out,
                "  -> {:<21} {:<7} {:<9} (used when no backend is up: {} connections)",
                sorry, forward, "sorry", s["counters"]["sorry_connections"]
            );
        }
        let refused = &s["counters"]["refused"];
        if refused.as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(out, "     refused (no backend up): {refused}");
        }
        if s["counters"]["over_limit"].as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(
                out,
                "     turned away at max_connections: {}",
                s["counters"]["over_limit"]
            );
        }
    }
    // One gateway carries every service: its data path once, as `show nat` prints it.
    if let Some(s) = items.iter().find(|s| s["datapath"].is_string()) {
        let _ = writeln!(
            out,
            "Data path: {} ({}); kernel path moved {} packets, {}",
            s["datapath"].as_str().unwrap_or("?"),
            s["datapath_reason"].as_str().unwrap_or(""),
            s["fast_path"]["packets"],
            human_bytes(s["fast_path"]["bytes"].as_u64().unwrap_or(0)),
        );
    }
    out
}

/// ipvsadm prints bytes with K/M/G suffixes.
fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    UNITS.iter().find(|(size, _)| n >= *size * 10).map_or_else(
        || n.to_string(),
        |(size, unit)| format!("{}{unit}", n / size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_reads_like_ipvsadm() {
        let item = json!({
            "name": "web", "listen": "198.51.100.10:80", "scheduler": "wrr",
            "persistence": { "timeout_s": 300, "netmask": 24 },
            "health": { "kind": "tcp", "interval_ms": 2000, "rise": 2, "fall": 4 },
            "sorry": null, "counters": { "sorry_connections": 0, "refused": 3 },
            "backends": [
                { "address": "10.0.0.101:80", "state": "up", "weight": 1, "active": 2, "inactive": 5,
                  "counters": { "connections": 100, "packets_in": 700, "packets_out": 600,
                                "bytes_in": 51200, "bytes_out": 12 } },
                { "address": "10.0.0.102:80", "state": "draining", "weight": 0, "active": 1, "inactive": 0,
                  "counters": { "connections": 200, "packets_in": 1, "packets_out": 1,
                                "bytes_in": 1, "bytes_out": 1 } },
            ],
        });
        let text = render(&[item]);
        assert!(text.contains("TCP  198.51.100.10:80 wrr persistent 300 mask /24 check tcp every 2000ms rise 2 fall 4  (web)"), "{text}");
        assert!(text.contains("  -> 10.0.0.101:80         Masq    up             1          2         5        100        700        600        50K         12"), "{text}");
        assert!(text.contains("draining"));
        assert!(text.contains("refused (no backend up): 3"));
    }

    #[test]
    fn render_shows_thresholds_overload_and_slow_start() {
        let item = json!({
            "name": "cache", "listen": "198.51.100.10:80", "scheduler": "lblcr",
            "persistence": null, "health": null, "sorry": null,
            "counters": { "sorry_connections": 0, "refused": 0, "over_limit": 2 },
            "fallback": false, "connection_limit": 500, "open_flows": 7, "slow_start_ms": 30000,
            "backends": [
                { "address": "10.0.0.101:80", "state": "up", "weight": 10, "effective_weight": 10,
                  "overloaded": true, "upper_threshold": 4, "lower_threshold": 2, "slow_start": false,
                  "active": 4, "inactive": 0,
                  "counters": { "connections": 9, "packets_in": 0, "packets_out": 0,
                                "bytes_in": 0, "bytes_out": 0 } },
                { "address": "10.0.0.102:80", "state": "up", "weight": 10, "effective_weight": 3,
                  "overloaded": false, "upper_threshold": null, "lower_threshold": null,
                  "slow_start": true, "active": 3, "inactive": 0,
                  "counters": { "connections": 3, "packets_in": 0, "packets_out": 0,
                                "bytes_in": 0, "bytes_out": 0 } },
            ],
        });
        let text = render(&[item]);
        assert!(
            text.contains("TCP  198.51.100.10:80 lblcr maxconn 7/500 slow-start 30000ms  (cache)"),
            "{text}"
        );
        assert!(
            text.contains("  -> 10.0.0.101:80         Masq    overload      10          4"),
            "{text}"
        );
        assert!(text.contains("  max 4 min 2"), "{text}");
        assert!(
            text.contains("  -> 10.0.0.102:80         Masq    up          3/10          3"),
            "{text}"
        );
        assert!(text.contains("slow start"), "{text}");
        assert!(text.contains("turned away at max_connections: 2"), "{text}");
    }

    #[test]
    fn direct_routing_shows_as_route() {
        let item = json!({
            "name": "web", "listen": "198.51.100.10:80", "scheduler": "rr", "forward": "dr",
            "persistence": null, "health": null, "sorry": "10.0.0.200:80",
            "counters": { "sorry_connections": 0, "refused": 0 },
            "backends": [
                { "address": "10.0.0.101:80", "state": "up", "weight": 1, "active": 1, "inactive": 0,
                  "counters": { "connections": 1, "packets_in": 9, "packets_out": 0,
                                "bytes_in": 900, "bytes_out": 0 } },
            ],
        });
        let text = render(&[item]);
        assert!(
            text.contains("  -> 10.0.0.101:80         Route   up             1          1         0          1          9          0        900          0"),
            "{text}"
        );
        assert!(
            text.contains("  -> 10.0.0.200:80         Route   sorry"),
            "{text}"
        );
    }

    #[test]
    fn bytes_are_shortened_as_ipvsadm_does() {
        assert_eq!(human_bytes(9_999), "9999");
        assert_eq!(human_bytes(10_240), "10K");
        assert_eq!(human_bytes(50 << 30), "50G");
    }
}
