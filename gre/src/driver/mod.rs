//! The tokio driver: TUN devices, underlay sockets, keepalive timers and route changes.
//!
//! Tasks per [`GreDriver`]:
//! - one **transmit** task per tunnel: TUN reads (with offload, a TSO super-packet is split
//!   into segments by tun-rs) → [`Tunnel::encapsulate`] → one `sendmmsg` per batch;
//! - one **receive** task per underlay socket (local address × GRE/UDP), shared by the
//!   tunnels on it: `recvmmsg` → [`Demux`] → [`Tunnel::decapsulate`] → TUN writes (with
//!   offload, TCP segments are coalesced back into super-packets, GRO-style);
//! - one **control** task per tunnel: keepalive timer, probes, and route add/withdraw on
//!   [`TunnelEvent`]s.
//!
//! Every task runs under one [`TaskWatch`]: none of them ends while the driver runs, so an
//! end before [`GreDriver::stop`] (an error, or a panic, which stays inside its task) is
//! recorded and [`GreDriver::dead_task`] reports it for the daemon's supervisor to act on.
//!
//! The driver makes no protocol decisions; all of them are in [`Tunnel`].

mod kernel;
mod netlink;
mod sys;

pub use kernel::{
    Datapath, DatapathState, KernelCounters, kernel_path_excluded, prepare_kernel_datapath,
};

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netsys::netlink::{add_route_replace, del_route_idempotent, route_via};
use netsys::sync::lock_unpoisoned;
use netsys::tun::TunRequest;
use netutil::Reconfigured;
use netutil::ipv4::Ipv4View;
use netutil::task::TaskWatch;
use netutil::vnet::VnetHdr;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tun_rs::{AsyncDevice, VIRTIO_NET_HDR_LEN};

use crate::gro::TcpCoalescer;
use crate::keepalive::{GRE_IN_UDP_PORT, KeepaliveConfig};
use crate::tunnel::{
    Counters, Demux, Encap, HEADROOM, PROBE_BUF_LEN, Tunnel, TunnelConfig, TunnelEvent, Underlay,
    Verdict,
};
use sys::MAX_BATCH;

/// The driver's only clock read.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Why the driver could not start or change something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Creating or configuring the TUN device failed.
    #[error("cannot create TUN device {name}: {source}")]
    OpenTun {
        /// Interface name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A netlink request (a route, an address or link query) failed.
    #[error(transparent)]
    Netlink(#[from] netsys::netlink::NetlinkError),
    /// No interface holds the tunnel's local address, so its MTU is unknown.
    #[error("no interface holds local address {0}")]
    LocalAddressMissing(Ipv4Addr),
}

/// How to run one tunnel: the core's configuration plus what the driver installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// The core configuration; `mtu == 0` means "underlay MTU minus overhead".
    pub tunnel: TunnelConfig,
    /// Inner address and prefix length of the TUN.
    pub address: Option<(Ipv4Addr, u8)>,
    /// Routes through the tunnel, installed while it is up.
    pub routes: Vec<IpNet>,
    /// Use TUN offload (virtio-net header, TSO/GRO super-packets).
    pub offload: bool,
    /// Which data path carries the tunnel's plain traffic.
    pub datapath: Datapath,
}

/// A snapshot of one tunnel for `show gre`; with the `serde` feature its serialisation is
/// `show gre --json` (durations as `…_ms` integers, monotonic counts under `counters`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GreStatus {
    /// Tunnel (and TUN) name.
    pub name: String,
    /// Outer source.
    pub local: Ipv4Addr,
    /// Outer destination.
    pub remote: Ipv4Addr,
    /// RFC 2890 key.
    pub key: Option<u32>,
    /// Sequence numbers on.
    pub sequence: bool,
    /// Checksums on.
    pub checksum: bool,
    /// GRE or GRE-in-UDP.
    pub underlay: Underlay,
    /// Tunnel MTU.
    pub mtu: u16,
    /// TUN offload in use.
    pub offload: bool,
    /// Line protocol up.
    pub up: bool,
    /// Why the tunnel is down, when it is.
    pub down_reason: Option<String>,
    /// How long it has been down.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "down_for_ms", with = "netutil::serde_ms::option")
    )]
    pub down_for: Option<Duration>,
    /// Keepalive settings, if on.
    pub keepalive: Option<KeepaliveConfig>,
    /// Time since the last keepalive reply.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "last_keepalive_ms", with = "netutil::serde_ms::option")
    )]
    pub last_keepalive: Option<Duration>,
    /// Probes sent since the last reply.
    pub keepalive_misses: u32,
    /// Configured routes.
    pub routes: Vec<IpNet>,
    /// Whether those routes are installed now.
    pub routes_installed: bool,
    /// Counters: the core's plus what the kernel programs carried.
    pub counters: Counters,
    /// The data path carrying the tunnel's plain traffic.
    pub datapath: Datapath,
    /// Why that data path (the configured one, or why the kernel path is not used).
    pub datapath_reason: String,
    /// What the kernel programs did (included in `counters`); `None` on the TUN path.
    pub kernel: Option<KernelCounters>,
    /// The driver task that ended while it should run, with its cause (see
    /// [`GreDriver::dead_task`]); `None` while all of them run.
    pub dead_task: Option<String>,
}

/// State shared by the tasks of one tunnel.
struct Shared {
    core: Mutex<Tunnel>,
    tun: AsyncDevice,
    ifindex: u32,
    /// Inner address as configured (a change needs a restart).
    address: Option<(Ipv4Addr, u8)>,
    /// MTU of the interface holding the local address, for `mtu = 0` on reconfigure.
    underlay_mtu: u16,
    /// The tunnel MTU, as in the core's config: read by the receive loop once per batch
    /// (for segmenting partial super-packets) without taking the core's lock.
    mtu: AtomicU16,
    routes: Mutex<Vec<IpNet>>,
    /// Routes a reconfigure asked for, applied by the control task (which owns netlink).
    pending_routes: Mutex<Option<Vec<IpNet>>>,
    routes_installed: AtomicBool,
    /// Frames carry a virtio-net header: offload asked for and granted by the kernel.
    offload: bool,
    /// Offload as configured (a change needs a restart, whatever the kernel granted).
    offload_configured: bool,
    /// The data path as configured (a change needs a restart).
    datapath_configured: Datapath,
    /// Wakes the control task when a keepalive reply may have changed the state.
    wake: Notify,
    underlay: Arc<UnderlaySocket>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Tunnel> {
        // A panic elsewhere cannot leave the tunnel state half-updated in a way that
        // matters more than stopping the data path would.
        lock_unpoisoned(&self.core)
    }

    fn routes(&self) -> Vec<IpNet> {
        lock_unpoisoned(&self.routes).clone()
    }
}

struct UnderlaySocket {
    fd: AsyncFd<Socket>,
    kind: Underlay,
    /// UDP GSO usable for sending (cleared when the kernel refuses it).
    gso: AtomicBool,
    /// The kernel coalesces received datagrams (UDP GRO).
    gro: bool,
}

impl UnderlaySocket {
    fn open(local: Ipv4Addr, kind: Underlay) -> Result<Self, DriverError> {
        let io = |what| move |source| DriverError::Io { what, source };
        let (ty, proto, port) = match kind {
            Underlay::Gre => (Type::RAW, Protocol::from(libc::IPPROTO_GRE), 0),
            Underlay::Udp => (Type::DGRAM, Protocol::UDP, GRE_IN_UDP_PORT),
        };
        let socket =
            Socket::new(Domain::IPV4, ty, Some(proto)).map_err(io("open underlay socket"))?;
        socket
            .bind(&SocketAddrV4::new(local, port).into())
            .map_err(io("bind underlay socket to the local address"))?;
        socket
            .set_nonblocking(true)
            .map_err(io("set underlay socket non-blocking"))?;
        sys::force_buffers(&socket, 4 << 20);
        let gro = kind == Underlay::Udp && sys::enable_udp_gro(&socket);
        Ok(Self {
            fd: sys::register(socket).map_err(io("register underlay socket"))?,
            kind,
            gso: AtomicBool::new(kind == Underlay::Udp),
            gro,
        })
    }

    fn destination(&self, remote: Ipv4Addr) -> SocketAddrV4 {
        let port = match self.kind {
            Underlay::Gre => 0,
            Underlay::Udp => GRE_IN_UDP_PORT,
        };
        SocketAddrV4::new(remote, port)
    }

    /// Sends a batch; for GRE-in-UDP, runs of equal-sized packets (the segments of one
    /// TSO super-packet) go out as one UDP GSO send.
    async fn send_batch(&self, packets: &[&[u8]], remote: Ipv4Addr) -> io::Result<()> {
        if !self.gso.load(Ordering::Relaxed) {
            return self.send_all(packets, remote).await;
        }
        let dst = self.destination(remote);
        let mut i = 0;
        while i < packets.len() {
            let segment = packets[i].len();
            let mut j = i + 1;
            let mut total = segment;
            // Equal sizes, then at most one shorter tail; within 64 segments and 64 KiB.
            while j < packets.len()
                && j - i < sys::MAX_GSO_SEGMENTS
                && total + packets[j].len() <= 65_000
                && packets[j - 1].len() == segment
                && packets[j].len() <= segment
            {
                total += packets[j].len();
                j += 1;
            }
            if j - i == 1 {
                self.send_all(&packets[i..j], remote).await?;
                i = j;
                continue;
            }
            loop {
                let mut guard = self.fd.writable().await?;
                match guard
                    .try_io(|fd| sys::send_gso(fd.as_raw_fd(), &packets[i..j], segment as u16, dst))
                {
                    Ok(Ok(_)) => break,
                    Ok(Err(e))
                        if e.raw_os_error() == Some(libc::EIO)
                            || e.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        tracing::info!(error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                        self.gso.store(false, Ordering::Relaxed);
                        return self.send_all(&packets[i..], remote).await;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Sends every packet, waiting while the socket buffer is full.
    async fn send_all(&self, packets: &[&[u8]], remote: Ipv4Addr) -> io::Result<()> {
        let dst = self.destination(remote);
        let mut sent = 0;
        while sent < packets.len() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| sys::send_batch(fd.as_raw_fd(), &packets[sent..], dst)) {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// One underlay socket and the tunnels that share it.
type UnderlayGroup = (Arc<UnderlaySocket>, Vec<Arc<Shared>>);

// The coalescer writes the header tun-rs configured the device for.
const _: () = assert!(VnetHdr::LEN == VIRTIO_NET_HDR_LEN);

/// Underlay receive buffers per `recvmmsg` when UDP GRO is on (each holds up to 64 datagrams).
const GRO_RECEIVES: usize = 16;
/// Largest tunnel MTU the driver sizes its transmit buffers for (the config allows up to it).
pub const MAX_TUNNEL_MTU: u16 = 9000;
/// Segments one TUN read may produce with offload (64 KiB / smallest sane MSS).
const MAX_SEGMENTS: usize = 64;

/// Running tunnels; dropping it without [`GreDriver::stop`] leaves routes to the kernel,
/// which removes them with the TUN devices.
pub struct GreDriver {
    tunnels: Vec<Arc<Shared>>,
    /// Each tunnel's data path (by index in `tunnels`).
    datapaths: Vec<DatapathState>,
    /// The kernel programs, while any tunnel runs on them.
    kernel: Option<Mutex<kernel::KernelTunnels>>,
    tasks: Vec<JoinHandle<()>>,
    watch: TaskWatch,
    netlink: rtnetlink::Handle,
}

impl GreDriver {
    /// Creates every tunnel's TUN device and sockets, installs routes, puts the tunnels
    /// that ask for it on the kernel path (its maps pinned under
    /// `/sys/fs/bpf/vipgate/<site>/`; a tunnel whose kernel path does not load runs on the
    /// TUN path and its status says why), and starts the tasks on the current tokio runtime.
    ///
    /// # Errors
    /// The first device, socket or netlink operation that failed; whatever was created
    /// before it is removed again.
    pub async fn start(specs: Vec<TunnelSpec>, site: &str) -> Result<Self, DriverError> {
        let netlink = netsys::netlink::connect().map_err(|source| DriverError::Io {
            what: "open rtnetlink socket",
            source,
        })?;
        let mut driver = Self {
            tunnels: Vec::new(),
            datapaths: Vec::new(),
            kernel: None,
            tasks: Vec::new(),
            watch: TaskWatch::new(),
            netlink,
        };
        if let Err(e) = driver.start_all(specs, site).await {
            driver.stop().await;
            return Err(e);
        }
        Ok(driver)
    }

    async fn start_all(&mut self, specs: Vec<TunnelSpec>, site: &str) -> Result<(), DriverError> {
        let mut underlays: HashMap<(Ipv4Addr, Underlay), UnderlayGroup> = HashMap::new();
        let reflector = Arc::new(open_reflector()?);
        for spec in specs {
            let mut config = spec.tunnel;
            let underlay_mtu = netlink::underlay_mtu(&self.netlink, config.local).await?;
            let underlay_mtu = u16::try_from(underlay_mtu).unwrap_or(u16::MAX);
            if config.mtu == 0 {
                config.mtu = config.default_mtu(underlay_mtu);
            }
            let key = (config.local, config.underlay);
            let underlay = match underlays.get(&key) {
                Some((u, _)) => Arc::clone(u),
                None => Arc::new(UnderlaySocket::open(config.local, config.underlay)?),
            };
            let (tun, offload) = open_tun(&config, spec.address, spec.offload)?;
            let ifindex = tun.if_index().map_err(|source| DriverError::OpenTun {
                name: config.name.clone(),
                source,
            })?;
            let shared = Arc::new(Shared {
                mtu: AtomicU16::new(config.mtu),
                core: Mutex::new(Tunnel::new(now(), config)),
                tun,
                ifindex,
                address: spec.address,
                underlay_mtu,
                routes: Mutex::new(spec.routes),
                pending_routes: Mutex::new(None),
                routes_installed: AtomicBool::new(false),
                offload,
                offload_configured: spec.offload,
                datapath_configured: spec.datapath,
                wake: Notify::new(),
                underlay: Arc::clone(&underlay),
            });
            install_routes(&self.netlink, &shared).await?;
            underlays
                .entry(key)
                .or_insert_with(|| (underlay, Vec::new()))
                .1
                .push(Arc::clone(&shared));
            self.tunnels.push(shared);
        }
        let configs: Vec<TunnelConfig> = self
            .tunnels
            .iter()
            .map(|sh| sh.core().config().clone())
            .collect();
        let candidates: Vec<kernel::Candidate<'_>> = self
            .tunnels
            .iter()
            .zip(&configs)
            .map(|(sh, config)| kernel::Candidate {
                config,
                tun_ifindex: sh.ifindex,
                datapath: sh.datapath_configured,
            })
            .collect();
        let (kernel, datapaths) =
            kernel::KernelTunnels::start(&self.netlink, site, &candidates).await;
        self.kernel = kernel.map(Mutex::new);
        self.datapaths = datapaths;
        for shared in &self.tunnels {
            self.tasks.push(
                self.watch
                    .spawn("GRE transmit", transmit_task(Arc::clone(shared))),
            );
            self.tasks.push(self.watch.spawn(
                "GRE control",
                control_task(Arc::clone(shared), self.netlink.clone()),
            ));
        }
        for (_, (underlay, tunnels)) in underlays {
            self.tasks.push(self.watch.spawn(
                "GRE receive",
                receive_task(underlay, tunnels, Arc::clone(&reflector)),
            ));
        }
        Ok(())
    }

    /// The first task (transmit, control or receive) that ended while the driver runs,
    /// with its cause; `None` while all of them run. The tunnels it served no longer carry
    /// traffic in that direction: the driver must be stopped and started again.
    pub fn dead_task(&self) -> Option<String> {
        self.watch.dead()
    }

    /// A snapshot of every tunnel.
    pub fn status(&self) -> Vec<GreStatus> {
        let now = now();
        let kernel = self.kernel.as_ref().map(lock_unpoisoned);
        self.tunnels
            .iter()
            .enumerate()
            .map(|(i, sh)| {
                let carried = kernel.as_ref().and_then(|k| k.stats(i));
                let datapath = self.datapaths.get(i);
                let core = sh.core();
                let c = core.config();
                let ka = core.keepalive();
                GreStatus {
                    name: c.name.clone(),
                    local: c.local,
                    remote: c.remote,
                    key: c.key,
                    sequence: c.sequence,
                    checksum: c.checksum,
                    underlay: c.underlay,
                    mtu: c.mtu,
                    offload: sh.offload,
                    up: core.is_up(),
                    down_reason: ka.filter(|k| !k.is_up()).map(|k| {
                        let cfg = k.config();
                        format!(
                            "no keepalive reply to {} probes sent every {:?}",
                            k.misses(),
                            cfg.interval
                        )
                    }),
                    down_for: core.down_since().map(|t| now.saturating_duration_since(t)),
                    keepalive: ka.map(|k| k.config()),
                    last_keepalive: ka
                        .and_then(|k| k.last_reply())
                        .map(|t| now.saturating_duration_since(t)),
                    keepalive_misses: ka.map_or(0, |k| k.misses()),
                    routes: sh.routes(),
                    routes_installed: sh.routes_installed.load(Ordering::Relaxed),
                    counters: with_kernel(core.counters(), carried.as_ref()),
                    datapath: datapath.map_or(Datapath::Tun, DatapathState::datapath),
                    datapath_reason: datapath.map(|d| d.reason.clone()).unwrap_or_default(),
                    kernel: carried,
                    dead_task: self.watch.dead(),
                }
            })
            .collect()
    }

    /// Applies a changed spec to the running tunnel of the same name without dropping it:
    /// MTU (TUN device and MSS clamp), keepalive period/retries/on-off, and routes (the
    /// control task adds and removes the difference with rtnetlink right after this returns).
    ///
    /// Returns [`Reconfigured::NeedsRestart`] with the reason when the change needs the
    /// tunnel to be restarted (no tunnel of that name, or endpoints, key, encap, sequence,
    /// checksum, inner address or offload differ); nothing has been changed then.
    ///
    /// # Errors
    /// Setting the TUN device's MTU failed; the old configuration stays in force.
    pub fn reconfigure(&self, spec: TunnelSpec) -> Result<Reconfigured, DriverError> {
        let Some((index, sh)) = self
            .tunnels
            .iter()
            .enumerate()
            .find(|(_, sh)| sh.core().config().name == spec.tunnel.name)
        else {
            return Ok(Reconfigured::restart(format!(
                "no tunnel {} runs in this driver",
                spec.tunnel.name
            )));
        };
        if spec.address != sh.address {
            return Ok(Reconfigured::restart(
                "changing `address` needs the tunnel to be restarted",
            ));
        }
        if spec.offload != sh.offload_configured {
            return Ok(Reconfigured::restart(
                "changing `offload` needs the tunnel to be restarted",
            ));
        }
        if spec.datapath != sh.datapath_configured {
            return Ok(Reconfigured::restart(
                "changing `datapath` needs the tunnel to be restarted",
            ));
        }
        let mut config = spec.tunnel;
        if config.mtu == 0 {
            config.mtu = config.default_mtu(sh.underlay_mtu);
        }
        {
            let mut core = sh.core();
            let old_mtu = core.config().mtu;
            let mut trial = core.clone();
            let outcome = trial.reconfigure(now(), config.clone());
            if !outcome.is_live() {
                return Ok(outcome);
            }
            if config.mtu != old_mtu {
                sh.tun
                    .set_mtu(config.mtu)
                    .map_err(|source| DriverError::Io {
                        what: "set the TUN device's MTU",
                        source,
                    })?;
                if let Some(k) = &self.kernel {
                    lock_unpoisoned(k).set_mtu(index, config.mtu);
                }
            }
            *core = trial;
            sh.mtu.store(config.mtu, Ordering::Relaxed);
        }
        if spec.routes != sh.routes() {
            *lock_unpoisoned(&sh.pending_routes) = Some(spec.routes);
        }
        // The core may have queued an Up (keepalives turned off) and the timer changed.
        sh.wake.notify_one();
        Ok(Reconfigured::Live)
    }

    /// Stops every task, withdraws the routes and deletes the TUN devices.
    pub async fn stop(mut self) {
        self.watch.stopping();
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            // Cancelled is the expected outcome; the watch caught any panic before.
            let _ = task.await;
        }
        for sh in &self.tunnels {
            withdraw_routes(&self.netlink, sh).await;
        }
        // The links on the TUN devices go before the devices do.
        if let Some(k) = self.kernel.take() {
            k.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unload();
        }
        // Dropping the last reference closes each TUN, which removes the interface.
        self.tunnels.clear();
    }
}

/// The core's counters plus what the kernel programs carried past it.
fn with_kernel(core: &Counters, carried: Option<&KernelCounters>) -> Counters {
    let mut c = core.clone();
    let Some(carried) = carried else {
        return c;
    };
    c.tx_packets += carried.tx_packets;
    c.tx_bytes += carried.tx_bytes;
    c.rx_packets += carried.rx_packets;
    c.rx_bytes += carried.rx_bytes;
    c
}

/// Opens the tunnel's TUN device: one queue, offload if asked and granted.
fn open_tun(
    config: &TunnelConfig,
    address: Option<(Ipv4Addr, u8)>,
    offload: bool,
) -> Result<(AsyncDevice, bool), DriverError> {
    let request = TunRequest {
        ipv4: address,
        ..TunRequest::new(config.name.clone(), config.mtu, offload)
    };
    let tun = netsys::tun::open(&request).map_err(|e| DriverError::OpenTun {
        name: e.name,
        source: e.source,
    })?;
    let device = tun
        .queues
        .into_iter()
        .next()
        .ok_or_else(|| DriverError::OpenTun {
            name: config.name.clone(),
            source: io::Error::other("no TUN queue opened"),
        })?;
    Ok((device, tun.offload))
}

/// IPPROTO_RAW socket (header included) for re-emitting peers' keepalive probes natively.
fn open_reflector() -> Result<Socket, DriverError> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(|source| DriverError::Io {
        what: "open raw socket for keepalive replies",
        source,
    })?;
    socket
        .set_nonblocking(true)
        .map_err(|source| DriverError::Io {
            what: "set raw socket non-blocking",
            source,
        })?;
    Ok(socket)
}

async fn install_routes(netlink: &rtnetlink::Handle, sh: &Shared) -> Result<(), DriverError> {
    for route in sh.routes() {
        add_route_replace(netlink, route_via(route, sh.ifindex)).await?;
    }
    sh.routes_installed.store(true, Ordering::Relaxed);
    Ok(())
}

async fn withdraw_routes(netlink: &rtnetlink::Handle, sh: &Shared) {
    for route in sh.routes() {
        if let Err(e) = del_route_idempotent(netlink, route_via(route, sh.ifindex)).await {
            tracing::warn!(error = %e, "cannot withdraw route");
        }
    }
    sh.routes_installed.store(false, Ordering::Relaxed);
}

/// Moves the installed routes to `new`: only the difference is added and removed, so
/// traffic on routes present in both never sees a gap. While the tunnel is down only the
/// list changes (the routes go in when it comes back up).
async fn replace_routes(netlink: &rtnetlink::Handle, sh: &Shared, new: Vec<IpNet>) {
    let old = std::mem::replace(&mut *lock_unpoisoned(&sh.routes), new.clone());
    if !sh.routes_installed.load(Ordering::Relaxed) {
        return;
    }
    for route in old.iter().filter(|r| !new.contains(r)) {
        if let Err(e) = del_route_idempotent(netlink, route_via(*route, sh.ifindex)).await {
            tracing::warn!(%route, error = %e, "cannot remove route");
        }
    }
    for route in new.iter().filter(|r| !old.contains(r)) {
        match add_route_replace(netlink, route_via(*route, sh.ifindex)).await {
            Ok(()) => tracing::info!(%route, "route added by reload"),
            Err(e) => tracing::warn!(%route, error = %e, "cannot add route"),
        }
    }
}

async fn transmit_task(sh: Arc<Shared>) -> Result<(), String> {
    let Err(e) = transmit_loop(&sh).await;
    let name = sh.core().config().name.clone();
    tracing::error!(tunnel = %name, error = %e, "transmit path stopped");
    Err(format!("tunnel {name}: {e}"))
}

async fn transmit_loop(sh: &Shared) -> io::Result<Infallible> {
    let remote = sh.core().config().remote;
    // Sized for the largest MTU a reconfigure may set later, not just today's.
    let mtu = usize::from(MAX_TUNNEL_MTU);
    let seg_max = if sh.offload { MAX_SEGMENTS } else { 1 };
    let mut original = vec![0u8; VnetHdr::LEN + 65_536];
    let mut bufs = vec![vec![0u8; HEADROOM + mtu.max(1500) + 256]; MAX_BATCH];
    let mut sizes = vec![0usize; MAX_BATCH];
    let mut out: Vec<(usize, core::ops::Range<usize>)> = Vec::with_capacity(MAX_BATCH);
    let mut errors: Vec<(usize, core::ops::Range<usize>)> = Vec::new();
    loop {
        let mut n = sh
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, HEADROOM)
            .await?;
        // Drain what is already queued, so one sendmmsg carries many packets.
        while MAX_BATCH - n >= seg_max {
            match sh
                .tun
                .try_recv_multiple(&mut original, &mut bufs[n..], &mut sizes[n..], HEADROOM)
            {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        out.clear();
        errors.clear();
        {
            let mut core = sh.core();
            for (i, buf) in bufs.iter_mut().enumerate().take(n) {
                match core.encapsulate(buf, HEADROOM..HEADROOM + sizes[i]) {
                    Encap::ToPeer(r) => out.push((i, r)),
                    Encap::ToTun(r) => errors.push((i, r)),
                    Encap::Drop(_) => {}
                }
            }
        }
        let packets: Vec<&[u8]> = out.iter().map(|(i, r)| &bufs[*i][r.clone()]).collect();
        if let Err(e) = sh.underlay.send_batch(&packets, remote).await {
            // The underlay may be unreachable for a while; packets are lost, not the tunnel.
            tracing::debug!(error = %e, "underlay send failed");
        }
        for (i, r) in &errors {
            write_tun_single(sh, &bufs[*i][r.clone()]).await;
        }
    }
}

/// Writes one locally generated packet (an ICMP error) to the TUN.
async fn write_tun_single(sh: &Shared, packet: &[u8]) {
    let result = if sh.offload {
        // An all-zero virtio-net header: no GSO, checksum already complete.
        let mut framed = vec![0u8; VnetHdr::LEN];
        framed.extend_from_slice(packet);
        sh.tun.send(&framed).await
    } else {
        sh.tun.send(packet).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

async fn receive_task(
    underlay: Arc<UnderlaySocket>,
    tunnels: Vec<Arc<Shared>>,
    reflector: Arc<Socket>,
) -> Result<(), String> {
    let Err(e) = receive_loop(&underlay, &tunnels, &reflector).await;
    let names: Vec<String> = tunnels
        .iter()
        .map(|sh| sh.core().config().name.clone())
        .collect();
    tracing::error!(tunnels = %names.join(","), error = %e, "receive path stopped");
    Err(format!("tunnels {}: {e}", names.join(", ")))
}

async fn receive_loop(
    underlay: &UnderlaySocket,
    tunnels: &[Arc<Shared>],
    reflector: &Socket,
) -> io::Result<Infallible> {
    let rx = RxContext {
        underlay,
        demux: Demux::new(tunnels.iter().map(|sh| {
            let core = sh.core();
            (core.config().remote, core.config().key)
        })),
        tunnels,
        reflector,
    };
    // With UDP GRO one receive buffer holds up to 64 datagrams: fewer buffers per call.
    let receives = if underlay.gro {
        GRO_RECEIVES
    } else {
        MAX_BATCH
    };
    let mut raw: Vec<Vec<u8>> = (0..receives).map(|_| vec![0u8; 65_536]).collect();
    let mut lens = [0usize; MAX_BATCH];
    let mut sources = [Ipv4Addr::UNSPECIFIED; MAX_BATCH];
    let mut segments = [0usize; MAX_BATCH];
    let mut gro: Vec<TcpCoalescer> = tunnels.iter().map(|_| TcpCoalescer::default()).collect();
    loop {
        let mut guard = underlay.fd.readable().await?;
        let n = match guard.try_io(|fd| {
            sys::recv_batch(
                fd.as_raw_fd(),
                &mut raw,
                &mut lens,
                &mut sources,
                &mut segments,
            )
        }) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        };
        let now = now();
        // The MTU a partial-checksum super-packet is segmented at (a reload may change it).
        for (sh, g) in tunnels.iter().zip(&mut gro) {
            g.mtu = usize::from(sh.mtu.load(Ordering::Relaxed));
        }
        // recv_batch fills at most raw.len() entries and clamps each length to its buffer.
        for ((buf, &len), (&source, &segment)) in raw
            .iter_mut()
            .zip(&lens)
            .zip(sources.iter().zip(&segments))
            .take(n)
        {
            let step = if segment == 0 { len } else { segment };
            let mut at = 0;
            while at < len {
                let end = (at + step.max(1)).min(len);
                let Some(datagram) = buf.get_mut(at..end) else {
                    break;
                };
                at = end;
                let Some((t, inner)) = rx.decapsulate(now, source, datagram) else {
                    continue;
                };
                let (Some(sh), Some(inner)) = (tunnels.get(t), datagram.get(inner)) else {
                    continue;
                };
                if !sh.offload {
                    write_tun(sh, inner).await;
                } else if let Some(frame) = gro.get_mut(t).and_then(|g| g.push(inner)) {
                    write_tun(sh, frame).await;
                }
            }
        }
        // Nothing waits for the next batch: what was merged so far goes out now.
        for (sh, gro) in tunnels.iter().zip(&mut gro) {
            if let Some(frame) = gro.finish() {
                write_tun(sh, frame).await;
            }
        }
    }
}

/// One TUN write; a failure loses that packet, not the tunnel.
async fn write_tun(sh: &Shared, frame: &[u8]) {
    if let Err(e) = sh.tun.send(frame).await {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

/// What one receive task hands every datagram to: its underlay socket, the tunnels on it
/// (indexed as in `demux`), and the raw socket that re-emits the peers' keepalive probes.
struct RxContext<'a> {
    underlay: &'a UnderlaySocket,
    demux: Demux,
    tunnels: &'a [Arc<Shared>],
    reflector: &'a Socket,
}

impl RxContext<'_> {
    /// Handles one underlay datagram; returns the tunnel index and where in `packet` the
    /// inner packet for its TUN is.
    fn decapsulate(
        &self,
        now: Instant,
        source: Ipv4Addr,
        packet: &mut [u8],
    ) -> Option<(usize, core::ops::Range<usize>)> {
        // Raw IPv4 sockets deliver the (reassembled) IP header; UDP sockets do not.
        let gre_at = match self.underlay.kind {
            Underlay::Gre => Ipv4View::new_unchecked(packet.first_chunk::<20>()?).ihl(),
            Underlay::Udp => 0,
        };
        let gre = packet.get_mut(gre_at..)?;
        let t = self.demux.lookup(source, gre)?;
        let sh = self.tunnels.get(t)?;
        let verdict = sh.core().decapsulate(now, source, gre);
        match verdict {
            Verdict::ToTun(r) => return Some((t, gre_at + r.start..gre_at + r.end)),
            Verdict::Reflect(r) => {
                // The core hands back a probe only after checking its IPv4 header is there.
                let inner = gre.get(r)?;
                let dst = Ipv4View::new_unchecked(inner.first_chunk::<20>()?).dst();
                let dst = SockAddr::from(SocketAddrV4::new(dst, 0));
                if let Err(e) = self.reflector.send_to(inner, &dst) {
                    tracing::debug!(error = %e, "keepalive reflection failed");
                }
            }
            Verdict::KeepaliveReply => sh.wake.notify_one(),
            Verdict::Drop(_) => {}
        }
        None
    }
}

async fn control_task(sh: Arc<Shared>, netlink: rtnetlink::Handle) -> Result<(), Infallible> {
    let mut probe = [0u8; PROBE_BUF_LEN];
    loop {
        let deadline = sh.core().poll_timeout();
        tokio::select! {
            () = netsys::timer::sleep_until(deadline) => {}
            () = sh.wake.notified() => {}
        }
        let now = now();
        let (remote, sent, events) = {
            let mut core = sh.core();
            if core.poll_timeout().is_some_and(|d| d <= now) {
                core.handle_timeout(now);
            }
            let sent = core.poll_transmit(&mut probe);
            let mut events = Vec::new();
            while let Some(e) = core.poll_event() {
                events.push(e);
            }
            (core.config().remote, sent, events)
        };
        if let Some(r) = sent
            && let Err(e) = sh.underlay.send_all(&[&probe[r]], remote).await
        {
            tracing::debug!(error = %e, "keepalive probe not sent");
        }
        let pending = lock_unpoisoned(&sh.pending_routes).take();
        if let Some(routes) = pending {
            replace_routes(&netlink, &sh, routes).await;
        }
        for event in events {
            let name = sh.core().config().name.clone();
            match event {
                TunnelEvent::Down => {
                    tracing::warn!(tunnel = %name, "keepalives unanswered: tunnel down, withdrawing routes");
                    withdraw_routes(&netlink, &sh).await;
                }
                TunnelEvent::Up => {
                    tracing::info!(tunnel = %name, "keepalive reply: tunnel up, installing routes");
                    if let Err(e) = install_routes(&netlink, &sh).await {
                        tracing::warn!(tunnel = %name, error = %e, "cannot install routes");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver task that ends while the driver runs is what `dead_task` reports, named and
    /// with its cause; the ends `stop` causes are not deaths.
    #[tokio::test]
    async fn a_task_death_is_recorded_and_stop_is_not_one() {
        let netlink = netsys::netlink::connect().expect("a netlink socket");
        let mut driver = GreDriver {
            tunnels: Vec::new(),
            datapaths: Vec::new(),
            kernel: None,
            tasks: Vec::new(),
            watch: TaskWatch::new(),
            netlink,
        };
        assert_eq!(driver.dead_task(), None);
        let failing = driver.watch.spawn("GRE receive", async {
            Err::<(), _>(io::Error::other("recvmmsg: bad file descriptor"))
        });
        failing
            .await
            .expect("the watch keeps the failure inside the task");
        let running = driver.watch.spawn(
            "GRE transmit",
            std::future::pending::<Result<(), Infallible>>(),
        );
        driver.tasks.push(running);
        assert_eq!(
            driver.dead_task().as_deref(),
            Some("GRE receive failed: recvmmsg: bad file descriptor")
        );
        let watch = driver.watch.clone();
        driver.stop().await;
        assert_eq!(
            watch.dead().as_deref(),
            Some("GRE receive failed: recvmmsg: bad file descriptor"),
            "the aborted transmit task is not a second death"
        );

        let fresh = TaskWatch::new();
        let driver = GreDriver {
            tunnels: Vec::new(),
            datapaths: Vec::new(),
            kernel: None,
            tasks: vec![fresh.spawn(
                "GRE control",
                std::future::pending::<Result<(), Infallible>>(),
            )],
            watch: fresh.clone(),
            netlink: netsys::netlink::connect().expect("a netlink socket"),
        };
        driver.stop().await;
        assert_eq!(fresh.dead(), None, "a deliberate stop is not a death");
    }
}
