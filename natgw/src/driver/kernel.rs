//! The kernel data path: the `kpath` TC program on the gateway's interfaces, fed from the core.
//!
//! The core still decides everything and still sees the first packets of every flow through
//! `nat0`. Every [`SYNC_INTERVAL`] the sync task (one per gateway):
//! - installs both directions of each flow the core made eligible
//!   ([`Gateway::fast_path_eligible`]: established TCP and UDP, whether dynamic PAT, a static
//!   forward or a virtual service placed it) into the program's flow map;
//! - removes the entries of flows the core no longer has (expired, closed, `nat clear`);
//! - feeds back what the program moved ([`Gateway::fast_path_activity`]): idle timers restart,
//!   TCP window tracking advances, a virtual service's per-backend packet and byte counters
//!   grow, and a flow the core has dropped meanwhile is forgotten.
//!
//! A direct-routing service's flow ([`Gateway::is_direct_routed`]) has one entry (the
//! client's direction; the real server answers the client itself), installed by the packet
//! loop at once when the core decides ([`KernelDatapath::install_direct`], before the packet
//! is written back to `nat0`, where the delivery program needs it), kept in every TCP state
//! while the core has the flow, and removed with it.
//!
//! Invariants: the map holds entries only for flows in `installed`, and `installed` only flows
//! the core had at the last sync; a stop unloads everything (programs, links, pins, qdiscs).
//! Costs O(flows) map calls per sync: fine for thousands of flows, not yet for 10⁶.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kpath::{Direction as KDir, FlowKey, KernelPath, LoadOptions, Rewrite};
use tokio::sync::watch;

use netsys::sync::lock_unpoisoned;

use super::now;
use crate::{DirectRoute, Direction, FastPathActivity, Gateway, Proto};

/// How often flows are installed, removed and their activity fed back to the core.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// Which data path moves established flows (spelt `kernel` / `tun` in config and status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Datapath {
    /// The `kpath` TC program where it loads; the TUN otherwise.
    #[default]
    Kernel,
    /// Every packet crosses `nat0` and the core.
    Tun,
}

impl Datapath {
    /// The config and status spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Tun => "tun",
        }
    }
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the kernel path needs before a process drops CAP_SYS_ADMIN: a bpffs at
/// `/sys/fs/bpf` (mounted if absent). Afterwards loading needs CAP_BPF and CAP_NET_ADMIN.
///
/// # Errors
/// Why the kernel path will not be able to pin its maps (the gateway then runs on the TUN).
pub fn prepare_kernel_datapath() -> Result<(), String> {
    kpath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf")).map_err(|e| e.to_string())
}

/// The fast path's counters for `show nat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FastPathCounters {
    /// Packets rewritten in the kernel (GSO segments counted one by one).
    pub packets: u64,
    /// IP bytes rewritten in the kernel.
    pub bytes: u64,
    /// Flows (both directions) in the program's map.
    pub flows: usize,
    /// Direct-routing packets dropped at `nat0` because their real server is not reachable
    /// on a directly connected network.
    #[cfg_attr(feature = "serde", serde(default))]
    pub direct_route_undeliverable: u64,
}

/// One installed flow: its map entries (two for a translation, one for a direct-routing
/// flow) and the packet and byte counts last fed to the core, per entry.
struct Installed {
    entries: Vec<(FlowKey, Rewrite)>,
    reported: Vec<(u64, u64)>,
}

/// Identity of a flow: protocol, inside, public and outside endpoints.
type FlowId = (Proto, SocketAddrV4, SocketAddrV4, SocketAddrV4);

/// The loaded program and the flows it holds.
pub(super) struct KernelDatapath {
    kp: Option<KernelPath>,
    installed: HashMap<FlowId, Installed>,
}

impl std::fmt::Debug for KernelDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDatapath")
            .field("kp", &self.kp)
            .field("installed", &self.installed.len())
            .finish()
    }
}

fn kproto(p: Proto) -> Option<kpath::Proto> {
    match p {
        Proto::Tcp => Some(kpath::Proto::Tcp),
        Proto::Udp => Some(kpath::Proto::Udp),
        Proto::Icmp => None,
    }
}

impl KernelDatapath {
    /// Loads the program for `site` and attaches it: the outbound program to every inside
    /// interface, the inbound one to the outside interface, the delivery program to the TUN
    /// `tun`. Entries adopted from a previous run are dropped (the core starts empty, so none
    /// of them is its decision).
    pub(super) fn start(
        site: &str,
        inside: &[String],
        outside: &str,
        tun: &str,
    ) -> Result<Self, String> {
        let mut kp = KernelPath::load(&LoadOptions::new(site)).map_err(|e| e.to_string())?;
        let attached = inside
            .iter()
            .map(|i| (i.as_str(), Some(KDir::Outbound)))
            .chain([(outside, Some(KDir::Inbound)), (tun, None)])
            .try_for_each(|(iface, dir)| {
                match dir {
                    Some(dir) => kp.attach(iface, dir),
                    None => kp.attach_delivery(iface),
                }
                .map(drop)
                .map_err(|e| format!("{iface}: {e}"))
            });
        if let Err(e) = attached {
            if let Err(u) = kp.unload() {
                tracing::warn!(error = %u, "unloading the kernel path after a failed attach");
            }
            return Err(e);
        }
        if kp.adopted() {
            for key in kp.keys().map_err(|e| e.to_string())? {
                kp.remove(&key).map_err(|e| e.to_string())?;
            }
        }
        Ok(KernelDatapath {
            kp: Some(kp),
            installed: HashMap::new(),
        })
    }

    /// One sync round (see the module docs).
    pub(super) fn sync(&mut self, gw: &Mutex<Gateway>) {
        let Some(kp) = self.kp.as_mut() else { return };
        let at = now();
        // Each eligible flow, its protocol and whether it is direct-routed.
        let wanted: HashMap<FlowId, (kpath::Proto, bool)> = {
            let gw = lock_unpoisoned(gw);
            gw.translations(at)
                .into_iter()
                .filter(|t| gw.fast_path_eligible(t))
                .filter_map(|t| {
                    let id = (t.proto, t.inside, t.public, t.outside);
                    Some((id, (kproto(t.proto)?, gw.is_direct_routed(&t))))
                })
                .collect()
        };
        let mut reports = Vec::new();
        let mut removed = HashSet::new();
        self.installed.retain(|id, flow| {
            let keep = wanted.contains_key(id);
            if !keep {
                // What the program moved since the last round still counts: the last data
                // before the FIN that ended the flow's eligibility (only what moves between
                // this read and the removal below is lost).
                collect_reports(kp, id, flow, &mut reports);
                for (key, _) in &flow.entries {
                    if let Err(e) = kp.remove(key) {
                        tracing::warn!(error = %e, "removing a kernel path entry");
                    }
                    removed.insert(*key);
                }
            }
            keep
        });
        if !removed.is_empty() {
            // A client reusing its port after a closed flow gets a new flow with the same
            // key, which the packet loop may have installed already (direct routing): the
            // removal of the old one took its entry too; put it back.
            for flow in self.installed.values_mut() {
                for (i, (key, rewrite)) in flow.entries.iter().enumerate() {
                    if !removed.contains(key) {
                        continue;
                    }
                    // A fresh entry counts from zero.
                    flow.reported[i] = (0, 0);
                    if let Err(e) = kp.insert(key, rewrite) {
                        tracing::debug!(error = %e, "reinstalling a kernel path entry");
                    }
                }
            }
        }
        for (id, &(proto, direct)) in &wanted {
            if self.installed.contains_key(id) {
                continue;
            }
            let (_, inside, public, outside) = *id;
            let entries = if direct {
                vec![kpath::direct_route_entry(
                    proto,
                    outside,
                    public,
                    *inside.ip(),
                )]
            } else {
                kpath::entries(proto, inside, public, outside).to_vec()
            };
            if let Err(e) = install(kp, &mut self.installed, *id, entries) {
                // A full map: the flow stays on the slow path.
                tracing::debug!(error = %e, "installing a kernel path entry");
            }
        }
        // Feed back what the program moved since the last round.
        for (id, flow) in &mut self.installed {
            collect_reports(kp, id, flow, &mut reports);
        }
        if !reports.is_empty() {
            let at = now();
            let mut gw = lock_unpoisoned(gw);
            for r in &reports {
                // A flow gone meanwhile is removed from the map on the next round.
                let _still_there = gw.fast_path_activity(at, r);
            }
        }
    }

    /// Installs the entry of a direct-routing flow the core has just decided (before the
    /// packet goes back to `nat0`), unless the flow has it already.
    ///
    /// # Errors
    /// The kernel path is unloaded, or the map refuses the entry (full): the packet cannot be
    /// delivered.
    pub(super) fn install_direct(&mut self, route: &DirectRoute) -> Result<(), String> {
        let Some(kp) = self.kp.as_mut() else {
            return Err("the kernel path is unloaded".into());
        };
        let id = (Proto::Tcp, route.backend, route.vip, route.client);
        if self.installed.contains_key(&id) {
            return Ok(());
        }
        let entry = kpath::direct_route_entry(
            kpath::Proto::Tcp,
            route.client,
            route.vip,
            *route.backend.ip(),
        );
        install(kp, &mut self.installed, id, vec![entry]).map_err(|e| e.to_string())
    }

    /// The program's counters.
    pub(super) fn counters(&self) -> FastPathCounters {
        let c = self
            .kp
            .as_ref()
            .and_then(|kp| kp.counters().ok())
            .unwrap_or_default();
        FastPathCounters {
            packets: c.fast_packets,
            bytes: c.fast_bytes,
            flows: self.installed.len(),
            direct_route_undeliverable: c.direct_route_undeliverable,
        }
    }

    /// Detaches the programs and removes maps, pins and qdiscs.
    pub(super) fn unload(&mut self) {
        self.installed.clear();
        if let Some(kp) = self.kp.take()
            && let Err(e) = kp.unload()
        {
            tracing::warn!(error = %e, "unloading the kernel path");
        }
    }
}

/// Inserts `entries` of flow `id` into the map and records them in `installed`; all or none
/// (a partial insert is taken back).
fn install(
    kp: &mut KernelPath,
    installed: &mut HashMap<FlowId, Installed>,
    id: FlowId,
    entries: Vec<(FlowKey, Rewrite)>,
) -> Result<(), kpath::KpathError> {
    if let Err(e) = entries
        .iter()
        .try_for_each(|(key, rewrite)| kp.insert(key, rewrite))
    {
        for (key, _) in &entries {
            let _absent = kp.remove(key);
        }
        return Err(e);
    }
    let reported = vec![(0, 0); entries.len()];
    installed.insert(id, Installed { entries, reported });
    Ok(())
}

/// Appends what the program moved of `flow` since its last report (one activity per
/// direction that moved) and remembers the counts reported.
fn collect_reports(
    kp: &KernelPath,
    id: &FlowId,
    flow: &mut Installed,
    out: &mut Vec<FastPathActivity>,
) {
    for (i, (key, _)) in flow.entries.iter().enumerate() {
        let Ok(Some(r)) = kp.report(key) else {
            continue;
        };
        let (packets, bytes) = flow.reported[i];
        if r.packets == packets {
            continue;
        }
        flow.reported[i] = (r.packets, r.bytes);
        out.push(FastPathActivity {
            proto: id.0,
            public: id.2,
            outside: id.3,
            direction: match key.direction {
                KDir::Outbound => Direction::Outbound,
                KDir::Inbound => Direction::Inbound,
            },
            // Counters below the last report belong to a fresh entry under the same key.
            packets: r.packets.checked_sub(packets).unwrap_or(r.packets),
            bytes: r.bytes.checked_sub(bytes).unwrap_or(r.bytes),
            tcp: r.tcp.map(|t| (t.seq_end, t.ack, t.window)),
        });
    }
}

/// The sync task: a round every [`SYNC_INTERVAL`] until `stop`.
pub(super) async fn sync_loop(
    kernel: Arc<Mutex<KernelDatapath>>,
    gw: Arc<Mutex<Gateway>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), super::DriverError> {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        if *stop.borrow() {
            return Ok(());
        }
        lock_unpoisoned(&kernel).sync(&gw);
    }
}
