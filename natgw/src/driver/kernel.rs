//! The kernel data path: the `kpath` TC program on the gateway's interfaces, fed from the core.
//!
//! The core still decides everything and still sees the first packets of every flow through
//! `nat0`. Every [`SYNC_INTERVAL`] the sync task (one per gateway):
//! - installs both directions of each flow the core made eligible
//!   ([`Gateway::fast_path_eligible`]: established TCP and UDP, whether dynamic PAT, a static
//!   forward or a virtual service placed it) into the program's flow map, unless the packet
//!   loop did already: it installs a TCP flow at once after the batch that made it
//!   established ([`KernelDatapath::install_established`], from
//!   [`Gateway::take_fast_path_ready`]); UDP flows wait for the sync;
//! - removes the entries of flows the core no longer has (expired, closed, `nat clear`);
//! - feeds back what the program moved ([`Gateway::fast_path_activity`]): idle timers restart,
//!   TCP window tracking advances, the FINs the program carried close the flow in the core
//!   (judged against the window; [`Gateway::fast_path_close`] orders a close whose FINs and
//!   last ACK fell in one round), a virtual service's per-backend packet and byte counters
//!   grow, and a flow the core has dropped meanwhile is forgotten. A flow the reports closed
//!   is no longer eligible, and its entries go at the next round: the entries of closed
//!   flows live at most two rounds, and every installed flow is one of the core's, so the
//!   table's bounds bound the map.
//!
//! A direct-routing service's flow ([`Gateway::is_direct_routed`]) has one entry (the
//! client's direction; the real server answers the client itself), installed by the packet
//! loop at once when the core decides ([`KernelDatapath::install_direct`], before the packet
//! is written back to `nat0`, where the delivery program needs it), kept in every TCP state
//! while the core has the flow, and removed with it.
//!
//! Published listeners (the kernel-executed handshake): the program opens the flows of
//! the TCP static forwards the core publishes ([`Gateway::published_listeners`]) on its own,
//! SYN by SYN, and reports each in a bounded ring, before it sends the SYN on. The packet
//! loop reads the ring before each batch (so the SYN-ACK that crosses `nat0` finds its flow
//! in the core), and so does a task every [`OPENED_POLL_INTERVAL`] ([`opened_loop`], for
//! when nothing crosses `nat0`) and every sync round; each report goes to the core,
//! which handles the SYN as if it had crossed it ([`Gateway::adopt_opened_syn`]); the
//! entries of a flow it refuses are removed at once. An adopted flow is half-open in the
//! core, not eligible: it waits in `opened`, its entries kept and their reports fed back,
//! so that the client's ACK the program carries establishes it; then it joins the installed
//! flows, or goes with its entries when the core no longer has it or has seen its close
//! begin (a connection that closed before a round made it eligible; what crosses of it
//! later the core tracks itself, as for an installed flow after its first FIN). That ACK is not left to
//! the sync round: the program reports each opened flow's first client ACK in a second
//! bounded ring, read with the first, and the entries' reports of those flows alone go to
//! the core at once ([`KernelDatapath::follow_handshakes`]). Until the core has judged it
//! the flow counts against the half-open bounds whose pressure withdraws the publication,
//! and one client network meets the per-source one within milliseconds: fed only at the
//! sync round (200 ms), 95% of a benchmark's SYNs took `nat0`. After each adoption and
//! each round the publication (and the inside networks, whose SYNs the program leaves to
//! the core) is stated again, so that pressure on the core's bounds withdraws it within
//! one interval.
//!
//! One-packet UDP services: each round the sync task also asks the core for the schedule of
//! every one-packet service it can state as a cycle ([`Gateway::one_packet_schedules`]) and
//! installs it when it changed (a rotation of the installed cycle is the same schedule),
//! with each backend endpoint's VIP for the answers; a service that has none any more
//! (hashing scheduler, persistence, no live backend) loses its schedule and its datagrams
//! cross the core again. A change of health, weight, drain or configuration reaches the
//! program within one round. What the program carried per backend endpoint is fed back
//! ([`Gateway::one_packet_fast_path_traffic`]).
//!
//! Restarts: the programs' tcx links and the maps are pinned under
//! `/sys/fs/bpf/vipgate/<site>/` and outlive the process (a `vipgate restart`, which re-execs
//! the daemon, or a crash): the kernel keeps forwarding the established flows while no daemon
//! runs. The next start swaps its programs into those links without a gap and adopts the
//! flows in the maps ([`KernelDatapath::adopt`]): each flow whose entries are whole becomes a
//! flow of the new core ([`Gateway::adopt_fast_path_flows`], the promotion flow sync uses),
//! which then expires, counts, lists and clears it as its own; the entries of a flow the core
//! refuses (its address, listener or backend no longer configured, a clash, a full table)
//! are removed from the map and counted.
//!
//! Invariants: after the adoption the map holds entries only for flows in `installed`, and
//! `installed` only flows the core had at the last sync; a stop (SIGTERM) unloads everything
//! (programs, links, pins, qdiscs). Costs O(flows) map calls per sync: fine for thousands of
//! flows, not yet for 10⁶.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kpath::{Direction as KDir, FlowKey, KernelPath, LoadOptions, Rewrite};
use tokio::sync::watch;

use netsys::sync::lock_unpoisoned;

use super::now;
use crate::{
    AdoptedFlow, DirectRoute, Direction, FastPathActivity, FastPathFlow, Gateway, OpenedSyn, Proto,
};

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
    /// Flows found in the pinned map at start (a previous run's) and adopted by the core.
    #[cfg_attr(feature = "serde", serde(default))]
    pub adopted: u64,
    /// Flows found in the pinned map at start whose entries were removed: the core refused
    /// them, or an entry was missing or malformed.
    #[cfg_attr(feature = "serde", serde(default))]
    pub adoption_dropped: u64,
    /// Entries the program's flow map holds (two per translated flow, one per direct-routing
    /// flow); 0 on the TUN path.
    #[cfg_attr(feature = "serde", serde(default))]
    pub map_capacity: u32,
    /// Entries the kernel's LRU evicted while their flow lived, put back by a sync round
    /// (at most 1024 a round).
    #[cfg_attr(feature = "serde", serde(default))]
    pub reinstalled: u64,
    /// One-packet datagrams scheduled to a backend in the kernel (also in the core's
    /// `one_packet_in`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub one_packet_in: u64,
    /// One-packet answers sent from their VIP in the kernel (also in `one_packet_out`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub one_packet_out: u64,
    /// One-packet services whose schedule the program holds.
    #[cfg_attr(feature = "serde", serde(default))]
    pub one_packet_services: usize,
    /// SYNs to a published listener the program executed: flows it opened.
    #[cfg_attr(feature = "serde", serde(default))]
    pub syn_opened: u64,
    /// SYNs to a published listener left to the core because the ring of opened flows was
    /// full (nothing opened, nothing lost).
    #[cfg_attr(feature = "serde", serde(default))]
    pub syn_ring_full: u64,
    /// Flows the program opened that the core adopted.
    #[cfg_attr(feature = "serde", serde(default))]
    pub opened_adopted: u64,
    /// Flows the program opened that the core refused (their entries removed).
    #[cfg_attr(feature = "serde", serde(default))]
    pub opened_refused: u64,
    /// Flows the program opened that the core adopted and has not made eligible for the
    /// fast path: half-open in the core until the handshake ring or a sync round reports the
    /// ACK the program carried, or closed before that round (a short connection), until the core drops
    /// them. Not a half-open count: [`crate::driver::NatStatus::half_open`] is.
    #[cfg_attr(feature = "serde", serde(default))]
    pub opened_pending: usize,
    /// First client ACKs of opened flows the program reported in its handshake ring.
    #[cfg_attr(feature = "serde", serde(default))]
    pub handshakes_reported: u64,
    /// Such ACKs the program could not report (the ring was full): their flows wait for the
    /// next sync round, as before the handshake ring.
    #[cfg_attr(feature = "serde", serde(default))]
    pub handshake_ring_full: u64,
    /// Opened flows whose reports were fed to the core at once on a handshake record (a
    /// record of a flow no longer pending is not counted).
    #[cfg_attr(feature = "serde", serde(default))]
    pub handshakes_fed: u64,
    /// Inside servers' SYN-ACKs of opened flows the program sent on (and reported, for the
    /// core to track: `syn_acks_by_data_path` in the gateway's counters).
    #[cfg_attr(feature = "serde", serde(default))]
    pub syn_acks_sent: u64,
    /// Such SYN-ACKs left to the core because the ring of opened flows was full.
    #[cfg_attr(feature = "serde", serde(default))]
    pub syn_ack_ring_full: u64,
    /// Listeners whose SYNs the program executes now.
    #[cfg_attr(feature = "serde", serde(default))]
    pub published_listeners: usize,
}

/// The flow map size for a table of `max_mappings` flows: two entries per flow, and an eighth
/// more because the kernel's LRU map keeps free entries on per-CPU lists and starts evicting
/// before the last entry is taken; an evicted entry's flow would finish on the slow path.
fn flow_map_entries(max_mappings: usize) -> u32 {
    let entries = max_mappings.saturating_mul(2).saturating_mul(9) / 8;
    u32::try_from(entries.max(1024)).unwrap_or(u32::MAX)
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
    /// Flows of a previous run: adopted, dropped.
    adoption: (u64, u64),
    /// The flow map's size.
    capacity: u32,
    /// Entries the LRU evicted and a sync round put back.
    reinstalled: u64,
    /// Flows the program opened that the core adopted and has not made eligible yet (see
    /// the module docs): half-open ones, and closed ones the core still holds; bounded by
    /// the core's table, since each is one of its flows.
    opened: HashMap<FlowId, Installed>,
    /// The publication the program holds, and its generation (bumped at each change).
    published: (Vec<crate::PublishedListener>, u32),
    /// Flows the program opened that the core adopted, and refused, since start.
    opened_adoption: (u64, u64),
    /// Opened flows whose reports were fed to the core on their handshake record.
    handshakes_fed: u64,
    /// One-packet services whose schedule is installed: VIP → (cursor index, cycle).
    one_packet: HashMap<SocketAddrV4, (u32, Vec<SocketAddrV4>)>,
    /// Backend endpoints of those services: endpoint → (VIP, counts fed to the core so far).
    one_packet_backends: HashMap<SocketAddrV4, (SocketAddrV4, kpath::OnePacketCounts)>,
}

/// Evicted entries put back per sync round at most.
const REINSTALL_PER_ROUND: usize = 1024;

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
    /// `tun`, each into the link a previous run left pinned there if any; the links of that
    /// run on interfaces no longer configured are detached. The flows of that run stay in the
    /// map, for [`KernelDatapath::adopt`].
    pub(super) fn start(
        site: &str,
        inside: &[String],
        outside: &str,
        tun: &str,
        max_mappings: usize,
    ) -> Result<Self, String> {
        let mut opts = LoadOptions::new(site);
        opts.max_flows = flow_map_entries(max_mappings);
        let mut kp = KernelPath::load(&opts).map_err(|e| e.to_string())?;
        let capacity = kp.flow_capacity().map_err(|e| e.to_string())?;
        if capacity < opts.max_flows {
            tracing::warn!(
                entries = capacity,
                wanted = opts.max_flows,
                "the pinned flow map of the previous run is smaller than max_mappings asks; \
                 flows past it finish on the slow path until a stop (not a restart) removes the pins"
            );
        }
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
        match kp.detach_unclaimed() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                links = n,
                "detached the previous run's links on interfaces gone or no longer configured"
            ),
            Err(e) => tracing::warn!(error = %e, "detaching the previous run's unclaimed links"),
        }
        if kp.adopted_links() > 0 {
            tracing::info!(
                links = kp.adopted_links(),
                "kernel path: the programs went into the links of the previous run (no forwarding gap)"
            );
        }
        Ok(KernelDatapath {
            kp: Some(kp),
            installed: HashMap::new(),
            adoption: (0, 0),
            capacity,
            reinstalled: 0,
            one_packet: HashMap::new(),
            one_packet_backends: HashMap::new(),
            opened: HashMap::new(),
            published: (Vec::new(), 0),
            opened_adoption: (0, 0),
            handshakes_fed: 0,
        })
    }

    /// Hands the flows the program opened since the last call to the core (see the module
    /// docs): an adopted one waits in `opened`, a refused one loses its entries. Then, if
    /// there was any, states the publication again (adoptions move the core's half-open
    /// counts).
    pub(super) fn adopt_opened(&mut self, gw: &Mutex<Gateway>) {
        let Some(kp) = self.kp.as_mut() else { return };
        let records = kp.take_opened(kpath::OPENED_RING_RECORDS);
        // After the opened flows: a handshake may follow its flow's SYN in the same drain.
        let handshakes = kp.take_handshakes(kpath::HANDSHAKE_RING_RECORDS);
        if records.is_empty() && handshakes.is_empty() {
            return;
        }
        if !records.is_empty() {
            let at = now();
            // In the ring's order: a flow's SYN before its SYN-ACK.
            let verdicts: Vec<bool> = {
                let mut gw = lock_unpoisoned(gw);
                records
                    .iter()
                    .map(|r| {
                        let segment = OpenedSyn {
                            client: r.client,
                            public: r.public,
                            inside: r.inside,
                            tcp_header: &r.tcp_header,
                        };
                        match r.kind {
                            kpath::OpenedKind::Syn => gw.adopt_opened_syn(at, &segment),
                            kpath::OpenedKind::SynAck => gw.follow_opened_syn_ack(at, &segment),
                        }
                    })
                    .collect()
            };
            for (r, adopted) in records.iter().zip(verdicts) {
                if r.kind == kpath::OpenedKind::SynAck {
                    // Sent and tracked (or not: counted by the core); nothing to install.
                    continue;
                }
                let id = (Proto::Tcp, r.inside, r.public, r.client);
                if self.installed.contains_key(&id) {
                    // Already the core's eligible flow (its entries are the installed ones).
                    continue;
                }
                let entries =
                    flow_entries(kpath::Proto::Tcp, r.inside, r.public, r.client, true).to_vec();
                if adopted {
                    self.opened_adoption.0 += 1;
                    // What the core knows already: the SYN, which the program counted in the
                    // inbound entry (the SYN-ACK it reports, uncounted). Not what the entries
                    // hold now: by the time the record is read the handshake may be over, and
                    // the client's ACK, counted there, would never reach the core, whose flow
                    // would stay half-open.
                    let syn = (1, 20 + r.tcp_header.len() as u64);
                    let reported = entries
                        .iter()
                        .map(|(key, _)| match key.direction {
                            KDir::Inbound => syn,
                            KDir::Outbound => (0, 0),
                        })
                        .collect();
                    self.opened.insert(id, Installed { entries, reported });
                } else {
                    self.opened_adoption.1 += 1;
                    self.opened.remove(&id);
                    for (key, _) in &entries {
                        if let Err(e) = kp.remove(key) {
                            tracing::warn!(error = %e, "removing a refused kernel-opened entry");
                        }
                    }
                }
            }
        }
        if !handshakes.is_empty() {
            self.follow_handshakes(gw, &handshakes);
        }
        self.publish(gw);
    }

    /// Feeds the core what the program moved of the opened flows whose client's first ACK
    /// it reported (see [`kpath::OpenedHandshake`]), so that the core judges that ACK and
    /// establishes them now rather than at the next sync round: until then each counts
    /// against the half-open bounds whose pressure withdraws the publication. Costs a
    /// report read per entry of those flows only; a flow no longer in `opened` (installed,
    /// gone, or reported twice) is skipped.
    fn follow_handshakes(&mut self, gw: &Mutex<Gateway>, handshakes: &[kpath::OpenedHandshake]) {
        let Some(kp) = self.kp.as_ref() else { return };
        let mut reports = Vec::new();
        for h in handshakes {
            let id = (Proto::Tcp, h.inside, h.public, h.client);
            if let Some(flow) = self.opened.get_mut(&id) {
                // An evicted entry is the sync round's to notice.
                let _evicted = collect_reports(kp, None, &id, flow, &mut reports);
            }
        }
        self.handshakes_fed += reports.len() as u64;
        feed_reports(&mut lock_unpoisoned(gw), now(), &reports);
    }

    /// States the core's publication and inside networks to the program (no system call
    /// when unchanged). Inside networks the program cannot hold withdraw every listener:
    /// their SYNs would be executed as if from outside.
    fn publish(&mut self, gw: &Mutex<Gateway>) {
        let Some(kp) = self.kp.as_mut() else { return };
        let (published, inside) = {
            let gw = lock_unpoisoned(gw);
            let inside: Vec<(std::net::Ipv4Addr, u8)> = gw
                .inside_networks()
                .iter()
                .map(|n| (n.network(), n.prefix_len()))
                .collect();
            (gw.published_listeners(), inside)
        };
        let published = match kp.set_inside_networks(&inside) {
            Ok(()) => published,
            Err(e) => {
                tracing::debug!(error = %e, "inside networks: nothing published");
                Vec::new()
            }
        };
        if published != self.published.0 {
            self.published = (published, self.published.1.wrapping_add(1));
        }
        let generation = self.published.1;
        let wanted: Vec<kpath::KernelPublished> = self
            .published
            .0
            .iter()
            .zip(0u32..)
            .map(|(p, listener)| kpath::KernelPublished {
                public: p.public,
                inside: p.inside,
                listener,
                generation,
            })
            .collect();
        if let Err(e) = kp.set_published(&wanted) {
            tracing::warn!(error = %e, "stating the published listeners");
            // All or nothing: a partial publication is still the core's decisions, but a
            // failing map is withdrawn whole.
            if let Err(e) = kp.set_published(&[]) {
                tracing::warn!(error = %e, "withdrawing the published listeners");
            }
            self.published = (Vec::new(), generation.wrapping_add(1));
        }
    }

    /// Feeds back what the program moved of the flows it opened, moves those the core made
    /// eligible to the installed ones and drops those the core no longer has or has seen
    /// closing, with their entries.
    fn follow_opened(
        &mut self,
        gw: &Mutex<Gateway>,
        wanted: &HashMap<FlowId, (kpath::Proto, bool, bool)>,
        walked: Option<&kpath::FlowReports>,
    ) {
        let Some(kp) = self.kp.as_mut() else { return };
        let eligible: Vec<FlowId> = self
            .opened
            .keys()
            .filter(|id| wanted.contains_key(*id))
            .copied()
            .collect();
        for id in eligible {
            if let Some(flow) = self.opened.remove(&id) {
                // The packet loop may have installed it already (fresh entries, fresh counts).
                self.installed.entry(id).or_insert(flow);
            }
        }
        let mut reports = Vec::new();
        for (id, flow) in &mut self.opened {
            collect_reports(kp, walked, id, flow, &mut reports);
        }
        let at = now();
        let mut gone = Vec::new();
        {
            let mut gw = lock_unpoisoned(gw);
            feed_reports(&mut gw, at, &reports);
            for &(proto, _, public, outside) in self.opened.keys() {
                let probe = FastPathActivity {
                    proto,
                    public,
                    outside,
                    direction: Direction::Inbound,
                    packets: 0,
                    bytes: 0,
                    tcp: None,
                    tcp_fin_end: None,
                };
                // Gone from the core, or closing there (never to be eligible): as an installed
                // flow's entries go once its first FIN ends its eligibility. Held until the
                // core expired them, a benchmark's short connections piled up here by the
                // ten thousand, each looked up every round.
                if !gw.fast_path_activity(at, &probe)
                    || gw.fast_path_flow_closing(proto, probe.public, probe.outside)
                {
                    gone.push((proto, probe.public, probe.outside));
                }
            }
        }
        self.opened.retain(|&(proto, _, public, outside), flow| {
            if !gone.contains(&(proto, public, outside)) {
                return true;
            }
            for (key, _) in &flow.entries {
                let _absent = kp.remove(key);
            }
            false
        });
    }

    /// Hands the flows a previous run left in the pinned map to the core
    /// ([`Gateway::adopt_fast_path_flows`]) and keeps the entries of those the core took and
    /// would put on the fast path itself; removes every other entry. Call once, after
    /// [`KernelDatapath::start`] and before the first sync.
    pub(super) fn adopt(&mut self, gw: &Mutex<Gateway>) {
        let Some(kp) = self.kp.as_mut() else { return };
        let found = match kp.entries() {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "reading the previous run's flows");
                return;
            }
        };
        if found.is_empty() {
            return;
        }
        let mut flows: HashMap<FlowId, Vec<(FlowKey, Rewrite, kpath::FlowReport)>> = HashMap::new();
        let mut malformed = Vec::new();
        for (key, rewrite, report) in found {
            match flow_of(&key, &rewrite) {
                Some(id) => flows.entry(id).or_default().push((key, rewrite, report)),
                None => malformed.push(key),
            }
        }
        // Whole flows only: both entries of a translation, the one of a direct-routing flow.
        let whole = |id: &FlowId, entries: &[(FlowKey, Rewrite, kpath::FlowReport)]| {
            let direct = entries.iter().all(|(_, r, _)| r.direct_route);
            let expected = if direct {
                vec![kpath::direct_route_entry(
                    kpath::Proto::Tcp,
                    id.3,
                    id.2,
                    *id.1.ip(),
                )]
            } else {
                // Whether the FINs went to the core is the previous run's decision: kept.
                let fin_to_core = entries.iter().any(|(_, r, _)| r.fin_to_core);
                kproto(id.0).map_or_else(Vec::new, |p| {
                    flow_entries(p, id.1, id.2, id.3, !fin_to_core).to_vec()
                })
            };
            entries.len() == expected.len()
                && expected
                    .iter()
                    .all(|e| entries.iter().any(|(k, r, _)| (k, r) == (&e.0, &e.1)))
        };
        let whole_flows: HashSet<FlowId> = flows
            .iter()
            .filter(|(id, entries)| whole(id, entries))
            .map(|(id, _)| *id)
            .collect();
        let candidates: Vec<AdoptedFlow> = whole_flows
            .iter()
            .map(|&(proto, inside, public, outside)| AdoptedFlow {
                proto,
                inside,
                public,
                outside,
            })
            .collect();
        let promotion = lock_unpoisoned(gw).adopt_fast_path_flows(now(), &candidates);
        let wanted = wanted(gw);
        let (mut adopted, mut dropped) = (0u64, malformed.len() as u64);
        for key in &malformed {
            let _absent = kp.remove(key);
        }
        for (id, entries) in flows {
            let keep = whole_flows.contains(&id)
                && wanted.get(&id).is_some_and(|&(_, direct, _)| {
                    direct == entries.iter().all(|(_, r, _)| r.direct_route)
                });
            if keep {
                adopted += 1;
                let reported = entries
                    .iter()
                    .map(|(_, _, r)| (r.packets, r.bytes))
                    .collect();
                let entries = entries.into_iter().map(|(k, r, _)| (k, r)).collect();
                self.installed.insert(id, Installed { entries, reported });
            } else {
                dropped += 1;
                for (key, _, _) in &entries {
                    if let Err(e) = kp.remove(key) {
                        tracing::warn!(error = %e, "removing a refused kernel path entry");
                    }
                }
            }
        }
        self.adoption = (adopted, dropped);
        if dropped > 0 {
            tracing::warn!(
                adopted,
                dropped,
                refused_by_core = promotion.refused,
                "kernel path: flows of the previous run dropped (their address, listener or backend is no longer configured, or their entries were incomplete)"
            );
        }
        tracing::info!(
            adopted,
            dropped,
            "kernel path: adopted the flows the previous run left in the pinned map"
        );
    }

    /// One sync round (see the module docs).
    pub(super) fn sync(&mut self, gw: &Mutex<Gateway>) {
        self.sync_one_packet(gw);
        self.adopt_opened(gw);
        self.publish(gw);
        let wanted = wanted(gw);
        // Every entry's report in one walk of the map (a few system calls, where a lookup per
        // entry took two per flow each round). Entries the program inserts during the walk
        // may be missed: the flows it opens are already reported through the ring and read
        // next round; an installed entry missing from the walk is treated as evicted and put
        // back. Should the walk fail, each entry is looked up on its own, as before.
        let walked = match self.kp.as_ref().map(KernelPath::reports) {
            Some(Ok(walked)) => Some(walked),
            None => None,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "walking the kernel path's flow map");
                None
            }
        };
        self.follow_opened(gw, &wanted, walked.as_ref());
        let Some(kp) = self.kp.as_mut() else { return };
        let mut reports = Vec::new();
        let mut removed = HashSet::new();
        self.installed.retain(|id, flow| {
            let keep = wanted.contains_key(id);
            if !keep {
                // What the program moved since the last round still counts: the last data
                // before the FIN that ended the flow's eligibility (only what moves between
                // this read and the removal below is lost).
                collect_reports(kp, walked.as_ref(), id, flow, &mut reports);
                for (key, _) in &flow.entries {
                    if let Err(e) = kp.remove(key) {
                        tracing::warn!(error = %e, "removing a kernel path entry");
                    }
                    removed.insert(*key);
                }
            }
            keep
        });
        // Flows whose entries were (re)inserted after the walk, which holds nothing of
        // them yet (or the counts of the entry they replaced): their reports start next round.
        let mut fresh = HashSet::new();
        if !removed.is_empty() {
            // A client reusing its port after a closed flow gets a new flow with the same
            // key, which the packet loop may have installed already (direct routing): the
            // removal of the old one took its entry too; put it back.
            for (id, flow) in &mut self.installed {
                for (i, (key, rewrite)) in flow.entries.iter().enumerate() {
                    if !removed.contains(key) {
                        continue;
                    }
                    // A fresh entry counts from zero.
                    flow.reported[i] = (0, 0);
                    fresh.insert(*id);
                    if let Err(e) = kp.insert(key, rewrite) {
                        tracing::debug!(error = %e, "reinstalling a kernel path entry");
                    }
                }
            }
        }
        for (id, &(proto, direct, carries_fin)) in &wanted {
            if self.installed.contains_key(id) {
                continue;
            }
            fresh.insert(*id);
            let (_, inside, public, outside) = *id;
            let entries = if direct {
                vec![kpath::direct_route_entry(
                    proto,
                    outside,
                    public,
                    *inside.ip(),
                )]
            } else {
                flow_entries(proto, inside, public, outside, carries_fin).to_vec()
            };
            if let Err(e) = install(kp, &mut self.installed, *id, entries) {
                // A full map: the flow stays on the slow path.
                tracing::debug!(error = %e, "installing a kernel path entry");
            }
        }
        // Feed back what the program moved since the last round, and put back the entries
        // the LRU evicted (the program never deletes one): without them the flow would finish
        // on the slow path. A budget per round keeps a map smaller than the table (a pinned
        // one adopted from a run with a smaller `max_mappings`) from churning every round.
        let mut budget = REINSTALL_PER_ROUND;
        for (id, flow) in &mut self.installed {
            if fresh.contains(id) {
                continue;
            }
            for i in collect_reports(kp, walked.as_ref(), id, flow, &mut reports) {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                flow.reported[i] = (0, 0);
                let (key, rewrite) = &flow.entries[i];
                match kp.insert(key, rewrite) {
                    Ok(()) => self.reinstalled += 1,
                    Err(e) => tracing::debug!(error = %e, "reinstalling an evicted entry"),
                }
            }
        }
        if !reports.is_empty() {
            let at = now();
            let mut gw = lock_unpoisoned(gw);
            for flow in &reports {
                for r in flow {
                    // A flow gone meanwhile is removed from the map on the next round.
                    let _still_there = gw.fast_path_activity(at, r);
                }
                if flow.iter().any(|r| r.tcp_fin_end.is_some()) {
                    gw.fast_path_close(at, flow);
                }
            }
        }
    }

    /// Installs the one-packet schedules the core gives now where they changed, removes
    /// those it no longer gives, keeps the backend endpoints of the answers in step, and
    /// feeds back what the program carried for each endpoint.
    fn sync_one_packet(&mut self, gw: &Mutex<Gateway>) {
        let Some(kp) = self.kp.as_mut() else { return };
        let schedules =
            lock_unpoisoned(gw).one_packet_schedules(now(), kpath::MAX_ONE_PACKET_SLOTS);
        self.one_packet.retain(|vip, _| {
            let keep = schedules.iter().any(|s| s.vip == *vip);
            if !keep && let Err(e) = kp.remove_one_packet_schedule(*vip) {
                tracing::warn!(error = %e, "removing a one-packet schedule");
            }
            keep
        });
        for s in &schedules {
            let cursor = match self.one_packet.get(&s.vip) {
                Some((_, slots)) if same_cycle(slots, &s.slots) => continue,
                Some(&(cursor, _)) => cursor,
                None => {
                    let Some(free) = (0..kpath::MAX_ONE_PACKET_SERVICES)
                        .find(|c| self.one_packet.values().all(|(used, _)| used != c))
                    else {
                        // More services than cursors: this one stays on the slow path.
                        continue;
                    };
                    free
                }
            };
            match kp.set_one_packet_schedule(s.vip, cursor, &s.slots) {
                Ok(()) => {
                    self.one_packet.insert(s.vip, (cursor, s.slots.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "installing a one-packet schedule"),
            }
        }
        let wanted: HashMap<SocketAddrV4, SocketAddrV4> = schedules
            .iter()
            .filter(|s| self.one_packet.contains_key(&s.vip))
            .flat_map(|s| s.backends.iter().map(move |&b| (b, s.vip)))
            .collect();
        let mut carried = Vec::new();
        for (&backend, (_, fed)) in &mut self.one_packet_backends {
            let Ok(Some(c)) = kp.one_packet_counts(backend) else {
                continue;
            };
            let to_backend = (
                c.in_packets.wrapping_sub(fed.in_packets),
                c.in_bytes.wrapping_sub(fed.in_bytes),
            );
            let to_client = (
                c.out_packets.wrapping_sub(fed.out_packets),
                c.out_bytes.wrapping_sub(fed.out_bytes),
            );
            *fed = c;
            if to_backend.0 != 0 || to_client.0 != 0 {
                carried.push((backend, to_backend, to_client));
            }
        }
        self.one_packet_backends.retain(|backend, (vip, _)| {
            let keep = wanted.get(backend) == Some(vip);
            if !keep && let Err(e) = kp.remove_one_packet_backend(*backend) {
                tracing::warn!(error = %e, "removing a one-packet backend endpoint");
            }
            keep
        });
        for (backend, vip) in wanted {
            if self.one_packet_backends.contains_key(&backend) {
                continue;
            }
            match kp.set_one_packet_backend(backend, vip) {
                Ok(()) => {
                    self.one_packet_backends
                        .insert(backend, (vip, kpath::OnePacketCounts::default()));
                }
                Err(e) => tracing::debug!(error = %e, "installing a one-packet backend endpoint"),
            }
        }
        if !carried.is_empty() {
            let mut gw = lock_unpoisoned(gw);
            for (backend, to_backend, to_client) in carried {
                gw.one_packet_fast_path_traffic(backend, to_backend, to_client);
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

    /// Installs both entries of a TCP flow the core has just made established (called by
    /// the packet loop after the batch that did it), unless the flow has them already.
    ///
    /// # Errors
    /// The kernel path is unloaded, or the map refuses an entry (full).
    pub(super) fn install_established(&mut self, flow: &FastPathFlow) -> Result<(), String> {
        let Some(kp) = self.kp.as_mut() else {
            return Err("the kernel path is unloaded".into());
        };
        let id = (flow.proto, flow.inside, flow.public, flow.outside);
        if let Some(old) = self.installed.get_mut(&id) {
            // A new connection on the 4-tuple of one that closed on the fast path (the
            // client reused its port before the sync removed the old entries): fresh entries,
            // or the old FIN would be reported as the new connection's.
            let closed = old.entries.iter().any(|(key, _)| {
                kp.report(key)
                    .ok()
                    .flatten()
                    .and_then(|r| r.tcp)
                    .is_some_and(|t| t.fin_end.is_some())
            });
            if closed {
                for (i, (key, rewrite)) in old.entries.iter().enumerate() {
                    old.reported[i] = (0, 0);
                    kp.insert(key, rewrite).map_err(|e| e.to_string())?;
                }
            }
            return Ok(());
        }
        let Some(proto) = kproto(flow.proto) else {
            return Err("not TCP or UDP".into());
        };
        let entries = flow_entries(
            proto,
            flow.inside,
            flow.public,
            flow.outside,
            flow.carries_fin,
        )
        .to_vec();
        install(kp, &mut self.installed, id, entries).map_err(|e| e.to_string())
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
            adopted: self.adoption.0,
            adoption_dropped: self.adoption.1,
            map_capacity: self.capacity,
            reinstalled: self.reinstalled,
            one_packet_in: c.one_packet_in,
            one_packet_out: c.one_packet_out,
            one_packet_services: self.one_packet.len(),
            syn_opened: c.syn_opened,
            syn_ring_full: c.syn_ring_full,
            opened_adopted: self.opened_adoption.0,
            opened_refused: self.opened_adoption.1,
            opened_pending: self.opened.len(),
            handshakes_reported: c.handshakes_reported,
            handshake_ring_full: c.handshake_ring_full,
            handshakes_fed: self.handshakes_fed,
            syn_acks_sent: c.syn_acks_sent,
            syn_ack_ring_full: c.syn_ack_ring_full,
            published_listeners: self.published.0.len(),
        }
    }

    /// Detaches the programs and removes maps, pins and qdiscs.
    pub(super) fn unload(&mut self) {
        self.installed.clear();
        self.opened.clear();
        self.one_packet.clear();
        self.one_packet_backends.clear();
        if let Some(kp) = self.kp.take()
            && let Err(e) = kp.unload()
        {
            tracing::warn!(error = %e, "unloading the kernel path");
        }
    }
}

/// Each flow the core makes eligible for the fast path, its protocol, whether it is
/// direct-routed and whether the program may carry its FINs.
fn wanted(gw: &Mutex<Gateway>) -> HashMap<FlowId, (kpath::Proto, bool, bool)> {
    let gw = lock_unpoisoned(gw);
    gw.translations(now())
        .into_iter()
        .filter(|t| gw.fast_path_eligible(t))
        .filter_map(|t| {
            let id = (t.proto, t.inside, t.public, t.outside);
            let how = (
                kproto(t.proto)?,
                gw.is_direct_routed(&t),
                gw.fast_path_carries_fin(&t),
            );
            Some((id, how))
        })
        .collect()
}

/// Both entries of a translated flow; its FINs left to the core unless `carries_fin`.
fn flow_entries(
    proto: kpath::Proto,
    inside: SocketAddrV4,
    public: SocketAddrV4,
    outside: SocketAddrV4,
    carries_fin: bool,
) -> [(FlowKey, Rewrite); 2] {
    let entries = kpath::entries(proto, inside, public, outside);
    if carries_fin {
        entries
    } else {
        kpath::fins_to_core(entries)
    }
}

/// The flow a map entry belongs to (the inverse of [`kpath::entries`] and
/// [`kpath::direct_route_entry`]); `None` for an entry neither could have made.
fn flow_of(key: &FlowKey, rewrite: &Rewrite) -> Option<FlowId> {
    let proto = match key.proto {
        kpath::Proto::Tcp => Proto::Tcp,
        kpath::Proto::Udp => Proto::Udp,
    };
    match (key.direction, rewrite.direct_route) {
        (KDir::Outbound, false) => Some((proto, key.src, rewrite.src, key.dst)),
        (KDir::Inbound, false) => Some((proto, rewrite.dst, key.dst, key.src)),
        (KDir::Inbound, true) if proto == Proto::Tcp => {
            Some((proto, rewrite.dst, key.dst, key.src))
        }
        _ => None,
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

/// Feeds `reports` (one group per flow, from [`collect_reports`]) to the core.
fn feed_reports(gw: &mut Gateway, at: std::time::Instant, reports: &[Vec<FastPathActivity>]) {
    for flow in reports {
        for r in flow {
            let _still_there = gw.fast_path_activity(at, r);
        }
        // A short connection may open and close within one round.
        if flow.iter().any(|r| r.tcp_fin_end.is_some()) {
            gw.fast_path_close(at, flow);
        }
    }
}

/// Appends what the program moved of `flow` since its last report (one activity per
/// direction that moved, in one group per flow) and remembers the counts reported; returns
/// the indices of the entries the map no longer holds (evicted), read in the same lookup.
/// The reports come from `walked` (this round's walk of the map), or from a lookup each.
fn collect_reports(
    kp: &KernelPath,
    walked: Option<&kpath::FlowReports>,
    id: &FlowId,
    flow: &mut Installed,
    out: &mut Vec<Vec<FastPathActivity>>,
) -> Vec<usize> {
    let mut moved = Vec::new();
    let mut absent = Vec::new();
    for (i, (key, _)) in flow.entries.iter().enumerate() {
        let report = match walked {
            Some(walked) => Ok(walked.get(key)),
            None => kp.report(key),
        };
        let r = match report {
            Ok(Some(r)) => r,
            Ok(None) => {
                absent.push(i);
                continue;
            }
            Err(_) => continue,
        };
        let (packets, bytes) = flow.reported[i];
        if r.packets == packets {
            continue;
        }
        flow.reported[i] = (r.packets, r.bytes);
        moved.push(FastPathActivity {
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
            tcp_fin_end: r.tcp.and_then(|t| t.fin_end),
        });
    }
    if !moved.is_empty() {
        out.push(moved);
    }
    absent
}

/// Whether `a` and `b` are the same cycle (one a rotation of the other): the core's rotation
/// moves with every datagram it schedules itself, which changes where its cycle starts, not
/// the schedule.
fn same_cycle(a: &[SocketAddrV4], b: &[SocketAddrV4]) -> bool {
    a.len() == b.len()
        && (a.is_empty()
            || (0..a.len()).any(|k| a[k..] == b[..a.len() - k] && a[..k] == b[a.len() - k..]))
}

/// How often the adoption task looks at the ring of opened flows. An empty ring costs a
/// read of two positions in shared memory, no system call; a full one holds
/// [`kpath::OPENED_RING_RECORDS`], so the program opens at most that many flows between two
/// adoptions (beyond, its SYNs take the slow path).
pub(super) const OPENED_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The adoption task: every [`OPENED_POLL_INTERVAL`] hands the flows the program opened to
/// the core (a sync round does too), so that the core's bounds and the publication follow
/// the program's openings within one interval. Ends with `stop` or when the program is gone.
pub(super) async fn opened_loop(
    kernel: Arc<Mutex<KernelDatapath>>,
    gw: Arc<Mutex<Gateway>>,
    stop: watch::Receiver<bool>,
) -> Result<(), super::DriverError> {
    every(OPENED_POLL_INTERVAL, stop, || {
        let mut kernel = lock_unpoisoned(&kernel);
        if kernel.kp.is_none() {
            return false;
        }
        kernel.adopt_opened(&gw);
        true
    })
    .await
}

/// The sync task: a round every [`SYNC_INTERVAL`] until `stop`.
pub(super) async fn sync_loop(
    kernel: Arc<Mutex<KernelDatapath>>,
    gw: Arc<Mutex<Gateway>>,
    stop: watch::Receiver<bool>,
) -> Result<(), super::DriverError> {
    every(SYNC_INTERVAL, stop, || {
        lock_unpoisoned(&kernel).sync(&gw);
        true
    })
    .await
}

/// Runs `round` every `interval` (a late tick delays the next ones rather than bunching
/// them) until `stop` turns true or `round` answers `false`.
async fn every(
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut round: impl FnMut() -> bool,
) -> Result<(), super::DriverError> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        if *stop.borrow() || !round() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(a: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(a.into(), port)
    }

    #[test]
    fn every_entry_names_the_flow_that_made_it() {
        let (inside, public, outside) = (
            ep([192, 168, 1, 2], 5000),
            ep([198, 51, 100, 1], 6000),
            ep([203, 0, 113, 9], 53),
        );
        for (proto, kp) in [
            (Proto::Udp, kpath::Proto::Udp),
            (Proto::Tcp, kpath::Proto::Tcp),
        ] {
            for (key, rewrite) in kpath::entries(kp, inside, public, outside) {
                assert_eq!(
                    flow_of(&key, &rewrite),
                    Some((proto, inside, public, outside))
                );
            }
        }
        let (client, vip, server) = (
            ep([203, 0, 113, 9], 40_000),
            ep([198, 51, 100, 10], 80),
            [10, 0, 0, 7],
        );
        let (key, rewrite) =
            kpath::direct_route_entry(kpath::Proto::Tcp, client, vip, server.into());
        assert_eq!(
            flow_of(&key, &rewrite),
            Some((Proto::Tcp, ep(server, 80), vip, client))
        );
        // No program writes an outbound direct-routing entry, nor a UDP one.
        let outbound = FlowKey {
            direction: KDir::Outbound,
            ..key
        };
        assert_eq!(flow_of(&outbound, &rewrite), None);
        let udp = FlowKey {
            proto: kpath::Proto::Udp,
            ..key
        };
        assert_eq!(flow_of(&udp, &rewrite), None);
    }

    #[test]
    fn the_flow_map_holds_every_flow_the_table_may_hold_with_headroom() {
        assert_eq!(flow_map_entries(65_536), 147_456);
        assert_eq!(flow_map_entries(1_000_000), 2_250_000);
        // A tiny table still gets a map worth loading; the largest table (2^24) fits a u32.
        assert_eq!(flow_map_entries(10), 1024);
        assert_eq!(flow_map_entries(1 << 24), 37_748_736);
        for n in [1, 1000, 65_536, 1 << 20] {
            assert!(u64::from(flow_map_entries(n)) >= 2 * n as u64);
        }
    }
}
