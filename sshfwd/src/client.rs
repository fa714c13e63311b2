//! The forwarding client: one SSH connection (or an opt-in pool of them) per destination,
//! carrying every `-L`, `-R` and `-D` forward, supervised so that a lost connection is
//! re-established with backoff and every forward comes back without restarting anything.
//!
//! Local listeners are bound once, at start, and stay bound across reconnects: a client that
//! connects while the tunnel is down waits (up to `connect_timeout`) for it to come back.
//! Remote forwards are requested again on every new connection, asking for the same port the
//! server allocated before when the spec said port 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use crate::forward::{self, LocalForward};
use crate::known_hosts::{self, Decision, StrictHostKeyChecking};
use crate::spec::{DynamicSpec, Endpoint, ForwardSpec};

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
    remote: Vec<RemoteForward>,
    local: Mutex<Vec<(LocalForward, Arc<ForwardCounters>)>>,
    state: Mutex<State>,
    host_key_refusal: Mutex<Option<String>>,
    allocated_tx: tokio::sync::mpsc::UnboundedSender<AllocatedPort>,
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running destination. Dropping it without [`Tunnel::stop`] leaves its tasks running.
pub struct Tunnel {
    shared: Arc<Shared>,
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
        for spec in &cfg.remote {
            if matches!(spec.listen, Endpoint::Unix(_)) {
                return Err(SshFwdError::Config(format!(
                    "remote forward {spec}: listening on a unix socket on the server is not supported"
                )));
            }
        }
        let connections = cfg.connections.max(1);
        let (pool, _) = watch::channel(vec![None; connections]);
        let (allocated_tx, allocated_rx) = tokio::sync::mpsc::unbounded_channel();
        let remote = cfg
            .remote
            .iter()
            .map(|spec| RemoteForward {
                spec: spec.clone(),
                counters: Arc::default(),
                bound_port: AtomicU64::new(0),
                last_allocated: AtomicU64::new(0),
            })
            .collect();
        let shared = Arc::new(Shared {
            russh: Arc::new(russh_config(&cfg)?),
            cfg,
            keys,
            pool,
            next: AtomicUsize::new(0),
            remote,
            local: Mutex::new(Vec::new()),
            state: Mutex::new(State::default()),
            host_key_refusal: Mutex::new(None),
            allocated_tx,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Bind before connecting: a port in use is a config error the user must see at once.
        let listeners = forward::bind_all(&shared.cfg).await?;
        for (fwd, listener) in listeners {
            let counters: Arc<ForwardCounters> = Arc::default();
            lock(&shared.local).push((fwd.clone(), counters.clone()));
            tasks.push(tokio::spawn(forward::serve(
                shared.clone(),
                fwd,
                listener,
                counters,
            )));
        }

        let first = if shared.cfg.fail_fast {
            let (handle, closed) = match connect_once(&shared).await {
                Ok(c) => c,
                Err(e) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    forward::cleanup_unix_sockets(&shared.cfg);
                    return Err(e);
                }
            };
            if let Err(e) = request_remote_forwards(&shared, &handle, true).await {
                tasks.iter().for_each(JoinHandle::abort);
                let _ = handle
                    .disconnect(Disconnect::ByApplication, "forward refused", "")
                    .await;
                forward::cleanup_unix_sockets(&shared.cfg);
                return Err(e);
            }
            Some((handle, closed))
        } else {
            None
        };

        let mut first = first;
        for slot in 0..connections {
            let conn = if slot == 0 { first.take() } else { None };
            tasks.push(tokio::spawn(supervise(
                shared.clone(),
                slot,
                conn,
                stop_rx.clone(),
            )));
        }
        Ok(Tunnel {
            shared,
            tasks,
            stop_tx,
            allocated_rx: Some(allocated_rx),
        })
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
        for (fwd, c) in lock(&self.shared.local).iter() {
            forwards.push(snapshot(fwd.kind(), fwd.spec_text(), fwd.bound.clone(), c));
        }
        for r in &self.shared.remote {
            let port = r.bound_port.load(Ordering::Relaxed);
            let bound = if port == 0 {
                String::new()
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
        forward::cleanup_unix_sockets(&self.shared.cfg);
    }

    /// Resolves when the tunnel can no longer work by itself: never, as long as it reconnects;
    /// kept for symmetry with a future "give up after N failures" policy.
    pub async fn wait(&mut self) {
        for t in &mut self.tasks {
            let _ = t.await;
        }
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
        keepalive_interval: cfg.server_alive_interval,
        keepalive_max: usize::try_from(cfg.server_alive_count_max).unwrap_or(usize::MAX),
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
    for r in &shared.remote {
        let Endpoint::Tcp { host, port } = &r.spec.listen else {
            continue;
        };
        // OpenSSH's rule: no bind address means "localhost", "*" or "" means all addresses.
        let address = match host.as_deref() {
            None => "localhost".to_string(),
            Some("*") => String::new(),
            Some(h) => h.to_string(),
        };
        let mut want = u32::from(*port);
        let last = r.last_allocated.load(Ordering::Relaxed);
        if want == 0 && last != 0 {
            want = u32::try_from(last).unwrap_or(0);
        }
        let mut result = handle.tcpip_forward(address.clone(), want).await;
        if result.is_err() && *port == 0 && want != 0 {
            // The old port was taken meanwhile: take any.
            result = handle.tcpip_forward(address.clone(), 0).await;
        }
        match result {
            Ok(allocated) => {
                let bound = if *port == 0 {
                    if allocated != 0 { allocated } else { want }
                } else {
                    u32::from(*port)
                };
                r.bound_port.store(u64::from(bound), Ordering::Relaxed);
                if *port == 0 {
                    r.last_allocated.store(u64::from(bound), Ordering::Relaxed);
                    let port = u16::try_from(bound).unwrap_or(0);
                    let _ = shared.allocated_tx.send(AllocatedPort {
                        port,
                        target: r.spec.connect.to_string(),
                    });
                }
            }
            Err(e) => {
                r.bound_port.store(0, Ordering::Relaxed);
                let msg = format!(
                    "{}: remote port forwarding failed for listen {}: {e}",
                    shared.cfg.name, r.spec.listen
                );
                if strict && shared.cfg.exit_on_forward_failure {
                    return Err(SshFwdError::RemoteForwardRefused(r.spec.listen.to_string()));
                }
                tracing::warn!("{msg}");
            }
        }
    }
    Ok(())
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
            _ = stop.changed() => {
                let _ = handle.disconnect(Disconnect::ByApplication, "vipgate stopping", "").await;
                return;
            }
        }
        shared.pool.send_modify(|p| p[slot] = None);
        if slot == 0 {
            lock(&shared.state).connected_at = None;
            for r in &shared.remote {
                r.bound_port.store(0, Ordering::Relaxed);
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

/// A live connection to carry one more channel, round-robin over the pool; waits for a
/// reconnect up to `connect_timeout`.
pub(crate) async fn pick(shared: &Shared) -> Option<Arc<Handle<ClientHandler>>> {
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
                match append(&cfg.known_hosts, &text, &line) {
                    Ok(()) => {
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

fn append(path: &std::path::Path, existing: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if !existing.is_empty() && !existing.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.write_all(line.as_bytes())
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
        let found = self
            .shared
            .remote
            .iter()
            .position(|r| r.bound_port.load(Ordering::Relaxed) == u64::from(connected_port));
        let Some(i) = found else {
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
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let r = &shared.remote[i];
            r.counters.total.fetch_add(1, Ordering::Relaxed);
            match &r.spec.connect {
                Endpoint::Tcp { host, port } => {
                    let host = host.as_deref().unwrap_or("localhost");
                    match TcpStream::connect((host, *port)).await {
                        Ok(mut s) => {
                            let _ = s.set_nodelay(true);
                            reply.accept().await;
                            pump(&mut s, &mut channel.into_stream(), &r.counters).await;
                        }
                        Err(e) => {
                            r.counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "{}: -R {}: connect to {host}:{port} failed: {e}",
                                shared.cfg.name,
                                r.spec
                            );
                            reply.reject(ChannelOpenFailure::ConnectFailed).await;
                        }
                    }
                }
                Endpoint::Unix(path) => match UnixStream::connect(path).await {
                    Ok(mut s) => {
                        reply.accept().await;
                        pump(&mut s, &mut channel.into_stream(), &r.counters).await;
                    }
                    Err(e) => {
                        r.counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "{}: -R {}: connect to {path} failed: {e}",
                            shared.cfg.name,
                            r.spec
                        );
                        reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    }
                },
            }
        });
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
