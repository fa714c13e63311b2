//! The running pieces of a site: each capability starts as one or more [`Part`]s.
//!
//! Contract for a capability module `parts::<x>`:
//! ```text
//! pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>>;
//! pub(crate) fn render(items: &[serde_json::Value]) -> String;
//! ```
//! `start` sets up what the part needs (TUN, routes, sockets) and spawns its tasks; on error
//! it must have undone its own setup. `vipgate run` starts capabilities in dependency order
//! (GRE, NAT and services, VRRP, SSH) and, when one fails, stops the ones already started in
//! reverse order, so nothing is left behind.

pub(crate) mod gre;
pub(crate) mod lb;
pub(crate) mod nat;
pub(crate) mod ssh;
pub(crate) mod vrrp;

use crate::config::SiteConfig;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (what [`Part::stop`] returns).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

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
    /// VRRP instances.
    Vrrp,
    /// SSH forwarding destinations and the forwarding server.
    Ssh,
}

impl Kind {
    /// Every kind, in start order.
    pub(crate) const ALL: [Kind; 5] = [Kind::Gre, Kind::Nat, Kind::Lb, Kind::Vrrp, Kind::Ssh];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Gre => "gre",
            Kind::Nat => "nat",
            Kind::Lb => "lb",
            Kind::Vrrp => "vrrp",
            Kind::Ssh => "ssh",
        }
    }

    /// Human rendering of `show <kind>`.
    pub(crate) fn render(self, items: &[serde_json::Value]) -> String {
        match self {
            Kind::Gre => gre::render(items),
            Kind::Nat => nat::render(items),
            Kind::Lb => lb::render(items),
            Kind::Vrrp => vrrp::render(items),
            Kind::Ssh => ssh::render(items),
        }
    }

    /// Whether the site configures anything of this kind.
    pub(crate) fn configured_in(self, site: &SiteConfig) -> bool {
        match self {
            Kind::Gre => !site.gre.is_empty(),
            Kind::Nat => site.nat.is_some(),
            Kind::Lb => !site.service.is_empty(),
            Kind::Vrrp => !site.vrrp.is_empty(),
            Kind::Ssh => !site.ssh.is_empty() || site.sshd.is_some(),
        }
    }

    /// This kind's sections of `site`, as JSON, to tell whether a reload changes them.
    pub(crate) fn sections(self, site: &SiteConfig) -> serde_json::Value {
        let v = match self {
            Kind::Gre => serde_json::to_value(&site.gre),
            Kind::Nat => serde_json::to_value(&site.nat),
            Kind::Lb => serde_json::to_value(&site.service),
            Kind::Vrrp => serde_json::to_value(&site.vrrp),
            Kind::Ssh => serde_json::to_value((&site.ssh, &site.sshd)),
        };
        v.unwrap_or_default()
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
            Kind::Vrrp => vrrp::start(site, ctx).await,
            Kind::Ssh => ssh::start(site, ctx).await,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// An operator command (`nat clear`, `lb weight`, ...).
    ///
    /// # Errors
    /// Unknown operations or bad arguments, as a message for the operator.
    fn control(&self, op: &str, _args: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        anyhow::bail!("{} `{}` does not support `{op}`", self.kind(), self.name())
    }
    /// Applies a changed config in place (weights, ACL rules, timers) without dropping flows
    /// or mastership. `Ok(true)`: applied live. `Ok(false)`: this part cannot apply the change
    /// live and `vipgate run` restarts it with the new config instead (the default).
    ///
    /// # Errors
    /// The new config cannot be applied; the part keeps running with the old one.
    fn reconfigure(&self, _site: &SiteConfig) -> anyhow::Result<bool> {
        Ok(false)
    }
    /// Stops the part and undoes everything it set up (routes, addresses, TUN devices).
    fn stop(self: Box<Self>) -> BoxFuture<()>;
}

/// What every part gets at start.
#[derive(Clone, Default)]
pub(crate) struct StartCtx {
    /// Only start these kinds (`vipgate run --only`); empty = all configured.
    pub(crate) only: Vec<Kind>,
    /// Cross-part wiring: the virtual services (started first) leave their health signals and
    /// VIP hooks here for the VRRP instances (started after them).
    pub(crate) wiring: std::sync::Arc<std::sync::Mutex<vrrp::Wiring>>,
}

/// The started parts of a site, in start order.
#[derive(Default)]
pub(crate) struct Running {
    pub(crate) parts: Vec<Box<dyn Part>>,
}

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
                Ok(parts) => running.parts.extend(parts),
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

    /// Applies a new config: unchanged kinds keep running untouched; changed kinds are
    /// reconfigured in place where their parts can, else restarted; added kinds start and
    /// removed kinds stop. Returns one line per kind that changed.
    ///
    /// # Errors
    /// A kind that failed to restart (it is then stopped; the rest keeps running).
    pub(crate) async fn reload(
        &mut self,
        old: &SiteConfig,
        new: &SiteConfig,
        ctx: &StartCtx,
    ) -> anyhow::Result<Vec<String>> {
        let mut report = Vec::new();
        for kind in Kind::ALL {
            if !(ctx.only.is_empty() || ctx.only.contains(&kind))
                || kind.sections(old) == kind.sections(new)
            {
                continue;
            }
            let was = kind.configured_in(old);
            let will = kind.configured_in(new);
            if was && will {
                let mut live = true;
                for p in self.parts.iter().filter(|p| p.kind() == kind) {
                    live &= p.reconfigure(new)?;
                }
                if live {
                    report.push(format!("{kind}: applied live"));
                    continue;
                }
            }
            // Restart this kind: stop its parts (last first), then start from the new config.
            let mut i = self.parts.len();
            while i > 0 {
                i -= 1;
                if self.parts[i].kind() == kind {
                    self.parts.remove(i).stop().await;
                }
            }
            if will {
                let started = kind
                    .start(new, ctx)
                    .await
                    .map_err(|e| e.context(format!("restarting {kind} with the new config")))?;
                // Keep start order: insert before the first part of a later kind.
                let at = self
                    .parts
                    .iter()
                    .position(|p| p.kind() > kind)
                    .unwrap_or(self.parts.len());
                self.parts.splice(at..at, started);
                report.push(format!(
                    "{kind}: {}",
                    if was { "restarted" } else { "started" }
                ));
            } else {
                report.push(format!("{kind}: stopped"));
            }
        }
        Ok(report)
    }

    /// `status()` of every part of one kind.
    pub(crate) fn statuses(&self, kind: Kind) -> Vec<serde_json::Value> {
        self.parts
            .iter()
            .filter(|p| p.kind() == kind)
            .map(|p| p.status())
            .collect()
    }
}
