//! The kernel data path: the `kpath` TC program on the gateway's interfaces, fed from the core.
//!
//! The core still decides everything and still sees the first packets of every flow through
//! `nat0`. Every [`SYNC_INTERVAL`] the sync task (one per gateway):
//! - installs both directions of each flow the core made eligible
//!   ([`Gateway::fast_path_eligible`]: established TCP, UDP, not a virtual service's) into the
//!   program's flow map;
//! - removes the entries of flows the core no longer has (expired, closed, `nat clear`);
//! - feeds back what the program moved ([`Gateway::fast_path_activity`]): idle timers restart,
//!   TCP window tracking advances, and a flow the core has dropped meanwhile is forgotten.
//!
//! Invariants: the map holds entries only for flows in `installed`, and `installed` only flows
//! the core had at the last sync; a stop unloads everything (programs, links, pins, qdiscs).
//! Costs O(flows) map calls per sync: fine for thousands of flows, not yet for 10⁶.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kpath::{Direction as KDir, FlowKey, KernelPath, LoadOptions, Rewrite};
use tokio::sync::watch;

use netsys::sync::lock_unpoisoned;

use super::now;
use crate::{Direction, FastPathActivity, Gateway, Proto};

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
}

/// One installed flow: its two map entries and the packet counts last fed to the core.
struct Installed {
    entries: [(FlowKey, Rewrite); 2],
    reported: [u64; 2],
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
    /// interface, the inbound one to the outside interface. Entries adopted from a previous
    /// run are dropped (the core starts empty, so none of them is its decision).
    pub(super) fn start(site: &str, inside: &[String], outside: &str) -> Result<Self, String> {
        let mut kp = KernelPath::load(&LoadOptions::new(site)).map_err(|e| e.to_string())?;
        let attached = inside
            .iter()
            .map(|i| (i.as_str(), KDir::Outbound))
            .chain([(outside, KDir::Inbound)])
            .try_for_each(|(iface, dir)| {
                kp.attach(iface, dir)
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
        let wanted: HashMap<FlowId, kpath::Proto> = {
            let gw = lock_unpoisoned(gw);
            gw.translations(at)
                .into_iter()
                .filter(|t| gw.fast_path_eligible(t))
                .filter_map(|t| Some(((t.proto, t.inside, t.public, t.outside), kproto(t.proto)?)))
                .collect()
        };
        self.installed.retain(|id, flow| {
            let keep = wanted.contains_key(id);
            if !keep {
                for (key, _) in &flow.entries {
                    if let Err(e) = kp.remove(key) {
                        tracing::warn!(error = %e, "removing a kernel path entry");
                    }
                }
            }
            keep
        });
        for (id, proto) in &wanted {
            if self.installed.contains_key(id) {
                continue;
            }
            let (_, inside, public, outside) = *id;
            let entries = kpath::entries(*proto, inside, public, outside);
            let ok = entries
                .iter()
                .try_for_each(|(key, rewrite)| kp.insert(key, rewrite));
            match ok {
                Ok(()) => {
                    self.installed.insert(
                        *id,
                        Installed {
                            entries,
                            reported: [0; 2],
                        },
                    );
                }
                Err(e) => {
                    // A full map: the flow stays on the slow path.
                    tracing::debug!(error = %e, "installing a kernel path entry");
                    for (key, _) in &entries {
                        let _absent = kp.remove(key);
                    }
                }
            }
        }
        // Feed back what the program moved since the last round.
        let mut reports = Vec::new();
        for (id, flow) in &mut self.installed {
            for (i, (key, _)) in flow.entries.iter().enumerate() {
                let Ok(Some(r)) = kp.report(key) else {
                    continue;
                };
                if r.packets == flow.reported[i] {
                    continue;
                }
                let moved = r.packets.wrapping_sub(flow.reported[i]);
                flow.reported[i] = r.packets;
                reports.push(FastPathActivity {
                    proto: id.0,
                    public: id.2,
                    outside: id.3,
                    direction: match key.direction {
                        KDir::Outbound => Direction::Outbound,
                        KDir::Inbound => Direction::Inbound,
                    },
                    packets: moved,
                    tcp: r.tcp.map(|t| (t.seq_end, t.ack, t.window)),
                });
            }
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
