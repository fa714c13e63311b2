//! The TUN driver: creates `nat0`, installs the steering routes, and runs the packet loop
//! around a [`Gateway`]. Only compiled with the `driver` feature.
//!
//! One task owns the gateway. It reads packets from `nat0`, classifies each
//! ([`Gateway::direction`]), lets the core rewrite it in place and writes it back; it wakes for
//! [`Gateway::poll_timeout`]; and it serves commands (`show`, `clear`, arbitrary closures for
//! the parts built on the gateway) between batches. Reads are drained in batches of up to
//! [`BATCH`] packets per wake-up into one reused buffer: no allocation per packet.

mod netlink;
mod sysctl;

use std::net::Ipv4Addr;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{AclRule, Gateway, GatewayConfig, GatewayStats, Translation, Verdict};

/// Packets handled per wake-up before timers and commands get a turn.
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
    /// The packet loop has stopped.
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

type Job = Box<dyn FnOnce(&mut Gateway, Instant) + Send>;

enum Command {
    Run(Job),
    Stop(oneshot::Sender<()>),
}

/// A running gateway: `nat0`, its routes and the packet loop.
#[derive(Debug)]
pub struct NatDriver {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<Result<(), DriverError>>,
    handle: rtnetlink::Handle,
    installed: netlink::Installed,
    tun: String,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Run(_) => "Run",
            Command::Stop(_) => "Stop",
        })
    }
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
        let probe = Gateway::new(now(), gw_cfg.clone())?;
        let public = probe.public_addresses();
        drop(probe);

        let dev = tun_rs::DeviceBuilder::new()
            .name(cfg.tun.clone())
            .mtu(cfg.mtu)
            .enable(true)
            .build_async()
            .map_err(|source| DriverError::OpenTun {
                name: cfg.tun.clone(),
                source,
            })?;
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
        for n in inside_nets {
            if !gw_cfg.inside_networks.contains(&n) {
                gw_cfg.inside_networks.push(n);
            }
        }
        let gw = match Gateway::new(now(), gw_cfg) {
            Ok(gw) => gw,
            Err(e) => {
                installed.remove(&handle).await;
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(run(dev, gw, rx));
        tracing::info!(tun = %cfg.tun, inside = ?cfg.inside, outside = %cfg.outside, "nat gateway running");
        Ok(NatDriver {
            commands: tx,
            task,
            handle,
            installed,
            tun: cfg.tun,
        })
    }

    /// Runs `f` on the gateway between two packet batches and returns its result. This is how
    /// other parts (virtual services) reach their selectors at run time.
    ///
    /// # Errors
    /// [`DriverError::Stopped`] if the loop has ended.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Gateway, Instant) -> R + Send + 'static,
    ) -> Result<R, DriverError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |gw, now| {
            let _ = tx.send(f(gw, now));
        });
        self.commands
            .send(Command::Run(job))
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// A copy of the state for `show nat`.
    ///
    /// # Errors
    /// [`DriverError::Stopped`] if the loop has ended.
    pub async fn snapshot(&self) -> Result<NatSnapshot, DriverError> {
        self.with(|gw, now| NatSnapshot {
            translations: gw.translations(now),
            acl: gw.acl_rules().map(|(r, h)| (r.clone(), h)).collect(),
            acl_implicit_denies: gw.acl_implicit_denies(),
            stats: gw.stats().clone(),
            flows: gw.table().len(),
            mappings: gw.table().mappings(),
            capacity: gw.table().capacity(),
            table_bytes: gw.table().heap_bytes(),
            public_addresses: gw.public_addresses(),
        })
        .await
    }

    /// Flushes dynamic flows (`vipgate nat clear`); returns how many were removed.
    ///
    /// # Errors
    /// [`DriverError::Stopped`] if the loop has ended.
    pub async fn clear(&self) -> Result<usize, DriverError> {
        self.with(|gw, now| gw.clear(now)).await
    }

    /// The TUN's name.
    #[must_use]
    pub fn tun_name(&self) -> &str {
        &self.tun
    }

    /// Stops the loop, removes every rule, route and neighbour entry, and closes the TUN.
    ///
    /// # Errors
    /// The loop's own error, if it had failed.
    pub async fn stop(mut self) -> Result<(), DriverError> {
        let (tx, rx) = oneshot::channel();
        let stopped = self.commands.send(Command::Stop(tx)).await.is_ok();
        if stopped {
            let _ = rx.await;
        }
        let result = match (&mut self.task).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Stopped),
        };
        self.installed.remove(&self.handle).await;
        tracing::info!(tun = %self.tun, "nat gateway stopped");
        result
    }
}

async fn run(
    dev: tun_rs::AsyncDevice,
    mut gw: Gateway,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), DriverError> {
    let mut buf = vec![0u8; 65536];
    loop {
        let deadline = gw.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = dev.recv(&mut buf) => {
                let n = r.map_err(DriverError::Io)?;
                let t = now();
                forward(&dev, &mut gw, t, &mut buf[..n]).await?;
                // Drain what else is queued without another trip through the scheduler.
                for _ in 1..BATCH {
                    match dev.try_recv(&mut buf) {
                        Ok(n) => forward(&dev, &mut gw, t, &mut buf[..n]).await?,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(DriverError::Io(e)),
                    }
                }
            }
            () = sleep => {}
            cmd = commands.recv() => match cmd {
                Some(Command::Run(job)) => job(&mut gw, now()),
                Some(Command::Stop(done)) => {
                    let _ = done.send(());
                    return Ok(());
                }
                None => return Ok(()),
            },
        }
        // quinn's rule: compare with the clock instead of trusting the timer to fire on time.
        if gw.poll_timeout().is_some_and(|d| d <= now()) {
            gw.handle_timeout(now());
        }
    }
}

async fn forward(
    dev: &tun_rs::AsyncDevice,
    gw: &mut Gateway,
    now: Instant,
    pkt: &mut [u8],
) -> Result<(), DriverError> {
    let dir = gw.direction(pkt);
    if gw.handle_packet(now, dir, pkt) == Verdict::Forward {
        match dev.try_send(pkt) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dev.send(pkt).await.map_err(DriverError::Io)?;
            }
            // The kernel refuses single packets for routing reasons (e.g. no route): that is
            // the packet's problem, not the loop's.
            Err(e) => tracing::debug!(error = %e, "nat0 write"),
        }
    }
    Ok(())
}
