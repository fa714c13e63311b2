//! The running pieces of a site: each capability starts as one or more [`Part`]s.
//!
//! Contract for a capability module `parts::<x>`:
//! ```text
//! pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>>;
//! pub(crate) fn render(items: &[serde_json::Value]) -> String;
//! ```
//! A part's `status()` is the serialisation of its library's typed status (`GreStatus`, ...):
//! `show --json` prints it, the metrics endpoint derives from it, and `render` reads it back
//! into the same type on the client side, so no field is written out by hand twice.
//! `start` sets up what the part needs (TUN, routes, sockets) and spawns its tasks; on error
//! it must have undone its own setup. `vipgate run` starts capabilities in dependency order
//! (GRE, NAT and services, VRRP, flow sync, SSH) and, when one fails, stops the ones already started in
//! reverse order, so nothing is left behind.

pub(crate) mod gre;
pub(crate) mod http;
pub(crate) mod lb;
mod lbruntime;
pub(crate) mod nat;
pub(crate) mod ssh;
pub(crate) mod sync;
pub(crate) mod vrrp;
pub(crate) mod wiring;

use crate::config::SiteConfig;
use crate::control::ControlOp;
use netutil::Reconfigured;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (what [`Part::stop`] returns).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A [`BoxFuture`] of a value already known.
pub(crate) fn ready<T: Send + 'static>(value: T) -> BoxFuture<T> {
    Box::pin(std::future::ready(value))
}

/// Which `vipgate show` topic a part answers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// GRE tunnels.
    Gre,
    /// The PAT gateway.
    Nat,
    /// Load-balanced virtual services.
    Lb,
    /// HTTP (L7) virtual services.
    Http,
    /// VRRP instances.
    Vrrp,
    /// Flow sync with the VRRP peers.
    Sync,
    /// SSH forwarding destinations and the forwarding server.
    Ssh,
}

impl Kind {
    /// Every kind, in start order.
    pub(crate) const ALL: [Kind; 7] = [
        Kind::Gre,
        Kind::Nat,
        Kind::Lb,
        Kind::Http,
        Kind::Vrrp,
        Kind::Sync,
        Kind::Ssh,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Gre => "gre",
            Kind::Nat => "nat",
            Kind::Lb => "lb",
            Kind::Http => "http",
            Kind::Vrrp => "vrrp",
            Kind::Sync => "sync",
            Kind::Ssh => "ssh",
        }
    }

    /// Human rendering of `show <kind>`; times of day in UTC when `utc`, else local time.
    pub(crate) fn render(self, items: &[serde_json::Value], utc: bool) -> String {
        match self {
            Kind::Gre => gre::render(items),
            Kind::Nat => nat::render(items),
            Kind::Lb => lb::render(items),
            Kind::Http => http::render(items),
            Kind::Vrrp => vrrp::render(items, utc),
            Kind::Sync => sync::render(items),
            Kind::Ssh => ssh::render(items),
        }
    }

    /// Whether the site configures anything of this kind.
    pub(crate) fn configured_in(self, site: &SiteConfig) -> bool {
        match self {
            Kind::Gre => !site.gre.is_empty(),
            Kind::Nat => site.nat.is_some(),
            Kind::Lb => !site.service.is_empty(),
            Kind::Http => !site.http.is_empty(),
            Kind::Vrrp => !site.vrrp.is_empty(),
            Kind::Sync => site.sync.is_some(),
            Kind::Ssh => !site.ssh.is_empty() || site.sshd.is_some(),
        }
    }

    /// This kind's sections of `site`, as JSON, to tell whether a reload changes them.
    pub(crate) fn sections(self, site: &SiteConfig) -> serde_json::Value {
        let v = match self {
            Kind::Gre => serde_json::to_value(&site.gre),
            Kind::Nat => serde_json::to_value(&site.nat),
            Kind::Lb => serde_json::to_value(&site.service),
            Kind::Http => serde_json::to_value(&site.http),
            Kind::Vrrp => serde_json::to_value(&site.vrrp),
            Kind::Sync => serde_json::to_value(&site.sync),
            Kind::Ssh => serde_json::to_value((&site.ssh, &site.sshd)),
        };
        v.unwrap_or_default()
    }

    /// The reload units of this kind in `site`, in file order. SSH destinations and the SSH
    /// server are one unit each; VRRP instances are grouped by sync group (a group changes
    /// state together, so it restarts together); each `[[http]]` listener is one, its section
    /// compared together with the contents of its certificate and key files (rewritten files
    /// are a change to apply); GRE tunnels share one driver (tunnels on one local address share
    /// its socket), and the gateway and the virtual services built on it are one unit per kind.
    pub(crate) fn units(self, site: &SiteConfig) -> Vec<Unit> {
        let one = |key: &str, members: Option<Vec<String>>, v: serde_json::Value| Unit {
            key: key.to_string(),
            members,
            section: v,
        };
        let json = |v: serde_json::Result<serde_json::Value>| v.unwrap_or_default();
        match self {
            Kind::Vrrp => {
                let mut units: Vec<Unit> = Vec::new();
                for s in &site.vrrp {
                    let name = s.name.get_ref().clone();
                    let key = match &s.group {
                        Some(g) => format!("group {g}"),
                        None => name.clone(),
                    };
                    let v = json(serde_json::to_value(s));
                    match units.iter_mut().find(|u| u.key == key) {
                        Some(u) => {
                            u.members.get_or_insert_with(Vec::new).push(name);
                            if let serde_json::Value::Array(a) = &mut u.section {
                                a.push(v);
                            }
                        }
                        None => units.push(one(&key, Some(vec![name]), serde_json::json!([v]))),
                    }
                }
                units
            }
            Kind::Ssh => {
                let mut units: Vec<Unit> = site
                    .sshd
                    .iter()
                    .map(|d| {
                        one(
                            "sshd",
                            Some(vec!["sshd".into()]),
                            json(serde_json::to_value(d)),
                        )
                    })
                    .collect();
                units.extend(site.ssh.iter().map(|d| {
                    let name = &d.destination.get_ref().text;
                    one(
                        name,
                        Some(vec![name.clone()]),
                        json(serde_json::to_value(d)),
                    )
                }));
                units
            }
            Kind::Http => site
                .http
                .iter()
                .map(|s| {
                    let name = s.name.get_ref();
                    let files = s.tls_files_digest();
                    one(
                        name,
                        Some(vec![name.clone()]),
                        json(serde_json::to_value((s, files))),
                    )
                })
                .collect(),
            Kind::Gre | Kind::Nat | Kind::Lb | Kind::Sync => {
                if self.configured_in(site) {
                    vec![one(self.as_str(), None, self.sections(site))]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Whether this kind has several units that start one by one (VRRP instances or sync
    /// groups, SSH destinations and the server); the others are one unit per kind.
    pub(crate) fn units_start_apart(self) -> bool {
        matches!(self, Kind::Vrrp | Kind::Ssh | Kind::Http)
    }

    /// The kinds built on this one at start (virtual services join the running gateway; VRRP
    /// instances take the services' health signals and the services' and `[nat]`'s address
    /// hooks; flow sync takes the gateway
    /// and the VRRP states): when this kind restarts, they must start again on the new one.
    pub(crate) fn dependents(self) -> &'static [Kind] {
        match self {
            Kind::Nat => &[Kind::Lb, Kind::Vrrp, Kind::Sync],
            Kind::Lb => &[Kind::Vrrp, Kind::Sync],
            Kind::Vrrp => &[Kind::Sync],
            Kind::Gre | Kind::Http | Kind::Sync | Kind::Ssh => &[],
        }
    }

    /// `site` with this kind's sections cut down to the units named in `keys` (what starting
    /// only those units needs); other kinds' sections are kept for cross-references.
    pub(crate) fn restrict(self, site: &SiteConfig, keys: &[String]) -> SiteConfig {
        let mut out = site.clone();
        let wanted = |name: &str| keys.iter().any(|k| k == name);
        match self {
            Kind::Vrrp => out.vrrp.retain(|s| match &s.group {
                Some(g) => wanted(&format!("group {g}")),
                None => wanted(s.name.get_ref()),
            }),
            Kind::Ssh => {
                out.ssh.retain(|d| wanted(&d.destination.get_ref().text));
                if !wanted("sshd") {
                    out.sshd = None;
                }
            }
            Kind::Http => out.http.retain(|s| wanted(s.name.get_ref())),
            Kind::Gre | Kind::Nat | Kind::Lb | Kind::Sync => {}
        }
        out
    }

    pub(crate) async fn start(
        self,
        site: &SiteConfig,
        ctx: &StartCtx,
    ) -> anyhow::Result<Vec<Box<dyn Part>>> {
        match self {
            Kind::Gre => gre::start(site, ctx).await,
            Kind::Nat => nat::start(site, ctx).await,
            Kind::Lb => lb::start(site, ctx).await,
            Kind::Http => http::start(site, ctx).await,
            Kind::Vrrp => vrrp::start(site, ctx).await,
            Kind::Sync => sync::start(site, ctx).await,
            Kind::Ssh => ssh::start(site, ctx).await,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a reload adds, changes or removes as one piece: a tunnel, a destination, a sync group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unit {
    /// Its name (`group NAME` for a VRRP sync group).
    pub(crate) key: String,
    /// The names of its parts; `None`: every part of the kind.
    pub(crate) members: Option<Vec<String>>,
    /// Its config sections, to tell whether a reload changes it.
    pub(crate) section: serde_json::Value,
}

impl Unit {
    /// Every part of `kind` as one unit (what a restart of a whole kind stops).
    fn every(kind: Kind) -> Unit {
        Unit {
            key: kind.as_str().into(),
            members: None,
            section: serde_json::Value::Null,
        }
    }

    /// How reload reports name it: `gre tun0`, `vrrp group G`, or just `nat`.
    fn label(&self, kind: Kind) -> String {
        if self.key == kind.as_str() {
            self.key.clone()
        } else {
            format!("{kind} {}", self.key)
        }
    }

    fn owns(&self, part: &dyn Part) -> bool {
        self.members
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| *n == part.name()))
    }
}

/// Renders each status with `one` after reading it back into its typed status `T`; an entry
/// that is not a `T` (a unit the supervisor reports `dead`, a part `stopped`) gets the
/// one-line `NAME is STATE (cause)`.
pub(crate) fn render_each<T: serde::de::DeserializeOwned>(
    items: &[serde_json::Value],
    one: impl Fn(&mut String, &T),
) -> String {
    let mut out = String::new();
    for item in items {
        match T::deserialize(item) {
            Ok(status) => one(&mut out, &status),
            Err(_) => {
                let text = |k: &str| item[k].as_str().unwrap_or("-").to_string();
                let _ = write!(out, "{} is {}", text("name"), text("state"));
                if let Some(cause) = item["last_death"].as_str() {
                    let _ = write!(out, " ({cause})");
                }
                out.push('\n');
            }
        }
    }
    out
}

/// `reason count, ...` for the reasons that counted something, or `none`.
pub(crate) fn drops_text<R: netutil::Reason>(drops: &netutil::DropCounters<R>) -> String {
    let counted: Vec<String> = drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{} {n}", r.as_str()))
        .collect();
    if counted.is_empty() {
        "none".to_string()
    } else {
        counted.join(", ")
    }
}

/// One running piece: a tunnel, the gateway, a VRRP instance, an SSH destination.
pub(crate) trait Part: Send + Sync {
    /// The `show` topic this part answers.
    fn kind(&self) -> Kind;
    /// Its name as configured (tunnel name, instance name, destination).
    fn name(&self) -> String;
    /// State and counters as JSON: what `show <kind> --json` prints, and the metrics source.
    fn status(&self) -> serde_json::Value;
    /// State and counters without per-flow detail: what `vipgate status` and the Prometheus
    /// metrics read. Cheap to call on every scrape; parts whose `status()` lists flows (nat)
    /// override it so a scrape does not walk their tables.
    fn summary(&self) -> serde_json::Value {
        self.status()
    }
    /// An operator command (`nat clear`, `lb weight`); the control socket hands each to the
    /// parts of [`ControlOp::kind`].
    ///
    /// # Errors
    /// An operation this part does not run, or one it cannot apply, as a message for the
    /// operator.
    fn control(&self, op: &ControlOp) -> anyhow::Result<serde_json::Value> {
        anyhow::bail!("{} `{}` does not support `{op}`", self.kind(), self.name())
    }
    /// Applies a changed config in place (weights, ACL rules, timers) without dropping flows
    /// or mastership. `Live`: applied. `NeedsRestart(reason)`: this part cannot apply the
    /// change live and `vipgate run` restarts it with the new config instead (the default);
    /// the reason is the driver's, shown once in the reload reply.
    ///
    /// The checks run now; the returned future only waits for a driver task's answer (VRRP
    /// asks its group's task), so the reload never blocks a runtime worker.
    ///
    /// # Errors
    /// The new config cannot be applied; the part keeps running with the old one.
    fn reconfigure(&self, _site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(Ok(Reconfigured::restart("it applies no change in place")))
    }
    /// The first of this part's long-lived tasks that ended while the part should be running
    /// (a panic, an error, a return), with its cause; `None` while all of them run. The
    /// daemon's supervisor polls it, logs the death, shows the unit as `dead` and restarts it.
    /// Drivers record it with `netutil::task::TaskWatch`.
    fn dead_task(&self) -> Option<String> {
        None
    }
    /// Stops the part and undoes everything it set up (routes, addresses, TUN devices).
    fn stop(self: Box<Self>) -> BoxFuture<()>;
}

/// What every part gets at start.
#[derive(Clone, Default)]
pub(crate) struct StartCtx {
    /// Only start these kinds (`vipgate run --only`); empty = all configured.
    pub(crate) only: Vec<Kind>,
    /// Cross-part wiring: the nat part leaves its gateway here for the virtual services, and
    /// the services leave their health signals and VIP hooks for the VRRP instances.
    pub(crate) wiring: wiring::SharedWiring,
}

/// The started parts of a site, in start order.
#[derive(Default)]
pub(crate) struct Running {
    pub(crate) parts: Vec<Box<dyn Part>>,
    /// Units whose task died, by `(kind, unit key)`: what the supervisor knows of each.
    pub(crate) deaths: std::collections::BTreeMap<(Kind, String), Death>,
    /// The units whose parts run, by `(kind, unit key)`, with the config section each was
    /// started (or last reconfigured live) with: what a reload compares the new file with. A
    /// unit stopped and not started again (a failed start) is absent, so the next reload
    /// starts it.
    pub(crate) applied: std::collections::BTreeMap<(Kind, String), Unit>,
}

/// What a reload did, one line per unit it touched; `failed` when a unit refused the new
/// config or failed to start (the other lines still happened).
#[derive(Debug, Default)]
pub(crate) struct ReloadReport {
    pub(crate) lines: Vec<String>,
    pub(crate) failed: bool,
}

/// A unit the supervisor found dead: why, how often it was restarted, when to try again.
pub(crate) struct Death {
    cause: String,
    restarts: u64,
    /// Whether the unit's parts are running again (the last restart succeeded).
    running: bool,
    retry_at: std::time::Instant,
    backoff: std::time::Duration,
}

/// The first retry after a death; doubled after each failed restart, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(60);

impl Running {
    /// Starts every configured kind in dependency order; on failure stops what was started.
    ///
    /// # Errors
    /// The first part that failed, named, with its cause.
    pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Running> {
        let mut running = Running::default();
        for kind in Kind::ALL {
            if !kind.configured_in(site) || !(ctx.only.is_empty() || ctx.only.contains(&kind)) {
                continue;
            }
            match kind.start(site, ctx).await {
                Ok(parts) => {
                    running.parts.extend(parts);
                    running.record_applied(kind, site);
                }
                Err(e) => {
                    running.stop().await;
                    return Err(e.context(format!(
                        "starting {kind} failed; everything started before it was stopped again"
                    )));
                }
            }
        }
        Ok(running)
    }

    /// Stops every part, last started first.
    pub(crate) async fn stop(&mut self) {
        while let Some(part) = self.parts.pop() {
            let (kind, name) = (part.kind(), part.name());
            part.stop().await;
            tracing::info!(%kind, %name, "stopped");
        }
    }

    /// Applies a new config unit by unit (see [`Kind::units`]), compared with what runs: a unit
    /// whose running config equals the new one is left untouched; a changed one is
    /// reconfigured in place where its parts can, else stopped and started again; a unit the
    /// new config adds, or one that is not running (a start that failed in an earlier reload,
    /// a supervisor restart that failed), is started; a removed one is stopped. A refusal or a
    /// failed start does not end the reload: the other units are still applied, and the
    /// report says what happened to each unit (`applied live`, `restarted`, `started`,
    /// `stopped`, `refused: ...`, `failed to start: ...`). A unit that failed to start is shown
    /// `dead` and the supervisor retries it like a unit whose task died.
    pub(crate) async fn reload(
        &mut self,
        new: &SiteConfig,
        ctx: &StartCtx,
        now: std::time::Instant,
    ) -> ReloadReport {
        let mut report = ReloadReport::default();
        let mut restarted: Vec<Kind> = Vec::new();
        for kind in Kind::ALL {
            if !(ctx.only.is_empty() || ctx.only.contains(&kind)) {
                continue;
            }
            let after = kind.units(new);
            let before: Vec<Unit> = self.applied_units(kind);
            // The nearest cause is named: the kind restarted last that this one is built on.
            if let Some(cause) = restarted
                .iter()
                .rev()
                .find(|k| k.dependents().contains(&kind))
                && !before.is_empty()
                && !after.is_empty()
            {
                // What this kind was wired to is gone: start it again on the new one.
                self.stop_unit(kind, &Unit::every(kind)).await;
                let label = kind.as_str().to_string();
                match self.start_at_place(kind, new, ctx, "").await {
                    Ok(()) => {
                        report
                            .lines
                            .push(format!("{kind}: restarted (it is built on {cause})"));
                        restarted.push(kind);
                        self.forget_deaths_of(kind, &after);
                    }
                    Err(e) => self.start_failed(&mut report, kind, &label, &after, e, now),
                }
                continue;
            }
            let mut to_start = Vec::new();
            for unit in &before {
                match after.iter().find(|u| u.key == unit.key) {
                    Some(u) if u.section == unit.section => {}
                    Some(u) => {
                        let mut live = Ok(Reconfigured::Live);
                        for p in self
                            .parts
                            .iter()
                            .filter(|p| p.kind() == kind && unit.owns(&***p))
                        {
                            match p.reconfigure(new).await {
                                Ok(this) => live = live.map(|all| all.and(this)),
                                Err(e) => {
                                    live = Err(e);
                                    break;
                                }
                            }
                        }
                        match live {
                            Ok(Reconfigured::Live) => {
                                self.applied.insert((kind, u.key.clone()), u.clone());
                                report
                                    .lines
                                    .push(format!("{}: applied live", unit.label(kind)));
                            }
                            Ok(Reconfigured::NeedsRestart(reason)) => {
                                self.stop_unit(kind, unit).await;
                                to_start.push((u.clone(), format!("restarted ({reason})")));
                            }
                            Err(e) => {
                                report.failed = true;
                                report.lines.push(format!(
                                    "{}: refused, the old config keeps running: {e:#}",
                                    unit.label(kind)
                                ));
                            }
                        }
                    }
                    None => {
                        self.stop_unit(kind, unit).await;
                        report.lines.push(format!("{}: stopped", unit.label(kind)));
                    }
                }
            }
            for unit in &after {
                if !before.iter().any(|u| u.key == unit.key) {
                    to_start.push((unit.clone(), "started".to_string()));
                }
            }
            if to_start.is_empty() {
                continue;
            }
            if kind.units_start_apart() {
                for (unit, how) in to_start {
                    let label = unit.label(kind);
                    let one = kind.restrict(new, std::slice::from_ref(&unit.key));
                    match self.start_at_place(kind, &one, ctx, &label).await {
                        Ok(()) => {
                            report.lines.push(format!("{label}: {how}"));
                            self.forget_deaths_of(kind, std::slice::from_ref(&unit));
                        }
                        Err(e) => self.start_failed(
                            &mut report,
                            kind,
                            &label,
                            std::slice::from_ref(&unit),
                            e,
                            now,
                        ),
                    }
                }
            } else {
                // One unit per kind (gre, nat, lb): start it whole.
                let units: Vec<Unit> = to_start.iter().map(|(u, _)| u.clone()).collect();
                let label = kind.as_str().to_string();
                match self.start_at_place(kind, new, ctx, &label).await {
                    Ok(()) => {
                        report.lines.extend(
                            to_start
                                .iter()
                                .map(|(u, how)| format!("{}: {how}", u.label(kind))),
                        );
                        if to_start.iter().any(|(_, how)| how.starts_with("restarted")) {
                            restarted.push(kind);
                        }
                        self.forget_deaths_of(kind, &units);
                    }
                    Err(e) => self.start_failed(&mut report, kind, &label, &units, e, now),
                }
            }
        }
        report
    }

    /// The units of `kind` that run, as they were started (or last reconfigured), in key
    /// order.
    fn applied_units(&self, kind: Kind) -> Vec<Unit> {
        self.applied
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, unit)| unit.clone())
            .collect()
    }

    /// Records a unit that a reload could not start: the report says why, and the unit shows
    /// `dead` until the supervisor (which retries it) or a later reload starts it.
    fn start_failed(
        &mut self,
        report: &mut ReloadReport,
        kind: Kind,
        label: &str,
        units: &[Unit],
        e: anyhow::Error,
        now: std::time::Instant,
    ) {
        report.failed = true;
        report
            .lines
            .push(format!("{label}: failed to start, it stays stopped: {e:#}"));
        for u in units {
            let d = self
                .deaths
                .entry((kind, u.key.clone()))
                .or_insert_with(|| Death {
                    cause: String::new(),
                    restarts: 0,
                    running: false,
                    retry_at: now,
                    backoff: FIRST_BACKOFF,
                });
            d.cause = format!("reload: {e:#}");
            d.running = false;
            d.retry_at = now + d.backoff;
            d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Forgets what the supervisor knew of units a reload started afresh.
    fn forget_deaths_of(&mut self, kind: Kind, units: &[Unit]) {
        for u in units {
            self.deaths.remove(&(kind, u.key.clone()));
        }
    }

    /// Starts `kind` from `site` and keeps start order: its parts go before the first part of
    /// a later kind.
    async fn start_at_place(
        &mut self,
        kind: Kind,
        site: &SiteConfig,
        ctx: &StartCtx,
        what: &str,
    ) -> anyhow::Result<()> {
        let started = kind.start(site, ctx).await.map_err(|e| {
            e.context(if what.is_empty() {
                format!("restarting {kind}")
            } else {
                format!("starting {what}")
            })
        })?;
        let at = self
            .parts
            .iter()
            .position(|p| p.kind() > kind)
            .unwrap_or(self.parts.len());
        self.parts.splice(at..at, started);
        self.record_applied(kind, site);
        Ok(())
    }

    /// Records the units of `kind` in `site` as running with their sections of `site`.
    fn record_applied(&mut self, kind: Kind, site: &SiteConfig) {
        for unit in kind.units(site) {
            self.applied.insert((kind, unit.key.clone()), unit);
        }
    }

    /// Stops the parts of one unit, last started first (`members: None`: every part of the
    /// kind), and forgets it as applied.
    async fn stop_unit(&mut self, kind: Kind, unit: &Unit) {
        match unit.members {
            None => self.applied.retain(|(k, _), _| *k != kind),
            Some(_) => {
                self.applied.remove(&(kind, unit.key.clone()));
            }
        }
        let mut i = self.parts.len();
        while i > 0 {
            i -= 1;
            if self.parts[i].kind() == kind && unit.owns(&*self.parts[i]) {
                self.parts.remove(i).stop().await;
            }
        }
    }

    /// `status()` of every part of one kind, with what the supervisor knows (see
    /// [`Running::summaries`]).
    pub(crate) fn statuses(&self, kind: Kind) -> Vec<serde_json::Value> {
        self.with_deaths(Some(kind), |p| p.status())
            .into_iter()
            .map(|(_, _, v)| v)
            .collect()
    }

    /// `(kind, name, summary())` of every part, then one entry per unit that is dead and not
    /// running (state `dead`). A part of a unit that died before carries `restarts` and
    /// `last_death`; what `vipgate status` and the metrics read.
    pub(crate) fn summaries(&self) -> Vec<(Kind, String, serde_json::Value)> {
        self.with_deaths(None, |p| p.summary())
    }

    fn with_deaths(
        &self,
        only: Option<Kind>,
        status: impl Fn(&dyn Part) -> serde_json::Value,
    ) -> Vec<(Kind, String, serde_json::Value)> {
        let mut out = Vec::new();
        for p in self
            .parts
            .iter()
            .filter(|p| only.is_none_or(|k| p.kind() == k))
        {
            let mut v = status(&**p);
            if let Some(d) = self.death_of(&**p)
                && let serde_json::Value::Object(m) = &mut v
            {
                m.insert("restarts".into(), d.restarts.into());
                m.insert("last_death".into(), d.cause.clone().into());
            }
            out.push((p.kind(), p.name(), v));
        }
        for ((kind, key), d) in &self.deaths {
            if d.running || only.is_some_and(|k| k != *kind) {
                continue;
            }
            let v = serde_json::json!({
                "name": key,
                "state": "dead",
                "last_death": d.cause,
                "restarts": d.restarts,
            });
            out.push((*kind, key.clone(), v));
        }
        out
    }

    /// Whether a dead unit waits for its next restart attempt.
    pub(crate) fn has_pending_restarts(&self) -> bool {
        self.deaths.values().any(|d| !d.running)
    }

    /// Forgets deaths of units `site` no longer configures (after a reload).
    pub(crate) fn forget_deaths_outside(&mut self, site: &SiteConfig) {
        self.deaths
            .retain(|(kind, key), _| kind.units(site).iter().any(|u| u.key == *key));
    }

    fn death_of(&self, part: &dyn Part) -> Option<&Death> {
        self.deaths
            .iter()
            .find(|((kind, key), _)| {
                *kind == part.kind() && (key == kind.as_str() || *key == part.name())
            })
            .map(|(_, d)| d)
    }

    /// The supervisor's step (the run loop calls it about once a second): a part whose task
    /// died is logged, its unit (with the kinds built on it) is stopped and started again
    /// from `site`; each further death or failed start of the same unit waits twice as long
    /// (1 s doubling to 60 s), the unit shown `dead` meanwhile.
    pub(crate) async fn supervise(
        &mut self,
        site: &SiteConfig,
        ctx: &StartCtx,
        now: std::time::Instant,
    ) {
        let mut due: Vec<(Kind, Unit)> = Vec::new();
        for p in &self.parts {
            let Some(cause) = p.dead_task() else { continue };
            let kind = p.kind();
            let Some(unit) = kind.units(site).into_iter().find(|u| u.owns(&**p)) else {
                continue;
            };
            tracing::error!(%kind, name = %p.name(), %cause, "a task died; restarting {}", unit.label(kind));
            let d = self
                .deaths
                .entry((kind, unit.key.clone()))
                .or_insert_with(|| Death {
                    cause: cause.clone(),
                    restarts: 0,
                    running: false,
                    retry_at: now,
                    backoff: FIRST_BACKOFF,
                });
            d.cause = cause;
            d.running = false;
            if !due.iter().any(|(k, u)| *k == kind && u.key == unit.key) {
                due.push((kind, unit));
            }
        }
        for ((kind, key), d) in &self.deaths {
            if !d.running
                && d.retry_at <= now
                && !due.iter().any(|(k, u)| k == kind && u.key == *key)
                && let Some(unit) = kind.units(site).into_iter().find(|u| u.key == *key)
            {
                due.push((*kind, unit));
            }
        }
        for (kind, unit) in due {
            let id = (kind, unit.key.clone());
            if self.deaths.get(&id).is_some_and(|d| d.retry_at > now) {
                self.stop_unit(kind, &unit).await;
                continue;
            }
            self.stop_unit(kind, &unit).await;
            let started = self
                .start_at_place(
                    kind,
                    &kind.restrict(site, std::slice::from_ref(&unit.key)),
                    ctx,
                    &unit.label(kind),
                )
                .await;
            let mut ok = started.is_ok();
            if let Err(e) = started {
                tracing::error!(%kind, unit = %unit.key, "restart failed: {e:#}");
            }
            for &dep in kind.dependents() {
                if ok && dep.configured_in(site) {
                    self.stop_unit(dep, &Unit::every(dep)).await;
                    if let Err(e) = self.start_at_place(dep, site, ctx, "").await {
                        tracing::error!(kind = %dep, "restart after {kind} failed: {e:#}");
                        ok = false;
                    }
                }
            }
            if let Some(d) = self.deaths.get_mut(&id) {
                d.restarts += 1;
                d.running = ok;
                // A unit that keeps dying waits longer each time, restarted or not.
                d.retry_at = now + d.backoff;
                d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
                if ok {
                    tracing::info!(%kind, unit = %unit.key, restarts = d.restarts, "restarted");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SITE: &str = r#"
[[gre]]
name = "gre-a"
local = "198.51.100.1"
remote = "198.51.100.2"
address = "172.16.0.1/30"

[[gre]]
name = "gre-b"
local = "198.51.100.1"
remote = "198.51.100.3"
address = "172.16.0.5/30"

[[vrrp]]
name = "pub"
interface = "eth0"
vrid = 51
priority = 150
addresses = ["198.51.100.10/24"]
group = "dir"

[[vrrp]]
name = "priv"
interface = "eth1"
vrid = 52
priority = 150
addresses = ["10.0.0.1/24"]
group = "dir"

[[vrrp]]
name = "other"
interface = "eth2"
vrid = 53
priority = 100
addresses = ["10.9.0.1/24"]

[[ssh]]
destination = "ops@203.0.113.5:22"
local = ["8585:127.0.0.1:80"]
"#;

    fn site(text: &str) -> SiteConfig {
        crate::config::parse(Path::new("site.toml"), text).expect("valid test config")
    }

    fn keys(units: &[Unit]) -> Vec<&str> {
        units.iter().map(|u| u.key.as_str()).collect()
    }

    #[test]
    fn units_are_tunnels_destinations_and_sync_groups() {
        let s = site(SITE);
        assert_eq!(keys(&Kind::Gre.units(&s)), ["gre"]);
        let vrrp = Kind::Vrrp.units(&s);
        assert_eq!(keys(&vrrp), ["group dir", "other"]);
        assert_eq!(vrrp[0].members, Some(vec!["pub".into(), "priv".into()]));
        assert_eq!(keys(&Kind::Ssh.units(&s)), ["ops@203.0.113.5:22"]);
        assert!(Kind::Nat.units(&s).is_empty());
    }

    #[test]
    fn a_change_touches_only_its_unit() {
        let old = site(SITE);
        let new = site(&SITE.replace("priority = 100", "priority = 90"));
        let (before, after) = (Kind::Vrrp.units(&old), Kind::Vrrp.units(&new));
        assert_eq!(before[0], after[0], "the sync group is unchanged");
        assert_ne!(before[1], after[1], "the ungrouped instance changed");
        assert_eq!(Kind::Gre.units(&old), Kind::Gre.units(&new));
        let new = site(&SITE.replace("198.51.100.3", "198.51.100.4"));
        assert_ne!(Kind::Gre.units(&old), Kind::Gre.units(&new));
    }

    /// A GRE part that applies a reload live or refuses it, counting the calls.
    struct FakeGre {
        accept: bool,
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Part for FakeGre {
        fn kind(&self) -> Kind {
            Kind::Gre
        }
        fn name(&self) -> String {
            "gre-a".into()
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "name": "gre-a" })
        }
        fn reconfigure(&self, _site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ready(if self.accept {
                Ok(Reconfigured::Live)
            } else {
                Err(anyhow::anyhow!("planted refusal"))
            })
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    fn running_fake(
        s: &SiteConfig,
        accept: bool,
    ) -> (Running, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let calls = std::sync::Arc::default();
        let mut r = Running {
            parts: vec![Box::new(FakeGre {
                accept,
                calls: std::sync::Arc::clone(&calls),
            })],
            ..Running::default()
        };
        r.record_applied(Kind::Gre, s);
        (r, calls)
    }

    #[tokio::test]
    async fn a_refused_unit_is_retried_by_the_next_reload() {
        let old = site(SITE);
        let new = site(&SITE.replace("198.51.100.3", "198.51.100.4"));
        let ctx = StartCtx {
            only: vec![Kind::Gre],
            ..StartCtx::default()
        };
        let now = tokio::time::Instant::now().into_std();
        let (mut r, calls) = running_fake(&old, false);
        let report = r.reload(&new, &ctx, now).await;
        assert!(report.failed);
        assert!(
            report.lines[0].starts_with("gre: refused"),
            "{:?}",
            report.lines
        );
        assert_eq!(r.parts.len(), 1, "the refusing part keeps running");
        // The running config is still the old one: the same file is tried again, and the old
        // file is "nothing changed".
        let again = r.reload(&new, &ctx, now).await;
        assert!(again.failed);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
        let back = r.reload(&old, &ctx, now).await;
        assert!(!back.failed && back.lines.is_empty(), "{:?}", back.lines);
    }

    #[tokio::test]
    async fn a_live_change_becomes_the_running_config() {
        let old = site(SITE);
        let new = site(&SITE.replace("198.51.100.3", "198.51.100.4"));
        let ctx = StartCtx {
            only: vec![Kind::Gre],
            ..StartCtx::default()
        };
        let now = tokio::time::Instant::now().into_std();
        let (mut r, calls) = running_fake(&old, true);
        let report = r.reload(&new, &ctx, now).await;
        assert_eq!(report.lines, ["gre: applied live"]);
        assert!(r.reload(&new, &ctx, now).await.lines.is_empty());
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        let back = r.reload(&old, &ctx, now).await;
        assert_eq!(back.lines, ["gre: applied live"]);
    }

    #[test]
    fn restrict_keeps_whole_sync_groups_and_other_kinds() {
        let s = site(SITE);
        let only = Kind::Vrrp.restrict(&s, &["group dir".to_string()]);
        let names: Vec<&str> = only
            .vrrp
            .iter()
            .map(|v| v.name.get_ref().as_str())
            .collect();
        assert_eq!(names, ["pub", "priv"]);
        assert_eq!(
            only.gre.len(),
            2,
            "other kinds are kept for cross-references"
        );
        let only = Kind::Ssh.restrict(&s, &[]);
        assert!(only.ssh.is_empty() && only.sshd.is_none());
    }
}
