//! The TUN driver: creates `nat0`, installs the steering routes, and runs the packet loop
//! around a [`Gateway`]. Only compiled with the `driver` feature.
//!
//! One task per TUN queue runs the packet loop (one queue by default; with `queues > 1` the
//! TUN is multi-queue and the kernel spreads flows over the queues, all tasks sharing one
//! table). Each reads packets from its queue, classifies each ([`Gateway::direction`]), lets
//! the core rewrite it in place and writes it back on the same queue; the first task also
//! wakes for [`Gateway::poll_timeout`]. With TUN offload one read brings a whole GSO
//! super-packet (a run of up to 64 KiB of one TCP or UDP flow) with its virtio-net header: the core
//! rewrites its headers in place ([`Gateway::handle_super_packet`], keeping a partial checksum
//! partial) and it is written back with the same virtio-net header, so the payload is never
//! copied, split or checksummed in userspace. Up to [`BATCH`] reads are translated under one
//! lock; buffers are reused, so there is no allocation per packet.

mod kernel;
mod netlink;
mod sysctl;

pub use kernel::{Datapath, FastPathCounters, SYNC_INTERVAL, prepare_kernel_datapath};

use std::net::Ipv4Addr;
use std::time::Instant;

use std::sync::{Arc, Mutex};

use netsys::netlink::NetlinkError;
use netsys::sync::lock_unpoisoned;
use netsys::tun::{Tun, TunRequest};
use netutil::Reconfigured;
use netutil::ipv4::Ipv4View;
use netutil::vnet::VnetHdr;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::translate;
use crate::{
    AclRule, DirectRoute, FastPathFlow, Gateway, GatewayConfig, GatewayStats, L4Checksum,
    PacketMeta, StaticEntry, Translation, Verdict,
};

/// Packets (with offload: super-packets of up to 64 KiB) read per wake-up and translated under
/// one lock.
pub const BATCH: usize = 16;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// A required kernel setting is wrong (the message says how to fix it).
    #[error("{0}")]
    Setting(String),
    /// A sysctl could not be read or written.
    #[error("sysctl {key}: {source}")]
    Sysctl {
        /// The sysctl key.
        key: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TUN device could not be created.
    #[error("creating TUN {name}: {source}")]
    OpenTun {
        /// Interface name.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The netlink socket could not be opened.
    #[error("opening netlink socket: {0}")]
    NetlinkSocket(std::io::Error),
    /// An interface named in the config does not exist.
    #[error("no interface named {0}")]
    NoInterface(String),
    /// The configuration was rejected by the core.
    #[error(transparent)]
    Config(#[from] crate::NatError),
    /// The packet loop ended abnormally.
    #[error("the NAT packet loop is not running")]
    Stopped,
    /// Reading or writing the TUN failed.
    #[error("TUN I/O: {0}")]
    Io(std::io::Error),
}

/// Where the gateway plugs into the host.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// TUN name. Default `nat0`.
    pub tun: String,
    /// Inside interfaces (their traffic is steered into the TUN).
    pub inside: Vec<String>,
    /// Outside interface (public addresses are answered for there).
    pub outside: String,
    /// Routing table for the steering routes. Default 4787.
    pub table: u32,
    /// First rule priority used (the rules take up to priority + 62). Default 100.
    pub priority: u32,
    /// MTU of the TUN. Default 1500.
    pub mtu: u16,
    /// TUN offload (virtio-net header, TSO/GSO super-packets): the big throughput win.
    /// Default true; falls back to plain reads if the kernel refuses.
    pub offload: bool,
    /// TUN queues, one packet task each (at most [`DriverConfig::MAX_QUEUES`]; 1 if the kernel
    /// refuses a multi-queue TUN). Default 1: on a 2-core host the benchmark's own endpoints
    /// keep both cores busy and a second queue measured no faster (bench/nat.sh, `QUEUES`).
    pub queues: usize,
    /// Public addresses NOT made live at start: another part (a VRRP master) decides when
    /// they are, through [`NatDriver::add_public_address`] / [`NatDriver::remove_public_address`].
    pub deferred_public: Vec<Ipv4Addr>,
    /// Which data path moves established flows. Default [`Datapath::Kernel`] (the TUN when
    /// the program does not load).
    pub datapath: Datapath,
    /// Names the kernel path's pin directory (`/sys/fs/bpf/vipgate/<site>/`). Default `nat`.
    pub site: String,
}

impl DriverConfig {
    /// The most TUN queues the driver opens.
    pub const MAX_QUEUES: usize = netsys::tun::MAX_QUEUES;

    /// Defaults for everything but the interfaces.
    #[must_use]
    pub fn new(inside: Vec<String>, outside: String) -> Self {
        DriverConfig {
            tun: "nat0".into(),
            inside,
            outside,
            table: 4787,
            priority: 100,
            mtu: 1500,
            offload: true,
            queues: 1,
            deferred_public: Vec::new(),
            datapath: Datapath::default(),
            site: "nat".into(),
        }
    }
}

/// A point-in-time copy of the gateway's state, for `show nat`; with the `serde` feature its
/// serialisation is `show nat --json` (monotonic counts under `counters`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NatStatus {
    /// Every flow; `None` in a [`NatDriver::summary`], and then left out of the serialisation
    /// (an empty table is `Some` of an empty list).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub translations: Option<Vec<Translation>>,
    /// The static forwards.
    pub statics: Vec<StaticEntry>,
    /// ACL rules with their hit counters, in match order.
    pub acl: Vec<AclRuleStatus>,
    /// Packet counters.
    pub counters: NatCounters,
    /// Flows in the table.
    pub flows: usize,
    /// Half-open flows (TCP before its handshake completed, UDP/ICMP before a reply).
    pub half_open: usize,
    /// Mappings in the table.
    pub mappings: usize,
    /// The table bound.
    pub capacity: usize,
    /// Heap bytes of the table.
    pub table_bytes: usize,
    /// The public addresses the gateway answers for.
    pub public_addresses: Vec<Ipv4Addr>,
    /// TUN queues opened (one packet task each).
    pub tun_queues: usize,
    /// The data path moving established flows.
    pub datapath: Datapath,
    /// Why this data path runs (the configured one, or why the kernel path did not load).
    pub datapath_reason: String,
    /// What the kernel path moved (all zero on `tun`).
    pub fast_path: FastPathCounters,
}

/// The gateway's counters and the ACL's implicit denies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NatCounters {
    /// Packet and flow counters of the core.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub gateway: GatewayStats,
    /// Inside packets denied by the ACL's implicit deny.
    pub acl_implicit_denies: u64,
}

/// One ACL rule and how often it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AclRuleStatus {
    /// The rule.
    pub rule: AclRule,
    /// Its counters.
    pub counters: AclRuleCounters,
}

/// Counters of one ACL rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AclRuleCounters {
    /// Packets the rule matched.
    pub hits: u64,
}

/// A running gateway: `nat0`, its routes and the packet loop.
///
/// The core sits behind a mutex shared with the packet loop, which holds it for one batch of
/// packets at a time; [`NatDriver::gateway`] gives other parts (virtual services) the same
/// access, e.g. `driver.gateway().lock()?.add_listener(..)` followed by
/// [`NatDriver::add_public_address`] for a new VIP.
#[derive(Debug)]
pub struct NatDriver {
    /// Locked unpoisoned: a panic while holding the lock cannot leave the table
    /// half-updated in a way that matters more than stopping the gateway would.
    gw: Arc<Mutex<Gateway>>,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    /// How the packet loops ended (one ending before `stop` is a dead part).
    watch: netutil::task::TaskWatch,
    handle: rtnetlink::Handle,
    installed: tokio::sync::Mutex<netlink::Installed>,
    tun: String,
    tun_queues: usize,
    learnt_inside: Vec<ipnet::Ipv4Net>,
    /// Addresses of this host, learnt at start (traffic to them may pass through).
    learnt_local: Vec<Ipv4Addr>,
    /// The kernel data path, when it runs.
    kernel: Option<Arc<Mutex<kernel::KernelDatapath>>>,
    /// Why the data path in use runs.
    datapath_reason: String,
}

/// The driver's clock: the one place that reads it.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

impl NatDriver {
    /// Checks sysctls, creates the TUN, installs routing and starts the packet loop in the
    /// current network namespace.
    ///
    /// # Errors
    /// Wrong sysctls, missing interfaces, netlink or TUN failures, or a rejected config.
    pub async fn start(cfg: DriverConfig, mut gw_cfg: GatewayConfig) -> Result<Self, DriverError> {
        sysctl::check_namespace()?;
        // Validate the core config before touching the host.
        let mut public = Gateway::new(now(), gw_cfg.clone())?.public_addresses();
        public.retain(|a| !cfg.deferred_public.contains(a));

        let request = TunRequest {
            queues: cfg.queues,
            ..TunRequest::new(cfg.tun.clone(), cfg.mtu, cfg.offload)
        };
        let Tun { queues, offload } =
            netsys::tun::open(&request).map_err(|e| DriverError::OpenTun {
                name: e.name,
                source: e.source,
            })?;
        sysctl::configure_tun(&cfg.tun)?;

        let handle = netsys::netlink::connect().map_err(DriverError::NetlinkSocket)?;
        let plan = netlink::Plan {
            tun: cfg.tun.clone(),
            inside: cfg.inside.clone(),
            outside: cfg.outside.clone(),
            table: cfg.table,
            priority: cfg.priority,
            public,
        };
        let (mut installed, inside_nets) = netlink::Installed::install(&handle, &plan).await?;
        for n in &inside_nets {
            if !gw_cfg.inside_networks.contains(n) {
                gw_cfg.inside_networks.push(*n);
            }
        }
        let learnt_local = installed.local_addresses().to_vec();
        for a in &learnt_local {
            if !gw_cfg.local_addresses.contains(a) {
                gw_cfg.local_addresses.push(*a);
            }
        }
        let max_mappings = gw_cfg.max_mappings;
        let gw = match Gateway::new(now(), gw_cfg) {
            Ok(gw) => Arc::new(Mutex::new(gw)),
            Err(e) => {
                installed.remove(&handle).await;
                return Err(e.into());
            }
        };
        let (stop, _) = watch::channel(false);
        let watch = netutil::task::TaskWatch::new();
        let n_queues = queues.len();
        let (kernel, datapath_reason) = match cfg.datapath {
            Datapath::Tun => (None, "configured: datapath = \"tun\"".to_owned()),
            Datapath::Kernel => {
                match kernel::KernelDatapath::start(
                    &cfg.site,
                    &cfg.inside,
                    &cfg.outside,
                    &cfg.tun,
                    max_mappings,
                ) {
                    Ok(k) => (
                        Some(Arc::new(Mutex::new(k))),
                        "configured: datapath = \"kernel\"".to_owned(),
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "the kernel data path did not load; every packet takes the TUN");
                        (None, format!("kernel path unavailable: {e}"))
                    }
                }
            }
        };
        // Only the kernel path can deliver a direct-routing service's packets by MAC.
        lock_unpoisoned(&gw).set_direct_routing(kernel.is_some());
        // The packet loop installs a flow the moment the core makes it established.
        lock_unpoisoned(&gw).set_fast_path_feed(kernel.is_some());
        if let Some(k) = &kernel {
            lock_unpoisoned(k).adopt(&gw);
        }
        let mut tasks = queues
            .into_iter()
            .enumerate()
            .map(|(i, dev)| {
                let queue = Queue {
                    dev,
                    offload,
                    owns_timers: i == 0,
                };
                let loop_ = run(queue, gw.clone(), kernel.clone(), stop.subscribe());
                watch.spawn("nat packet loop", loop_)
            })
            .collect::<Vec<_>>();
        if let Some(k) = &kernel {
            tasks.push(watch.spawn(
                "nat kernel path sync",
                kernel::sync_loop(k.clone(), gw.clone(), stop.subscribe()),
            ));
            tasks.push(watch.spawn(
                "nat kernel path adoption",
                kernel::opened_loop(k.clone(), gw.clone(), stop.subscribe()),
            ));
        }
        tracing::info!(tun = %cfg.tun, queues = n_queues, datapath = if kernel.is_some() { "kernel" } else { "tun" }, inside = ?cfg.inside, outside = %cfg.outside, "nat gateway running");
        Ok(NatDriver {
            gw,
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
            watch,
            handle,
            installed: tokio::sync::Mutex::new(installed),
            tun: cfg.tun,
            tun_queues: n_queues,
            learnt_inside: inside_nets,
            learnt_local,
            kernel,
            datapath_reason,
        })
    }

    /// The first packet loop that ended while the gateway was running, with its cause (a TUN
    /// read error, a panic); `None` while every loop runs. The supervisor restarts the part.
    #[must_use]
    pub fn dead_task(&self) -> Option<String> {
        self.watch.dead()
    }

    /// The core, shared with the packet loop (hold the lock briefly: packets wait meanwhile).
    #[must_use]
    pub fn gateway(&self) -> Arc<Mutex<Gateway>> {
        self.gw.clone()
    }

    /// Makes another public address live (a VIP added after start): routed into the TUN and
    /// answered for on the outside link. Idempotent.
    ///
    /// # Errors
    /// A netlink failure.
    pub async fn add_public_address(&self, addr: Ipv4Addr) -> Result<(), DriverError> {
        self.installed
            .lock()
            .await
            .add_public(&self.handle, addr)
            .await
    }

    /// Withdraws a public address made live with [`NatDriver::add_public_address`] (a VIP
    /// whose VRRP instance left master): its route into the TUN and its proxy neighbour go, so
    /// this host stops answering for it. Flows already in the table stay until they expire.
    /// Idempotent.
    ///
    /// # Errors
    /// A netlink failure.
    pub async fn remove_public_address(&self, addr: Ipv4Addr) -> Result<(), DriverError> {
        self.installed
            .lock()
            .await
            .remove_public(&self.handle, addr)
            .await
    }

    /// A copy of the state for `show nat`, every flow included (the packet loop waits while
    /// the table is walked: up to `max_mappings` flows).
    #[must_use]
    pub fn snapshot(&self) -> NatStatus {
        self.copy_state(true)
    }

    /// Counters, ACL hits and table usage without the flows: what metrics scrapes and
    /// `vipgate status` need, cheap whatever the table holds.
    #[must_use]
    pub fn summary(&self) -> NatStatus {
        self.copy_state(false)
    }

    fn copy_state(&self, translations: bool) -> NatStatus {
        // Read before the core's lock: the sync task takes the kernel path's lock first.
        let fast = self
            .kernel
            .as_ref()
            .map_or_else(FastPathCounters::default, |k| lock_unpoisoned(k).counters());
        let gw = lock_unpoisoned(&self.gw);
        let now = now();
        NatStatus {
            translations: translations.then(|| gw.translations(now)),
            statics: gw.static_entries().collect(),
            acl: gw
                .acl_rules()
                .map(|(r, hits)| AclRuleStatus {
                    rule: r.clone(),
                    counters: AclRuleCounters { hits },
                })
                .collect(),
            counters: NatCounters {
                gateway: gw.stats().clone(),
                acl_implicit_denies: gw.acl_implicit_denies(),
            },
            flows: gw.table().len(),
            half_open: gw.table().half_open(),
            mappings: gw.table().mappings(),
            capacity: gw.table().capacity(),
            table_bytes: gw.table().heap_bytes(),
            public_addresses: gw.public_addresses(),
            tun_queues: self.tun_queues,
            datapath: if self.kernel.is_some() {
                Datapath::Kernel
            } else {
                Datapath::Tun
            },
            datapath_reason: self.datapath_reason.clone(),
            fast_path: fast,
        }
    }

    /// Applies a changed core config live (see [`Gateway::reconfigure`]), or says why it
    /// needs a new gateway.
    ///
    /// # Errors
    /// [`DriverError::Config`] when the core rejects the config.
    pub fn reconfigure(&self, mut config: GatewayConfig) -> Result<Reconfigured, DriverError> {
        let mut gw = lock_unpoisoned(&self.gw);
        // Keep the subnets learnt from the inside interfaces at start.
        for n in &self.learnt_inside {
            if !config.inside_networks.contains(n) {
                config.inside_networks.push(*n);
            }
        }
        for a in &self.learnt_local {
            if !config.local_addresses.contains(a) {
                config.local_addresses.push(*a);
            }
        }
        Ok(gw.reconfigure(now(), config)?)
    }

    /// Flushes dynamic flows (`vipgate nat clear`); returns how many were removed.
    pub fn clear(&self) -> usize {
        let removed = lock_unpoisoned(&self.gw).clear(now());
        // The kernel path forgets the cleared flows now, not at its next round.
        if let Some(k) = &self.kernel {
            lock_unpoisoned(k).sync(&self.gw);
        }
        removed
    }

    /// The TUN's name.
    #[must_use]
    pub fn tun_name(&self) -> &str {
        &self.tun
    }

    /// Stops the loop, removes every rule, route and neighbour entry, and closes the TUN.
    /// Idempotent (the driver may be shared with the parts built on it).
    ///
    /// # Errors
    /// The loop's own error, if it had failed.
    pub async fn stop(&self) -> Result<(), DriverError> {
        self.watch.stopping();
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().await);
        for task in tasks {
            let _ = task.await;
        }
        let result = match self.watch.dead() {
            Some(why) => {
                tracing::warn!(%why, "a nat packet loop had ended before the stop");
                Err(DriverError::Stopped)
            }
            None => Ok(()),
        };
        if let Some(k) = &self.kernel {
            lock_unpoisoned(k).unload();
        }
        self.installed.lock().await.remove(&self.handle).await;
        tracing::info!(tun = %self.tun, "nat gateway stopped");
        result
    }
}

/// Room for the largest IPv4 packet (a GSO super-packet is at most 64 KiB).
const MAX_PACKET: usize = 65_535;

/// How the core should read one packet read with its virtio-net header, after fixing what it
/// cannot take: a partial checksum that is not TCP/UDP over IPv4 (an ICMP message, another
/// protocol) is finished here and its `NEEDS_CSUM` flag cleared, because the core needs
/// complete checksums there. `None`: drop the packet (a partial checksum outside it).
fn prepare(head: &mut [u8], pkt: &mut [u8]) -> Option<PacketMeta> {
    let h = VnetHdr::decode(head)?;
    let mut meta = PacketMeta::default();
    // (header length, protocol) of an IPv4 packet; the lengths are the core's to check.
    let ipv4 = pkt
        .first_chunk::<20>()
        .map(Ipv4View::new_unchecked)
        .filter(|ip| ip.version() == 4)
        .map(|ip| (ip.ihl(), ip.protocol()));
    if h.needs_csum() {
        let start = usize::from(h.csum_start);
        let offset = usize::from(h.csum_offset);
        let tcp_udp = ipv4.is_some_and(|(ihl, proto)| {
            start == ihl && matches!((proto, offset), (6, 16) | (17, 6))
        });
        if tcp_udp {
            meta.l4_checksum = L4Checksum::Partial;
        } else if !h.is_gso() {
            if !translate::finish_partial_checksum(pkt, start, offset, false) {
                return None;
            }
            head[0] &= !VnetHdr::NEEDS_CSUM;
        }
        // A super-packet of anything else (IPv6): left as it is; the core passes or drops it.
    }
    if let Some((ihl, proto)) = ipv4
        && h.is_gso()
        && h.gso_size > 0
    {
        meta.segments = gso_segments(pkt, ihl, proto, h.gso_size);
    }
    Some(meta)
}

/// The number of wire segments of an IPv4 TCP/UDP super-packet cut at `gso_size` payload bytes.
fn gso_segments(pkt: &[u8], ihl: usize, proto: u8, gso_size: u16) -> u32 {
    let l4_header = match proto {
        6 => pkt.get(ihl + 12).map_or(20, |b| usize::from(b >> 4) * 4),
        _ => 8,
    };
    let payload = pkt.len().saturating_sub(ihl + l4_header);
    let segments = payload.div_ceil(usize::from(gso_size)).max(1);
    u32::try_from(segments).unwrap_or(u32::MAX)
}

/// One TUN queue and what its packet task needs to know.
struct Queue {
    dev: tun_rs::AsyncDevice,
    /// Packets carry a virtio-net header.
    offload: bool,
    /// This task also runs the core's timers (one task does, the others only move packets).
    owns_timers: bool,
}

async fn run(
    queue: Queue,
    gw: Arc<Mutex<Gateway>>,
    kernel: Option<Arc<Mutex<kernel::KernelDatapath>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), DriverError> {
    // With TUN offload the kernel hands over whole GSO super-packets (up to 64 KiB of one TCP
    // or UDP flow behind one header, plus the virtio-net header) and takes them back the same
    // way: NAT rewrites only the headers, so each super-packet is translated in place and
    // written back with its own virtio-net header, and the kernel segments it (or not: a veth
    // passes it whole) on the way out. Without offload the same loop moves plain packets.
    // After one awaited read, whatever else is ready is read too (up to BATCH) and translated
    // under one lock. Buffers are reused: no allocation per packet. A packet is written back
    // on the queue it came from, so the kernel's flow-to-queue steering stays put and the
    // forwarding work of the write happens on this task's core.
    let Queue {
        dev,
        offload,
        owns_timers,
    } = queue;
    let head = if offload { VnetHdr::LEN } else { 0 };
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; head + MAX_PACKET]).collect();
    let mut lens = [0usize; BATCH];
    let mut routes = Vec::new();
    let mut ready = Vec::new();
    loop {
        let deadline = if owns_timers {
            lock_unpoisoned(&gw).poll_timeout()
        } else {
            None
        };
        tokio::select! {
            r = dev.recv(&mut bufs[0]) => {
                lens[0] = r.map_err(DriverError::Io)?;
                let mut n = 1;
                while n < BATCH {
                    match dev.try_recv(&mut bufs[n]) {
                        Ok(len) => {
                            lens[n] = len;
                            n += 1;
                        }
                        // WouldBlock ends the batch; a real error shows up on the next recv.
                        Err(_) => break,
                    }
                }
                // The flows the kernel opened first: the program reports a SYN before it
                // sends it on, so the SYN-ACK in this batch finds its flow in the core.
                if let Some(k) = kernel.as_deref() {
                    lock_unpoisoned(k).adopt_opened(&gw);
                }
                translate_batch(&gw, &mut bufs[..n], &mut lens[..n], head, &mut routes, &mut ready);
                install_direct_routes(kernel.as_deref(), &mut routes, &mut lens[..n]);
                install_established(kernel.as_deref(), &mut ready);
                for (b, len) in bufs.iter().zip(&lens[..n]) {
                    if *len == 0 {
                        continue;
                    }
                    if let Err(e) = dev.send(&b[..*len]).await {
                        // A TUN write only fails for the packet's own sake (no route, a
                        // header the kernel refuses): drop it, as a router would.
                        tracing::debug!(error = %e, "nat0 write");
                    }
                }
            }
            () = netsys::timer::sleep_until(deadline) => {}
            // The only change ever sent is the stop; a dropped sender means stop too.
            _ = stop.changed() => return Ok(()),
        }
        if owns_timers {
            // quinn's rule: compare with the clock instead of trusting the timer to fire on
            // time.
            let mut gw = lock_unpoisoned(&gw);
            if gw.poll_timeout().is_some_and(|d| d <= now()) {
                gw.handle_timeout(now());
            }
        }
    }
}

/// Installs the kernel path's entry of each direct-routing decision of a batch (`routes`:
/// the packet's index and the decision; emptied), so that the delivery program at `nat0`'s
/// ingress finds it when the packet is written back. A packet whose entry cannot be
/// installed gets length 0: written back, it would be routed to the VIP, into `nat0` again.
fn install_direct_routes(
    kernel: Option<&Mutex<kernel::KernelDatapath>>,
    routes: &mut Vec<(usize, DirectRoute)>,
    lens: &mut [usize],
) {
    if routes.is_empty() {
        return;
    }
    let mut kernel = kernel.map(lock_unpoisoned);
    for (i, route) in routes.drain(..) {
        let installed = match kernel.as_mut() {
            Some(k) => k.install_direct(&route),
            None => Err("no kernel path".into()),
        };
        if let Err(e) = installed {
            tracing::debug!(error = %e, client = %route.client, "direct route not installed; packet dropped");
            if let Some(len) = lens.get_mut(i) {
                *len = 0;
            }
        }
    }
}

/// Installs the kernel path's entries of the flows the core made established in a batch
/// (`ready`; emptied), so that the rest of a short connection (request, response) takes the
/// fast path instead of waiting for the next sync round. A flow the map refuses (full)
/// stays on the slow path; the sync tries again.
fn install_established(
    kernel: Option<&Mutex<kernel::KernelDatapath>>,
    ready: &mut Vec<FastPathFlow>,
) {
    if ready.is_empty() {
        return;
    }
    let Some(kernel) = kernel else {
        ready.clear();
        return;
    };
    let mut kernel = lock_unpoisoned(kernel);
    for flow in ready.drain(..) {
        if let Err(e) = kernel.install_established(&flow) {
            tracing::debug!(error = %e, outside = %flow.outside, "established flow not installed; the sync retries");
        }
    }
}

/// Runs the core over the packets read into `bufs` (each `lens[i]` bytes, the first `head`
/// of them a virtio-net header) under one lock. A packet to drop gets length 0; a packet the
/// core direct-routes is kept and its decision appended to `routes` with its index; the
/// flows the batch made established are appended to `ready`.
fn translate_batch(
    gw: &Mutex<Gateway>,
    bufs: &mut [Vec<u8>],
    lens: &mut [usize],
    head: usize,
    routes: &mut Vec<(usize, DirectRoute)>,
    ready: &mut Vec<FastPathFlow>,
) {
    let t = now();
    let mut gw = lock_unpoisoned(gw);
    for (i, (buf, len)) in bufs.iter_mut().zip(lens.iter_mut()).enumerate() {
        let Some(frame) = buf.get_mut(..*len) else {
            *len = 0;
            continue;
        };
        if frame.len() <= head {
            *len = 0;
            continue;
        }
        let (h, pkt) = frame.split_at_mut(head);
        let meta = if head == 0 {
            Some(PacketMeta::default())
        } else {
            prepare(h, pkt)
        };
        let verdict = meta.map(|meta| {
            let dir = gw.direction(pkt);
            gw.handle_super_packet(t, dir, pkt, meta)
        });
        match verdict {
            Some(Verdict::Forward) => {}
            Some(Verdict::DirectRoute(route)) => routes.push((i, route)),
            Some(Verdict::Drop(_)) | None => *len = 0,
        }
    }
    ready.extend(gw.take_fast_path_ready());
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEEDS_CSUM: u8 = VnetHdr::NEEDS_CSUM;
    const GSO_NONE: u8 = VnetHdr::GSO_NONE;

    fn hdr(flags: u8, gso_type: u8, gso_size: u16, start: u16, offset: u16) -> [u8; VnetHdr::LEN] {
        let mut b = [0u8; VnetHdr::LEN];
        VnetHdr {
            flags,
            gso_type,
            hdr_len: 0,
            gso_size,
            csum_start: start,
            csum_offset: offset,
        }
        .encode(&mut b);
        b
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let len = u16::try_from(20 + l4.len()).expect("small");
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[192, 168, 101, 10]);
        p[16..20].copy_from_slice(&[198, 51, 100, 200]);
        let c = netutil::checksum::checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn tcp_super_packet_is_partial_and_counts_segments() {
        let mut tcp = vec![0u8; 20 + 3000];
        tcp[12] = 5 << 4;
        let mut pkt = ipv4(6, &tcp);
        let mut h = hdr(NEEDS_CSUM, 1, 1448, 20, 16);
        let meta = prepare(&mut h, &mut pkt).expect("kept");
        assert_eq!(meta.l4_checksum, L4Checksum::Partial);
        assert_eq!(meta.segments, 3);
        assert_eq!(h[0], NEEDS_CSUM, "the header goes back unchanged");
    }

    #[test]
    fn partial_icmp_is_finished_and_flag_cleared() {
        // An echo request whose checksum field holds the partial sum 0 (no pseudo-header).
        let icmp = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, 0xde, 0xad];
        let mut pkt = ipv4(1, &icmp);
        let mut h = hdr(NEEDS_CSUM, GSO_NONE, 0, 20, 2);
        let meta = prepare(&mut h, &mut pkt).expect("kept");
        assert_eq!(meta, PacketMeta::default());
        assert_eq!(h[0] & NEEDS_CSUM, 0);
        assert_eq!(netutil::checksum::checksum(&pkt[20..]), 0);
    }

    #[test]
    fn partial_checksum_outside_the_packet_is_dropped() {
        let mut pkt = ipv4(1, &[8, 0, 0, 0]);
        let mut h = hdr(NEEDS_CSUM, GSO_NONE, 0, 20, 200);
        assert!(prepare(&mut h, &mut pkt).is_none());
    }

    #[test]
    fn plain_packet_is_full_and_one_segment() {
        let mut pkt = ipv4(17, &[0, 53, 0, 53, 0, 8, 0, 0]);
        let mut h = hdr(0, GSO_NONE, 0, 0, 0);
        assert_eq!(prepare(&mut h, &mut pkt), Some(PacketMeta::default()));
    }
}
