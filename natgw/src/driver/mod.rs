//! The TUN driver: creates `nat0`, installs the steering routes, and runs the packet loop
//! around a [`Gateway`]. Only compiled with the `driver` feature.
//!
//! One task runs the packet loop. It reads packets from `nat0`, classifies each
//! ([`Gateway::direction`]), lets the core rewrite it in place and writes it back; and it wakes
//! for [`Gateway::poll_timeout`]. With TUN offload one read brings a whole TCP super-packet
//! (up to [`BATCH`] segments), translated under one lock and written back coalesced; buffers
//! are reused, so there is no allocation per packet.

mod netlink;
mod sysctl;

use std::net::Ipv4Addr;
use std::time::Instant;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{AclRule, Gateway, GatewayConfig, GatewayStats, Translation, Verdict};

/// Segment buffers per read (tun-rs's ideal batch size).
pub const BATCH: usize = 128;

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
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The netlink error.
        source: rtnetlink::Error,
    },
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
    /// Public addresses NOT made live at start: another part (a VRRP master) decides when
    /// they are, through [`NatDriver::add_public_address`] / [`NatDriver::remove_public_address`].
    pub deferred_public: Vec<Ipv4Addr>,
}

impl DriverConfig {
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
            deferred_public: Vec::new(),
        }
    }
}

/// A point-in-time copy of the gateway's state, for `show nat`.
#[derive(Debug, Clone)]
pub struct NatSnapshot {
    /// Every flow.
    pub translations: Vec<Translation>,
    /// ACL rules with hit counters.
    pub acl: Vec<(AclRule, u64)>,
    /// Inside packets denied by the ACL's implicit deny.
    pub acl_implicit_denies: u64,
    /// Packet counters.
    pub stats: GatewayStats,
    /// Flows in the table.
    pub flows: usize,
    /// Mappings in the table.
    pub mappings: usize,
    /// The table bound.
    pub capacity: usize,
    /// Heap bytes of the table.
    pub table_bytes: usize,
    /// The public addresses the gateway answers for.
    pub public_addresses: Vec<Ipv4Addr>,
}

/// A running gateway: `nat0`, its routes and the packet loop.
///
/// The core sits behind a mutex shared with the packet loop, which holds it for one batch of
/// packets at a time; [`NatDriver::gateway`] gives other parts (virtual services) the same
/// access, e.g. `driver.gateway().lock()?.add_listener(..)` followed by
/// [`NatDriver::add_public_address`] for a new VIP.
#[derive(Debug)]
pub struct NatDriver {
    gw: Arc<Mutex<Gateway>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<Result<(), DriverError>>>>,
    handle: rtnetlink::Handle,
    installed: tokio::sync::Mutex<netlink::Installed>,
    tun: String,
    learnt_inside: Vec<ipnet::Ipv4Net>,
}

/// The driver's clock: the one place that reads it.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn lock(gw: &Mutex<Gateway>) -> MutexGuard<'_, Gateway> {
    // A panic while holding the lock cannot leave the table half-updated in a way that
    // matters more than stopping the gateway would; keep serving.
    gw.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(cfg.tun.clone())
                .mtu(cfg.mtu)
                .offload(offload)
                .enable(true)
                .build_async()
        };
        let open_err = |source| DriverError::OpenTun {
            name: cfg.tun.clone(),
            source,
        };
        let dev = match build(cfg.offload) {
            Ok(dev) => dev,
            Err(e) if cfg.offload => {
                tracing::warn!(error = %e, "TUN offload unavailable; one packet per read");
                build(false).map_err(open_err)?
            }
            Err(e) => return Err(open_err(e)),
        };
        sysctl::configure_tun(&cfg.tun)?;

        let (conn, handle, _) = rtnetlink::new_connection().map_err(DriverError::NetlinkSocket)?;
        tokio::spawn(conn);
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
        let gw = match Gateway::new(now(), gw_cfg) {
            Ok(gw) => Arc::new(Mutex::new(gw)),
            Err(e) => {
                installed.remove(&handle).await;
                return Err(e.into());
            }
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(dev, gw.clone(), usize::from(cfg.mtu), stop_rx));
        tracing::info!(tun = %cfg.tun, inside = ?cfg.inside, outside = %cfg.outside, "nat gateway running");
        Ok(NatDriver {
            gw,
            stop: Mutex::new(Some(stop_tx)),
            task: tokio::sync::Mutex::new(Some(task)),
            handle,
            installed: tokio::sync::Mutex::new(installed),
            tun: cfg.tun,
            learnt_inside: inside_nets,
        })
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

    /// A copy of the state for `show nat`.
    #[must_use]
    pub fn snapshot(&self) -> NatSnapshot {
        let gw = lock(&self.gw);
        let now = now();
        NatSnapshot {
            translations: gw.translations(now),
            acl: gw.acl_rules().map(|(r, h)| (r.clone(), h)).collect(),
            acl_implicit_denies: gw.acl_implicit_denies(),
            stats: gw.stats().clone(),
            flows: gw.table().len(),
            mappings: gw.table().mappings(),
            capacity: gw.table().capacity(),
            table_bytes: gw.table().heap_bytes(),
            public_addresses: gw.public_addresses(),
        }
    }

    /// Applies a changed core config live (see [`Gateway::reconfigure`]).
    ///
    /// # Errors
    /// [`crate::NatError::NeedsRestart`] when the change needs a new gateway.
    pub fn reconfigure(&self, mut config: GatewayConfig) -> Result<(), DriverError> {
        let mut gw = lock(&self.gw);
        // Keep the subnets learnt from the inside interfaces at start.
        for n in &self.learnt_inside {
            if !config.inside_networks.contains(n) {
                config.inside_networks.push(*n);
            }
        }
        gw.reconfigure(now(), config)?;
        Ok(())
    }

    /// Flushes dynamic flows (`vipgate nat clear`); returns how many were removed.
    pub fn clear(&self) -> usize {
        lock(&self.gw).clear(now())
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
        let stop = self
            .stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = self.task.lock().await.take();
        let result = match task {
            Some(task) => task.await.unwrap_or(Err(DriverError::Stopped)),
            None => Ok(()),
        };
        self.installed.lock().await.remove(&self.handle).await;
        tracing::info!(tun = %self.tun, "nat gateway stopped");
        result
    }
}

/// Room before each packet for the virtio-net header that offload reads and writes.
const OFFSET: usize = 16;

async fn run(
    dev: tun_rs::AsyncDevice,
    gw: Arc<Mutex<Gateway>>,
    mtu: usize,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), DriverError> {
    // With TUN offload the kernel hands over TCP/UDP super-packets (up to 64 KiB); tun-rs
    // splits them into `bufs` and coalesces the rewritten segments again on the way back.
    // Without offload the same calls move one packet at a time. All buffers are reused.
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; OFFSET + mtu]).collect();
    let mut sizes = vec![0usize; BATCH];
    let mut gro = tun_rs::GROTable::default();
    loop {
        let deadline = lock(&gw).poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = dev.recv_multiple(&mut original, &mut bufs, &mut sizes, OFFSET) => {
                let n = match r {
                    Ok(n) => n,
                    // A malformed super-packet (bad virtio header) is that packet's problem.
                    Err(e) if e.kind() == std::io::ErrorKind::Other => {
                        tracing::debug!(error = %e, "nat0 read");
                        continue;
                    }
                    Err(e) => return Err(DriverError::Io(e)),
                };
                let k = translate_batch(&gw, &mut bufs, &sizes[..n]);
                if k > 0
                    && let Err(e) = dev.send_multiple(&mut gro, &mut bufs[..k], OFFSET).await
                {
                    // A TUN write only fails for the packets' own sake (no route): drop them,
                    // as a router would.
                    tracing::debug!(error = %e, "nat0 write");
                }
                for b in &mut bufs[..k] {
                    b.resize(OFFSET + mtu, 0);
                }
            }
            () = sleep => {}
            _ = &mut stop => return Ok(()),
        }
        // quinn's rule: compare with the clock instead of trusting the timer to fire on time.
        let mut gw = lock(&gw);
        if gw.poll_timeout().is_some_and(|d| d <= now()) {
            gw.handle_timeout(now());
        }
    }
}

/// Runs the core over `sizes.len()` received packets under one lock. The packets to forward
/// are moved to the front of `bufs`, each cut to its length; returns how many there are.
fn translate_batch(gw: &Mutex<Gateway>, bufs: &mut [Vec<u8>], sizes: &[usize]) -> usize {
    let t = now();
    let mut gw = lock(gw);
    let mut k = 0;
    for (i, len) in sizes.iter().enumerate() {
        let end = OFFSET + len;
        let Some(pkt) = bufs[i].get_mut(OFFSET..end) else {
            continue;
        };
        let dir = gw.direction(pkt);
        if gw.handle_packet(t, dir, pkt) == Verdict::Forward {
            bufs[i].truncate(end);
            bufs.swap(k, i);
            k += 1;
        }
    }
    k
}
