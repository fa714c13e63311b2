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
use gre::driver::{GreDriver, GreStatus, TunnelSpec};
use gre::{DropReason, Underlay};
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
    let driver = GreDriver::start(specs, &lower::gre_pin_site(&site.path))
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
                |s| status_json(&s),
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

fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn status_json(s: &GreStatus) -> Value {
    let c = &s.counters;
    let drops: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(c.drops(*r))))
        .collect();
    json!({
        "name": s.name,
        "state": if s.up { "up" } else { "down" },
        "down_reason": s.down_reason,
        "down_for_s": s.down_for.map(secs),
        "local": s.local.to_string(),
        "remote": s.remote.to_string(),
        "encap": match s.underlay { Underlay::Gre => "gre", Underlay::Udp => "udp" },
        "key": s.key,
        "sequence": s.sequence,
        "checksum": s.checksum,
        "mtu": s.mtu,
        "offload": s.offload,
        "keepalive": s.keepalive.map(|k| json!({
            "interval_s": secs(k.interval),
            "retries": k.retries,
            "misses": s.keepalive_misses,
            "last_reply_s_ago": s.last_keepalive.map(secs),
        })),
        "routes": s.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "routes_installed": s.routes_installed,
        "dead_task": s.dead_task,
        "datapath": s.datapath,
        "datapath_reason": s.datapath_reason,
        "kernel": s.kernel.map(|k| json!({
            "tx_packets": k.tx_packets,
            "tx_bytes": k.tx_bytes,
            "rx_packets": k.rx_packets,
            "rx_bytes": k.rx_bytes,
            "tx_passed_packets": k.tx_passed,
            "rx_passed_packets": k.rx_passed,
        })),
        "counters": {
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "keepalives_sent": c.keepalives_sent,
            "keepalive_replies": c.keepalive_replies,
            "keepalives_reflected": c.keepalives_reflected,
            "mss_clamped": c.mss_clamped,
            "frag_needed_sent": c.frag_needed_sent,
            "sequence_gaps": c.sequence_gaps,
            "drops": drops,
        },
    })
}

/// Human text for `vipgate show gre`, modelled on IOS `show interfaces tunnel`.
pub(crate) fn render(items: &[Value]) -> String {
    let mut out = String::new();
    if items.is_empty() {
        out.push_str("no GRE tunnels\n");
    }
    for t in items {
        let s = |k: &str| t[k].as_str().unwrap_or("-").to_string();
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let _ = write!(out, "{} is {}", s("name"), s("state"));
        if let Some(reason) = t["down_reason"].as_str() {
            let _ = write!(out, " ({reason}");
            if let Some(f) = t["down_for_s"].as_f64() {
                let _ = write!(out, ", for {f:.1}s");
            }
            out.push(')');
        }
        out.push('\n');
        let _ = write!(
            out,
            "  {} -> {}  encap {}  mtu {}",
            s("local"),
            s("remote"),
            s("encap"),
            n(&t["mtu"])
        );
        if let Some(k) = t["key"].as_u64() {
            let _ = write!(out, "  key {k}");
        }
        if t["sequence"].as_bool() == Some(true) {
            out.push_str("  sequence");
        }
        if t["checksum"].as_bool() == Some(true) {
            out.push_str("  checksum");
        }
        if t["offload"].as_bool() == Some(true) {
            out.push_str("  offload");
        }
        out.push('\n');
        let ka = &t["keepalive"];
        if ka.is_object() {
            let _ = writeln!(
                out,
                "  keepalive every {}s, retries {}, missed {}, last reply {}",
                ka["interval_s"].as_f64().unwrap_or(0.0),
                n(&ka["retries"]),
                n(&ka["misses"]),
                ka["last_reply_s_ago"]
                    .as_f64()
                    .map_or("never".to_string(), |a| format!("{a:.1}s ago")),
            );
        } else {
            out.push_str("  keepalive off\n");
        }
        let routes: Vec<&str> = t["routes"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !routes.is_empty() {
            let _ = writeln!(
                out,
                "  routes {}: {}",
                if t["routes_installed"].as_bool() == Some(true) {
                    "installed"
                } else {
                    "withdrawn"
                },
                routes.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "  data path: {} ({})",
            s("datapath"),
            t["datapath_reason"].as_str().unwrap_or("-")
        );
        let k = &t["kernel"];
        if k.is_object() {
            let _ = writeln!(
                out,
                "  kernel carried tx {} packets {} bytes, rx {} packets {} bytes; left to the TUN path tx {} rx {}",
                n(&k["tx_packets"]),
                n(&k["tx_bytes"]),
                n(&k["rx_packets"]),
                n(&k["rx_bytes"]),
                n(&k["tx_passed_packets"]),
                n(&k["rx_passed_packets"])
            );
        }
        if let Some(dead) = t["dead_task"].as_str() {
            let _ = writeln!(out, "  dead task: {dead}");
        }
        let c = &t["counters"];
        let _ = writeln!(
            out,
            "  tx {} packets {} bytes, rx {} packets {} bytes",
            n(&c["tx_packets"]),
            n(&c["tx_bytes"]),
            n(&c["rx_packets"]),
            n(&c["rx_bytes"])
        );
        let _ = writeln!(
            out,
            "  keepalives sent {} replies {} reflected {}, mss clamped {}, frag-needed sent {}",
            n(&c["keepalives_sent"]),
            n(&c["keepalive_replies"]),
            n(&c["keepalives_reflected"]),
            n(&c["mss_clamped"]),
            n(&c["frag_needed_sent"])
        );
        let drops: Vec<String> = c["drops"]
            .as_object()
            .map(|d| {
                d.iter()
                    .filter(|(_, v)| n(v) > 0)
                    .map(|(k, v)| format!("{k} {}", n(v)))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  drops: {}",
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_state_reason_and_drops() {
        let mut counters = gre::Counters::default();
        counters.count_drop(DropReason::WrongKey);
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
            datapath: "kernel",
            datapath_reason: "configured: datapath = \"kernel\"".into(),
            kernel: Some(gre::driver::KernelCounters {
                tx_packets: 4,
                ..Default::default()
            }),
        };
        let text = render(&[status_json(&status)]);
        assert!(
            text.starts_with("gre-br is down (no keepalive reply"),
            "{text}"
        );
        assert!(text.contains("key 42"));
        assert!(text.contains("routes withdrawn: 192.168.102.0/24"));
        assert!(text.contains("drops: wrong_key 1"));
        assert!(text.contains("tx 5 packets"));
        assert!(text.contains("dead task: GRE receive panicked"), "{text}");
        assert!(
            text.contains("data path: kernel (configured: datapath = \"kernel\")"),
            "{text}"
        );
        assert!(text.contains("kernel carried tx 4 packets"), "{text}");
        assert_eq!(render(&[]), "no GRE tunnels\n");
    }
}
