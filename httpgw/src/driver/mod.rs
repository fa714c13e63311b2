//! The I/O half: a tokio listener, hyper's HTTP/1.1 server per client connection (reading
//! through the framing guard) or, on a TLS connection that chose `h2` by ALPN, hyper's HTTP/2
//! server, and hyper-util's pooled HTTP/1.1 client to the backends. Every decision is the
//! core's ([`Gateway::decide`]); this module moves bytes, enforces time and size bounds and
//! reports outcomes back.
//!
//! A reload ([`HttpGateway::reconfigure`]) swaps the core's routes and pools in place, under
//! the lock every request takes to be decided, and puts a new [`Shared`] in place for the
//! connections accepted after it: its limits, access log and TLS certificates. A connection
//! keeps the `Shared` it was accepted with, so an open connection (a TLS session, a keep-alive
//! one) is never cut by a reload, and its next request is decided by the new routes.
//!
//! Health: three tasks beside the listener. natgw's checker (the L4 services' one) probes
//! the backends of the pools that have checks; a health task applies what it reports to the
//! core ([`Gateway::handle_check`]) and ends ejections on time ([`Gateway::handle_timeout`],
//! also every [`HEALTH_TICK`] so that slow starts move on in `show http`); a forwarder hands
//! the checker the newest target list after a reload or an operator state change (a watch:
//! a list nobody took yet is replaced, never queued behind). The health task also publishes,
//! per pool, whether it has a live backend ([`HttpGateway::pool_live`], for VRRP).
//!
//! Workers: a listener runs one worker per CPU the process may use (HAProxy's
//! `nbthread`), each on a thread of its own with a single-threaded tokio runtime; one accept
//! loop hands each new connection to the worker with the fewest. A connection is served from
//! its hand-over to its close by that worker, and each worker has its own
//! pooled client to the backends: a request, its backend connection's task and the wake-ups
//! between them stay on one thread (no work stealing, no cross-thread wake-up per request).
//! Shared by the workers: the core (under its lock), the connection slots
//! (`max_connections`), the HTTPS clients and the counters. A worker has its own generation
//! channel; a reload sends each worker its new [`Shared`].
//!
//! Stopping drains: the listening socket closes, idle connections are closed (HTTP/2 with a
//! `GOAWAY`), a busy HTTP/1.1 connection answers its request with `Connection: close` and
//! closes, and whatever is still open after `drain_timeout` is cut.

mod bare;
mod proxied;
mod stream;
pub mod tls;
mod upstream_tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use bare::Plain;
use natgw::health::probe::run_checker;
use natgw::health::{CheckEvent, CheckTargets};
use tokio::sync::mpsc;
use upstream_tls::TlsUpstream;

use natgw::health::TlsCheck;

use crate::health::{CheckKey, Ejection};
use crate::hygiene::{self, Refusal};
use crate::{
    Answer, AttemptFailure, Gateway, GatewayConfig, GatewayStatus, Handshake, Limits, Outcome,
    Reload, ResetBudget, TlsSession, Upstream, Verdict, client_closed,
};
use proxied::SendError;

type Body = BoxBody<Bytes, hyper::Error>;

/// Errors starting a gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The listening socket could not be opened.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddrV4,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A worker thread (or its runtime, or its copy of the listening socket) could not be
    /// set up.
    #[error("http worker: {0}")]
    Worker(std::io::Error),
    /// A pool's `tls` to its backends cannot be set up (its CA file, the system's roots).
    #[error("pool {pool}: tls: {source}")]
    UpstreamTls {
        /// The pool.
        pool: String,
        /// Why.
        source: natgw::health::tls::TlsSetupError,
    },
}

#[allow(clippy::disallowed_methods)] // the driver's one clock read
fn now() -> Instant {
    Instant::now()
}

/// What a connection is served with, fixed when it is accepted (see the module
/// documentation). The gateway, the connection count and the upstream client's connection
/// pool are the listener's, shared by every generation.
struct Shared {
    gateway: Arc<Mutex<Gateway>>,
    limits: Limits,
    access_log: bool,
    client: Client<Plain, Full<Bytes>>,
    /// The HTTPS clients of the pools with `tls`, the listener's: a connection accepted
    /// before a reload reaches the pools that reload made HTTPS.
    tls_clients: Arc<Mutex<TlsClients>>,
    connections: Arc<AtomicU64>,
    /// TLS termination (the same certificates for every worker).
    tls: Option<Arc<Tls>>,
    /// Becomes true when the listener stops: connections finish what they answer and close.
    stopping: watch::Receiver<bool>,
}

/// A TLS listener's certificates, loaded.
struct Tls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// The certificates presented (the leaf of each chain), to tell what a reload changed.
    leaves: Vec<Vec<u8>>,
}

impl Tls {
    /// Reads every certificate and key of `config`, for every worker; `None` without TLS.
    fn load_shared(config: Option<&crate::TlsConfig>) -> Result<Option<Arc<Self>>, tls::TlsError> {
        Ok(config.map(Self::load).transpose()?.map(Arc::new))
    }

    /// Reads every certificate and key.
    fn load(config: &crate::TlsConfig) -> Result<Self, tls::TlsError> {
        let (server, leaves) = tls::server_config(config)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(server),
            handshake_timeout: config.handshake_timeout,
            leaves,
        })
    }
}

fn http_connector(limits: &Limits) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(limits.connect_timeout));
    connector
}

/// A pooled HTTP/1.1 client to the backends over `connector`. It sends a request again by
/// itself only when the pooled connection it took turned out closed before any byte of the
/// request was written (hyper's `retry_canceled_requests`); every other retry is the
/// gateway's decision.
fn pooled<C>(limits: &Limits, connector: C) -> Client<C, Full<Bytes>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(limits.upstream_idle)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// The plain HTTP client to the backends.
fn upstream_client(limits: &Limits) -> Client<Plain, Full<Bytes>> {
    pooled(limits, Plain(http_connector(limits)))
}

/// HTTPS clients to the backends, one per distinct TLS setting.
type TlsClients = HashMap<TlsCheck, Client<TlsUpstream, Full<Bytes>>>;

/// The HTTPS client for one setting; its TLS handshake is bounded by `connect_timeout` as the
/// TCP connection is.
fn tls_client(
    limits: &Limits,
    check: &TlsCheck,
) -> Result<Client<TlsUpstream, Full<Bytes>>, natgw::health::tls::TlsSetupError> {
    let connector = TlsUpstream::new(http_connector(limits), check, limits.connect_timeout)?;
    Ok(pooled(limits, connector))
}

/// Every pool's HTTPS client, each CA file read now.
fn tls_clients(config: &GatewayConfig) -> Result<TlsClients, StartError> {
    let mut clients = TlsClients::new();
    for pool in &config.pools {
        let Some(check) = &pool.tls else { continue };
        if clients.contains_key(check) {
            continue;
        }
        let client =
            tls_client(&config.limits, check).map_err(|source| StartError::UpstreamTls {
                pool: pool.name.clone(),
                source,
            })?;
        clients.insert(check.clone(), client);
    }
    Ok(clients)
}

/// What [`HttpGateway::reconfigure`] changed; its `Display` is the log line's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveReload {
    /// Routes, pools, backends, weights.
    pub routing: Reload,
    /// Limits or the access log changed (for the connections accepted from now on).
    pub limits: bool,
    /// Certificates presented from now on that differ from before (every one when TLS was
    /// added).
    pub certificates: usize,
    /// TLS was added (`Some(true)`) or removed (`Some(false)`).
    pub tls: Option<bool>,
}

impl std::fmt::Display for LiveReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.routing)?;
        if self.limits {
            f.write_str("; limits")?;
        }
        match self.tls {
            Some(true) => f.write_str("; TLS on")?,
            Some(false) => f.write_str("; TLS off")?,
            None => {}
        }
        if self.certificates > 0 {
            write!(f, "; {} new certificate(s)", self.certificates)?;
        }
        Ok(())
    }
}

impl Shared {
    fn gateway(&self) -> std::sync::MutexGuard<'_, Gateway> {
        self.gateway.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running HTTP gateway: one listener and its connections.
pub struct HttpGateway {
    /// Per worker, the generation new connections get; its accept loop reads it.
    current: Vec<watch::Sender<Arc<Shared>>>,
    /// The connection slots, every worker's.
    slots: Arc<Slots>,
    /// Per worker, its connections (served or handed over).
    worker_open: Vec<Arc<AtomicUsize>>,
    local: SocketAddr,
    watch: netutil::task::TaskWatch,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    /// Ends once every worker has ended (drained).
    workers: JoinHandle<()>,
    /// What the health checker probes (sent again after each change).
    targets: watch::Sender<CheckTargets<CheckKey>>,
    /// The checker, the health task and the target forwarder.
    health: Vec<JoinHandle<()>>,
    /// Per pool: whether it has a live backend.
    live: PoolsLive,
}

/// Per pool name, whether it has a live backend (a pool a reload added gets its channel then).
type PoolsLive = Arc<Mutex<HashMap<String, watch::Sender<bool>>>>;

/// Publishes each pool's liveness to whoever follows it.
fn publish_live(gateway: &Gateway, live: &PoolsLive) {
    let mut channels = live.lock().unwrap_or_else(PoisonError::into_inner);
    for (pool, up) in gateway.pools_live() {
        match channels.get(&pool) {
            Some(tx) => {
                tx.send_if_modified(|v| std::mem::replace(v, up) != up);
            }
            None => {
                channels.insert(pool, watch::channel(up).0);
            }
        }
    }
}

/// Longest the health task waits between two looks at the ejections and slow starts.
const HEALTH_TICK: Duration = Duration::from_millis(250);

/// A task that never fails, in the form [`netutil::task::TaskWatch::spawn`] takes.
async fn infallible(task: impl Future<Output = ()>) -> Result<(), Infallible> {
    task.await;
    Ok(())
}

/// Hands the checker each new target list (see the module documentation).
async fn forward_targets(
    mut lists: watch::Receiver<CheckTargets<CheckKey>>,
    checker: mpsc::Sender<CheckTargets<CheckKey>>,
) {
    loop {
        let list = lists.borrow_and_update().clone();
        if checker.send(list).await.is_err() || lists.changed().await.is_err() {
            return;
        }
    }
}

/// Applies the checker's reports and ends ejections on time, logging each change.
async fn apply_health(
    name: String,
    gateway: Arc<Mutex<Gateway>>,
    mut events: mpsc::Receiver<CheckEvent<CheckKey>>,
    live: PoolsLive,
) {
    let lock = || gateway.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        publish_live(&lock(), &live);
        let at = now();
        let next = lock()
            .poll_timeout()
            .map_or(at + HEALTH_TICK, |t| t.min(at + HEALTH_TICK));
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                let change = match &event {
                    CheckEvent::Changed(t) => Some((t.key.clone(), t.health)),
                    _ => None,
                };
                let moved = lock().handle_check(event);
                if let Some((key, health)) = change {
                    tracing::info!(http = %name, backend = %key, ?health, in_rotation_changed = moved, "health check verdict");
                }
            }
            () = tokio::time::sleep(next.saturating_duration_since(at)) => {
                for key in lock().handle_timeout(now()) {
                    tracing::info!(http = %name, backend = %key, "ejection over");
                }
            }
        }
    }
}

/// Logs what passive ejection did.
fn log_ejection(e: &Ejection) {
    if e.spared {
        tracing::warn!(backend = %e.key, errors = e.errors, last = %e.last, "not ejected: the pool's last live backend");
    } else {
        tracing::warn!(backend = %e.key, errors = e.errors, last = %e.last, "backend ejected");
    }
}

impl std::fmt::Debug for HttpGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGateway")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl HttpGateway {
    /// Binds the listener and starts accepting.
    ///
    /// # Errors
    /// [`StartError`] for a bad configuration or a listener that cannot be bound.
    pub async fn start(config: &GatewayConfig) -> Result<Self, StartError> {
        let gateway = Gateway::new(config)?;
        let (stop, stopped) = watch::channel(false);
        let tls = Tls::load_shared(config.tls.as_ref())?;
        let tls_clients = Arc::new(Mutex::new(tls_clients(config)?));
        let listener = bind(config.listen).map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let (targets, target_lists) = watch::channel(gateway.check_targets());
        let live = PoolsLive::default();
        publish_live(&gateway, &live);
        let gateway = Arc::new(Mutex::new(gateway));
        let connections = Arc::new(AtomicU64::new(0));
        let slots = Arc::new(Slots::new(config.limits.max_connections));
        let mut current = Vec::new();
        let mut links = Vec::new();
        let mut worker_open = Vec::new();
        let mut ends = Vec::new();
        for worker in 0..worker_count() {
            let shared = Arc::new(Shared {
                gateway: Arc::clone(&gateway),
                limits: config.limits,
                access_log: config.access_log,
                client: upstream_client(&config.limits),
                tls_clients: Arc::clone(&tls_clients),
                connections: Arc::clone(&connections),
                tls: tls.clone(),
                stopping: stopped.clone(),
            });
            let (sender, generations) = watch::channel(shared);
            let (link, end) =
                spawn_worker(worker, generations, stopped.clone()).map_err(StartError::Worker)?;
            current.push(sender);
            worker_open.push(Arc::clone(&link.open));
            links.push(link);
            ends.push(end);
        }
        let watch = netutil::task::TaskWatch::new();
        let accept = watch.spawn(
            "http accept loop",
            accept_loop(listener, links, stopped, Arc::clone(&slots)),
        );
        let workers = watch.spawn("http workers", until_workers_end(ends));
        let (lists_tx, lists_rx) = mpsc::channel(1);
        let (events_tx, events_rx) = mpsc::channel(64);
        let health = vec![
            watch.spawn(
                "http health checker",
                infallible(run_checker(lists_rx, events_tx)),
            ),
            watch.spawn(
                "http health targets",
                infallible(forward_targets(target_lists, lists_tx)),
            ),
            watch.spawn(
                "http health",
                infallible(apply_health(
                    config.name.clone(),
                    gateway,
                    events_rx,
                    Arc::clone(&live),
                )),
            ),
        ];
        Ok(Self {
            current,
            slots,
            worker_open,
            local,
            watch,
            stop,
            accept,
            workers,
            targets,
            health,
            live,
        })
    }

    /// The address it listens on (the port chosen when configured as 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Counters and backend states.
    #[must_use]
    pub fn status(&self) -> GatewayStatus {
        let shared = Arc::clone(&self.current[0].borrow());
        let mut status = shared.gateway().status(now());
        status.connections = shared.connections.load(Ordering::Relaxed);
        status.workers = self
            .worker_open
            .iter()
            .map(|open| open.load(Ordering::Relaxed) as u64)
            .collect();
        status
    }

    /// Applies `config` to the running listener (a reload; its listen address is not
    /// looked at: moving the listener takes a new gateway). Certificates and keys are read
    /// again, even from unchanged paths. Requests already forwarded finish against their
    /// backends and open connections stay; requests decided from now on take the new routes,
    /// connections accepted from now on the new limits and certificates. Nothing changes if
    /// it is refused.
    ///
    /// # Errors
    /// [`StartError::Config`] or [`StartError::Tls`] (a certificate or key that cannot be
    /// used): the old configuration keeps running.
    pub fn reconfigure(&self, config: &GatewayConfig) -> Result<LiveReload, StartError> {
        let current = Arc::clone(&self.current[0].borrow());
        let tls = Tls::load_shared(config.tls.as_ref())?;
        // Read again as certificates are: a rewritten CA file applies; the pooled HTTPS
        // connections are opened anew.
        let upstream_tls = tls_clients(config)?;
        let routing = {
            let mut gateway = current.gateway();
            let routing = gateway.reconfigure(config)?;
            self.targets.send_replace(gateway.check_targets());
            publish_live(&gateway, &self.live);
            routing
        };
        *current
            .tls_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream_tls;
        let certificates = match (&current.tls, &tls) {
            (Some(old), Some(new)) => new
                .leaves
                .iter()
                .filter(|leaf| !old.leaves.contains(leaf))
                .count(),
            (None, Some(new)) => new.leaves.len(),
            _ => 0,
        };
        let same_client = config.limits.upstream_idle == current.limits.upstream_idle
            && config.limits.connect_timeout == current.limits.connect_timeout;
        let reload = LiveReload {
            routing,
            limits: config.limits != current.limits || config.access_log != current.access_log,
            certificates,
            tls: (current.tls.is_some() != tls.is_some()).then_some(tls.is_some()),
        };
        self.slots.resize(config.limits.max_connections);
        for sender in &self.current {
            let current = Arc::clone(&sender.borrow());
            let client = if same_client {
                current.client.clone()
            } else {
                upstream_client(&config.limits)
            };
            sender.send_replace(Arc::new(Shared {
                gateway: Arc::clone(&current.gateway),
                limits: config.limits,
                access_log: config.access_log,
                client,
                tls_clients: Arc::clone(&current.tls_clients),
                connections: Arc::clone(&current.connections),
                tls: tls.clone(),
                stopping: current.stopping.clone(),
            }));
        }
        Ok(reload)
    }

    /// Sets a backend's operator state; see [`Gateway::set_backend_state`].
    ///
    /// # Errors
    /// An unknown pool or backend.
    pub fn set_backend_state(
        &self,
        pool: &str,
        addr: SocketAddrV4,
        state: balance::AdminState,
    ) -> Result<bool, crate::CommandError> {
        let current = Arc::clone(&self.current[0].borrow());
        let mut gateway = current.gateway();
        let changed = gateway.set_backend_state(pool, addr, state)?;
        // Maintenance stops the checks of a backend, back to ready starts them again.
        self.targets.send_replace(gateway.check_targets());
        Ok(changed)
    }

    /// Follows whether pool `pool` has a live backend (VRRP `track_services`); `None` for a
    /// pool it does not have. Updated within a quarter of a second of a change.
    #[must_use]
    pub fn pool_live(&self, pool: &str) -> Option<watch::Receiver<bool>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pool)
            .map(watch::Sender::subscribe)
    }

    /// The accept loop's death, if it ended while it should run.
    #[must_use]
    pub fn dead(&self) -> Option<String> {
        self.watch.dead()
    }

    /// Stops listening and drains: requests in flight get `drain_timeout` to finish (see
    /// the module documentation); returns once every connection is closed.
    pub async fn stop(self) {
        self.watch.stopping();
        for task in &self.health {
            task.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        let _ = self.workers.await;
    }
}

/// The listener, bound with `IP_FREEBIND` so that a VIP can be listed before VRRP brings the
/// address up (HAProxy's `bind ... freebind`): connections arrive once it is.
fn bind(addr: SocketAddrV4) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_freebind_v4(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// How many workers a listener runs: one per CPU this process may run on (its affinity and
/// its cgroup's quota, as the standard library counts them).
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A connection taken from the listening socket, on its way to a worker with its slot. Not
/// registered with any runtime (non-blocking): the worker registers it with its own.
struct Accepted {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
}

/// The accept loop's side of a worker: its queue, and how many connections it has (being
/// served or queued), to give the next one to the least busy.
struct WorkerLink {
    queue: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
}

/// Starts worker `index`: a thread with a single-threaded runtime running [`worker_loop`].
/// The receiver gets how the loop ended; it sees the sender dropped if the thread panicked.
fn spawn_worker(
    index: usize,
    generations: watch::Receiver<Arc<Shared>>,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<(WorkerLink, oneshot::Receiver<std::io::Result<()>>)> {
    let (queue, accepted) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    let (ended, end) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let worker_open = Arc::clone(&open);
    std::thread::Builder::new()
        .name(format!("http-worker-{index}"))
        .spawn(move || {
            let result = runtime.block_on(worker_loop(accepted, worker_open, generations, stopped));
            let _ = ended.send(result);
        })?;
    Ok((WorkerLink { queue, open }, end))
}

/// Waits for every worker to end; the first that failed (or whose thread panicked) ends the
/// wait with its error, for the task watch to record.
async fn until_workers_end(
    workers: Vec<oneshot::Receiver<std::io::Result<()>>>,
) -> Result<(), std::io::Error> {
    let mut ends = JoinSet::new();
    for end in workers {
        ends.spawn(end);
    }
    while let Some(end) = ends.join_next().await {
        match end {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) | Err(_) => return Err(std::io::Error::other("worker thread panicked")),
        }
    }
    Ok(())
}

/// A listener's connection slots (`max_connections`), taken by the accept loop and given
/// back as connections close, on any worker. A reload that lowers the maximum takes the free
/// slots away at once; the ones held then are owed, and each is forgotten as the accept loop
/// gets it back.
struct Slots {
    permits: Arc<Semaphore>,
    /// The maximum now, and the slots still owed.
    books: Mutex<(u32, u32)>,
}

impl Slots {
    fn new(max: u32) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            books: Mutex::new((max, 0)),
        }
    }

    /// Makes `wanted` the maximum.
    fn resize(&self, wanted: u32) {
        let mut books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        let (max, owed) = &mut *books;
        if wanted > *max {
            let more = wanted - *max;
            let paid = more.min(*owed);
            *owed -= paid;
            self.permits.add_permits((more - paid) as usize);
        } else if wanted < *max {
            let fewer = *max - wanted;
            let taken = u32::try_from(self.permits.forget_permits(fewer as usize)).unwrap_or(fewer);
            *owed += fewer - taken.min(fewer);
        }
        *max = wanted;
    }

    /// Whether a slot just taken pays a debt (and must be forgotten, not used).
    fn pays_debt(&self) -> bool {
        let mut books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        let owed = &mut books.1;
        let pays = *owed > 0;
        *owed = owed.saturating_sub(1);
        pays
    }
}

/// Takes connections (each once it has a slot) and hands each to the worker with the fewest
/// (ties: the next in turn), as HAProxy's listener hands a connection to its least loaded
/// thread; a worker never serves more than its share while another idles. Ends on stop,
/// closing the listening socket (new connections are refused from then on).
async fn accept_loop(
    listener: std::net::TcpListener,
    workers: Vec<WorkerLink>,
    mut stopped: watch::Receiver<bool>,
    slots: Arc<Slots>,
) -> Result<(), std::io::Error> {
    let listener = TcpListener::from_std(listener)?;
    let mut turn = 0;
    loop {
        let slot = tokio::select! {
            p = Arc::clone(&slots.permits).acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = stopped.changed() => return Ok(()),
        };
        if slots.pays_debt() {
            slot.forget();
            continue;
        }
        let accepted = tokio::select! {
            // Taken off this runtime at once: the worker registers it with its own.
            a = listener.accept() => a.and_then(|(tcp, peer)| Ok((tcp.into_std()?, peer))),
            _ = stopped.changed() => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: not fatal.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let n = workers.len();
        turn = (turn + 1) % n;
        let worker = (0..n)
            .map(|k| &workers[(turn + k) % n])
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .unwrap_or(&workers[0]);
        worker.open.fetch_add(1, Ordering::Relaxed);
        if worker.queue.send(Accepted { tcp, peer, slot }).is_err() {
            return Err(std::io::Error::other("a worker is gone"));
        }
    }
}

/// A worker: serves the connections the accept loop hands it, on its own runtime; on stop
/// (or once the accept loop is gone), drains them.
async fn worker_loop(
    mut accepted: mpsc::UnboundedReceiver<Accepted>,
    open: Arc<AtomicUsize>,
    generations: watch::Receiver<Arc<Shared>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    // Dropping the set on return aborts the connections still open.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let next = tokio::select! {
            a = accepted.recv() => a,
            _ = stopped.wait_for(|s| *s) => None,
        };
        let Some(Accepted { tcp, peer, slot }) = next else {
            return drain(connections, &generations).await;
        };
        let shared = Arc::clone(&generations.borrow());
        let open = Arc::clone(&open);
        let tcp = match TcpStream::from_std(tcp) {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!("http connection: {e}");
                open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
        };
        connections.spawn(async move {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            accept(&shared, tcp, peer).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

/// Waits for a worker's connections (each closing once it has answered what it was
/// answering) for at most the drain timeout; the ones still open are cut as the set drops.
async fn drain(
    mut connections: JoinSet<()>,
    generations: &watch::Receiver<Arc<Shared>>,
) -> Result<(), std::io::Error> {
    let timeout = generations.borrow().limits.drain_timeout;
    let open = connections.len();
    if open > 0 {
        let requests = generations.borrow().gateway().in_flight();
        tracing::info!(
            connections = open,
            requests,
            "http: stopping; draining for at most {timeout:?}"
        );
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, connections.join_next()).await {}
    if !connections.is_empty() {
        tracing::warn!(
            connections = connections.len(),
            "http: drain timeout; cutting the connections still open"
        );
    }
    Ok(())
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

/// What the requests of one client connection share.
#[derive(Default)]
struct Conn {
    /// `Some(sni)` over TLS.
    tls: Option<Option<Arc<str>>>,
    /// The backend's side of a switch passed on to the client (a `101`): once hyper is done
    /// with the connection, it becomes a tunnel to it.
    tunnel: Mutex<Option<OnUpgrade>>,
    /// An HTTP/2 connection's streams.
    h2: Option<Streams>,
    /// HTTP/1.1: a second handle on the client's socket, to notice it closing while a
    /// request waits for its backend (hyper does not read the socket then). Kept out of the
    /// reactor until a request has waited [`CLOSING_WATCH_AFTER`] ([`wait_upstream`]):
    /// registered, it would double every readiness event of the connection and cost a `recv`
    /// per request.
    closing: Option<std::net::TcpStream>,
    /// Its own connections to the backends of pools with `proxy_protocol`.
    kept: proxied::Kept,
}

impl Conn {
    /// Resolves once the client of an HTTP/1.1 connection has closed it (its socket reads
    /// as ended or reset, nothing before that); never if the socket cannot be watched or
    /// holds bytes (a pipelined request: the client is there).
    async fn client_gone(&self) {
        let Some(watch) = &self.closing else {
            return std::future::pending().await;
        };
        // A second duplicate, registered for this wait only (dropped with it).
        let Some(tcp) = watch
            .try_clone()
            .ok()
            .and_then(|d| TcpStream::from_std(d).ok())
        else {
            return std::future::pending().await;
        };
        let mut byte = [0u8; 1];
        if let Ok(1..) = tcp.peek(&mut byte).await {
            std::future::pending::<()>().await;
        }
    }
}

/// How long a request waits for its backend before its client's socket is watched for a
/// close: most answers come sooner, and a cancel is still noticed (and the backend's
/// request dropped) this long after the client left.
const CLOSING_WATCH_AFTER: Duration = Duration::from_millis(20);

/// How a request sent to a backend ended for the client waiting for it.
enum Waited<T> {
    Answered(T),
    TimedOut,
    /// The client closed its connection ([`Conn::client_gone`]).
    ClientGone,
}

/// Waits for `request` for at most `timeout`, watching the client's socket for a close from
/// [`CLOSING_WATCH_AFTER`] on. One timer serves both (first the watch's start, then reset to
/// the deadline): every request waits, so a second timer would be armed and cancelled on
/// each. The request is polled first, as `tokio::time::timeout` polls it.
async fn wait_upstream<T>(
    conn: &Conn,
    timeout: Duration,
    request: impl Future<Output = T>,
) -> Waited<T> {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let watch = conn.closing.is_some() && CLOSING_WATCH_AFTER < timeout;
    let timer = tokio::time::sleep_until(if watch {
        start + CLOSING_WATCH_AFTER
    } else {
        deadline
    });
    tokio::pin!(request, timer);
    if watch {
        tokio::select! {
            biased;
            out = &mut request => return Waited::Answered(out),
            () = &mut timer => timer.as_mut().reset(deadline),
        }
    }
    tokio::select! {
        biased;
        out = &mut request => Waited::Answered(out),
        () = &mut timer => Waited::TimedOut,
        () = conn.client_gone(), if watch => Waited::ClientGone,
    }
}

/// The handle [`Conn::client_gone`] watches: the client's socket, duplicated (only peeked
/// at; closing the duplicate does not close the connection). It shares the open file with
/// tokio's socket, so it is non-blocking as that one is.
fn closing_watch(tcp: &TcpStream) -> Option<std::net::TcpStream> {
    let fd = tcp.as_fd().try_clone_to_owned().ok()?;
    Some(std::net::TcpStream::from(fd))
}

/// The streams of one HTTP/2 connection: how many are being answered, since when none is,
/// and the client's cancellations against their budget.
struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    resets: Mutex<ResetBudget>,
    /// Signalled once the client has cancelled more streams than its budget.
    flood: Notify,
}

impl Streams {
    fn new(limits: &Limits) -> Self {
        Self {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(now()),
            resets: Mutex::new(ResetBudget::new(limits.max_cancels())),
            flood: Notify::new(),
        }
    }

    /// How long no stream has been answered (zero while one is).
    fn idle_for(&self, now: Instant) -> Duration {
        if self.open.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        now.saturating_duration_since(since)
    }

    fn cancelled(&self, now: Instant) {
        let over = self
            .resets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancelled(now);
        if over {
            self.flood.notify_one();
        }
    }
}

/// A stream of an HTTP/2 connection being answered, from its request to the end of its
/// response body (a long download keeps the connection from counting as idle).
struct OpenStream(Arc<Conn>);

impl OpenStream {
    fn enter(conn: Arc<Conn>) -> Self {
        if let Some(streams) = &conn.h2 {
            streams.open.fetch_add(1, Ordering::Relaxed);
        }
        Self(conn)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(streams) = &self.0.h2 {
            *streams
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = now();
            streams.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Streams reset by the client before hyper took them, held at most, and streams the
/// gateway had to reset for the client's protocol errors over a connection's life: past
/// either, the HTTP/2 layer sends `GOAWAY` (`ENHANCE_YOUR_CALM`). hyper's defaults, stated.
const MAX_PENDING_RESETS: usize = 20;
const MAX_ERROR_RESETS: usize = 1024;

/// One accepted connection: the TLS handshake first on a TLS listener (bounded by its
/// timeout, counted), then HTTP.
async fn accept(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let (Some(peer), Some(local)) = (v4(peer), tcp.local_addr().ok().and_then(v4)) else {
        return;
    };
    let _ = tcp.set_nodelay(true);
    let Some(Tls {
        acceptor,
        handshake_timeout: timeout,
        ..
    }) = shared.tls.as_deref()
    else {
        let conn = Conn {
            closing: closing_watch(&tcp),
            ..Conn::default()
        };
        serve(shared, tcp, peer, local, conn).await;
        return;
    };
    let closing = closing_watch(&tcp);
    let stream = match tokio::time::timeout(*timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            shared.gateway().handshake(Handshake::Failed);
            tracing::debug!(client = %peer, "TLS handshake: {e}");
            return;
        }
        Err(_) => {
            shared.gateway().handshake(Handshake::TimedOut);
            tracing::debug!(client = %peer, "TLS handshake timed out");
            return;
        }
    };
    shared.gateway().handshake(Handshake::Done);
    let session = stream.get_ref().1;
    let sni = session
        .server_name()
        .map(|n| Arc::from(n.to_ascii_lowercase()));
    if session.alpn_protocol() == Some(b"h2") {
        let conn = Conn {
            tls: Some(sni),
            h2: Some(Streams::new(&shared.limits)),
            ..Conn::default()
        };
        serve_h2(shared, stream, peer, local, conn).await;
        return;
    }
    let conn = Conn {
        tls: Some(sni),
        closing,
        ..Conn::default()
    };
    serve(shared, stream, peer, local, conn).await;
}

/// Serves an HTTP/2 connection: at most `max_streams` streams at once, heads bounded by the
/// header list size (and then by the gateway as HTTP/1.1 heads are), the connection sent
/// away once no stream has been open for the header timeout, or once its client cancels
/// streams faster than its budget (rapid reset); then given the header timeout to finish.
async fn serve_h2<S>(
    shared: &Arc<Shared>,
    io: S,
    peer: SocketAddrV4,
    local: SocketAddrV4,
    conn: Conn,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits;
    shared.gateway().h2_connection();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.h2_header_list_size())
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS)
        // A peer that stops answering pings while its streams wait is gone.
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let conn = Arc::new(conn);
    let svc_shared = Arc::clone(shared);
    let svc_conn = Arc::clone(&conn);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        let conn = Arc::clone(&svc_conn);
        async move {
            let open = OpenStream::enter(Arc::clone(&conn));
            let res = handle(&shared, peer, local, &conn, req).await;
            // The stream stays open while its body is sent: the guard goes with the body.
            Ok::<_, Infallible>(res.map(|body| {
                body.map_frame(move |frame| {
                    let _open = &open;
                    frame
                })
                .boxed()
            }))
        }
    });
    let Some(streams) = conn.h2.as_ref() else {
        return;
    };
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let period = (limits.header_timeout / 4).max(Duration::from_millis(25));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = shared.stopping.clone();
    let (flood, grace) = loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    if is_reset_flood(&e) {
                        shared.gateway().reset_flood();
                    }
                    tracing::debug!(client = %peer, "http/2 connection: {e}");
                }
                return;
            }
            () = streams.flood.notified() => break (true, limits.header_timeout),
            _ = stopping.wait_for(|s| *s) => break (false, limits.drain_timeout),
            _ = tick.tick() => {
                if streams.idle_for(now()) >= limits.header_timeout {
                    break (false, limits.header_timeout);
                }
            }
        }
    };
    if flood {
        shared.gateway().reset_flood();
        tracing::debug!(client = %peer, "http/2 client cancels streams too fast: GOAWAY");
    }
    served.as_mut().graceful_shutdown();
    if tokio::time::timeout(grace, served).await.is_err() {
        tracing::debug!(client = %peer, "http/2 connection did not finish after GOAWAY: closed");
    }
}

/// Whether hyper's HTTP/2 layer ended the connection for the client's resets (its own
/// bounds, [`MAX_PENDING_RESETS`] and [`MAX_ERROR_RESETS`]).
fn is_reset_flood(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = s.source();
    }
    false
}

async fn serve<S>(shared: &Arc<Shared>, io: S, peer: SocketAddrV4, local: SocketAddrV4, conn: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits;
    let io = TokioIo::new(stream::GuardedStream::new(io, limits.max_header_bytes));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // The guard already bounds a head; hyper's buffer only has to hold one.
        .max_buf_size((limits.max_header_bytes + 1024).max(8192))
        .keep_alive(true)
        // A guard refusal reads as the client's EOF: hyper must still answer the requests
        // before it (it would drop them on an EOF without half-close).
        .half_close(true);
    let svc_shared = Arc::clone(shared);
    let conn = Arc::new(conn);
    let svc_conn = Arc::clone(&conn);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        let conn = Arc::clone(&svc_conn);
        // Boxed: polling the connection by hand (to shut it down gracefully) needs an
        // `Unpin` future.
        Box::pin(async move { Ok::<_, Infallible>(handle(&shared, peer, local, &conn, req).await) })
    });
    let mut served = builder.serve_connection(io, service);
    let mut stopping = shared.stopping.clone();
    let mut shutting = false;
    let done = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| served.poll_without_shutdown(cx)) => break r,
            // Closes an idle connection now, a busy one once it has answered.
            _ = stopping.wait_for(|s| *s), if !shutting => {
                std::pin::Pin::new(&mut served).graceful_shutdown();
                shutting = true;
            }
        }
    };
    let parts = match done {
        Ok(()) => served.into_parts(),
        Err(e) => {
            tracing::debug!(client = %peer, "http connection: {e}");
            return;
        }
    };
    let guarded = parts.io.into_inner();
    let switched = conn
        .tunnel
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(upstream) = switched {
        let (client, mut first) = guarded.into_tunnel();
        let mut early = parts.read_buf.to_vec();
        early.append(&mut first);
        tunnel(shared, peer, client, early, upstream).await;
        return;
    }
    let refusal = guarded.refused_head();
    let cut = guarded.refused();
    let mut stream = guarded.into_inner();
    if let Some(refusal) = refusal {
        shared.gateway().refused(refusal.status);
        log(
            shared,
            peer,
            "-",
            "-",
            refusal.status,
            refusal.reason,
            Duration::ZERO,
        );
        let _ = stream.write_all(&refusal_bytes(refusal)).await;
    } else if cut {
        tracing::debug!(client = %peer, "http connection cut: malformed body framing");
    }
    let _ = stream.shutdown().await;
}

/// Splices a switched connection to its backend until either side closes or no byte passes
/// for the tunnel timeout; `early` (client bytes read before the switch) goes first.
async fn tunnel<S>(shared: &Shared, peer: SocketAddrV4, client: S, early: Vec<u8>, up: OnUpgrade)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.limits;
    let upstream = match tokio::time::timeout(limits.upstream_timeout, up).await {
        Ok(Ok(u)) => TokioIo::new(u),
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, "upgrade: {e}");
            return;
        }
        Err(_) => return,
    };
    match splice(client, upstream, early, limits.tunnel_timeout).await {
        Ok((up, down)) => {
            tracing::debug!(client = %peer, up, down, "tunnel closed");
        }
        Err(e) => tracing::debug!(client = %peer, "tunnel: {e}"),
    }
}

/// Copies both ways between `a` and `b` (`early` to `b` first) until both directions have
/// ended (an EOF is passed on as a write shutdown), or nothing moves for `idle`. Returns the
/// bytes copied a → b and b → a.
async fn splice<A, B>(a: A, b: B, early: Vec<u8>, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel idle");
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::time::timeout(idle, bw.write_all(&early))
        .await
        .map_err(|_| timed_out())??;
    let (mut abuf, mut bbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    let (mut up, mut down) = (early.len() as u64, 0u64);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => {
                let n = r?;
                if n == 0 {
                    a_open = false;
                    let _ = bw.shutdown().await;
                } else {
                    tokio::time::timeout(idle, bw.write_all(&abuf[..n]))
                        .await
                        .map_err(|_| timed_out())??;
                    up += n as u64;
                }
            }
            r = br.read(&mut bbuf), if b_open => {
                let n = r?;
                if n == 0 {
                    b_open = false;
                    let _ = aw.shutdown().await;
                } else {
                    tokio::time::timeout(idle, aw.write_all(&bbuf[..n]))
                        .await
                        .map_err(|_| timed_out())??;
                    down += n as u64;
                }
            }
            () = tokio::time::sleep(idle) => return Err(timed_out()),
        }
    }
    Ok((up, down))
}

/// The answer to a head the guard refused: hyper never saw it, so it is written here.
fn refusal_bytes(refusal: Refusal) -> Vec<u8> {
    let reason = refusal.status.canonical_reason().unwrap_or("Error");
    let body = format!("{} {reason}: {}\n", refusal.status.as_u16(), refusal.reason);
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        refusal.status.as_u16(),
        body.len()
    )
    .into_bytes()
}

fn text(status: StatusCode, detail: &str, close: bool) -> Response<Body> {
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!("{} {reason}: {detail}\n", status.as_u16());
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Whether [`log`] would print anything (the access log's level is enabled).
fn access_logged(shared: &Shared) -> bool {
    if shared.access_log {
        tracing::enabled!(target: "httpgw::access", tracing::Level::INFO)
    } else {
        tracing::enabled!(target: "httpgw::access", tracing::Level::DEBUG)
    }
}

fn log(
    shared: &Shared,
    client: SocketAddrV4,
    request: &str,
    route: &str,
    status: StatusCode,
    to: &str,
    took: Duration,
) {
    let ms = took.as_secs_f64() * 1000.0;
    if shared.access_log {
        tracing::info!(target: "httpgw::access", %client, request, route, status = status.as_u16(), to, ms);
    } else {
        tracing::debug!(target: "httpgw::access", %client, request, route, status = status.as_u16(), to, ms);
    }
}

/// A request being answered. Dropped before it is marked done, its client cancelled it:
/// hyper drops the answer of an HTTP/2 stream the client reset, or of a connection gone. It
/// is then counted and logged as 499, its backend (if it had one) released without a
/// failure, and on HTTP/2 charged to the connection's reset budget.
struct InFlight<'a> {
    shared: &'a Shared,
    conn: &'a Conn,
    client: SocketAddrV4,
    line: &'a str,
    started: Instant,
    /// The backend it was forwarded to, while waiting for its answer.
    upstream: Option<Upstream>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = now();
        let (route, to) = match self.upstream.take() {
            Some(up) => {
                let mut gateway = self.shared.gateway();
                gateway.finish(now, &up, Outcome::Cancelled);
                (gateway.route_name(up.route), up.addr.to_string())
            }
            None => {
                self.shared.gateway().cancelled();
                ("-".to_owned(), "client cancelled".to_owned())
            }
        };
        log(
            self.shared,
            self.client,
            self.line,
            &route,
            client_closed(),
            &to,
            self.started.elapsed(),
        );
        if let Some(streams) = &self.conn.h2 {
            streams.cancelled(now);
        }
    }
}

/// Answers one request. A request asking to upgrade gets the switch (`101`, then the
/// connection is a tunnel) or an answer that closes the connection: the framing guard holds
/// back what the client sent after it. HTTP/2 has no upgrade (its connection-specific
/// fields make a request malformed, refused by the HTTP/2 layer) and no `Connection` field.
async fn handle(
    shared: &Arc<Shared>,
    client: SocketAddrV4,
    local: SocketAddrV4,
    conn: &Conn,
    req: Request<Incoming>,
) -> Response<Body> {
    let version = req.version();
    let h2 = version == Version::HTTP_2;
    let asked = !h2 && hygiene::upgrade_requested(req.headers());
    // The request line, for the access log only: not built when nothing would print it.
    let line = if access_logged(shared) {
        let target = if h2 {
            req.uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string)
        } else {
            req.uri().to_string()
        };
        format!("{} {target} {version:?}", req.method())
    } else {
        String::new()
    };
    let mut flight = InFlight {
        shared,
        conn,
        client,
        line: &line,
        started: now(),
        upstream: None,
        done: false,
    };
    let Some(mut res) = answer(shared, local, conn, &mut flight, req).await else {
        // Counted and logged as the flight drops; the answer goes nowhere.
        drop(flight);
        return text(client_closed(), "client closed request", true);
    };
    flight.done = true;
    if h2 {
        res.headers_mut().remove(header::CONNECTION);
    } else if res.status() != StatusCode::SWITCHING_PROTOCOLS
        && (asked || *shared.stopping.borrow())
    {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Reads a request body of at most `limit` bytes, each read within `idle` of the last;
/// `Ok(None)`: the client went away in the middle of it.
async fn read_body(body: Incoming, limit: usize, idle: Duration) -> Result<Option<Bytes>, Refusal> {
    let mut body = Limited::new(body, limit);
    let mut read = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    reason: "request body timed out",
                });
            }
            Ok(None) => return Ok(Some(Bytes::from(read))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) if e.is::<LengthLimitError>() => {
                return Err(Refusal {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    reason: "body too large",
                });
            }
            Ok(Some(Err(e))) if client_went_away(&*e) => return Ok(None),
            Ok(Some(Err(_))) => return Err(Refusal::bad("body unreadable")),
        }
    }
}

/// `scheme://addr` and `path_and_query`: written once into a buffer of its exact size, which
/// the URI keeps as it is (a `String` formatted and parsed would be copied, and grown on the
/// way).
fn absolute_uri(
    scheme: &str,
    addr: SocketAddrV4,
    path_and_query: &str,
) -> Result<http::Uri, http::uri::InvalidUri> {
    use std::io::Write as _;
    const LONGEST: usize = "255.255.255.255:65535".len();
    let mut authority = [0u8; LONGEST];
    let len = {
        let mut rest = &mut authority[..];
        // The longest address fits.
        let _fits = write!(rest, "{addr}");
        LONGEST - rest.len()
    };
    let mut uri = Vec::with_capacity(scheme.len() + "://".len() + len + path_and_query.len());
    uri.extend_from_slice(scheme.as_bytes());
    uri.extend_from_slice(b"://");
    uri.extend_from_slice(&authority[..len]);
    uri.extend_from_slice(path_and_query.as_bytes());
    http::Uri::try_from(uri)
}

/// A copy of a request head for an attempt that may be retried (its method and fields; the
/// target and version are set per attempt).
fn copy_head(head: &http::request::Parts) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = head.method.clone();
    *copy.headers_mut() = head.headers.clone();
    copy.into_parts().0
}

/// The HTTPS client of a TLS setting. A request decided before a reload and retried after it
/// may name a setting the reload dropped: its client is built then (reading its CA file).
fn https_client(shared: &Shared, check: &TlsCheck) -> Option<Client<TlsUpstream, Full<Bytes>>> {
    let mut clients = shared
        .tls_clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(client) = clients.get(check) {
        return Some(client.clone());
    }
    match tls_client(&shared.limits, check) {
        Ok(client) => {
            clients.insert(check.clone(), client.clone());
            Some(client)
        }
        Err(e) => {
            tracing::warn!("upstream TLS: {e}");
            None
        }
    }
}

/// An error and its causes, `: `-separated (hyper-util's own text is only "client error
/// (Connect)").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether an upstream error is the backend closing the connection before any byte of an
/// answer (after the request was written: hyper's "connection closed before message
/// completed").
fn closed_unanswered(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        cause = e.source();
    }
    false
}

/// Whether a body error is the client going away: the connection ended mid-body, the
/// stream was reset.
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
            return matches!(io.kind(), UnexpectedEof | ConnectionReset | BrokenPipe);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote() || h2.is_io();
        }
        cause = e.source();
    }
    false
}

async fn answer(
    shared: &Arc<Shared>,
    local: SocketAddrV4,
    conn: &Conn,
    flight: &mut InFlight<'_>,
    req: Request<Incoming>,
) -> Option<Response<Body>> {
    let (client, line, started) = (flight.client, flight.line, flight.started);
    let refuse = |status: StatusCode, why: &str| {
        shared.gateway().refused(status);
        log(shared, client, line, "-", status, why, started.elapsed());
        text(status, why, true)
    };
    let (mut head, body) = req.into_parts();
    if head.version == Version::HTTP_2 {
        // The bounds the framing guard puts on an HTTP/1.1 head.
        if let Err(r) = hygiene::check_h2_head(&head, shared.limits.max_header_bytes) {
            return Some(refuse(r.status, r.reason));
        }
        hygiene::join_cookies(&mut head.headers);
    }
    let max_body = shared.limits.max_body_bytes;
    match hygiene::content_length(&head.headers) {
        Ok(Some(n)) if n > max_body => {
            return Some(refuse(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
        }
        Ok(_) => {}
        Err(r) => return Some(refuse(r.status, r.reason)),
    }
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    // Most requests have none: no timer to arm, nothing to read. The reading is boxed so
    // that the future of every request (boxed by hyper) does not carry its state.
    let read = if body.is_end_stream() {
        Ok(Some(Bytes::new()))
    } else {
        Box::pin(read_body(body, limit, shared.limits.header_timeout)).await
    };
    let body = match read {
        Ok(b) => b?,
        Err(r) => return Some(refuse(r.status, r.reason)),
    };

    let tls = conn.tls.as_ref().map(|sni| TlsSession {
        sni: sni.as_deref(),
    });
    let verdict = shared
        .gateway()
        .decide(started, client, *local.ip(), tls, &mut head);
    let up = match verdict {
        Verdict::Respond(Answer {
            status,
            location,
            reason,
        }) => {
            log(shared, client, line, "-", status, reason, started.elapsed());
            let close = status.is_client_error() && status != StatusCode::NOT_FOUND;
            let mut res = text(status, reason, close);
            if let Some(location) = location {
                res.headers_mut().insert(header::LOCATION, location);
            }
            return Some(res);
        }
        Verdict::Forward(up) => up,
    };
    // Kept in the flight while it waits for its backend (a cancel releases it there), and
    // worked on in place: retries change its backend.
    let up = flight.upstream.insert(up);
    let bodiless = body.is_empty();
    // The head is moved into the last attempt and copied for one that may be retried.
    let mut head = Some(head);
    let (outcome, response) = loop {
        let scheme = if up.tls.is_some() { "https" } else { "http" };
        // A connection of the client's own takes the origin form; the pooled clients find
        // their connection by the absolute URI's authority.
        let uri = if up.proxy_protocol {
            up.path_and_query.parse()
        } else {
            absolute_uri(scheme, up.addr, &up.path_and_query)
        };
        let parts = match &head {
            Some(h) if up.may_retry() => Some(copy_head(h)),
            _ => head.take(),
        };
        let (Ok(uri), Some(mut parts)) = (uri, parts) else {
            shared.gateway().finish(now(), up, Outcome::Broken);
            return Some(text(StatusCode::BAD_GATEWAY, "unforwardable target", false));
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upstream = Request::from_parts(parts, Full::new(body.clone()));
        let https = match &up.tls {
            Some(check) if !up.proxy_protocol => {
                let Some(client) = https_client(shared, check) else {
                    shared.gateway().finish(now(), up, Outcome::Broken);
                    return Some(text(
                        StatusCode::BAD_GATEWAY,
                        "upstream TLS unusable",
                        false,
                    ));
                };
                Some(client)
            }
            _ => None,
        };
        let request = async {
            if up.proxy_protocol {
                let timeout = shared.limits.connect_timeout;
                // Boxed: its connect and handshake would make the future of every request,
                // boxed by hyper, this much larger.
                return Box::pin(proxied::send(
                    &conn.kept, timeout, client, local, up.addr, upstream,
                ))
                .await;
            }
            let sent = match &https {
                Some(https) => https.request(upstream).await,
                None => shared.client.request(upstream).await,
            };
            sent.map_err(|e| {
                if e.is_connect() {
                    SendError::Connect(causes(&e))
                } else {
                    SendError::Exchange(e.into())
                }
            })
        };
        let sent = match wait_upstream(conn, shared.limits.upstream_timeout, request).await {
            Waited::Answered(sent) => Ok(sent),
            Waited::TimedOut => Err(()),
            Waited::ClientGone => return None,
        };
        let (outcome, response, failure) = match sent {
            Err(()) => (Outcome::TimedOut, None, None),
            Ok(Err(SendError::Connect(why))) => {
                tracing::debug!(backend = %up.addr, "upstream: {why}");
                (Outcome::Refused, None, Some(AttemptFailure::Unsent))
            }
            Ok(Err(SendError::Exchange(e))) => {
                tracing::debug!(backend = %up.addr, "upstream: {e}");
                let closed =
                    closed_unanswered(&*e).then_some(AttemptFailure::ClosedUnanswered { bodiless });
                (Outcome::Broken, None, closed)
            }
            // A 101 the client did not get to ask for is a broken answer.
            Ok(Ok(res))
                if res.status() == StatusCode::SWITCHING_PROTOCOLS && up.upgrade.is_none() =>
            {
                (Outcome::Broken, None, None)
            }
            Ok(Ok(res)) => (Outcome::Answered(res.status()), Some(res), None),
        };
        let failed = up.addr;
        let retried = failure.and_then(|f| shared.gateway().retry(now(), up, f));
        match retried {
            Some(retried) => {
                if let Some(ejection) = retried.ejection {
                    log_ejection(&ejection);
                }
                tracing::debug!(backend = %failed, next = %up.addr, "upstream failed; retrying");
            }
            None => break (outcome, response),
        }
    };
    // The backend is released at the response head: its counters measure time to answer.
    // (It stays in the flight: nothing is awaited from here on, so no cancel can follow.)
    if let Some(ejection) = shared.gateway().finish(now(), up, outcome) {
        log_ejection(&ejection);
    }
    if access_logged(shared) {
        let route = shared.gateway().route_name(up.route);
        log(
            shared,
            client,
            line,
            &route,
            outcome.status(),
            &up.addr.to_string(),
            started.elapsed(),
        );
    }
    let res = match response {
        Some(mut res) if res.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let switched = hyper::upgrade::on(&mut res);
            *conn.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(switched);
            let (mut parts, _) = res.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            hygiene::remove_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(p) = protocol.or_else(|| up.upgrade.take()) {
                parts.headers.insert(header::UPGRADE, p);
            }
            Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed())
        }
        Some(res) => {
            let (mut parts, body) = res.into_parts();
            hygiene::remove_hop_by_hop(&mut parts.headers);
            if let Some(via) = &up.via {
                parts.headers.append(header::VIA, HeaderValue::clone(via));
            }
            // Before the route's rules, so that a Set-Cookie a rule writes stays as written.
            if let Some(prefix) = &up.cookie_prefix {
                prefix.apply(&mut parts.headers);
            }
            shared
                .gateway()
                .rewrite_response(up.route, &mut parts.headers);
            if let Some((cookie, nocache)) = up.set_cookie.take() {
                parts.headers.append(header::SET_COOKIE, cookie);
                if nocache {
                    parts
                        .headers
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
                }
            }
            Response::from_parts(parts, body.boxed())
        }
        None => {
            let why = match outcome {
                Outcome::TimedOut => "upstream timed out",
                Outcome::Refused => "upstream could not be reached",
                _ => "upstream failed",
            };
            text(outcome.status(), why, false)
        }
    };
    Some(res)
}
