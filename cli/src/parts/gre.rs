//! `vipgate run` / `show gre`: userspace GRE tunnels.
//!
//! All tunnels of a site run in one [`GreDriver`], because tunnels that share a local
//! address share its underlay socket and are told apart by (remote, key). Each tunnel is
//! still its own [`Part`] so `show gre` lists them one by one; the driver stops when the
//! last of them is stopped.

use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::SiteConfig;
use crate::config::lower;
use anyhow::Context;
use gre::Underlay;
use gre::driver::{GreDriver, GreStatus, TunnelSpec};
use netutil::Reconfigured;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The driver shared by the tunnel parts, with a count of parts still running.
struct SharedDriver {
    driver: Mutex<Option<GreDriver>>,
    running: AtomicUsize,
}

struct GreTunnelPart {
    name: String,
    shared: Arc<SharedDriver>,
}

/// Starts every `[[gre]]` tunnel.
///
/// # Errors
/// A TUN device, socket or route that could not be set up; nothing is left behind.
pub(crate) async fn start(
    site: &SiteConfig,
    _ctx: &StartCtx,
) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let specs: Vec<TunnelSpec> = site.gre.iter().map(lower::gre).collect();
    let names: Vec<String> = specs.iter().map(|s| s.tunnel.name.clone()).collect();
    let driver = GreDriver::start(specs)
        .await
        .with_context(|| format!("starting GRE tunnels {}", names.join(", ")))?;
    let shared = Arc::new(SharedDriver {
        driver: Mutex::new(Some(driver)),
        running: AtomicUsize::new(names.len()),
    });
    for name in &names {
        tracing::info!(tunnel = %name, "GRE tunnel started");
    }
    Ok(names
        .into_iter()
        .map(|name| {
            Box::new(GreTunnelPart {
                name,
                shared: Arc::clone(&shared),
            }) as Box<dyn Part>
        })
        .collect())
}

impl GreTunnelPart {
    /// `Part::reconfigure`: every check and change here is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        let Some(section) = site.gre.iter().find(|g| *g.name.get_ref() == self.name) else {
            return Ok(Reconfigured::restart("the tunnel is gone"));
        };
        let guard = self
            .shared
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(driver) = guard.as_ref() else {
            return Ok(Reconfigured::restart("the driver is not running"));
        };
        // Until reloads are diffed per tunnel, an added tunnel is only started by a
        // restart of the whole kind.
        let running: Vec<String> = driver.status().into_iter().map(|s| s.name).collect();
        if site.gre.iter().any(|g| !running.contains(g.name.get_ref())) {
            return Ok(Reconfigured::restart("a tunnel was added"));
        }
        let outcome = driver
            .reconfigure(lower::gre(section))
            .with_context(|| format!("reconfiguring GRE tunnel {}", self.name))?;
        if outcome.is_live() {
            tracing::info!(tunnel = %self.name, "GRE tunnel reconfigured live");
        }
        Ok(outcome)
    }
}

impl Part for GreTunnelPart {
    fn kind(&self) -> Kind {
        Kind::Gre
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn status(&self) -> Value {
        let guard = self
            .shared
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard
            .as_ref()
            .and_then(|d| d.status().into_iter().find(|s| s.name == self.name))
            .map_or_else(
                || json!({ "name": self.name, "state": "stopped" }),
                |s| serde_json::to_value(s).unwrap_or_default(),
            )
    }

    /// Applies this tunnel's new `[[gre]]` section live where the driver can (routes,
    /// keepalive, mtu and with it the MSS clamp); `Ok(false)` when it needs a restart
    /// (endpoints, key, encap, sequence, checksum, address, offload), when the tunnel is
    /// gone from the file, or when the file adds a tunnel this driver does not run.
    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(self.reconfigure_now(site))
    }

    /// A dead driver task stops every tunnel it served (a receive task serves all the
    /// tunnels on one local address), so each tunnel part reports the driver's first death:
    /// the supervisor then restarts the GRE unit, which restarts the whole driver.
    fn dead_task(&self) -> Option<String> {
        self.shared
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(GreDriver::dead_task)
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            if self.shared.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                let driver = self
                    .shared
                    .driver
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(d) = driver {
                    d.stop().await;
                }
            }
        })
    }
}

/// Human text for `vipgate show gre`, modelled on IOS `show interfaces tunnel`.
pub(crate) fn render(items: &[Value]) -> String {
    if items.is_empty() {
        return "no GRE tunnels\n".to_string();
    }
    super::render_each(items, render_tunnel)
}

fn render_tunnel(out: &mut String, t: &GreStatus) {
    let _ = write!(out, "{} is {}", t.name, if t.up { "up" } else { "down" });
    if let Some(reason) = &t.down_reason {
        let _ = write!(out, " ({reason}");
        if let Some(f) = t.down_for {
            let _ = write!(out, ", for {:.1}s", f.as_secs_f64());
        }
        out.push(')');
    }
    out.push('\n');
    let encap = match t.underlay {
        Underlay::Gre => "gre",
        Underlay::Udp => "udp",
    };
    let _ = write!(
        out,
        "  {} -> {}  encap {encap}  mtu {}",
        t.local, t.remote, t.mtu
    );
    if let Some(k) = t.key {
        let _ = write!(out, "  key {k}");
    }
    for (on, word) in [
        (t.sequence, "sequence"),
        (t.checksum, "checksum"),
        (t.offload, "offload"),
    ] {
        if on {
            let _ = write!(out, "  {word}");
        }
    }
    out.push('\n');
    match t.keepalive {
        Some(ka) => {
            let _ = writeln!(
                out,
                "  keepalive every {}s, retries {}, missed {}, last reply {}",
                ka.interval.as_secs_f64(),
                ka.retries,
                t.keepalive_misses,
                t.last_keepalive.map_or("never".to_string(), |a| format!(
                    "{:.1}s ago",
                    a.as_secs_f64()
                )),
            );
        }
        None => out.push_str("  keepalive off\n"),
    }
    if !t.routes.is_empty() {
        let routes: Vec<String> = t.routes.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  routes {}: {}",
            if t.routes_installed {
                "installed"
            } else {
                "withdrawn"
            },
            routes.join(", ")
        );
    }
    if let Some(dead) = &t.dead_task {
        let _ = writeln!(out, "  dead task: {dead}");
    }
    let c = &t.counters;
    let _ = writeln!(
        out,
        "  tx {} packets {} bytes, rx {} packets {} bytes",
        c.tx_packets, c.tx_bytes, c.rx_packets, c.rx_bytes
    );
    let _ = writeln!(
        out,
        "  keepalives sent {} replies {} reflected {}, mss clamped {}, frag-needed sent {}",
        c.keepalives_sent,
        c.keepalive_replies,
        c.keepalives_reflected,
        c.mss_clamped,
        c.frag_needed_sent
    );
    let _ = writeln!(out, "  drops: {}", super::drops_text(&c.drops));
}

#[cfg(test)]
mod tests {
    use super::*;
    use gre::DropReason;

    #[test]
    fn render_shows_state_reason_and_drops() {
        let mut counters = gre::Counters::default();
        counters.drops.count(DropReason::WrongKey);
        counters.tx_packets = 5;
        let status = GreStatus {
            name: "gre-br".into(),
            local: "198.51.100.1".parse().unwrap(),
            remote: "198.51.100.2".parse().unwrap(),
            key: Some(42),
            sequence: false,
            checksum: false,
            underlay: Underlay::Gre,
            mtu: 1476,
            offload: true,
            up: false,
            down_reason: Some("no keepalive reply to 3 probes sent every 1s".into()),
            down_for: Some(std::time::Duration::from_millis(1500)),
            keepalive: Some(gre::KeepaliveConfig::default()),
            last_keepalive: None,
            keepalive_misses: 3,
            routes: vec!["192.168.102.0/24".parse().unwrap()],
            routes_installed: false,
            counters,
            dead_task: Some("GRE receive panicked: index out of bounds".into()),
        };
        let text = render(&[serde_json::to_value(&status).unwrap()]);
        assert!(
            text.starts_with("gre-br is down (no keepalive reply"),
            "{text}"
        );
        assert!(text.contains("key 42"));
        assert!(text.contains("routes withdrawn: 192.168.102.0/24"));
        assert!(text.contains("drops: wrong_key 1"));
        assert!(text.contains("tx 5 packets"));
        assert!(text.contains("dead task: GRE receive panicked"), "{text}");
        assert_eq!(render(&[]), "no GRE tunnels\n");
        let dead = json!({"name": "gre-br", "state": "dead", "last_death": "tun deleted"});
        assert_eq!(render(&[dead]), "gre-br is dead (tun deleted)\n");
    }
}
