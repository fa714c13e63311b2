//! The forwarding client: one SSH connection (or an opt-in pool of them) per destination,
//! carrying every `-L`, `-R` and `-D` forward, supervised so that a lost connection is
//! re-established with backoff and every forward comes back without restarting anything.
//!
//! Local listeners are bound once, at start, and stay bound across reconnects: a client that
//! connects while the tunnel is down waits (up to `connect_timeout`) for it to come back.
//! Remote forwards are requested again on every new connection, asking for the same port the
//! server allocated before when the spec said port 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use russh::client::{self, ChannelOpenHandle, Handle, Msg, Session};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyBase64};
use russh::{Channel, ChannelOpenFailure, Disconnect};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, BackoffConfig};
use crate::copy::{ForwardCounters, pump};
use crate::error::SshFwdError;
use crate::forward::{self, LocalForward, StdListener};
use crate::known_hosts::{self, Decision, StrictHostKeyChecking};
use crate::spec::{DynamicSpec, Endpoint, ForwardSpec};
use crate::worker::Worker;

/// Everything one destination needs; the CLI builds it from flags, `-o`, `-F` or `[[ssh]]`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name shown in status and logs (`ops@host:22`).
    pub name: String,
    /// Host to connect to (also the name looked up in known_hosts).
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Identity files tried in order.
    pub identities: Vec<PathBuf>,
    /// Passphrase for encrypted identity files.
    pub passphrase: Option<String>,
    /// Also try the keys of the ssh-agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
    /// known_hosts file read and (with accept-new) appended to.
    pub known_hosts: PathBuf,
    /// Unknown-host policy; a changed key is always refused.
    pub strict_host_key_checking: StrictHostKeyChecking,
    /// `-L` forwards.
    pub local: Vec<ForwardSpec>,
    /// `-R` forwards.
    pub remote: Vec<ForwardSpec>,
    /// `-D` forwards.
    pub dynamic: Vec<DynamicSpec>,
    /// Listeners without a bind address listen on all addresses instead of loopback.
    pub gateway_ports: bool,
    /// Keepalive probe interval (`ServerAliveInterval`); `None` disables.
    pub server_alive_interval: Option<Duration>,
    /// Unanswered probes before the connection is declared dead (`ServerAliveCountMax`).
    pub server_alive_count_max: u32,
    /// A remote forward the server refuses fails the start.
    pub exit_on_forward_failure: bool,
    /// Cipher preference (OpenSSH names); empty keeps russh's default order.
    pub ciphers: Vec<String>,
    /// Reconnect schedule.
    pub backoff: BackoffConfig,
    /// SSH connections to keep; channels are spread over them round-robin. 1 = OpenSSH-like.
    pub connections: usize,
    /// Limit for TCP connect + handshake, and for a local client waiting for a reconnect.
    pub connect_timeout: Duration,
    /// If the first connection fails, `start` returns the error (the CLI); otherwise it keeps
    /// retrying in the background (a daemon).
    pub fail_fast: bool,
}

impl ClientConfig {
    /// A config with OpenSSH's defaults for everything but the destination.
    #[must_use]
    pub fn new(host: &str, port: u16, user: &str, known_hosts: PathBuf) -> Self {
        ClientConfig {
            name: format!("{user}@{}", known_hosts::host_field(host, port)),
            host: host.to_string(),
            port,
            user: user.to_string(),
            identities: Vec::new(),
            passphrase: None,
            use_agent: true,
            known_hosts,
            strict_host_key_checking: StrictHostKeyChecking::AcceptNew,
            local: Vec::new(),
            remote: Vec::new(),
            dynamic: Vec::new(),
            gateway_ports: false,
            server_alive_interval: Some(Duration::from_secs(15)),
            server_alive_count_max: 3,
            exit_on_forward_failure: true,
            ciphers: Vec::new(),
            backoff: BackoffConfig::default(),
            connections: 1,
            connect_timeout: Duration::from_secs(10),
            fail_fast: true,
        }
    }
}

/// A snapshot of one forward for `vipgate show ssh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardStatus {
    /// `local`, `remote` or `dynamic`.
    pub kind: &'static str,
    /// The spec as given (`8585:127.0.0.1:80`).
    pub spec: String,
    /// Where it actually listens (`127.0.0.1:8585`, or on the server for `-R`); empty while
    /// a remote forward is not established.
    pub bound: String,
    /// Connections now open.
    pub active: u64,
    /// Connections since start.
    pub total: u64,
    /// Connections that could not be forwarded.
    pub failed: u64,
    /// Bytes sent into the tunnel by closed connections.
    pub bytes_out: u64,
    /// Bytes received from the tunnel by closed connections.
    pub bytes_in: u64,
}

/// A snapshot of a destination for `vipgate show ssh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStatus {
    /// Config name.
    pub name: String,
    /// `connected`, `connecting` or `stopped`.
    pub state: &'static str,
    /// Time since the current connection came up.
    pub uptime: Option<Duration>,
    /// Reconnections since start.
    pub reconnects: u64,
    /// SSH connections now up (of `connections`).
    pub connections_up: usize,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// Every forward.
    pub forwards: Vec<ForwardStatus>,
}

/// Fired when the server allocates a port for a `-R ...:0:...` forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedPort {
    /// The allocated port on the server.
    pub port: u16,
    /// Where connections to it go (`host:port` or a socket path).
    pub target: String,
}

pub(crate) struct RemoteForward {
    pub(crate) spec: ForwardSpec,
    pub(crate) counters: Arc<ForwardCounters>,
    /// Port the server listens on now (the spec's, or the allocated one), 0 while down.
    pub(crate) bound_port: AtomicU64,
    /// Port the server allocated last time, asked for again after a reconnect.
    pub(crate) last_allocated: AtomicU64,
    /// The server accepted the forward on the current connection.
    pub(crate) listening: AtomicBool,
}

impl RemoteForward {
    fn new(spec: ForwardSpec) -> Self {
        RemoteForward {
            spec,
            counters: Arc::default(),
            bound_port: AtomicU64::new(0),
            last_allocated: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    fn set_down(&self) {
        self.bound_port.store(0, Ordering::Relaxed);
        self.listening.store(false, Ordering::Relaxed);
    }
}

/// A bound `-L` / `-D` listener and the task accepting on it.
struct LocalEntry {
    /// What it forwards to; swapped in place when a reload changes only the target.
    current: Arc<Mutex<Arc<LocalForward>>>,
    counters: Arc<ForwardCounters>,
    /// Normalised listening address (see [`LocalForward::listen_key`]).
    key: String,
    task: JoinHandle<()>,
}

/// `ServerAliveInterval` / `ServerAliveCountMax`, changeable while connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keepalive {
    interval: Option<Duration>,
    count_max: u32,
}

#[derive(Default)]
struct State {
    connected_at: Option<Instant>,
    reconnects: u64,
    last_error: Option<String>,
    stopped: bool,
}

type Pool = Vec<Option<Arc<Handle<ClientHandler>>>>;

pub(crate) struct Shared {
    pub(crate) cfg: ClientConfig,
    russh: Arc<client::Config>,
    keys: Vec<(PathBuf, Arc<PrivateKey>)>,
    pool: watch::Sender<Pool>,
    next: AtomicUsize,
    remote: Mutex<Vec<Arc<RemoteForward>>>,
    local: Mutex<Vec<LocalEntry>>,
    keepalive: watch::Sender<Keepalive>,
    state: Mutex<State>,
    host_key_refusal: Mutex<Option<String>>,
    allocated_tx: tokio::sync::mpsc::UnboundedSender<AllocatedPort>,
    /// The runtime of each connection slot's thread (see [`crate::worker`]).
    pub(crate) runtimes: Vec<tokio::runtime::Handle>,
    next_slot: AtomicUsize,
}

impl Shared {
    /// The slot whose thread takes the next accepted connection, round-robin.
    pub(crate) fn next_slot(&self) -> usize {
        self.next_slot.fetch_add(1, Ordering::Relaxed) % self.runtimes.len()
    }

    fn remotes(&self) -> Vec<Arc<RemoteForward>> {
        lock(&self.remote).clone()
    }

    /// Starts accepting on a bound listener, on the thread of the next slot.
    fn add_local(self: &Arc<Self>, fwd: LocalForward, listener: StdListener) {
        let key = fwd.listen_key(self.cfg.gateway_ports);
        let current = Arc::new(Mutex::new(Arc::new(fwd)));
        let counters: Arc<ForwardCounters> = Arc::default();
        let slot = self.next_slot();
        let task = self.runtimes[slot].spawn(forward::serve(
            self.clone(),
            current.clone(),
            listener,
            counters.clone(),
            slot,
        ));
        lock(&self.local).push(LocalEntry {
            current,
            counters,
            key,
            task,
        });
    }

    /// Closes every listener (connections already accepted carry on) and removes the unix
    /// sockets they created.
    fn close_locals(&self) {
        for e in lock(&self.local).drain(..) {
            close_local(&e);
        }
    }
}

fn close_local(e: &LocalEntry) {
    e.task.abort();
    if let Some(path) = lock(&e.current).unix_path() {
        let _ = std::fs::remove_file(path);
    }
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running destination. Dropping it without [`Tunnel::stop`] ends its connection threads,
/// and with them its listeners and forwarded connections, without a clean SSH disconnect.
pub struct Tunnel {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    tasks: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    allocated_rx: Option<tokio::sync::mpsc::UnboundedReceiver<AllocatedPort>>,
}

impl Tunnel {
    /// Loads keys, binds every local listener, connects (see [`ClientConfig::fail_fast`]),
    /// establishes the remote forwards and starts the supervisor.
    ///
    /// # Errors
    /// Unloadable identities, a listener that cannot bind (the message names the address),
    /// and with `fail_fast` a failed first connection (host key, auth, network); with
    /// `exit_on_forward_failure`, a remote forward the server refuses.
    pub async fn start(cfg: ClientConfig) -> Result<Tunnel, SshFwdError> {
        let keys = load_identities(&cfg)?;
        let connections = cfg.connections.max(1);
        let workers = (0..connections)
            .map(|slot| Worker::spawn(format!("ssh-conn-{slot}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SshFwdError::Config(format!("cannot start a connection thread: {e}")))?;
        let (pool, _) = watch::channel(vec![None; connections]);
        let (allocated_tx, allocated_rx) = tokio::sync::mpsc::unbounded_channel();
        let remote = cfg
            .remote
            .iter()
            .map(|spec| Arc::new(RemoteForward::new(spec.clone())))
            .collect();
        let (keepalive, _) = watch::channel(Keepalive {
            interval: cfg.server_alive_interval,
            count_max: cfg.server_alive_count_max,
        });
        let shared = Arc::new(Shared {
            russh: Arc::new(russh_config(&cfg)?),
            cfg,
            keys,
            pool,
            next: AtomicUsize::new(0),
            remote: Mutex::new(remote),
            local: Mutex::new(Vec::new()),
            keepalive,
            state: Mutex::new(State::default()),
            host_key_refusal: Mutex::new(None),
            allocated_tx,
            runtimes: workers.iter().map(|w| w.handle().clone()).collect(),
            next_slot: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Bind before connecting: a port in use is a config error the user must see at once.
        let mut bound = Vec::new();
        for fwd in forward::wanted(&shared.cfg) {
            match fwd.bind(shared.cfg.gateway_ports) {
                Ok(b) => bound.push(b),
                Err(e) => {
                    for (f, _) in &bound {
                        if let Some(path) = f.unix_path() {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    shutdown_workers(workers).await;
                    return Err(e);
                }
            }
        }
        for (fwd, listener) in bound {
            shared.add_local(fwd, listener);
        }

        let first = if shared.cfg.fail_fast {
            // The session task is spawned where the connection is made: on slot 0's thread.
            let sh = shared.clone();
            let connected = shared.runtimes[0]
                .spawn(async move { connect_once(&sh).await })
                .await
                .unwrap_or_else(|e| Err(SshFwdError::Config(format!("connection task: {e}"))));
            let (handle, closed) = match connected {
                Ok(c) => c,
                Err(e) => {
                    shared.close_locals();
                    shutdown_workers(workers).await;
                    return Err(e);
                }
            };
            if let Err(e) = request_remote_forwards(&shared, &handle, true).await {
                shared.close_locals();
                let _ = handle
                    .disconnect(Disconnect::ByApplication, "forward refused", "")
                    .await;
                shutdown_workers(workers).await;
                return Err(e);
            }
            Some((handle, closed))
        } else {
            None
        };

        let mut first = first;
        for slot in 0..connections {
            let conn = if slot == 0 { first.take() } else { None };
            tasks.push(shared.runtimes[slot].spawn(supervise(
                shared.clone(),
                slot,
                conn,
                stop_rx.clone(),
            )));
        }
        Ok(Tunnel {
            shared,
            workers,
            tasks,
            stop_tx,
            allocated_rx: Some(allocated_rx),
        })
    }

    /// Applies a changed config to the running tunnel without dropping its SSH connection:
    /// `-L` / `-D` listeners are opened and closed (a listener whose address stays but whose
    /// target changes is kept and retargeted), `-R` forwards are requested and cancelled on
    /// the live connection, keepalive settings take effect at the next probe. Connections
    /// already open through any forward, kept or removed, carry on.
    ///
    /// Returns `Ok(Some(why))` without changing anything when the change needs a new SSH
    /// connection (destination, identity, host key policy, cipher, connection count...).
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// A new listener cannot be bound; nothing was changed then.
    pub fn reconfigure(&self, new: &ClientConfig) -> Result<Option<String>, SshFwdError> {
        let old = &self.shared.cfg;
        let needs_restart = [
            ("host", old.host != new.host),
            ("port", old.port != new.port),
            ("user", old.user != new.user),
            ("identity", old.identities != new.identities),
            ("passphrase", old.passphrase != new.passphrase),
            ("use_agent", old.use_agent != new.use_agent),
            ("known_hosts", old.known_hosts != new.known_hosts),
            (
                "strict_host_key_checking",
                old.strict_host_key_checking != new.strict_host_key_checking,
            ),
            ("ciphers", old.ciphers != new.ciphers),
            (
                "connections",
                old.connections.max(1) != new.connections.max(1),
            ),
            ("gateway_ports", old.gateway_ports != new.gateway_ports),
            (
                "connect_timeout",
                old.connect_timeout != new.connect_timeout,
            ),
            ("reconnect schedule", old.backoff != new.backoff),
        ];
        if let Some((what, _)) = needs_restart.iter().find(|(_, changed)| *changed) {
            return Ok(Some(format!("{what} changed")));
        }
        let shared = &self.shared;

        // Local listeners, matched by listening address. Bind every new one first, so that a
        // failure leaves the running config untouched.
        let wanted = forward::wanted(new);
        let keys: Vec<String> = wanted
            .iter()
            .map(|f| f.listen_key(new.gateway_ports))
            .collect();
        let existing: Vec<String> = lock(&shared.local).iter().map(|e| e.key.clone()).collect();
        let mut bound = Vec::new();
        for (fwd, key) in wanted.iter().zip(&keys) {
            if existing.contains(key) {
                continue;
            }
            match fwd.bind(new.gateway_ports) {
                Ok(b) => bound.push(b),
                Err(e) => {
                    for (f, _) in &bound {
                        if let Some(path) = f.unix_path() {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    return Err(e);
                }
            }
        }
        lock(&shared.local).retain(|e| match keys.iter().position(|k| *k == e.key) {
            None => {
                close_local(e);
                false
            }
            Some(i) => {
                let mut current = lock(&e.current);
                if !current.same_as(&wanted[i]) {
                    *current = Arc::new(current.retargeted(&wanted[i]));
                }
                true
            }
        });
        for (fwd, listener) in bound {
            shared.add_local(fwd, listener);
        }

        // Remote forwards, matched by spec, changed on the live connection (or at the next
        // connection if it is down).
        let mut removed = Vec::new();
        let mut added = Vec::new();
        {
            let mut remote = lock(&shared.remote);
            remote.retain(|r| {
                let keep = new.remote.contains(&r.spec);
                if !keep {
                    removed.push(r.clone());
                }
                keep
            });
            for spec in &new.remote {
                if !remote.iter().any(|r| r.spec == *spec) {
                    let r = Arc::new(RemoteForward::new(spec.clone()));
                    remote.push(r.clone());
                    added.push(r);
                }
            }
        }
        let live = shared.pool.borrow().first().cloned().flatten();
        if let Some(handle) = live.filter(|h| !h.is_closed())
            && !(removed.is_empty() && added.is_empty())
        {
            let sh = shared.clone();
            shared.runtimes[0].spawn(async move {
                for r in &removed {
                    cancel_remote_forward(&handle, r).await;
                }
                for r in &added {
                    let _ = request_remote_forward(&sh, &handle, r, false).await;
                }
            });
        }

        shared.keepalive.send_if_modified(|ka| {
            let next = Keepalive {
                interval: new.server_alive_interval,
                count_max: new.server_alive_count_max,
            };
            let changed = *ka != next;
            *ka = next;
            changed
        });
        Ok(None)
    }

    /// Ports allocated by the server for `-R` port 0 forwards, as they happen (also after
    /// reconnects). Can be taken once.
    pub fn allocated_ports(
        &mut self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<AllocatedPort>> {
        self.allocated_rx.take()
    }

    /// The current state for `vipgate show ssh`.
    #[must_use]
    pub fn status(&self) -> TunnelStatus {
        let state = lock(&self.shared.state);
        let up = self
            .shared
            .pool
            .borrow()
            .iter()
            .flatten()
            .filter(|h| !h.is_closed())
            .count();
        let mut forwards = Vec::new();
        for e in lock(&self.shared.local).iter() {
            let fwd = lock(&e.current).clone();
            forwards.push(snapshot(
                fwd.kind(),
                fwd.spec_text(),
                fwd.bound.clone(),
                &e.counters,
            ));
        }
        for r in &self.shared.remotes() {
            let port = r.bound_port.load(Ordering::Relaxed);
            let bound = if !r.listening.load(Ordering::Relaxed) {
                String::new()
            } else if let Endpoint::Unix(path) = &r.spec.listen {
                path.clone()
            } else {
                let host = match &r.spec.listen {
                    Endpoint::Tcp { host: Some(h), .. } => h.clone(),
                    _ => "localhost".to_string(),
                };
                format!(
                    "{}:{port}",
                    if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    }
                )
            };
            forwards.push(snapshot("remote", r.spec.to_string(), bound, &r.counters));
        }
        TunnelStatus {
            name: self.shared.cfg.name.clone(),
            state: if state.stopped {
                "stopped"
            } else if up > 0 {
                "connected"
            } else {
                "connecting"
            },
            uptime: state
                .connected_at
                .map(|t| now().saturating_duration_since(t)),
            reconnects: state.reconnects,
            connections_up: up,
            last_error: state.last_error.clone(),
            forwards,
        }
    }

    /// Stops listeners and supervisors and disconnects; removes unix sockets it created.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
        let handles: Vec<_> = self
            .shared
            .pool
            .borrow()
            .iter()
            .flatten()
            .cloned()
            .collect();
        for h in handles {
            let _ = h
                .disconnect(Disconnect::ByApplication, "vipgate stopping", "")
                .await;
        }
        self.shared
            .pool
            .send_modify(|p| p.iter_mut().for_each(|h| *h = None));
        lock(&self.shared.state).stopped = true;
        self.shared.close_locals();
        shutdown_workers(self.workers).await;
    }

    /// Resolves when the tunnel can no longer work by itself: never, as long as it reconnects;
    /// kept for symmetry with a future "give up after N failures" policy.
    pub async fn wait(&mut self) {
        for t in &mut self.tasks {
            let _ = t.await;
        }
    }
}

async fn shutdown_workers(workers: Vec<Worker>) {
    for w in workers {
        w.shutdown().await;
    }
}

fn snapshot(kind: &'static str, spec: String, bound: String, c: &ForwardCounters) -> ForwardStatus {
    ForwardStatus {
        kind,
        spec,
        bound,
        active: c.active.load(Ordering::Relaxed),
        total: c.total.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
        bytes_in: c.bytes_in.load(Ordering::Relaxed),
    }
}

fn load_identities(cfg: &ClientConfig) -> Result<Vec<(PathBuf, Arc<PrivateKey>)>, SshFwdError> {
    let mut keys = Vec::new();
    for path in &cfg.identities {
        crate::server::check_file_mode(path, true)?;
        let key = russh::keys::load_secret_key(path, cfg.passphrase.as_deref()).map_err(|e| {
            let why = match e {
                russh::keys::Error::KeyIsEncrypted => {
                    "the key is encrypted: give its passphrase (passphrase_file, or run interactively)".to_string()
                }
                other => other.to_string(),
            };
            SshFwdError::Identity { path: path.clone(), why }
        })?;
        keys.push((path.clone(), Arc::new(key)));
    }
    Ok(keys)
}

/// Whether an identity file is encrypted (the CLI uses it to decide whether to prompt).
#[must_use]
pub fn identity_is_encrypted(path: &std::path::Path) -> bool {
    matches!(
        russh::keys::load_secret_key(path, None),
        Err(russh::keys::Error::KeyIsEncrypted)
    )
}

fn russh_config(cfg: &ClientConfig) -> Result<client::Config, SshFwdError> {
    let mut preferred = russh::Preferred::default();
    if !cfg.ciphers.is_empty() {
        let mut names = Vec::new();
        for c in &cfg.ciphers {
            let name = russh::cipher::Name::try_from(c.as_str())
                .map_err(|()| SshFwdError::Config(format!("unsupported cipher '{c}'")))?;
            names.push(name);
        }
        preferred.cipher = names.into();
    }
    // Offer first the host key types known_hosts already has for this server, so the server
    // presents a key we can verify instead of one that would look like a key change.
    if let Ok(text) = std::fs::read_to_string(&cfg.known_hosts) {
        let known = known_hosts::known_algorithms(&text, &cfg.host, cfg.port);
        if !known.is_empty() {
            let mut order: Vec<russh::keys::Algorithm> = Vec::new();
            for name in &known {
                for alg in preferred.key.iter() {
                    let base = match alg {
                        russh::keys::Algorithm::Rsa { .. } => "ssh-rsa",
                        other => other.as_str(),
                    };
                    if base == name && !order.contains(alg) {
                        order.push(alg.clone());
                    }
                }
            }
            for alg in preferred.key.iter() {
                if !order.contains(alg) {
                    order.push(alg.clone());
                }
            }
            preferred.key = order.into();
        }
    }
    Ok(client::Config {
        preferred,
        // Keepalives are ours (see `keepalive_dead`), so that a reload can change them on the
        // live connection.
        keepalive_interval: None,
        inactivity_timeout: None,
        nodelay: true,
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_BUFFER,
        ..client::Config::default()
    })
}

/// Receive window per channel: 8 MiB keeps a loopback or LAN pipe full at several Gbit/s
/// without one slow reader holding much (the window is credit, not a buffer we allocate).
const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
/// Largest packet we accept (russh caps it below 64 KiB); OpenSSH sends up to this, so fewer, larger packets are
/// encrypted and MACed per megabyte.
const MAX_PACKET: u32 = 65_535;
/// Messages queued per channel before backpressure reaches the SSH connection.
const CHANNEL_BUFFER: usize = 64;

pub(crate) async fn connect_once(
    shared: &Arc<Shared>,
) -> Result<(Arc<Handle<ClientHandler>>, oneshot::Receiver<()>), SshFwdError> {
    let cfg = &shared.cfg;
    let addr = known_hosts::host_field(&cfg.host, cfg.port);
    let target = if cfg.host.contains(':') {
        format!("[{}]:{}", cfg.host, cfg.port)
    } else {
        format!("{}:{}", cfg.host, cfg.port)
    };
    let fut = async {
        let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|error| SshFwdError::Connect {
                addr: target.clone(),
                error,
            })?;
        let _ = tcp.set_nodelay(true);
        let (closed_tx, closed_rx) = oneshot::channel();
        *lock(&shared.host_key_refusal) = None;
        let handler = ClientHandler {
            shared: shared.clone(),
            _closed: closed_tx,
        };
        let handle = client::connect_stream(shared.russh.clone(), tcp, handler)
            .await
            .map_err(|e| match lock(&shared.host_key_refusal).take() {
                Some(msg) => SshFwdError::HostKey(msg),
                None => e,
            })?;
        Ok::<_, SshFwdError>((handle, closed_rx))
    };
    let (mut handle, closed) = tokio::time::timeout(cfg.connect_timeout, fut)
        .await
        .map_err(|_| SshFwdError::Timeout(addr.clone()))??;
    authenticate(shared, &mut handle).await?;
    Ok((Arc::new(handle), closed))
}

async fn authenticate(
    shared: &Arc<Shared>,
    handle: &mut Handle<ClientHandler>,
) -> Result<(), SshFwdError> {
    let cfg = &shared.cfg;
    let mut tried = Vec::new();
    let rsa_hash = handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .unwrap_or(Some(HashAlg::Sha256));
    for (path, key) in &shared.keys {
        tried.push(path.display().to_string());
        let key = PrivateKeyWithHashAlg::new(key.clone(), rsa_hash);
        if handle
            .authenticate_publickey(cfg.user.clone(), key)
            .await?
            .success()
        {
            tracing::debug!("{}: authenticated with {}", cfg.name, path.display());
            return Ok(());
        }
    }
    if cfg.use_agent && std::env::var_os("SSH_AUTH_SOCK").is_some() {
        match russh::keys::agent::client::AgentClient::connect_env().await {
            Ok(mut agent) => {
                let identities = agent.request_identities().await.unwrap_or_default();
                for id in identities {
                    let russh::keys::agent::AgentIdentity::PublicKey { key, comment } = id else {
                        continue;
                    };
                    tried.push(format!(
                        "agent key {}",
                        if comment.is_empty() {
                            key.algorithm().to_string()
                        } else {
                            comment
                        }
                    ));
                    let hash = if key.algorithm().is_rsa() {
                        rsa_hash
                    } else {
                        None
                    };
                    match handle
                        .authenticate_publickey_with(cfg.user.clone(), key, hash, &mut agent)
                        .await
                    {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(_) => {}
                        Err(e) => tracing::debug!("agent signing failed: {e}"),
                    }
                }
            }
            Err(e) => tracing::debug!("ssh-agent unavailable: {e}"),
        }
    }
    Err(SshFwdError::AuthFailed {
        user: cfg.user.clone(),
        host: known_hosts::host_field(&cfg.host, cfg.port),
        tried: if tried.is_empty() {
            "no identities".to_string()
        } else {
            tried.join(", ")
        },
    })
}

/// Asks the server for every `-R`; with `strict`, the first refusal is an error.
async fn request_remote_forwards(
    shared: &Arc<Shared>,
    handle: &Handle<ClientHandler>,
    strict: bool,
) -> Result<(), SshFwdError> {
    for r in shared.remotes() {
        request_remote_forward(shared, handle, &r, strict).await?;
    }
    Ok(())
}

/// Asks the server for one `-R` (a `tcpip-forward` or a `streamlocal-forward@openssh.com`).
async fn request_remote_forward(
    shared: &Arc<Shared>,
    handle: &Handle<ClientHandler>,
    r: &RemoteForward,
    strict: bool,
) -> Result<(), SshFwdError> {
    let refused = |e: russh::Error| {
        r.set_down();
        if strict && shared.cfg.exit_on_forward_failure {
            return Err(SshFwdError::RemoteForwardRefused(r.spec.listen.to_string()));
        }
        tracing::warn!(
            "{}: remote port forwarding failed for listen {}: {e}",
            shared.cfg.name,
            r.spec.listen
        );
        Ok(())
    };
    let (host, port) = match &r.spec.listen {
        Endpoint::Tcp { host, port } => (host, *port),
        Endpoint::Unix(path) => {
            return match handle.streamlocal_forward(path.clone()).await {
                Ok(()) => {
                    r.listening.store(true, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => refused(e),
            };
        }
    };
    let address = remote_bind_address(host.as_deref());
    let mut want = u32::from(port);
    let last = r.last_allocated.load(Ordering::Relaxed);
    if want == 0 && last != 0 {
        want = u32::try_from(last).unwrap_or(0);
    }
    let mut result = handle.tcpip_forward(address.clone(), want).await;
    if result.is_err() && port == 0 && want != 0 {
        // The old port was taken meanwhile: take any.
        result = handle.tcpip_forward(address.clone(), 0).await;
    }
    match result {
        Ok(allocated) => {
            let bound = if port == 0 {
                if allocated != 0 { allocated } else { want }
            } else {
                u32::from(port)
            };
            r.bound_port.store(u64::from(bound), Ordering::Relaxed);
            r.listening.store(true, Ordering::Relaxed);
            if port == 0 {
                r.last_allocated.store(u64::from(bound), Ordering::Relaxed);
                let port = u16::try_from(bound).unwrap_or(0);
                let _ = shared.allocated_tx.send(AllocatedPort {
                    port,
                    target: r.spec.connect.to_string(),
                });
            }
            Ok(())
        }
        Err(e) => refused(e),
    }
}

/// OpenSSH's rule: no bind address means "localhost", "*" or "" means all addresses.
fn remote_bind_address(host: Option<&str>) -> String {
    match host {
        None => "localhost".to_string(),
        Some("*") => String::new(),
        Some(h) => h.to_string(),
    }
}

/// Asks the server to stop listening for a `-R` removed by a reload.
async fn cancel_remote_forward(handle: &Handle<ClientHandler>, r: &RemoteForward) {
    if !r.listening.load(Ordering::Relaxed) {
        return;
    }
    let result = match &r.spec.listen {
        Endpoint::Unix(path) => handle.cancel_streamlocal_forward(path.clone()).await,
        Endpoint::Tcp { host, .. } => {
            let port = u32::try_from(r.bound_port.load(Ordering::Relaxed)).unwrap_or(0);
            handle
                .cancel_tcpip_forward(remote_bind_address(host.as_deref()), port)
                .await
        }
    };
    if let Err(e) = result {
        tracing::warn!("cancelling remote forward {}: {e}", r.spec);
    }
    r.set_down();
}

/// Resolves when the server stopped answering keepalives: `count_max` probes in a row
/// unanswered, one sent every `interval` (OpenSSH's `ServerAliveInterval` /
/// `ServerAliveCountMax`). The settings are re-read at every tick, so a reload applies them
/// to the live connection.
async fn keepalive_dead(
    handle: Arc<Handle<ClientHandler>>,
    mut settings: watch::Receiver<Keepalive>,
) {
    let answered = Arc::new(AtomicBool::new(true));
    let mut misses = 0u32;
    loop {
        let ka = *settings.borrow_and_update();
        let Some(interval) = ka.interval.filter(|d| !d.is_zero()) else {
            misses = 0;
            if settings.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            }
        }
        if answered.load(Ordering::Relaxed) {
            misses = 0;
            answered.store(false, Ordering::Relaxed);
            let (h, flag) = (handle.clone(), answered.clone());
            tokio::spawn(async move {
                if h.send_ping().await.is_ok() {
                    flag.store(true, Ordering::Relaxed);
                }
            });
        } else {
            misses += 1;
            if misses >= ka.count_max.max(1) {
                return;
            }
        }
    }
}

async fn supervise(
    shared: Arc<Shared>,
    slot: usize,
    mut first: Option<(Arc<Handle<ClientHandler>>, oneshot::Receiver<()>)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(shared.cfg.backoff);
    let mut ever_up = false;
    loop {
        let (handle, closed) = match first.take() {
            Some(c) => c,
            None => match connect_once(&shared).await {
                Ok(c) => {
                    if slot == 0 {
                        let _ = request_remote_forwards(&shared, &c.0, false).await;
                    }
                    c
                }
                Err(e) => {
                    tracing::warn!("{}: connection failed: {e}", shared.cfg.name);
                    lock(&shared.state).last_error = Some(e.to_string());
                    let delay = backoff.on_disconnected(now(), rand::random());
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        _ = stop.changed() => return,
                    }
                }
            },
        };
        backoff.on_connected(now());
        {
            let mut st = lock(&shared.state);
            if ever_up && slot == 0 {
                st.reconnects += 1;
            }
            if slot == 0 {
                st.connected_at = Some(now());
            }
            st.last_error = None;
        }
        if ever_up {
            tracing::info!("{}: reconnected, forwards restored", shared.cfg.name);
        }
        ever_up = true;
        shared.pool.send_modify(|p| p[slot] = Some(handle.clone()));
        tokio::select! {
            _ = closed => {}
            () = keepalive_dead(handle.clone(), shared.keepalive.subscribe()) => {
                lock(&shared.state).last_error = Some("server not responding to keepalives".into());
                let _ = handle.disconnect(Disconnect::ByApplication, "keepalive timeout", "").await;
            }
            _ = stop.changed() => {
                let _ = handle.disconnect(Disconnect::ByApplication, "vipgate stopping", "").await;
                return;
            }
        }
        shared.pool.send_modify(|p| p[slot] = None);
        if slot == 0 {
            lock(&shared.state).connected_at = None;
            for r in shared.remotes() {
                r.set_down();
            }
        }
        let delay = backoff.on_disconnected(now(), rand::random());
        let why = lock(&shared.state)
            .last_error
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        tracing::warn!(
            "{}: connection lost ({why}); reconnecting in {delay:?}",
            shared.cfg.name
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A live connection to carry one more channel: the one of `slot` (whose thread runs the
/// caller) when it is up, else round-robin over the pool; waits for a reconnect up to
/// `connect_timeout`.
pub(crate) async fn pick(shared: &Shared, slot: usize) -> Option<Arc<Handle<ClientHandler>>> {
    if let Some(Some(h)) = shared.pool.borrow().get(slot)
        && !h.is_closed()
    {
        return Some(h.clone());
    }
    let mut rx = shared.pool.subscribe();
    let live = |p: &Pool| p.iter().any(|h| h.as_ref().is_some_and(|h| !h.is_closed()));
    tokio::time::timeout(shared.cfg.connect_timeout, rx.wait_for(live))
        .await
        .ok()?
        .ok()?;
    let pool = rx.borrow();
    let live: Vec<_> = pool.iter().flatten().filter(|h| !h.is_closed()).collect();
    if live.is_empty() {
        return None;
    }
    let i = shared.next.fetch_add(1, Ordering::Relaxed) % live.len();
    Some(live[i].clone())
}

/// Connects a channel the server opened for a `-R` forward to its local target.
async fn serve_remote(
    shared: Arc<Shared>,
    r: Arc<RemoteForward>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    r.counters.total.fetch_add(1, Ordering::Relaxed);
    let failed = |target: &str, e: std::io::Error| {
        r.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "{}: -R {}: connect to {target} failed: {e}",
            shared.cfg.name,
            r.spec
        );
    };
    match &r.spec.connect {
        Endpoint::Tcp { host, port } => {
            let host = host.as_deref().unwrap_or("localhost");
            match TcpStream::connect((host, *port)).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    reply.accept().await;
                    pump(s, channel, &[], &r.counters).await;
                }
                Err(e) => {
                    failed(&format!("{host}:{port}"), e);
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        }
        Endpoint::Unix(path) => match UnixStream::connect(path).await {
            Ok(s) => {
                reply.accept().await;
                pump(s, channel, &[], &r.counters).await;
            }
            Err(e) => {
                failed(path, e);
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        },
    }
}

pub(crate) struct ClientHandler {
    shared: Arc<Shared>,
    /// Dropped with the session task: the supervisor's receiver then sees the connection end.
    _closed: oneshot::Sender<()>,
}

impl ClientHandler {
    fn verify_host_key(&self, key: &PublicKey) -> bool {
        let cfg = &self.shared.cfg;
        let path = cfg.known_hosts.display().to_string();
        let text = match std::fs::read_to_string(&cfg.known_hosts) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                *lock(&self.shared.host_key_refusal) = Some(format!("cannot read {path}: {e}"));
                return false;
            }
        };
        let algorithm = key.algorithm().as_str().to_string();
        let blob = key.public_key_bytes();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let status = known_hosts::check(&text, &cfg.host, cfg.port, &algorithm, &blob);
        match known_hosts::decide(
            &status,
            cfg.strict_host_key_checking,
            &cfg.host,
            cfg.port,
            &path,
            &fingerprint,
        ) {
            Decision::Accept => true,
            Decision::AcceptAndRecord => {
                let line = known_hosts::format_entry(&cfg.host, cfg.port, &algorithm, &blob);
                let recheck = |text: &str| {
                    let status = known_hosts::check(text, &cfg.host, cfg.port, &algorithm, &blob);
                    known_hosts::decide(
                        &status,
                        cfg.strict_host_key_checking,
                        &cfg.host,
                        cfg.port,
                        &path,
                        &fingerprint,
                    )
                };
                match append_locked(&cfg.known_hosts, &line, recheck) {
                    Ok(Decision::Accept) => true,
                    Ok(Decision::Refuse(msg)) => {
                        tracing::error!("{msg}");
                        *lock(&self.shared.host_key_refusal) = Some(msg);
                        false
                    }
                    Ok(Decision::AcceptAndRecord) => {
                        tracing::warn!(
                            "Permanently added '{}' ({algorithm}) to the list of known hosts ({path}); fingerprint {fingerprint}",
                            known_hosts::host_field(&cfg.host, cfg.port)
                        );
                        true
                    }
                    Err(e) => {
                        *lock(&self.shared.host_key_refusal) =
                            Some(format!("cannot record host key in {path}: {e}"));
                        false
                    }
                }
            }
            Decision::Refuse(msg) => {
                tracing::error!("{msg}");
                *lock(&self.shared.host_key_refusal) = Some(msg);
                false
            }
        }
    }
}

/// Appends `line` to known_hosts under an exclusive flock, after re-reading the file under
/// the lock and deciding again with `recheck`: another process (`vipgate ssh` beside the
/// daemon, a second `[[ssh]]` to the same host) may have recorded a key meanwhile, and then
/// that record decides (the same key is accepted, a different one refused) instead of both
/// keys ending up trusted. Returns the decision under the lock; the line was written only for
/// [`Decision::AcceptAndRecord`].
fn append_locked(
    path: &std::path::Path,
    line: &str,
    recheck: impl Fn(&str) -> Decision,
) -> std::io::Result<Decision> {
    use std::io::{Read, Write};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    f.lock()?;
    let mut existing = String::new();
    f.read_to_string(&mut existing)?;
    let decision = recheck(&existing);
    if decision == Decision::AcceptAndRecord {
        if !existing.is_empty() && !existing.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.write_all(line.as_bytes())?;
    }
    // The lock is released when `f` is closed.
    Ok(decision)
}

impl client::Handler for ClientHandler {
    type Error = SshFwdError;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                Ok(self.verify_host_key(key))
            }
            russh::keys::PublicKeyOrCertificate::Certificate(_) => {
                *lock(&self.shared.host_key_refusal) =
                    Some("host certificates are not supported".into());
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let remote = self.shared.remotes().into_iter().find(|r| {
            matches!(r.spec.listen, Endpoint::Tcp { .. })
                && r.listening.load(Ordering::Relaxed)
                && r.bound_port.load(Ordering::Relaxed) == u64::from(connected_port)
        });
        let Some(remote) = remote else {
            tracing::warn!(
                "{}: server opened a forwarded channel for {connected_address}:{connected_port}, which we did not ask for; refused",
                self.shared.cfg.name
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        tracing::debug!("forwarded connection from {originator_address}:{originator_port}");
        // Connecting locally may take a while: never block the session's event loop on it.
        tokio::spawn(serve_remote(self.shared.clone(), remote, channel, reply));
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let remote = self.shared.remotes().into_iter().find(|r| {
            r.listening.load(Ordering::Relaxed)
                && matches!(&r.spec.listen, Endpoint::Unix(p) if p == socket_path)
        });
        let Some(remote) = remote else {
            tracing::warn!(
                "{}: server opened a forwarded channel for socket {socket_path}, which we did not ask for; refused",
                self.shared.cfg.name
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        tokio::spawn(serve_remote(self.shared.clone(), remote, channel, reply));
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let why = match &reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                format!("server disconnected: {info:?}")
            }
            client::DisconnectReason::Error(e) => e.to_string(),
        };
        lock(&self.shared.state).last_error = Some(why);
        match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known_hosts::StrictHostKeyChecking;

    /// Two first contacts racing with different keys: the second re-checks under the lock,
    /// sees the first one's record and is refused, so only one key is ever trusted.
    #[test]
    fn accept_new_rechecks_under_the_lock() {
        let dir = std::env::temp_dir().join(format!("sshfwd-kh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("known_hosts");
        let record = |blob: &[u8]| {
            let line = known_hosts::format_entry("h", 2222, "ssh-ed25519", blob);
            append_locked(&path, &line, |text| {
                let status = known_hosts::check(text, "h", 2222, "ssh-ed25519", blob);
                known_hosts::decide(
                    &status,
                    StrictHostKeyChecking::AcceptNew,
                    "h",
                    2222,
                    "known_hosts",
                    "SHA256:x",
                )
            })
            .unwrap()
        };
        assert_eq!(record(&[0, 0, 0, 1]), Decision::AcceptAndRecord);
        assert!(matches!(record(&[0, 0, 0, 2]), Decision::Refuse(_)));
        assert_eq!(record(&[0, 0, 0, 1]), Decision::Accept);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
