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
//! and applied to the pool between two packet batches, and each failed probe is counted there
//! (the pool's backend counters hold failed checks and up/down transitions). A reload
//! (SIGHUP, `vipgate reload`) applies weights, backends, schedulers, persistence, sorry server
//! and health settings in place, without touching established flows; adding, removing or
//! moving a service restarts the gateway.
//!
//! `show lb --json` is the serialisation of [`LbItem`]; `render` reads the JSON back into it.
//! The service-level types live here, not in a library: one entry joins the pool (balance),
//! the service's forwarding and checks (natgw) and the gateway's data path (its driver). What
//! is the pool's own (`BackendState`, `Health`, `BackendStats`, `PoolStats`, `SchedulerKind`)
//! derives serde in balance, behind its `serde` feature, so its spelling is the library's.
//!
//! A VIP that a `[[vrrp]]` instance lists is not made live at start: the VRRP master makes it
//! live through the [`vrrp::driver::AddressHook`] this part hands over in [`StartCtx::wiring`],
//! together with one health signal per service for `track_services`.

use super::lbruntime::{BackendDiff, Runtime};
use super::{BoxFuture, Kind, Part, StartCtx, ready, wiring};
use crate::config::host::{HostRoutes, Reach};
use crate::config::{SiteConfig, lower};
use crate::control::ControlOp;
use anyhow::{Context, bail};
use balance::{
    AdminState, BackendConfig, BackendState, BackendStats, Health, PoolStats, SchedulerKind,
};
use natgw::driver::{Datapath, DriverConfig, FastPathCounters, NatDriver};
use natgw::health::probe::run_checker;
use natgw::health::{CheckEvent, CheckKind, CheckTargets};
use natgw::{BackendKey, GatewayConfig, VirtualService};
use netsys::netlink::Handle;
use netsys::sync::lock_unpoisoned;
use netutil::Reconfigured;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
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
    targets: mpsc::Sender<CheckTargets<BackendKey>>,
    tasks: Vec<JoinHandle<()>>,
    /// How the health tasks ended (one ending before `stop` is a dead part).
    watch: netutil::task::TaskWatch,
    /// Each service's file configuration and the operator's runtime changes on top of it
    /// (locked before the gateway when both are).
    runtime: Mutex<HashMap<String, Runtime>>,
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
    let runtime = services
        .iter()
        .map(|s| (s.name.clone(), Runtime::new(s.clone())))
        .collect();
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
        infallible(apply_health(
            gw.clone(),
            changes_rx,
            health,
            targets_tx.clone(),
        )),
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
        runtime: Mutex::new(runtime),
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
                Some(running)
                    if running.listen() == s.listen
                        && running.ports() == s.ports.as_ref()
                        && running.proto() == s.proto
                        && running.one_packet() == s.one_packet =>
                {
                    running
                        .reconfigure(s.clone())
                        .map_err(|e| anyhow::anyhow!("service {}: {e}", s.name))?
                }
                Some(_) => bail!(
                    "service {}: moving a service to another listen address, ports or protocol needs a restart of vipgate",
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

fn health_targets(gw: &natgw::Gateway) -> CheckTargets<BackendKey> {
    let mut all = CheckTargets::default();
    all.extend(gw.services().map(VirtualService::health_targets));
    all
}

/// Applies health changes and agent answers to the pools and counts failed checks in them
/// (between two packet batches: the loop holds the lock per batch). An agent that changes a
/// backend's state changes the checker's targets too (maintenance stops the health checks).
async fn apply_health(
    gw: SharedGateway,
    mut events: mpsc::Receiver<CheckEvent<BackendKey>>,
    health: HashMap<String, watch::Sender<bool>>,
    targets: mpsc::Sender<CheckTargets<BackendKey>>,
) {
    while let Some(event) = events.recv().await {
        let t = match event {
            CheckEvent::Agent { key, outcome } => {
                let mut gw = lock(&gw);
                let Some(service) = gw.service_mut(&key.service) else {
                    continue;
                };
                let state_changed = service.agent_said(key.backend, outcome);
                if let Some(tx) = health.get(&key.service) {
                    tx.send_if_modified(|v| std::mem::replace(v, service.is_available()) != *v);
                }
                if state_changed {
                    tracing::info!(target = %key, ?outcome, "agent changed the backend's state");
                    // A full channel holds a newer list already.
                    let _ = targets.try_send(health_targets(&gw));
                }
                continue;
            }
            CheckEvent::Failed { key, why } => {
                if let Some(service) = lock(&gw).service_mut(&key.service) {
                    service.check_failed(key.backend, why);
                }
                continue;
            }
            CheckEvent::Changed(t) => t,
        };
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

/// Makes a VRRP-owned VIP (a service's, or a PAT public address of `[nat]`) live or
/// withdraws it, as the VRRP master state comes and goes.
pub(super) struct VipHook {
    pub(super) vip: Ipv4Addr,
    pub(super) tx: mpsc::UnboundedSender<(Ipv4Addr, bool)>,
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

/// Applies what the [`VipHook`]s ask, in order, until every sender is gone.
pub(super) async fn move_vips(
    driver: Arc<NatDriver>,
    mut rx: mpsc::UnboundedReceiver<(Ipv4Addr, bool)>,
) {
    while let Some((vip, live)) = rx.recv().await {
        let result = if live {
            driver.add_public_address(vip).await
        } else {
            driver.remove_public_address(vip).await
        };
        match result {
            Ok(()) => {
                tracing::info!(%vip, live, "VRRP-owned public address {}", if live { "made live" } else { "withdrawn" })
            }
            Err(e) => {
                tracing::error!(%vip, live, error = %e, "moving a VRRP-owned public address failed")
            }
        }
    }
}

impl ServicePart {
    /// Runs `f` on this service (under the gateway lock, between two packet batches).
    /// An operator names a backend as the config writes it: `ip:port` on a single-port
    /// service, `ip` alone (port 0) on a multi-port one; the other form would only be "not a
    /// backend", so it is refused saying which form the service wants.
    fn check_backend_form(&self, backend: SocketAddrV4) -> anyhow::Result<()> {
        let multi_port = self.with_service(|s| s.ports().is_some())?;
        match (multi_port, backend.port()) {
            (false, 0) => bail!(
                "service `{}` listens on one port: write its backend as ip:port",
                self.name
            ),
            (true, port) if port != 0 => bail!(
                "service `{}` listens on several ports: write its backend as ip alone",
                self.name
            ),
            _ => Ok(()),
        }
    }

    fn with_service<R>(&self, f: impl FnOnce(&mut VirtualService) -> R) -> anyhow::Result<R> {
        lock(&self.shared.gw)
            .service_mut(&self.name)
            .map(f)
            .with_context(|| format!("service `{}` is not running", self.name))
    }
}

/// Sets every backend of a service to the operator state its runtime changes record (ready
/// for the others), after a reload applied the effective configuration.
fn apply_states(gw: &mut natgw::Gateway, rt: &Runtime) {
    let Some(service) = gw.service_mut(&rt.file().name) else {
        return;
    };
    let live: Vec<SocketAddrV4> = service
        .pool()
        .backends()
        .filter(|(_, b)| b.state() != BackendState::Removed)
        .map(|(_, b)| b.addr())
        .collect();
    for addr in live {
        // Cannot fail: the backend is live in this pool.
        let _ = service.set_admin(addr, rt.state(addr));
    }
}

/// What `lb add-backend` promises after `vipgate check`: the checks the config check makes
/// of a backend, made against the running gateway.
fn check_new_backend(
    gw: &natgw::Gateway,
    service: &VirtualService,
    backend: SocketAddrV4,
) -> anyhow::Result<()> {
    let name = service.name();
    if service.pool().sorry() == Some(backend) {
        bail!("{backend} is the sorry server of service `{name}`");
    }
    if service.ports().is_some() && backend.port() != 0 {
        bail!(
            "service `{name}` listens on several ports: backend {backend} takes no port (write {}: each connection keeps its port, or its rport)",
            backend.ip()
        );
    }
    // The endpoints it is reached on: a port-less backend, one per service port.
    let reached: Vec<SocketAddrV4> = match (backend.port(), service.ports()) {
        (0, Some(ports)) => ports
            .iter()
            .map(|p| SocketAddrV4::new(*backend.ip(), ports.backend_port(p)))
            .collect(),
        (0, None) => vec![SocketAddrV4::new(*backend.ip(), service.listen().port())],
        _ => vec![backend],
    };
    for (_, l) in gw.listeners() {
        for &endpoint in &reached {
            let other = match &l.selector {
                natgw::Selector::Static(st)
                    if l.proto == service.proto() && st.inside == endpoint =>
                {
                    format!("the [[nat.static]] forward of port {}", l.public.port())
                }
                natgw::Selector::Service(s)
                    if s.name() != name
                        && s.proto() == service.proto()
                        && s.uses_endpoint(endpoint) =>
                {
                    format!("service `{}`", s.name())
                }
                _ => continue,
            };
            bail!(
                "{endpoint} already serves {other}: a real server's address and port can serve one service or forward at a time (replies are told apart by it); give it another port for service `{name}`"
            );
        }
    }
    if service.forward() == natgw::Forward::DirectRoute {
        let port = service.listen().port();
        if backend.port() != port && backend.port() != 0 {
            bail!(
                "service `{name}` forwards by direct routing: backend {backend} must listen on the VIP's port {port} (the packet reaches it unchanged)"
            );
        }
        match HostRoutes::read() {
            Ok(routes) => {
                let why = match routes.reach(*backend.ip()) {
                    Reach::OnLink => return Ok(()),
                    Reach::Via(gw) => format!("this host reaches it through the gateway {gw}"),
                    Reach::Unreachable => "this host has no route to it".to_owned(),
                };
                bail!(
                    "service `{name}` forwards by direct routing: {backend} is not on a directly connected network ({why}); direct routing delivers by MAC on a shared segment"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "the routes cannot be read: not checking that {backend} is on a connected network");
            }
        }
    }
    Ok(())
}

/// The note every runtime change answers with.
const NOT_PERSISTED: &str =
    "not persisted: a restart, or a reload that changes this service in the file, replaces it";

impl ServicePart {
    /// `vipgate lb add-backend` (ipvsadm -a).
    fn add_backend(&self, backend: BackendConfig) -> anyhow::Result<Value> {
        let mut runtime = lock_unpoisoned(&self.shared.runtime);
        let rt = runtime
            .get(&self.name)
            .with_context(|| format!("service `{}` is not running", self.name))?;
        let next = rt.with_added(backend).map_err(anyhow::Error::msg)?;
        let targets = {
            let mut gw = lock(&self.shared.gw);
            let service = gw
                .services()
                .find(|s| s.name() == self.name)
                .with_context(|| format!("service `{}` is not running", self.name))?;
            check_new_backend(&gw, service, backend.addr)?;
            let Some(service) = gw.service_mut(&self.name) else {
                bail!("service `{}` is not running", self.name);
            };
            service
                .reconfigure(next.effective())
                .with_context(|| format!("service `{}`", self.name))?;
            // A backend removed earlier that still held flows comes back ready.
            let _ = service.set_admin(backend.addr, next.state(backend.addr));
            health_targets(&gw)
        };
        runtime.insert(self.name.clone(), next);
        let _ = self.shared.targets.try_send(targets);
        tracing::info!(service = %self.name, backend = %backend.addr, weight = backend.weight, "backend added by operator");
        Ok(json!({
            "service": self.name,
            "backend": backend.addr.to_string(),
            "weight": backend.weight,
            "added": true,
            "note": NOT_PERSISTED,
        }))
    }

    /// `vipgate lb weight --canary BACKEND PERCENT`: `backend` gets `percent` % of the
    /// weight, the others the rest in the ratios of their configured weights (the file's, or
    /// an `add-backend`'s), all set at once. `0` gives the others their configured weights
    /// back, so a canary step never depends on the steps before it.
    fn canary(&self, backend: SocketAddrV4, percent: u8) -> anyhow::Result<Value> {
        let effective = lock_unpoisoned(&self.shared.runtime)
            .get(&self.name)
            .map(Runtime::effective)
            .with_context(|| format!("service `{}` is not running", self.name))?;
        let base: Vec<(SocketAddrV4, u32)> = effective
            .pool
            .backends
            .iter()
            .map(|b| (b.addr, b.weight))
            .collect();
        let plan = balance::canary_weights(effective.pool.scheduler, &base, backend, percent)
            .with_context(|| format!("service `{}`: canary {backend}", self.name))?;
        let previous = self.with_service(|s| {
            let before: Vec<Option<u32>> = plan
                .weights
                .iter()
                .map(|&(addr, _)| {
                    s.backend_id(addr)
                        .and_then(|id| s.pool().backend(id))
                        .map(balance::Backend::weight)
                })
                .collect();
            s.set_weights(&plan.weights).map(|()| before)
        })??;
        tracing::info!(service = %self.name, %backend, percent, share_per_mille = plan.share_per_mille, "canary weights set by operator");
        let weights: Vec<Value> = plan
            .weights
            .iter()
            .zip(previous)
            .map(|(&(addr, weight), previous)| {
                json!({"backend": addr.to_string(), "weight": weight, "previous": previous})
            })
            .collect();
        Ok(json!({
            "service": self.name,
            "canary": backend.to_string(),
            "percent": percent,
            "share_per_mille": plan.share_per_mille,
            "weights": weights,
            "note": "not persisted; `--canary BACKEND 0%` gives the others their configured weights back",
        }))
    }

    /// `vipgate lb remove-backend` (ipvsadm -d): established flows run on.
    fn remove_backend(&self, backend: SocketAddrV4) -> anyhow::Result<Value> {
        let mut runtime = lock_unpoisoned(&self.shared.runtime);
        let rt = runtime
            .get(&self.name)
            .with_context(|| format!("service `{}` is not running", self.name))?;
        let next = rt.with_removed(backend).map_err(anyhow::Error::msg)?;
        let (targets, held) = {
            let mut gw = lock(&self.shared.gw);
            let Some(service) = gw.service_mut(&self.name) else {
                bail!("service `{}` is not running", self.name);
            };
            service
                .reconfigure(next.effective())
                .with_context(|| format!("service `{}`", self.name))?;
            let held = service
                .backend_id(backend)
                .and_then(|id| service.pool().backend(id))
                .map_or(0, balance::Backend::connections);
            (health_targets(&gw), held)
        };
        runtime.insert(self.name.clone(), next);
        let _ = self.shared.targets.try_send(targets);
        tracing::info!(service = %self.name, %backend, held, "backend removed by operator");
        Ok(json!({
            "service": self.name,
            "backend": backend.to_string(),
            "removed": true,
            "connections_left": held,
            "note": NOT_PERSISTED,
        }))
    }

    /// `vipgate show lb --connections` (`ipvsadm -Lnc`): this service's flows to `backend`
    /// from `client`, at most `limit` (and [`CONNECTIONS_LIMIT`]) of them.
    fn connections(
        &self,
        backend: Option<SocketAddrV4>,
        client: Option<Ipv4Addr>,
        limit: u32,
    ) -> anyhow::Result<Value> {
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(CONNECTIONS_LIMIT);
        let gw = lock(&self.shared.gw);
        let listener = gw
            .listeners()
            .find(|(_, l)| {
                matches!(&l.selector, natgw::Selector::Service(s) if s.name() == self.name)
            })
            .map(|(id, _)| id)
            .with_context(|| format!("service `{}` is not running", self.name))?;
        let (flows, matched) = gw.translations_where(
            now(),
            |t| {
                t.listener == Some(listener)
                    && backend.is_none_or(|b| t.inside == b)
                    && client.is_none_or(|c| *t.outside.ip() == c)
            },
            limit,
        );
        drop(gw);
        let connections = flows
            .into_iter()
            .map(|(t, state)| Connection {
                service: self.name.clone(),
                protocol: Protocol::of(t.proto),
                expires_in_s: t.expires_in.as_secs(),
                state: state.to_owned(),
                source: t.outside,
                virtual_address: t.public,
                destination: t.inside,
            })
            .collect();
        Ok(serde_json::to_value(Connections {
            connections,
            matched,
        })?)
    }

    /// `vipgate lb set state` (HAProxy's `set server state`).
    fn set_state(&self, backend: SocketAddrV4, state: AdminState) -> anyhow::Result<Value> {
        let mut runtime = lock_unpoisoned(&self.shared.runtime);
        let rt = runtime
            .get_mut(&self.name)
            .with_context(|| format!("service `{}` is not running", self.name))?;
        let previous = rt.state(backend);
        let targets = {
            let mut gw = lock(&self.shared.gw);
            let Some(service) = gw.service_mut(&self.name) else {
                bail!("service `{}` is not running", self.name);
            };
            service
                .set_admin(backend, state)
                .with_context(|| format!("service `{}`", self.name))?;
            health_targets(&gw)
        };
        rt.set_state(backend, state);
        drop(runtime);
        // maint stops the backend's checks, ready after maint starts them again.
        let _ = self.shared.targets.try_send(targets);
        tracing::info!(service = %self.name, %backend, %state, %previous, "backend state set by operator");
        Ok(json!({
            "service": self.name,
            "backend": backend.to_string(),
            "state": state,
            "previous": previous,
            "file_state": AdminState::Ready,
            "note": NOT_PERSISTED,
        }))
    }

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
        // The file's services with the runtime changes of those the file left alone.
        let mut runtime = lock_unpoisoned(&self.shared.runtime);
        let next: Vec<Runtime> = site
            .service
            .iter()
            .map(|s| {
                let file = lower::service(s);
                match runtime.get(&file.name) {
                    Some(rt) => {
                        let next = rt.reloaded(file);
                        if rt.is_changed() && !next.is_changed() {
                            tracing::info!(service = %next.file().name, "the file changed the service: its runtime changes are replaced by the file's");
                        }
                        next
                    }
                    None => Runtime::new(file),
                }
            })
            .collect();
        let services: Vec<natgw::ServiceConfig> = next.iter().map(Runtime::effective).collect();
        let applied = {
            let mut gw = lock(&self.shared.gw);
            gw.reconfigure_services(services).map(|outcome| {
                if outcome == Reconfigured::Live {
                    for rt in &next {
                        apply_states(&mut gw, rt);
                    }
                }
                (outcome, health_targets(&gw))
            })
        };
        if matches!(applied, Ok((Reconfigured::Live, _))) {
            *runtime = next
                .into_iter()
                .map(|rt| (rt.file().name.clone(), rt))
                .collect();
        }
        drop(runtime);
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
        let runtime = lock_unpoisoned(&self.shared.runtime);
        let rt = runtime.get(&self.name);
        let service = self
            .with_service(|s| ServiceEntry::Running(Box::new(ServiceStatus::of(s, rt))))
            .unwrap_or_else(|e| ServiceEntry::Missing {
                name: self.name.clone(),
                error: format!("{e:#}"),
            });
        drop(runtime);
        // The gateway's data path (the director's own, or the PAT gateway's it joined).
        let nat = self.shared.driver.summary();
        let item = LbItem {
            service,
            gateway: GatewayPath {
                datapath: nat.datapath,
                datapath_reason: nat.datapath_reason,
                fast_path: nat.fast_path,
                flows_adopted: nat.counters.gateway.flows_adopted,
            },
        };
        serde_json::to_value(item).unwrap_or_default()
    }

    /// The status, taken from the gateway at most once per second.
    fn summary(&self) -> Value {
        self.summary.get(|| self.status())
    }

    fn control(&self, op: &ControlOp) -> anyhow::Result<Value> {
        if let ControlOp::LbWeight { backend, .. }
        | ControlOp::LbCanary { backend, .. }
        | ControlOp::LbRemoveBackend { backend, .. }
        | ControlOp::LbSetState { backend, .. } = *op
        {
            self.check_backend_form(backend)?;
        }
        let (backend, weight) = match *op {
            ControlOp::LbWeight {
                backend, weight, ..
            } => (backend, weight),
            ControlOp::LbAddBackend {
                backend,
                weight,
                max_connections,
                min_connections,
                ..
            } => {
                return self.add_backend(BackendConfig {
                    max_connections,
                    min_connections,
                    ..BackendConfig::new(backend, u32::from(weight))
                });
            }
            ControlOp::LbCanary {
                backend, percent, ..
            } => return self.canary(backend, percent),
            ControlOp::LbRemoveBackend { backend, .. } => return self.remove_backend(backend),
            ControlOp::LbSetState { backend, state, .. } => {
                return self.set_state(backend, state);
            }
            ControlOp::LbConnections {
                backend,
                client,
                limit,
                ..
            } => return self.connections(backend, client, limit),
            ControlOp::NatClear
            | ControlOp::VrrpSetPriority { .. }
            | ControlOp::HttpSetState { .. } => {
                bail!("lb `{}` does not support `{op}`", self.name)
            }
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

/// One entry of `show lb --json`: a service (or why it could not be read) and the data path
/// of the gateway that carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LbItem {
    #[serde(flatten)]
    service: ServiceEntry,
    #[serde(flatten)]
    gateway: GatewayPath,
}

/// A service's status, or the error that stood in for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum ServiceEntry {
    Running(Box<ServiceStatus>),
    /// The gateway no longer holds the service (e.g. between a failed reload and the
    /// restart it asked for).
    Missing {
        name: String,
        error: String,
    },
}

/// The gateway's data path, the same for every service (`show nat` prints it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GatewayPath {
    datapath: Datapath,
    datapath_reason: String,
    fast_path: FastPathCounters,
    /// Connections taken over mid-stream by a hash scheduler (stateless adoption; every
    /// service of the gateway together).
    #[serde(default)]
    flows_adopted: u64,
}

/// Ports `first..=last` of a service (one port: `first == last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PortSpan {
    first: u16,
    last: u16,
}

/// Service ports `first..=last` reach backend ports from `to` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct RportStatus {
    first: u16,
    last: u16,
    to: u16,
}

/// `198.51.100.10:80,443,8000-8100`: a service's local address as `show lb` prints it
/// (ipvsadm prints `FWM 1` for a firewall-mark service; the ports say more).
fn local_address(listen: SocketAddrV4, ports: &[PortSpan]) -> String {
    if ports.is_empty() {
        return listen.to_string();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.first == p.last {
                p.first.to_string()
            } else {
                format!("{}-{}", p.first, p.last)
            }
        })
        .collect();
    format!("{}:{}", listen.ip(), list.join(","))
}

/// One virtual service: its pool, checks and counters (ipvsadm's service line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ServiceStatus {
    name: String,
    listen: SocketAddrV4,
    /// Every port of the VIP the service listens on (`listen`'s alone for a single-port
    /// service), as ranges.
    #[serde(default)]
    ports: Vec<PortSpan>,
    /// How many ports `ports` holds (metrics: `vipgate_lb_listening_ports`).
    #[serde(default)]
    listening_ports: usize,
    /// A multi-port service's backend port mappings.
    #[serde(default)]
    rports: Vec<RportStatus>,
    protocol: Protocol,
    /// Each datagram scheduled on its own (ipvsadm `-o`, "ops" in `ipvsadm -Ln`).
    #[serde(default)]
    one_packet: bool,
    forward: ForwardMethod,
    scheduler: SchedulerKind,
    persistence: Option<PersistenceStatus>,
    /// Persistence templates held.
    templates: usize,
    sorry: Option<SocketAddrV4>,
    /// Whether a backend can take new flows (what VRRP `track_services` watches).
    available: bool,
    health: Option<HealthCheckStatus>,
    counters: PoolStats,
    fallback: bool,
    /// `max_connections` of the service; `None` when unlimited.
    connection_limit: Option<u32>,
    open_flows: u64,
    slow_start_ms: Option<u64>,
    locality_entries: usize,
    backends: Vec<BackendStatus>,
    /// The file's backends `lb remove-backend` took out (those still holding flows are
    /// also listed in `backends`, as removed).
    #[serde(default)]
    removed_at_runtime: Vec<SocketAddrV4>,
}

/// A service's protocol: ipvsadm's first column (TCP, UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// [`natgw::Proto`] of a service (TCP or UDP; nothing else makes a service).
    fn of(p: natgw::Proto) -> Self {
        match p {
            natgw::Proto::Udp => Self::Udp,
            natgw::Proto::Tcp | natgw::Proto::Icmp => Self::Tcp,
        }
    }

    /// As `ipvsadm -Ln` prints it.
    fn ipvsadm_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// [`natgw::Forward`] as the configuration spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum ForwardMethod {
    #[serde(rename = "nat")]
    Nat,
    #[serde(rename = "dr")]
    DirectRoute,
}

impl From<natgw::Forward> for ForwardMethod {
    fn from(f: natgw::Forward) -> Self {
        match f {
            natgw::Forward::Nat => Self::Nat,
            natgw::Forward::DirectRoute => Self::DirectRoute,
        }
    }
}

impl ForwardMethod {
    /// ipvsadm's column: Masq or Route.
    fn ipvsadm_name(self) -> &'static str {
        match self {
            Self::Nat => natgw::Forward::Nat,
            Self::DirectRoute => natgw::Forward::DirectRoute,
        }
        .ipvsadm_name()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PersistenceStatus {
    timeout_s: u64,
    netmask: u8,
}

/// A service's health-check settings; `path` and `status` are those of an HTTP check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HealthCheckStatus {
    kind: CheckProtocol,
    path: Option<String>,
    status: Option<u16>,
    interval_ms: u64,
    timeout_ms: u64,
    rise: u32,
    fall: u32,
    /// HTTPS: the SNI name, whether the certificate is verified, and the CA file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<std::path::PathBuf>,
    /// The string an HTTP check's body (or a UDP check's answer) must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<String>,
    /// The datagram a UDP check sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    send: Option<String>,
    /// The port probes connect to, when not the backend's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// The agent's port and how often it is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CheckProtocol {
    Tcp,
    Http,
    Https,
    Udp,
}

/// One real server (ipvsadm's `->` line). The thresholds keep ipvsadm's names
/// (Uthreshold/Lthreshold): a key with "connections" in it would become a Prometheus counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BackendStatus {
    address: SocketAddrV4,
    /// The operator's state (`lb set state`); the file's is always ready.
    #[serde(default)]
    admin: AdminState,
    /// Added by `lb add-backend`: the file does not list it.
    #[serde(default)]
    added_at_runtime: bool,
    /// The file's weight when the running one differs (`lb weight`, `lb add-backend`).
    #[serde(default)]
    file_weight: Option<u32>,
    weight: u32,
    effective_weight: u32,
    slow_start: bool,
    upper_threshold: Option<u32>,
    lower_threshold: Option<u32>,
    overloaded: bool,
    state: BackendState,
    health: Health,
    active: u32,
    inactive: u32,
    counters: BackendStats,
    /// Why the last failed health check failed (the reason a down backend is down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_check_failure: Option<String>,
    /// What the backend's agent last said, once it was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<AgentStatus>,
}

/// A backend's agent (HAProxy agent check) in `show lb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentStatus {
    /// Its last words, or why it gave none.
    said: String,
    counters: AgentCounters,
}

/// Under `counters`, so that the metrics make a counter of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct AgentCounters {
    /// Lines that were too long or not agent words.
    malformed: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ServiceStatus {
    fn of(s: &VirtualService, rt: Option<&Runtime>) -> Self {
        let pool = s.pool();
        let threshold = |t: u32| (t != 0).then_some(t);
        let backends = pool
            .backends()
            .map(|(_, b)| {
                let notes = s.check_notes(b.addr());
                let diff = match rt {
                    Some(rt) if b.state() != BackendState::Removed => rt.diff(b.addr(), b.weight()),
                    _ => BackendDiff::default(),
                };
                BackendStatus {
                    address: b.addr(),
                    // A removed backend's state no longer matters (it takes nothing new).
                    admin: if b.state() == BackendState::Removed {
                        AdminState::Ready
                    } else {
                        b.admin()
                    },
                    added_at_runtime: diff.added,
                    file_weight: diff.file_weight,
                    weight: b.weight(),
                    effective_weight: b.effective_weight(),
                    slow_start: b.is_ramping(),
                    upper_threshold: threshold(b.max_connections()),
                    lower_threshold: threshold(b.min_connections()),
                    overloaded: b.is_overloaded(),
                    state: b.state(),
                    health: b.health(),
                    active: b.active(),
                    inactive: b.inactive(),
                    counters: *b.stats(),
                    last_check_failure: notes
                        .and_then(|n| n.last_failure)
                        .map(|why| why.to_string()),
                    agent: notes.and_then(|n| {
                        let said = match n.agent? {
                            Ok(reply) => reply.to_string(),
                            Err(why) => why.to_string(),
                        };
                        Some(AgentStatus {
                            said,
                            counters: AgentCounters {
                                malformed: n.agent_malformed,
                            },
                        })
                    }),
                }
            })
            .collect();
        let health = s.health().map(|h| {
            let (kind, path, status, expect, tls) = match &h.kind {
                CheckKind::Tcp => (CheckProtocol::Tcp, None, None, None, None),
                CheckKind::Udp { expect, .. } => {
                    (CheckProtocol::Udp, None, None, Some(expect.clone()), None)
                }
                CheckKind::Http {
                    path,
                    status,
                    expect,
                    tls,
                } => (
                    if tls.is_some() {
                        CheckProtocol::Https
                    } else {
                        CheckProtocol::Http
                    },
                    Some(path.clone()),
                    Some(*status),
                    expect.clone(),
                    tls.as_ref(),
                ),
            };
            HealthCheckStatus {
                kind,
                path,
                status,
                interval_ms: millis(h.interval),
                timeout_ms: millis(h.timeout),
                rise: h.rise,
                fall: h.fall,
                send: match &h.kind {
                    CheckKind::Udp { send, .. } => Some(send.clone()),
                    _ => None,
                },
                sni: tls.and_then(|t| t.sni.clone()),
                verify: tls.map(|t| t.verify),
                ca_file: tls.and_then(|t| t.ca_file.clone()),
                expect,
                port: h.port,
                agent_port: h.agent.map(|a| a.port),
                agent_interval_ms: h.agent.map(|a| millis(a.interval)),
            }
        });
        let (ports, rports) = match s.ports() {
            Some(p) => (
                p.ranges()
                    .iter()
                    .map(|r| PortSpan {
                        first: *r.start(),
                        last: *r.end(),
                    })
                    .collect(),
                p.rports()
                    .iter()
                    .map(|r| RportStatus {
                        first: *r.ports.start(),
                        last: *r.ports.end(),
                        to: r.to,
                    })
                    .collect(),
            ),
            None => (
                vec![PortSpan {
                    first: s.listen().port(),
                    last: s.listen().port(),
                }],
                Vec::new(),
            ),
        };
        Self {
            name: s.name().to_string(),
            listen: s.listen(),
            listening_ports: s.ports().map_or(1, natgw::ServicePorts::len),
            ports,
            rports,
            protocol: Protocol::of(s.proto()),
            one_packet: s.one_packet(),
            forward: s.forward().into(),
            scheduler: pool.scheduler(),
            persistence: pool.persistence().map(|p| PersistenceStatus {
                timeout_s: p.timeout.as_secs(),
                netmask: p.netmask,
            }),
            templates: pool.templates(),
            sorry: pool.sorry(),
            available: s.is_available(),
            health,
            counters: pool.stats(),
            fallback: pool.fallback(),
            connection_limit: threshold(pool.max_connections()),
            open_flows: pool.connections(),
            slow_start_ms: pool.slow_start().map(millis),
            locality_entries: pool.locality_entries(),
            backends,
            removed_at_runtime: rt.map(|rt| rt.removed().to_vec()).unwrap_or_default(),
        }
    }
}

/// `(active, inactive)` connections of `backend` in `service`, read from a `show lb` answer;
/// `None` when the service no longer lists the backend.
///
/// # Errors
/// The answer has no service of that name.
pub(crate) fn backend_connections(
    show: &Value,
    service: &str,
    backend: SocketAddrV4,
) -> anyhow::Result<Option<(u32, u32)>> {
    let items = show.as_array().map(Vec::as_slice).unwrap_or_default();
    let status = items
        .iter()
        .filter_map(|item| ServiceEntry::deserialize(item).ok())
        .find_map(|entry| match entry {
            ServiceEntry::Running(s) if s.name == service => Some(s),
            _ => None,
        })
        .with_context(|| format!("no running service `{service}`"))?;
    Ok(status
        .backends
        .iter()
        .find(|b| b.address == backend)
        .map(|b| (b.active, b.inactive)))
}

/// The clock `show lb --connections` reads the flows' expiry against (the driver's, as the
/// part runs beside it; the clock ban is for protocol cores).
#[allow(clippy::disallowed_methods)]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// At most this many flows go into one `show lb --connections` answer per service.
pub(crate) const CONNECTIONS_LIMIT: usize = 65_536;

/// One service's answer to `show lb --connections`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Connections {
    /// The flows listed (at most the limit asked for).
    pub(crate) connections: Vec<Connection>,
    /// How many flows matched the filters (more than listed when the limit cut the list).
    pub(crate) matched: usize,
}

/// One flow of a virtual service, as `ipvsadm -Lnc` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Connection {
    service: String,
    protocol: Protocol,
    /// Seconds until the flow expires if idle.
    expires_in_s: u64,
    /// ESTABLISHED, SYN_RECV, FIN_WAIT, TIME_WAIT, ... (ipvsadm's names).
    state: String,
    /// The client.
    source: SocketAddrV4,
    /// The VIP:port it connected to.
    #[serde(rename = "virtual")]
    virtual_address: SocketAddrV4,
    /// The backend.
    destination: SocketAddrV4,
}

/// Human text for `vipgate show lb --connections`, laid out like `ipvsadm -Lnc` (plus the
/// service's name); `shown` of `matched` flows when a limit cut the list.
pub(crate) fn render_connections(all: &[Connection], matched: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "IPVS connection entries\npro expire state       source                virtual               destination           service"
    );
    for c in all {
        let _ = writeln!(
            out,
            "{:<3} {:02}:{:02} {:<11} {:<21} {:<21} {:<21} {}",
            c.protocol.ipvsadm_name(),
            c.expires_in_s / 60,
            c.expires_in_s % 60,
            c.state,
            c.source.to_string(),
            c.virtual_address.to_string(),
            c.destination.to_string(),
            c.service,
        );
    }
    if matched > all.len() {
        let _ = writeln!(
            out,
            "... (first {} of {matched} shown; --limit raises it up to {CONNECTIONS_LIMIT}, --json has the same limit)",
            all.len()
        );
    }
    out
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
    out.push_str(&super::render_each(
        items,
        |out, entry: &ServiceEntry| match entry {
            ServiceEntry::Running(s) => render_service(out, s),
            ServiceEntry::Missing { name, error } => {
                let _ = writeln!(out, "{name}: {error}");
            }
        },
    ));
    // One gateway carries every service: its data path once, as `show nat` prints it.
    if let Some(gw) = items
        .iter()
        .find_map(|item| GatewayPath::deserialize(item).ok())
    {
        let _ = writeln!(
            out,
            "Data path: {} ({}); kernel path moved {} packets, {}",
            gw.datapath.as_str(),
            gw.datapath_reason,
            gw.fast_path.packets,
            human_bytes(gw.fast_path.bytes),
        );
        if gw.flows_adopted > 0 {
            let _ = writeln!(
                out,
                "Adopted mid-stream (a hash scheduler's connections this director never saw start): {}",
                gw.flows_adopted
            );
        }
    }
    out
}

fn render_service(out: &mut String, s: &ServiceStatus) {
    let forward = s.forward.ipvsadm_name();
    let mut flags = String::new();
    if let Some(p) = &s.persistence {
        let _ = write!(flags, " persistent {}", p.timeout_s);
        if p.netmask != 32 {
            let _ = write!(flags, " mask /{}", p.netmask);
        }
    }
    if s.one_packet {
        flags.push_str(" ops");
    }
    if s.fallback {
        flags.push_str(" fallback");
    }
    if let Some(max) = s.connection_limit {
        let _ = write!(flags, " maxconn {}/{max}", s.open_flows);
    }
    if let Some(ms) = s.slow_start_ms {
        let _ = write!(flags, " slow-start {ms}ms");
    }
    if let Some(h) = &s.health {
        let kind = match h.kind {
            CheckProtocol::Tcp => "tcp",
            CheckProtocol::Http => "http",
            CheckProtocol::Https => "https",
            CheckProtocol::Udp => "udp",
        };
        let _ = write!(flags, " check {kind}");
        if let Some(port) = h.port {
            let _ = write!(flags, " port {port}");
        }
        if let Some(sni) = &h.sni {
            let _ = write!(flags, " sni {sni}");
        }
        if h.verify == Some(false) {
            flags.push_str(" verify none");
        }
        if let Some(ca) = &h.ca_file {
            let _ = write!(flags, " ca-file {}", ca.display());
        }
        if let Some(send) = &h.send {
            let _ = write!(flags, " send {send:?}");
        }
        if let Some(expect) = &h.expect {
            let _ = write!(flags, " expect {expect:?}");
        }
        let _ = write!(
            flags,
            " every {}ms rise {} fall {}",
            h.interval_ms, h.rise, h.fall
        );
        if let (Some(port), Some(ms)) = (h.agent_port, h.agent_interval_ms) {
            let _ = write!(flags, " agent port {port} every {ms}ms");
        }
    }
    let _ = writeln!(
        out,
        "{}  {} {}{flags}  ({})",
        s.protocol.ipvsadm_name(),
        local_address(s.listen, &s.ports),
        s.scheduler.as_str(),
        s.name
    );
    for b in &s.backends {
        // An overloaded backend that is otherwise up shows why it gets nothing; a ramping
        // one shows the weight in effect over the configured one.
        let state = match b.state {
            BackendState::Up if b.overloaded => "overload",
            other => other.as_str(),
        };
        let weight = if b.effective_weight == b.weight {
            b.weight.to_string()
        } else {
            format!("{}/{}", b.effective_weight, b.weight)
        };
        let c = &b.counters;
        let mut notes = String::new();
        if let Some(max) = b.upper_threshold {
            let _ = write!(notes, "  max {max}");
        }
        if let Some(min) = b.lower_threshold {
            let _ = write!(notes, " min {min}");
        }
        if b.slow_start {
            notes.push_str("  slow start");
        }
        // Runtime differences from the file (`lb add-backend`, `lb weight`, `lb set state`).
        if b.added_at_runtime {
            notes.push_str("  added at runtime");
        }
        if let Some(w) = b.file_weight {
            let _ = write!(notes, "  weight {} (file: {w})", b.weight);
        }
        if b.admin != AdminState::Ready {
            let _ = write!(notes, "  state {} (file: ready)", b.admin);
        }
        // A backend that flaps shows it here; its state column only says where it is now.
        if c.checks_failed > 0 || c.down_transitions > 0 {
            let _ = write!(notes, "  checks failed {}", c.checks_failed);
            if c.down_transitions > 0 {
                let _ = write!(
                    notes,
                    ", down {}x up {}x",
                    c.down_transitions, c.up_transitions
                );
            }
            if let Some(why) = &b.last_check_failure {
                let _ = write!(notes, ", last: {why}");
            }
        }
        if let Some(agent) = &b.agent {
            let _ = write!(notes, "  agent: {}", agent.said);
            if agent.counters.malformed > 0 {
                let _ = write!(notes, " ({} malformed)", agent.counters.malformed);
            }
        }
        let _ = writeln!(
            out,
            "  -> {:<21} {:<7} {:<9} {:>6} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}{notes}",
            b.address.to_string(),
            forward,
            state,
            weight,
            b.active,
            b.inactive,
            c.connections,
            c.packets_in,
            c.packets_out,
            human_bytes(c.bytes_in),
            human_bytes(c.bytes_out),
        );
    }
    if let Some(sorry) = s.sorry {
        let _ = writeln!(
            out,
            "  -> {:<21} {:<7} {:<9} (used when no backend is up: {} connections)",
            sorry.to_string(),
            forward,
            "sorry",
            s.counters.sorry
        );
    }
    if !s.removed_at_runtime.is_empty() {
        let list: Vec<String> = s
            .removed_at_runtime
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(
            out,
            "     removed at runtime (the file lists them): {}",
            list.join(", ")
        );
    }
    if s.counters.refused > 0 {
        let _ = writeln!(out, "     refused (no backend up): {}", s.counters.refused);
    }
    if s.counters.over_limit > 0 {
        let _ = writeln!(
            out,
            "     turned away at max_connections: {}",
            s.counters.over_limit
        );
    }
}

/// ipvsadm prints bytes with K/M/G suffixes.
fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    UNITS.iter().find(|(size, _)| n >= *size * 10).map_or_else(
        || n.to_string(),
        |(size, unit)| format!("{}{unit}", n / size),
    )
}

/// Per-second figures of a service or a backend over a `show lb --rate` interval, as
/// `ipvsadm -Ln --rate` names them: new connections, packets and bytes each way (in: client to
/// backend). ipvsadm's kernel estimator smooths over ~2 s; these are the plain average over
/// the interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Rates {
    cps: u64,
    in_pps: u64,
    out_pps: u64,
    in_bps: u64,
    out_bps: u64,
}

impl Rates {
    /// The rates between two readings of one backend's counters `elapsed` apart. A counter
    /// that went down (the daemon restarted, the backend was removed and added) counts from 0.
    fn between(before: &BackendStats, after: &BackendStats, elapsed: Duration) -> Self {
        let ms = u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let per_s = |b: u64, a: u64| {
            let delta = if a >= b { a - b } else { a };
            u64::try_from(u128::from(delta) * 1000 / u128::from(ms)).unwrap_or(u64::MAX)
        };
        Rates {
            cps: per_s(before.connections, after.connections),
            in_pps: per_s(before.packets_in, after.packets_in),
            out_pps: per_s(before.packets_out, after.packets_out),
            in_bps: per_s(before.bytes_in, after.bytes_in),
            out_bps: per_s(before.bytes_out, after.bytes_out),
        }
    }

    fn add(self, other: Self) -> Self {
        Rates {
            cps: self.cps.saturating_add(other.cps),
            in_pps: self.in_pps.saturating_add(other.in_pps),
            out_pps: self.out_pps.saturating_add(other.out_pps),
            in_bps: self.in_bps.saturating_add(other.in_bps),
            out_bps: self.out_bps.saturating_add(other.out_bps),
        }
    }
}

/// One backend's rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct BackendRates {
    address: SocketAddrV4,
    #[serde(flatten)]
    rates: Rates,
}

/// One service's rates: the sum of its backends' (as ipvsadm's service line), then each
/// backend's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ServiceRates {
    name: String,
    protocol: Protocol,
    listen: SocketAddrV4,
    ports: Vec<PortSpan>,
    #[serde(flatten)]
    rates: Rates,
    backends: Vec<BackendRates>,
}

/// The rates of every service running in both readings of `show lb` (`before`, then
/// `after`, `elapsed` apart); a backend missing from the first reading counts from 0.
pub(crate) fn rates(before: &[Value], after: &[Value], elapsed: Duration) -> Vec<ServiceRates> {
    let running = |items: &[Value]| {
        items
            .iter()
            .filter_map(|v| match ServiceEntry::deserialize(v) {
                Ok(ServiceEntry::Running(s)) => Some(*s),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let before = running(before);
    running(after)
        .into_iter()
        .map(|s| {
            let earlier = before.iter().find(|b| b.name == s.name);
            let backends: Vec<BackendRates> = s
                .backends
                .iter()
                .map(|b| {
                    let zero = BackendStats::default();
                    let was = earlier
                        .and_then(|e| e.backends.iter().find(|x| x.address == b.address))
                        .map_or(&zero, |x| &x.counters);
                    BackendRates {
                        address: b.address,
                        rates: Rates::between(was, &b.counters, elapsed),
                    }
                })
                .collect();
            ServiceRates {
                rates: backends
                    .iter()
                    .fold(Rates::default(), |sum, b| sum.add(b.rates)),
                name: s.name,
                protocol: s.protocol,
                listen: s.listen,
                ports: s.ports,
                backends,
            }
        })
        .collect()
}

/// Human text for `vipgate show lb --rate`, laid out like `ipvsadm -Ln --rate`.
pub(crate) fn render_rates(all: &[ServiceRates]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS"
    );
    let _ = writeln!(out, "  -> RemoteAddress:Port");
    let line = |out: &mut String, head: String, r: &Rates| {
        let _ = writeln!(
            out,
            "{head:<33} {:>8} {:>8} {:>8} {:>8} {:>8}",
            r.cps, r.in_pps, r.out_pps, r.in_bps, r.out_bps
        );
    };
    for s in all {
        let proto = serde_json::to_value(s.protocol)
            .ok()
            .and_then(|v| v.as_str().map(str::to_ascii_uppercase))
            .unwrap_or_default();
        line(
            &mut out,
            format!("{proto:<4} {}", local_address(s.listen, &s.ports)),
            &s.rates,
        );
        for b in &s.backends {
            line(&mut out, format!("  -> {}", b.address), &b.rates);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_render_as_ipvsadm_lnc_and_say_when_cut() {
        let c = Connection {
            service: "web".into(),
            protocol: Protocol::Tcp,
            expires_in_s: 899,
            state: "ESTABLISHED".into(),
            source: addr("198.51.100.200:40001"),
            virtual_address: addr("198.51.100.10:80"),
            destination: addr("10.0.0.101:80"),
        };
        let text = render_connections(std::slice::from_ref(&c), 1);
        let line = text.lines().nth(2).unwrap_or_default();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            [
                "TCP",
                "14:59",
                "ESTABLISHED",
                "198.51.100.200:40001",
                "198.51.100.10:80",
                "10.0.0.101:80",
                "web"
            ]
        );
        assert!(!text.contains("shown"));
        let cut = render_connections(std::slice::from_ref(&c), 70_000);
        assert!(cut.contains("first 1 of 70000 shown"), "{cut}");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["virtual"], "198.51.100.10:80");
        assert_eq!(json["expires_in_s"], 899);
    }

    #[test]
    fn drain_reads_a_backends_connections_from_show_lb() {
        let mut s = service(
            "web",
            SchedulerKind::Rr,
            vec![backend("10.0.0.101:80", BackendState::Up, 1)],
        );
        (s.backends[0].active, s.backends[0].inactive) = (3, 2);
        let show = json!([running(s)]);
        let web = "web";
        assert_eq!(
            backend_connections(&show, web, addr("10.0.0.101:80")).unwrap(),
            Some((3, 2))
        );
        assert_eq!(
            backend_connections(&show, web, addr("10.0.0.109:80")).unwrap(),
            None
        );
        let err = backend_connections(&show, "nosuch", addr("10.0.0.101:80")).unwrap_err();
        assert!(err.to_string().contains("no running service `nosuch`"));
        assert!(backend_connections(&json!("garbage"), web, addr("10.0.0.101:80")).is_err());
    }

    fn addr(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    fn backend(address: &str, state: BackendState, weight: u32) -> BackendStatus {
        BackendStatus {
            address: addr(address),
            admin: AdminState::Ready,
            added_at_runtime: false,
            file_weight: None,
            weight,
            effective_weight: weight,
            slow_start: false,
            upper_threshold: None,
            lower_threshold: None,
            overloaded: false,
            state,
            health: Health::Up,
            active: 0,
            inactive: 0,
            counters: BackendStats::default(),
            last_check_failure: None,
            agent: None,
        }
    }

    fn service(
        name: &str,
        scheduler: SchedulerKind,
        backends: Vec<BackendStatus>,
    ) -> ServiceStatus {
        ServiceStatus {
            name: name.to_string(),
            listen: addr("198.51.100.10:80"),
            ports: vec![PortSpan {
                first: 80,
                last: 80,
            }],
            listening_ports: 1,
            rports: Vec::new(),
            protocol: Protocol::Tcp,
            one_packet: false,
            forward: ForwardMethod::Nat,
            scheduler,
            persistence: None,
            templates: 0,
            sorry: None,
            available: true,
            health: None,
            counters: PoolStats::default(),
            fallback: false,
            connection_limit: None,
            open_flows: 0,
            slow_start_ms: None,
            locality_entries: 0,
            backends,
            removed_at_runtime: Vec::new(),
        }
    }

    /// What `status()` sends: the service with the gateway's data path.
    fn item(service: ServiceEntry) -> Value {
        serde_json::to_value(LbItem {
            service,
            gateway: GatewayPath {
                datapath: Datapath::Kernel,
                datapath_reason: "the kernel program is attached".to_string(),
                fast_path: FastPathCounters {
                    packets: 12,
                    bytes: 20_480,
                    ..FastPathCounters::default()
                },
                flows_adopted: 3,
            },
        })
        .unwrap()
    }

    fn running(s: ServiceStatus) -> Value {
        item(ServiceEntry::Running(Box::new(s)))
    }

    fn tcp_check(fall: u32) -> HealthCheckStatus {
        HealthCheckStatus {
            kind: CheckProtocol::Tcp,
            path: None,
            status: None,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall,
            sni: None,
            verify: None,
            ca_file: None,
            expect: None,
            send: None,
            port: None,
            agent_port: None,
            agent_interval_ms: None,
        }
    }

    /// Two readings 2 s apart: per-second figures per backend, the service line their sum, a
    /// backend new in the second reading counted from 0, a counter that went down (a restart)
    /// counted from 0 rather than wrapping.
    #[test]
    fn rates_are_the_counters_deltas_per_second() {
        let stats = |connections, packets, bytes| BackendStats {
            connections,
            packets_in: packets,
            packets_out: packets / 2,
            bytes_in: bytes,
            bytes_out: bytes * 10,
            ..BackendStats::default()
        };
        let with = |b: &[(&str, BackendStats)]| {
            running(service(
                "web",
                SchedulerKind::Wrr,
                b.iter()
                    .map(|(a, c)| BackendStatus {
                        counters: *c,
                        ..backend(a, BackendState::Up, 1)
                    })
                    .collect(),
            ))
        };
        let before = with(&[
            ("10.0.0.1:80", stats(100, 1000, 100_000)),
            ("10.0.0.2:80", stats(50, 500, 50_000)),
        ]);
        let after = with(&[
            ("10.0.0.1:80", stats(120, 1400, 140_000)),
            ("10.0.0.2:80", stats(10, 100, 10_000)),
            ("10.0.0.3:80", stats(4, 40, 4000)),
        ]);
        let r = rates(&[before], &[after], Duration::from_secs(2));
        assert_eq!(r.len(), 1);
        let rate = |cps, pps, bps| Rates {
            cps,
            in_pps: pps,
            out_pps: pps / 2,
            in_bps: bps,
            out_bps: bps * 10,
        };
        assert_eq!(
            r[0].backends.iter().map(|b| b.rates).collect::<Vec<_>>(),
            [rate(10, 200, 20_000), rate(5, 50, 5000), rate(2, 20, 2000)]
        );
        assert_eq!(r[0].rates, rate(17, 270, 27_000));
        let text = render_rates(&r);
        assert!(text.starts_with("Prot LocalAddress:Port"), "{text}");
        assert!(
            text.contains(
                "TCP  198.51.100.10:80                   17      270      135    27000   270000"
            ),
            "{text}"
        );
        assert!(text.contains("  -> 10.0.0.3:80"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json[0]["cps"], 17, "{json}");
        assert_eq!(json[0]["backends"][0]["in_bps"], 20_000, "{json}");
    }

    #[test]
    fn render_reads_like_ipvsadm() {
        let mut up = backend("10.0.0.101:80", BackendState::Up, 1);
        (up.active, up.inactive) = (2, 5);
        up.counters = BackendStats {
            connections: 100,
            packets_in: 700,
            packets_out: 600,
            bytes_in: 51200,
            bytes_out: 12,
            ..BackendStats::default()
        };
        let mut draining = backend("10.0.0.102:80", BackendState::Draining, 0);
        draining.active = 1;
        let mut s = service("web", SchedulerKind::Wrr, vec![up, draining]);
        s.persistence = Some(PersistenceStatus {
            timeout_s: 300,
            netmask: 24,
        });
        s.health = Some(tcp_check(4));
        s.counters.refused = 3;
        let text = render(&[running(s)]);
        assert!(text.contains("TCP  198.51.100.10:80 wrr persistent 300 mask /24 check tcp every 2000ms rise 2 fall 4  (web)"), "{text}");
        assert!(text.contains("  -> 10.0.0.101:80         Masq    up             1          2         5        100        700        600        50K         12\n"), "{text}");
        assert!(text.contains("draining"));
        assert!(text.contains("refused (no backend up): 3"));
        assert!(
            text.contains("Data path: kernel (the kernel program is attached); kernel path moved 12 packets, 20K"),
            "{text}"
        );
        let mut s = service("web", SchedulerKind::Wrr, Vec::new());
        s.health = Some(HealthCheckStatus {
            port: Some(8080),
            ..tcp_check(4)
        });
        let text = render(&[running(s)]);
        assert!(
            text.contains("wrr check tcp port 8080 every 2000ms"),
            "{text}"
        );
    }

    #[test]
    fn render_shows_thresholds_overload_slow_start_and_the_limit() {
        let mut full = backend("10.0.0.101:80", BackendState::Up, 10);
        (full.overloaded, full.active) = (true, 4);
        (full.upper_threshold, full.lower_threshold) = (Some(4), Some(2));
        let mut ramping = backend("10.0.0.102:80", BackendState::Up, 10);
        (ramping.effective_weight, ramping.slow_start, ramping.active) = (3, true, 3);
        let mut s = service("cache", SchedulerKind::Lblcr, vec![full, ramping]);
        (s.connection_limit, s.open_flows, s.slow_start_ms) = (Some(500), 7, Some(30_000));
        s.counters.over_limit = 2;
        let text = render(&[running(s)]);
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

    /// `lb add-backend`, `lb set state`, `lb weight` and `lb remove-backend` show as
    /// differences from the file, in the text and the JSON.
    #[test]
    fn runtime_changes_show_as_differences_from_the_file() {
        let mut added = backend("10.0.0.103:80", BackendState::Up, 2);
        added.added_at_runtime = true;
        let mut drained = backend("10.0.0.101:80", BackendState::Draining, 1);
        drained.admin = AdminState::Drain;
        let mut maint = backend("10.0.0.102:80", BackendState::Maint, 5);
        (maint.admin, maint.file_weight) = (AdminState::Maint, Some(1));
        let mut s = service("web", SchedulerKind::Rr, vec![drained, maint, added]);
        s.removed_at_runtime = vec![addr("10.0.0.104:80")];
        let v = running(s.clone());
        assert_eq!(v["backends"][0]["admin"], "drain");
        assert_eq!(v["backends"][1]["state"], "maint");
        assert_eq!(v["backends"][1]["file_weight"], 1);
        assert_eq!(v["backends"][2]["added_at_runtime"], true);
        assert_eq!(v["removed_at_runtime"], json!(["10.0.0.104:80"]));
        assert_eq!(
            ServiceEntry::deserialize(&v).unwrap(),
            ServiceEntry::Running(Box::new(s))
        );
        let text = render(&[v]);
        for want in [
            "-> 10.0.0.101:80         Masq    draining       1",
            "state drain (file: ready)",
            "-> 10.0.0.102:80         Masq    maint          5",
            "weight 5 (file: 1)  state maint (file: ready)",
            "added at runtime",
            "removed at runtime (the file lists them): 10.0.0.104:80",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[test]
    fn direct_routing_shows_as_route() {
        let mut b = backend("10.0.0.101:80", BackendState::Up, 1);
        b.active = 1;
        (
            b.counters.connections,
            b.counters.packets_in,
            b.counters.bytes_in,
        ) = (1, 9, 900);
        let mut s = service("web", SchedulerKind::Rr, vec![b]);
        (s.forward, s.sorry) = (ForwardMethod::DirectRoute, Some(addr("10.0.0.200:80")));
        let text = render(&[running(s)]);
        assert!(
            text.contains("  -> 10.0.0.101:80         Route   up             1          1         0          1          9          0        900          0"),
            "{text}"
        );
        assert!(
            text.contains("  -> 10.0.0.200:80         Route   sorry"),
            "{text}"
        );
    }

    /// A one-packet UDP service reads as `ipvsadm -Ln` prints it (`UDP`, `ops`), with its
    /// UDP check; its JSON says so and reads back.
    /// A multi-port service prints its ports where ipvsadm prints `FWM n`; the JSON lists
    /// them as ranges with the rports, and reads back.
    #[test]
    fn a_multi_port_service_shows_its_ports() {
        let b = backend("10.0.0.101:0", BackendState::Up, 1);
        let mut s = service("web", SchedulerKind::Wrr, vec![b]);
        s.ports = vec![
            PortSpan {
                first: 80,
                last: 80,
            },
            PortSpan {
                first: 443,
                last: 443,
            },
            PortSpan {
                first: 8000,
                last: 8009,
            },
        ];
        s.listening_ports = 12;
        s.rports = vec![RportStatus {
            first: 443,
            last: 443,
            to: 8443,
        }];
        s.persistence = Some(PersistenceStatus {
            timeout_s: 300,
            netmask: 32,
        });
        let v = running(s.clone());
        assert_eq!(
            v["ports"],
            json!([{"first": 80, "last": 80}, {"first": 443, "last": 443}, {"first": 8000, "last": 8009}])
        );
        assert_eq!(
            v["rports"],
            json!([{"first": 443, "last": 443, "to": 8443}])
        );
        assert_eq!(v["listening_ports"], 12);
        assert_eq!(
            ServiceEntry::deserialize(&v).unwrap(),
            ServiceEntry::Running(Box::new(s))
        );
        let text = render(&[v]);
        assert!(
            text.contains("TCP  198.51.100.10:80,443,8000-8009 wrr persistent 300"),
            "{text}"
        );
        assert!(text.contains("  -> 10.0.0.101:0 "), "{text}");
    }

    #[test]
    fn a_udp_service_shows_its_protocol_and_one_packet() {
        let b = backend("10.0.0.101:53", BackendState::Up, 1);
        let mut s = service("dns", SchedulerKind::Rr, vec![b]);
        (s.protocol, s.one_packet) = (Protocol::Udp, true);
        s.health = Some(HealthCheckStatus {
            kind: CheckProtocol::Udp,
            send: Some("ping".into()),
            expect: Some("pong".into()),
            ..tcp_check(4)
        });
        let v = running(s.clone());
        assert_eq!(
            (&v["protocol"], &v["one_packet"]),
            (&json!("udp"), &json!(true))
        );
        assert_eq!(v["health"]["send"], "ping");
        assert_eq!(
            ServiceEntry::deserialize(&v).unwrap(),
            ServiceEntry::Running(Box::new(s))
        );
        let text = render(&[v]);
        assert!(
            text.contains("UDP  198.51.100.10:80 rr ops check udp send \"ping\" expect \"pong\" every 2000ms rise 2 fall 4  (dns)"),
            "{text}"
        );
        let c = Connection {
            service: "dns".into(),
            protocol: Protocol::Udp,
            expires_in_s: 299,
            state: "UDP".into(),
            source: addr("198.51.100.200:40000"),
            virtual_address: addr("198.51.100.10:53"),
            destination: addr("10.0.0.101:53"),
        };
        let text = render_connections(&[c], 1);
        assert!(text.contains("\nUDP 04:59 UDP "), "{text}");
    }

    #[test]
    fn a_flapping_backend_says_so_and_a_missing_service_shows_its_error() {
        let mut flapping = backend("10.0.0.102:80", BackendState::Down, 1);
        flapping.health = Health::Down;
        flapping.counters = BackendStats {
            checks_failed: 9,
            down_transitions: 2,
            up_transitions: 1,
            ..BackendStats::default()
        };
        flapping.last_check_failure = Some("expected string not in the body's first 16 KiB".into());
        flapping.agent = Some(AgentStatus {
            said: "drain 50%".into(),
            counters: AgentCounters { malformed: 2 },
        });
        let mut s = service("web", SchedulerKind::Wrr, vec![flapping]);
        s.health = Some(tcp_check(3));
        let gone = item(ServiceEntry::Missing {
            name: "api".to_string(),
            error: "service `api` is not running".to_string(),
        });
        let text = render(&[running(s), gone]);
        assert!(
            text.contains("  -> 10.0.0.102:80         Masq    down           1          0         0          0          0          0          0          0  checks failed 9, down 2x up 1x, last: expected string not in the body's first 16 KiB  agent: drain 50% (2 malformed)"),
            "{text}"
        );
        assert!(text.contains("api: service `api` is not running"), "{text}");
        // The data path once, although both entries carry it.
        assert_eq!(text.matches("Data path:").count(), 1, "{text}");
    }

    /// The JSON keeps the keys and spellings that scripts, the metrics and the end-to-end
    /// tests read; the client reads it back into the same value.
    #[test]
    fn json_shape_is_stable_and_reads_back() {
        let mut b = backend("10.0.0.101:80", BackendState::Draining, 0);
        b.upper_threshold = Some(4);
        b.counters.checks_failed = 3;
        let mut s = service("web", SchedulerKind::Wlc, vec![b]);
        s.forward = ForwardMethod::DirectRoute;
        s.health = Some(HealthCheckStatus {
            kind: CheckProtocol::Http,
            path: Some("/health".to_string()),
            status: Some(200),
            ..tcp_check(4)
        });
        s.persistence = Some(PersistenceStatus {
            timeout_s: 300,
            netmask: 32,
        });
        let v = running(s.clone());
        assert_eq!(
            v,
            json!({
                "name": "web", "listen": "198.51.100.10:80", "protocol": "tcp", "one_packet": false,
                "ports": [{ "first": 80, "last": 80 }], "listening_ports": 1, "rports": [],
                "forward": "dr",
                "scheduler": "wlc", "persistence": { "timeout_s": 300, "netmask": 32 },
                "templates": 0, "sorry": null, "available": true,
                "health": { "kind": "http", "path": "/health", "status": 200,
                            "interval_ms": 2000, "timeout_ms": 1000, "rise": 2, "fall": 4 },
                "counters": { "sorry_connections": 0, "refused": 0, "persistent_hits": 0,
                              "persist_full": 0, "over_limit": 0, "locality_full": 0 },
                "fallback": false, "connection_limit": null, "open_flows": 0,
                "slow_start_ms": null, "locality_entries": 0,
                "backends": [{
                    "address": "10.0.0.101:80", "admin": "ready", "added_at_runtime": false,
                    "file_weight": null, "weight": 0, "effective_weight": 0,
                    "slow_start": false, "upper_threshold": 4, "lower_threshold": null,
                    "overloaded": false, "state": "draining", "health": "up",
                    "active": 0, "inactive": 0,
                    "counters": { "connections": 0, "packets_in": 0, "packets_out": 0,
                                  "bytes_in": 0, "bytes_out": 0, "checks_failed": 3,
                                  "down_transitions": 0, "up_transitions": 0 },
                }],
                "removed_at_runtime": [],
                "datapath": "kernel", "datapath_reason": "the kernel program is attached",
                "fast_path": { "packets": 12, "bytes": 20480, "flows": 0,
                               "direct_route_undeliverable": 0, "adopted": 0,
                               "adoption_dropped": 0, "map_capacity": 0,
                               "reinstalled": 0, "one_packet_in": 0,
                               "one_packet_out": 0, "one_packet_services": 0,
                               "syn_opened": 0, "syn_ring_full": 0,
                               "opened_adopted": 0, "opened_refused": 0,
                               "opened_pending": 0, "handshakes_reported": 0,
                               "handshake_ring_full": 0, "handshakes_fed": 0,
                               "syn_acks_sent": 0, "syn_ack_ring_full": 0,
                               "published_listeners": 0 },
                "flows_adopted": 3,
            })
        );
        assert_eq!(
            ServiceEntry::deserialize(&v).unwrap(),
            ServiceEntry::Running(Box::new(s))
        );
        let missing = item(ServiceEntry::Missing {
            name: "api".to_string(),
            error: "gone".to_string(),
        });
        assert_eq!(
            (&missing["name"], &missing["error"], &missing["datapath"]),
            (&json!("api"), &json!("gone"), &json!("kernel"))
        );
    }

    /// A new client reading an older daemon's status: counters it did not have read as 0.
    #[test]
    fn counters_an_older_daemon_lacks_read_as_zero() {
        let mut v = running(service(
            "web",
            SchedulerKind::Rr,
            vec![backend("10.0.0.101:80", BackendState::Up, 1)],
        ));
        v["counters"].as_object_mut().unwrap().remove("over_limit");
        for k in ["checks_failed", "down_transitions", "up_transitions"] {
            v["backends"][0]["counters"]
                .as_object_mut()
                .unwrap()
                .remove(k);
        }
        let ServiceEntry::Running(s) = ServiceEntry::deserialize(&v).unwrap() else {
            panic!("not read as a service: {v}");
        };
        assert_eq!(
            (s.counters.over_limit, s.backends[0].counters.checks_failed),
            (0, 0)
        );
    }

    #[test]
    fn a_dead_part_renders_as_dead() {
        let dead = json!({"name": "web", "state": "dead", "last_death": "gateway stopped"});
        assert!(render(&[dead]).contains("web is dead (gateway stopped)"));
    }

    #[test]
    fn bytes_are_shortened_as_ipvsadm_does() {
        assert_eq!(human_bytes(9_999), "9999");
        assert_eq!(human_bytes(10_240), "10K");
        assert_eq!(human_bytes(50 << 30), "50G");
    }
}
