//! The forwarding client: one SSH connection (or an opt-in pool of them) per destination,
//! carrying every `-L`, `-R` and `-D` forward, supervised so that a lost connection is
//! re-established with backoff and every forward comes back without restarting anything.
//!
//! Local listeners are bound once, at start, and stay bound across reconnects: a client that
//! connects while the connection is down waits (up to `connect_timeout`) for it to come back.
//! Remote forwards are requested again on every new connection, asking for the same port the
//! server allocated before when the spec said port 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netutil::Reconfigured;
use russh::Disconnect;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::certs;
use super::forward::{self, Listeners};
use super::lock;
use super::session::{
    ClientHandler, Identity, JumpHandler, RefusalChange, RemoteForward, Shared, State,
};
use super::worker::Worker;
use crate::backoff::Backoff;
use crate::config::{
    AllocatedPort, ClientConfig, ClientCounts, Keepalive, SshClientStatus, TunnelState,
};
use crate::error::SshFwdError;
use crate::known_hosts;
use crate::options::{AddressFamily, AlgorithmList};
use crate::reload::ReloadPlan;
use crate::spec::Endpoint;

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// A running destination. Dropping it without [`SshClient::stop`] ends its connection
/// threads, and with them its listeners and forwarded connections, without a clean SSH
/// disconnect.
pub struct SshClient {
    shared: Arc<Shared>,
    /// The config the forwards and keepalive now follow: the start config, then each
    /// reload's.
    applied: Mutex<ClientConfig>,
    listeners: Listeners,
    workers: Vec<Worker>,
    tasks: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    allocated_rx: Option<mpsc::UnboundedReceiver<AllocatedPort>>,
}

impl SshClient {
    /// Loads keys, binds every local listener, connects (see [`ClientConfig::fail_fast`]),
    /// establishes the remote forwards and starts the supervisor.
    ///
    /// # Errors
    /// Unloadable identities, a listener that cannot bind (the message names the address),
    /// and with `fail_fast` a failed first connection (host key, auth, network); with
    /// `exit_on_forward_failure`, a remote forward the server refuses.
    pub async fn start(cfg: ClientConfig) -> Result<SshClient, SshFwdError> {
        let keys = load_identities(
            &cfg.identities,
            &cfg.certificates,
            cfg.passphrase.as_deref(),
        )?;
        let jump_keys = cfg
            .jump
            .iter()
            .map(|hop| load_identities(&hop.identities, &[], cfg.passphrase.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        let connections = cfg.connections.max(1);
        let workers = (0..connections)
            .map(|slot| Worker::spawn(format!("ssh-conn-{slot}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SshFwdError::Config(format!("cannot start a connection thread: {e}")))?;
        let (pool, _) = watch::channel(vec![None; connections]);
        let (allocated_tx, allocated_rx) = mpsc::unbounded_channel();
        let remote = cfg
            .remote
            .iter()
            .map(|spec| Arc::new(RemoteForward::new(spec.clone())))
            .collect();
        let (keepalive, _) = watch::channel(cfg.keepalive());
        let applied = Mutex::new(cfg.clone());
        let cfg_local = cfg.local.clone();
        let shared = Arc::new(Shared {
            russh: Arc::new(russh_config(&cfg, &cfg.host, cfg.port)?),
            keys,
            jump_keys,
            cfg,
            pool,
            next: AtomicUsize::new(0),
            remote: Mutex::new(remote),
            keepalive,
            state: Mutex::new(State::default()),
            host_key_refusal: Mutex::new(None),
            allocated_tx,
            runtimes: workers.iter().map(|w| w.handle().clone()).collect(),
            next_slot: AtomicUsize::new(0),
            refused_wake: Notify::new(),
            forward_requests_in_flight: watch::channel(0).0,
            local: Mutex::new(cfg_local),
            probes: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Bind before connecting: a port in use is a config error the user must see at once.
        let bound = match forward::bind_all(&shared.cfg.local_forwards(), shared.cfg.gateway_ports)
        {
            Ok(bound) => bound,
            Err(e) => {
                shutdown_workers(workers).await;
                return Err(e);
            }
        };
        let listeners = Listeners::default();
        listeners.add(&shared, bound);

        let first = if shared.cfg.fail_fast {
            // The session task is spawned where the connection is made: on slot 0's thread.
            let sh = shared.clone();
            let connected = shared.runtimes[0]
                .spawn(async move { connect_once(&sh).await })
                .await
                .unwrap_or_else(|e| Err(SshFwdError::Config(format!("connection task: {e}"))));
            let connection = match connected {
                Ok(c) => c,
                Err(e) => {
                    listeners.close_all();
                    shutdown_workers(workers).await;
                    return Err(e);
                }
            };
            if let Err(e) = request_remote_forwards(&shared, &connection.handle, true).await {
                listeners.close_all();
                let _ = connection
                    .handle
                    .disconnect(Disconnect::ByApplication, "forward refused", "")
                    .await;
                shutdown_workers(workers).await;
                return Err(e);
            }
            Some(connection)
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
        Ok(SshClient {
            shared,
            applied,
            listeners,
            workers,
            tasks,
            stop_tx,
            allocated_rx: Some(allocated_rx),
        })
    }

    /// Applies a changed config to the running destination without dropping its SSH
    /// connection, as [`ReloadPlan::between`] plans it: `-L` / `-D` listeners are opened and
    /// closed (a listener whose address stays but whose forward changes is kept and
    /// retargeted), `-R` forwards are requested and cancelled on the live connection (or at
    /// the next one if it is down), keepalive settings take effect at the next probe.
    /// Connections already open through any forward, kept or removed, carry on.
    ///
    /// Returns [`Reconfigured::NeedsRestart`] without changing anything when the change needs
    /// a new SSH connection (destination, identity, host key policy, cipher, connection
    /// count...).
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// A new listener cannot be bound; nothing was changed then.
    pub fn reconfigure(&self, new: &ClientConfig) -> Result<Reconfigured, SshFwdError> {
        let mut applied = lock(&self.applied);
        let plan = match ReloadPlan::between(&applied, new) {
            Ok(plan) => plan,
            Err(restart) => return Ok(Reconfigured::restart(restart.to_string())),
        };
        let shared = &self.shared;

        // Bind every new listener first, so that a failure leaves the running config untouched.
        let bound = forward::bind_all(&plan.bind, new.gateway_ports)?;
        self.listeners.close(&plan.close);
        self.listeners.retarget(&plan.retarget);
        self.listeners.add(shared, bound);

        let (cancelled, requested) = {
            let mut remote = lock(&shared.remote);
            let mut cancelled = Vec::new();
            remote.retain(|r| {
                let keep = !plan.cancel_remote.contains(&r.spec);
                if !keep {
                    cancelled.push(r.clone());
                }
                keep
            });
            let requested: Vec<_> = plan
                .request_remote
                .iter()
                .map(|spec| Arc::new(RemoteForward::new(spec.clone())))
                .collect();
            remote.extend(requested.iter().cloned());
            (cancelled, requested)
        };
        let live = shared.pool.borrow().first().cloned().flatten();
        if let Some(handle) = live.filter(|h| !h.is_closed())
            && !(cancelled.is_empty() && requested.is_empty())
        {
            let sh = shared.clone();
            shared.runtimes[0].spawn(async move {
                for r in &cancelled {
                    cancel_remote_forward(&handle, r).await;
                }
                for r in &requested {
                    let _ = request_remote_forward(&sh, &handle, r, false).await;
                }
            });
        }

        *lock(&shared.local) = new.local.clone();
        if let Some(keepalive) = plan.keepalive {
            shared.keepalive.send_replace(keepalive);
        }
        *applied = new.clone();
        Ok(Reconfigured::Live)
    }

    /// Ports allocated by the server for `-R` port 0 forwards, as they happen (also after
    /// reconnects). Can be taken once.
    pub fn allocated_ports(&mut self) -> Option<mpsc::UnboundedReceiver<AllocatedPort>> {
        self.allocated_rx.take()
    }

    /// The current state for `vipgate show ssh`.
    #[must_use]
    pub fn status(&self) -> SshClientStatus {
        let state = lock(&self.shared.state);
        let up = self
            .shared
            .pool
            .borrow()
            .iter()
            .flatten()
            .filter(|h| !h.is_closed())
            .count();
        let mut forwards = self.listeners.status();
        let at = now();
        forwards.extend(self.shared.remotes().iter().map(|r| r.status(at)));
        SshClientStatus {
            name: self.shared.cfg.name.clone(),
            state: if state.stopped {
                TunnelState::Stopped
            } else if up > 0 {
                TunnelState::Connected
            } else {
                TunnelState::Connecting
            },
            uptime: state
                .connected_at
                .map(|t| now().saturating_duration_since(t)),
            counters: ClientCounts {
                reconnects: state.reconnects,
                probes: self.shared.probes.load(Ordering::Relaxed),
                probe_failures: self.shared.probe_failures.load(Ordering::Relaxed),
            },
            connections_up: up,
            last_error: state.last_error.clone(),
            forwards,
        }
    }

    /// A `direct-tcpip` channel from the server to `host`:`port` as a byte stream: what
    /// `ssh -W` forwards stdin and stdout over.
    ///
    /// # Errors
    /// No live connection within `connect_timeout`, or the server could not open the channel
    /// (worded as a failed connect to `host`:`port`).
    pub async fn open_stream(
        &self,
        host: &str,
        port: u16,
    ) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + use<>, SshFwdError>
    {
        let handle =
            super::session::pick(&self.shared, 0)
                .await
                .ok_or_else(|| SshFwdError::Timeout {
                    host: self.shared.cfg.host.clone(),
                    port: self.shared.cfg.port,
                })?;
        let channel = handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|e| SshFwdError::Connect {
                host: host.to_string(),
                port,
                error: std::io::Error::other(format!("the server could not open it: {e}")),
            })?;
        Ok(channel.into_stream())
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
        self.listeners.close_all();
        shutdown_workers(self.workers).await;
    }

    /// Resolves when the destination can no longer work by itself: never, as long as it
    /// reconnects; kept for symmetry with a future "give up after N failures" policy.
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

/// Loads each identity with its certificate: the first of `certificates` (`CertificateFile`)
/// that certifies its key, else `<identity>-cert.pub` if that exists and certifies it (as
/// OpenSSH does; a `-cert.pub` for another key is skipped with a warning).
fn load_identities(
    paths: &[PathBuf],
    certificates: &[PathBuf],
    passphrase: Option<&str>,
) -> Result<Vec<Identity>, SshFwdError> {
    let explicit = certificates
        .iter()
        .map(|p| certs::load_certificate(p).map(|c| (p.clone(), c)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut keys = Vec::new();
    for path in paths {
        super::server::check_file_mode(path, true)?;
        let key = russh::keys::load_secret_key(path, passphrase).map_err(|e| {
            let why = match e {
                russh::keys::Error::KeyIsEncrypted => {
                    "the key is encrypted: give its passphrase (passphrase_file, or run interactively)".to_string()
                }
                other => other.to_string(),
            };
            SshFwdError::Identity { path: path.clone(), why }
        })?;
        let certifies =
            |c: &russh::keys::Certificate| c.public_key() == key.public_key().key_data();
        let mut cert = explicit.iter().find(|(_, c)| certifies(c)).cloned();
        if cert.is_none() {
            let mut beside = path.as_os_str().to_owned();
            beside.push("-cert.pub");
            let beside = PathBuf::from(beside);
            if beside.exists() {
                let c = certs::load_certificate(&beside)?;
                if certifies(&c) {
                    cert = Some((beside, c));
                } else {
                    tracing::warn!(
                        "{} does not certify {}; not used",
                        beside.display(),
                        path.display()
                    );
                }
            }
        }
        keys.push(Identity {
            path: path.clone(),
            key: Arc::new(key),
            cert,
        });
    }
    for (p, c) in &explicit {
        if !keys
            .iter()
            .any(|k| k.cert.as_ref().is_some_and(|(_, kc)| kc == c))
        {
            tracing::warn!(
                "CertificateFile {} certifies none of the identity files; not used",
                p.display()
            );
        }
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

/// russh's settings for a connection to `host`:`port` (the destination or a jump host).
fn russh_config(cfg: &ClientConfig, host: &str, port: u16) -> Result<client::Config, SshFwdError> {
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
    let algorithms = &cfg.algorithms;
    preferred.kex = restrict(
        &preferred.kex,
        |n| n.as_ref(),
        algorithms.kex.as_ref(),
        "KexAlgorithms",
    )?
    .into();
    preferred.mac = restrict(
        &preferred.mac,
        |n| n.as_ref(),
        algorithms.macs.as_ref(),
        "MACs",
    )?
    .into();
    preferred.key = restrict(
        &preferred.key,
        russh::keys::Algorithm::as_str,
        algorithms.host_keys.as_ref(),
        "HostKeyAlgorithms",
    )?
    .into();
    // Offer first the host key types known_hosts already has for this server, so the server
    // presents a key we can verify instead of one that would look like a key change.
    if let Ok(text) = std::fs::read_to_string(&cfg.known_hosts) {
        let known = known_hosts::known_algorithms(&text, host, port);
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
        // A `@cert-authority` for this host: ask for its host certificate first (OpenSSH
        // offers certificate algorithms ahead of plain keys). Without one a certificate could
        // only be judged as its plain key, so none is asked for.
        if !known_hosts::cert_authorities(&text, host, port).is_empty() {
            preferred.host_key_certificates = preferred.key.to_vec().into();
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

/// Applies an OpenSSH algorithm list to russh's defaults. The protocol markers in the kex list
/// (`ext-info-c`, `kex-strict-c-v00@openssh.com`: strict kex is the Terrapin fix) are not
/// algorithms a user chooses and are always kept.
fn restrict<T: Clone>(
    defaults: &[T],
    name: impl Fn(&T) -> &str,
    list: Option<&AlgorithmList>,
    keyword: &str,
) -> Result<Vec<T>, SshFwdError> {
    let Some(list) = list else {
        return Ok(defaults.to_vec());
    };
    let marker = |n: &str| n.starts_with("ext-info-") || n.starts_with("kex-strict-");
    let names: Vec<&str> = defaults.iter().map(&name).filter(|n| !marker(n)).collect();
    let chosen = list
        .select(&names)
        .map_err(|why| SshFwdError::Config(format!("{keyword}: {why}")))?;
    let mut out: Vec<T> = chosen
        .iter()
        .filter_map(|c| defaults.iter().find(|d| name(d) == *c).cloned())
        .collect();
    out.extend(defaults.iter().filter(|d| marker(name(d))).cloned());
    Ok(out)
}

/// Receive window per channel: 8 MiB keeps a loopback or LAN pipe full at several Gbit/s
/// without one slow reader holding much (the window is credit, not a buffer we allocate).
const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
/// Largest packet we accept (russh caps it below 64 KiB); OpenSSH sends up to this, so fewer, larger packets are
/// encrypted and MACed per megabyte.
const MAX_PACKET: u32 = 65_535;
/// Messages queued per channel before backpressure reaches the SSH connection.
const CHANNEL_BUFFER: usize = 64;

/// One SSH connection to the destination, with the jump host sessions it runs through (kept
/// for as long as the connection lives; they end with it).
pub(crate) struct Connection {
    pub(crate) handle: Arc<Handle<ClientHandler>>,
    /// Resolves when the session task ends.
    pub(crate) closed: oneshot::Receiver<()>,
    _hops: Vec<Handle<JumpHandler>>,
}

fn target_name(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn connect_once(shared: &Arc<Shared>) -> Result<Connection, SshFwdError> {
    let cfg = &shared.cfg;
    let fut = async {
        *lock(&shared.host_key_refusal) = None;
        let (closed_tx, closed_rx) = oneshot::channel();
        let handler = ClientHandler::new(shared.clone(), closed_tx);
        let refusal = |e: SshFwdError| match lock(&shared.host_key_refusal).take() {
            Some(msg) => SshFwdError::HostKey(msg),
            None => e,
        };
        let (handle, hops) = if cfg.jump.is_empty() {
            let tcp = connect_tcp(cfg, &cfg.host, cfg.port)
                .await
                .map_err(|error| SshFwdError::Connect {
                    host: cfg.host.clone(),
                    port: cfg.port,
                    error,
                })?;
            let _ = tcp.set_nodelay(true);
            let handle = client::connect_stream(shared.russh.clone(), tcp, handler)
                .await
                .map_err(refusal)?;
            (handle, Vec::new())
        } else {
            let (hops, stream) = connect_jumps(shared).await?;
            let handle = client::connect_stream(shared.russh.clone(), stream, handler)
                .await
                .map_err(refusal)?;
            (handle, hops)
        };
        Ok::<_, SshFwdError>((handle, closed_rx, hops))
    };
    let (mut handle, closed, hops) = tokio::time::timeout(cfg.connect_timeout, fut)
        .await
        .map_err(|_| SshFwdError::Timeout {
            host: cfg.host.clone(),
            port: cfg.port,
        })??;
    authenticate(shared, &mut handle, &cfg.user, &cfg.host, &shared.keys).await?;
    Ok(Connection {
        handle: Arc::new(handle),
        closed,
        _hops: hops,
    })
}

/// Connects and authenticates every `ProxyJump` hop in order, each through the previous one's
/// `direct-tcpip` channel, checking each hop's host key against known_hosts under its own
/// name; returns the hop sessions and a stream to the destination through the last one.
async fn connect_jumps(
    shared: &Arc<Shared>,
) -> Result<(Vec<Handle<JumpHandler>>, russh::ChannelStream<client::Msg>), SshFwdError> {
    let cfg = &shared.cfg;
    let mut hops: Vec<Handle<JumpHandler>> = Vec::new();
    for (hop, keys) in cfg.jump.iter().zip(&shared.jump_keys) {
        let russh = Arc::new(russh_config(cfg, &hop.host, hop.port)?);
        let handler = JumpHandler::new(shared.clone(), &hop.host, hop.port);
        let refusal = |e: SshFwdError| match lock(&shared.host_key_refusal).take() {
            Some(msg) => SshFwdError::HostKey(msg),
            None => e,
        };
        let mut handle = match hops.last() {
            None => {
                let tcp = connect_tcp(cfg, &hop.host, hop.port)
                    .await
                    .map_err(|error| SshFwdError::Connect {
                        host: hop.host.clone(),
                        port: hop.port,
                        error,
                    })?;
                let _ = tcp.set_nodelay(true);
                client::connect_stream(russh, tcp, handler)
                    .await
                    .map_err(refusal)?
            }
            Some(previous) => {
                let stream = open_through(previous, &hop.host, hop.port).await?;
                client::connect_stream(russh, stream, handler)
                    .await
                    .map_err(refusal)?
            }
        };
        authenticate(shared, &mut handle, &hop.user, &hop.host, keys).await?;
        tracing::debug!(
            "{}: through jump host {}",
            cfg.name,
            target_name(&hop.host, hop.port)
        );
        hops.push(handle);
    }
    let last = hops
        .last()
        .ok_or_else(|| SshFwdError::Config("no jump host".to_string()))?;
    let stream = open_through(last, &cfg.host, cfg.port).await?;
    Ok((hops, stream))
}

/// A `direct-tcpip` channel from a jump host to `host`:`port`, as a byte stream.
async fn open_through(
    via: &Handle<JumpHandler>,
    host: &str,
    port: u16,
) -> Result<russh::ChannelStream<client::Msg>, SshFwdError> {
    let channel = via
        .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
        .await
        .map_err(|e| SshFwdError::Connect {
            host: host.to_string(),
            port,
            error: std::io::Error::other(format!("the jump host could not open it: {e}")),
        })?;
    Ok(channel.into_stream())
}

/// Resolves the destination, keeps the addresses of the configured family, and connects to
/// each in resolver order (from `bind_address` when set) until one answers; the last error is
/// the one reported, as ssh reports it.
async fn connect_tcp(cfg: &ClientConfig, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addrs = tokio::net::lookup_host((host, port)).await?;
    let mut last = None;
    for addr in addrs {
        let wanted = match cfg.address_family {
            AddressFamily::Any => true,
            AddressFamily::Inet => addr.is_ipv4(),
            AddressFamily::Inet6 => addr.is_ipv6(),
        };
        if !wanted {
            continue;
        }
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(local) = cfg.bind_address {
            socket.bind(std::net::SocketAddr::new(local, 0))?;
        }
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no address of the requested family",
        )
    }))
}

/// Public-key authentication as `user` with `keys`, then (unless disabled) the agent's keys.
async fn authenticate<H: client::Handler>(
    shared: &Arc<Shared>,
    handle: &mut Handle<H>,
    user: &str,
    host: &str,
    keys: &[Identity],
) -> Result<(), SshFwdError> {
    let cfg = &shared.cfg;
    let mut tried = Vec::new();
    // What the server last said can continue (ssh prints it in "Permission denied (...)").
    let mut offered: Option<russh::MethodSet> = None;
    let rsa_hash = handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .unwrap_or(Some(HashAlg::Sha256));
    for Identity { path, key, cert } in keys {
        // The certificate first, then the plain key (what OpenSSH offers).
        if let Some((cert_path, cert)) = cert {
            tried.push(cert_path.display().to_string());
            if !failed(
                &mut offered,
                handle
                    .authenticate_openssh_cert(user, key.clone(), cert.clone())
                    .await?,
            ) {
                tracing::debug!(
                    "{}: authenticated with certificate {}",
                    cfg.name,
                    cert_path.display()
                );
                return Ok(());
            }
        }
        tried.push(path.display().to_string());
        let key = PrivateKeyWithHashAlg::new(key.clone(), rsa_hash);
        if !failed(
            &mut offered,
            handle.authenticate_publickey(user, key).await?,
        ) {
            tracing::debug!("{}: authenticated with {}", cfg.name, path.display());
            return Ok(());
        }
    }
    if cfg.use_agent && (cfg.agent_socket.is_some() || std::env::var_os("SSH_AUTH_SOCK").is_some())
    {
        let agent = match &cfg.agent_socket {
            Some(path) => russh::keys::agent::client::AgentClient::connect_uds(path).await,
            None => russh::keys::agent::client::AgentClient::connect_env().await,
        };
        match agent {
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
                        .authenticate_publickey_with(user, key, hash, &mut agent)
                        .await
                    {
                        Ok(r) => {
                            if !failed(&mut offered, r) {
                                return Ok(());
                            }
                        }
                        Err(e) => tracing::debug!("agent signing failed: {e}"),
                    }
                }
            }
            Err(e) => tracing::debug!("ssh-agent unavailable: {e}"),
        }
    }
    if let Some(prompt) = &cfg.prompt
        && (cfg.kbd_interactive_authentication || cfg.password_authentication)
    {
        // Ask what the server still takes: no prompt for a method it does not offer.
        if !failed(&mut offered, handle.authenticate_none(user).await?) {
            return Ok(());
        }
        let can_continue = offered.clone().unwrap_or_else(russh::MethodSet::empty);
        let who = format!("{user}@{host}");
        if cfg.kbd_interactive_authentication
            && can_continue.contains(&russh::MethodKind::KeyboardInteractive)
        {
            tried.push("keyboard-interactive".to_string());
            if keyboard_interactive(handle, user, &who, prompt).await? {
                tracing::debug!("{}: authenticated with keyboard-interactive", cfg.name);
                return Ok(());
            }
        }
        if cfg.password_authentication && can_continue.contains(&russh::MethodKind::Password) {
            tried.push("password".to_string());
            for attempt in 0..PASSWORD_ATTEMPTS {
                if attempt > 0 {
                    tracing::warn!("Permission denied, please try again.");
                }
                let (answer, asked) = (prompt.answer.clone(), who.clone());
                let Ok(Some(password)) =
                    tokio::task::spawn_blocking(move || answer.password(&asked)).await
                else {
                    break;
                };
                if !failed(
                    &mut offered,
                    handle.authenticate_password(user, password).await?,
                ) {
                    tracing::debug!("{}: authenticated with a password", cfg.name);
                    return Ok(());
                }
            }
        }
    }
    // Nothing was tried (no identities, no prompt): ask what the server takes, for ssh's
    // "Permission denied (publickey,password)".
    if offered.is_none() && !failed(&mut offered, handle.authenticate_none(user).await?) {
        return Ok(());
    }
    Err(SshFwdError::AuthFailed {
        user: user.to_string(),
        host: host.to_string(),
        methods: denied_methods(offered.as_deref()),
        tried: if tried.is_empty() {
            "no identities".to_string()
        } else {
            tried.join(", ")
        },
    })
}

/// Whether an authentication attempt failed, keeping the methods the server said can
/// continue.
fn failed(offered: &mut Option<russh::MethodSet>, r: client::AuthResult) -> bool {
    match r {
        client::AuthResult::Success => false,
        client::AuthResult::Failure {
            remaining_methods, ..
        } => {
            *offered = Some(remaining_methods);
            true
        }
    }
}

/// The methods of "Permission denied (...)": the server's last list in its order, as ssh
/// prints it; `publickey` when none came (the server closed first).
fn denied_methods(offered: Option<&[russh::MethodKind]>) -> String {
    let names: Vec<&str> = offered
        .unwrap_or_default()
        .iter()
        .filter(|m| **m != russh::MethodKind::None)
        .map(<&str>::from)
        .collect();
    if names.is_empty() {
        "publickey".to_string()
    } else {
        names.join(",")
    }
}

/// Passwords asked for before giving up (OpenSSH's `NumberOfPasswordPrompts`).
const PASSWORD_ATTEMPTS: usize = 3;
/// Keyboard-interactive rounds and prompts per round accepted from a server: one that keeps
/// asking is refused instead of prompting forever.
const MAX_KBD_ROUNDS: usize = 8;
const MAX_KBD_PROMPTS: usize = 16;

/// Keyboard-interactive authentication, each round's prompts answered by `prompt`; whether
/// the server accepted.
async fn keyboard_interactive<H: client::Handler>(
    handle: &mut Handle<H>,
    user: &str,
    who: &str,
    prompt: &crate::config::Prompt,
) -> Result<bool, SshFwdError> {
    let mut reply = handle
        .authenticate_keyboard_interactive_start(user, None)
        .await?;
    for _ in 0..MAX_KBD_ROUNDS {
        let (name, instructions, prompts) = match reply {
            client::KeyboardInteractiveAuthResponse::Success => return Ok(true),
            client::KeyboardInteractiveAuthResponse::Failure { .. } => return Ok(false),
            client::KeyboardInteractiveAuthResponse::InfoRequest {
                name,
                instructions,
                prompts,
            } => (name, instructions, prompts),
        };
        if prompts.len() > MAX_KBD_PROMPTS {
            tracing::warn!(
                "{who}: the server asked {} keyboard-interactive questions at once; giving up",
                prompts.len()
            );
            return Ok(false);
        }
        let prompts: Vec<(String, bool)> =
            prompts.into_iter().map(|p| (p.prompt, p.echo)).collect();
        let (answer, asked) = (prompt.answer.clone(), who.to_string());
        let answers = tokio::task::spawn_blocking(move || {
            answer.keyboard_interactive(&asked, &name, &instructions, &prompts)
        })
        .await;
        let Ok(Some(answers)) = answers else {
            return Ok(false);
        };
        reply = handle
            .authenticate_keyboard_interactive_respond(answers)
            .await?;
    }
    tracing::warn!("{who}: more than {MAX_KBD_ROUNDS} keyboard-interactive rounds; giving up");
    Ok(false)
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
///
/// A refusal fails with `strict` and `exit_on_forward_failure`; otherwise the forward turns
/// `pending` and [`retry_refused`] asks again with backoff on the same connection (the old
/// session of a restarted client may still hold the port on the server: autossh's classic
/// failure). Logs when the forward turns pending and when it binds, not every attempt.
async fn request_remote_forward(
    shared: &Arc<Shared>,
    handle: &Handle<ClientHandler>,
    r: &RemoteForward,
    strict: bool,
) -> Result<(), SshFwdError> {
    let refused = |e: russh::Error| {
        if strict && shared.cfg.exit_on_forward_failure {
            r.set_down();
            // ssh names the port alone (or the socket path).
            let listen = match &r.spec.listen {
                Endpoint::Tcp { port, .. } => port.to_string(),
                Endpoint::Unix(path) => path.clone(),
            };
            return Err(SshFwdError::RemoteForwardRefused(listen));
        }
        let change = r.set_refused(shared.cfg.backoff, now(), rand::random());
        if change == RefusalChange::NowPending {
            tracing::warn!(
                "{}: Warning: {} ({e}); retrying with backoff up to {:?}",
                shared.cfg.name,
                r.refusal_reason(),
                shared.cfg.backoff.max
            );
            shared.refused_wake.notify_one();
        } else {
            tracing::debug!("{}: {} again ({e})", shared.cfg.name, r.refusal_reason());
        }
        Ok(())
    };
    let bound = |r: &RemoteForward, port: u64| {
        if let Some(attempts) = r.set_listening(port) {
            tracing::info!(
                "{}: remote forward {} established after {attempts} refused request(s)",
                shared.cfg.name,
                r.spec
            );
        }
    };
    // Held until the answer below is applied (`bound` or `refused`).
    let _in_flight = shared.forward_request_in_flight();
    let (host, port) = match &r.spec.listen {
        Endpoint::Tcp { host, port } => (host, *port),
        Endpoint::Unix(path) => {
            return match handle.streamlocal_forward(path.clone()).await {
                Ok(()) => {
                    bound(r, 0);
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
            let port_now = if port == 0 {
                if allocated != 0 { allocated } else { want }
            } else {
                u32::from(port)
            };
            bound(r, u64::from(port_now));
            if port == 0 {
                r.last_allocated
                    .store(u64::from(port_now), Ordering::Relaxed);
                let port = u16::try_from(port_now).unwrap_or(0);
                let target = match &r.spec.connect {
                    Some(target) => target.to_string(),
                    None => "SOCKS requests (reverse dynamic)".to_string(),
                };
                let _ = shared.allocated_tx.send(AllocatedPort { port, target });
            }
            Ok(())
        }
        Err(e) => refused(e),
    }
}

/// Asks again, on the live connection `handle`, for each `-R` the server refused, when its
/// backoff says so; never returns (the supervisor drops it with the connection).
async fn retry_refused(shared: &Arc<Shared>, handle: &Handle<ClientHandler>) {
    loop {
        let due = shared.remotes().iter().filter_map(|r| r.retry_at()).min();
        match due {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = shared.refused_wake.notified() => continue,
                }
            }
            None => {
                shared.refused_wake.notified().await;
                continue;
            }
        }
        let at = now();
        for r in shared.remotes() {
            if r.retry_at().is_some_and(|due| due <= at) {
                let _ = request_remote_forward(shared, handle, &r, false).await;
            }
        }
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

/// Resolves with the reason when a probe through the connection of `slot` fails: every
/// `interval`, [`probe_forwards`].
async fn probe_failed(
    shared: &Arc<Shared>,
    slot: usize,
    handle: &Handle<ClientHandler>,
    interval: Duration,
) -> String {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(why) = probe_forwards(shared, slot, handle).await {
            return why;
        }
    }
}

/// Opens a channel end to end through every forward, one at a time, each within
/// `connect_timeout`: for a `-L`, a `direct-tcpip` (or `direct-streamlocal`) channel to its
/// target, which the server only confirms once it has connected; for a `-R` (carried by slot
/// 0), a channel to the server's own listening address, which must come back to us as the
/// forwarded channel of that forward (and is served as any other: its target sees a
/// connection open and close). `-D` forwards have no fixed target: a `direct-tcpip` channel to
/// `probe_target` stands for them when one is named.
async fn probe_forwards(
    shared: &Arc<Shared>,
    slot: usize,
    handle: &Handle<ClientHandler>,
) -> Result<(), String> {
    let timeout = shared.cfg.connect_timeout;
    // Every `-L` has a target (parse_local), which is what is probed.
    let targets: Vec<(String, Endpoint)> = lock(&shared.local)
        .iter()
        .filter_map(|spec| Some((spec.to_string(), spec.connect.clone()?)))
        .collect();
    for (spec, target) in &targets {
        let open = async {
            match target {
                Endpoint::Tcp { host, port } => {
                    handle
                        .channel_open_direct_tcpip(
                            host.as_deref().unwrap_or("localhost"),
                            u32::from(*port),
                            "127.0.0.1",
                            0,
                        )
                        .await
                }
                Endpoint::Unix(path) => handle.channel_open_direct_streamlocal(path.clone()).await,
            }
        };
        let result = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(format!(
                "probe of -L {spec} failed: the server could not open {target}: {e}"
            )),
            Err(_) => Err(format!("probe of -L {spec} timed out after {timeout:?}")),
        };
        count_probe(shared, result)?;
    }
    if let Some((host, port)) = &shared.cfg.probe_target {
        let open =
            handle.channel_open_direct_tcpip(host.as_str(), u32::from(*port), "127.0.0.1", 0);
        let result = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(format!(
                "probe of -D target {host}:{port} failed: the server could not open it: {e}"
            )),
            Err(_) => Err(format!(
                "probe of -D target {host}:{port} timed out after {timeout:?}"
            )),
        };
        count_probe(shared, result)?;
    }
    if slot != 0 {
        return Ok(());
    }
    for r in shared.remotes() {
        if !r.listening.load(Ordering::Relaxed) {
            continue;
        }
        let mut arrivals = r.arrivals.subscribe();
        let before = *arrivals.borrow_and_update();
        let round_trip = async {
            let channel = match &r.spec.listen {
                Endpoint::Tcp { host, .. } => {
                    let port = u32::try_from(r.bound_port.load(Ordering::Relaxed)).unwrap_or(0);
                    handle
                        .channel_open_direct_tcpip(
                            probe_host(host.as_deref()),
                            port,
                            "127.0.0.1",
                            0,
                        )
                        .await
                }
                Endpoint::Unix(path) => handle.channel_open_direct_streamlocal(path.clone()).await,
            }
            .map_err(|e| format!("the server could not connect to its listener: {e}"))?;
            let back = arrivals.wait_for(|n| *n != before).await.map(|_| ());
            let _ = channel.close().await;
            back.map_err(|_| "the forward was removed".to_string())
        };
        let result = match tokio::time::timeout(timeout, round_trip).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(format!("probe of -R {} failed: {why}", r.spec)),
            Err(_) => Err(format!(
                "probe of -R {} timed out after {timeout:?} (no forwarded channel came back)",
                r.spec
            )),
        };
        count_probe(shared, result)?;
    }
    Ok(())
}

fn count_probe(shared: &Shared, result: Result<(), String>) -> Result<(), String> {
    shared.probes.fetch_add(1, Ordering::Relaxed);
    if result.is_err() {
        shared.probe_failures.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// Where a probe reaches the server's listener of a `-R` bound to `host` (OpenSSH's
/// defaults: none is localhost, `*` and empty are every address, loopback among them).
fn probe_host(host: Option<&str>) -> String {
    match host {
        None | Some("localhost") => "localhost".to_string(),
        Some("*" | "" | "0.0.0.0") => "127.0.0.1".to_string(),
        Some("::") => "::1".to_string(),
        Some(h) => h.to_string(),
    }
}

async fn supervise(
    shared: Arc<Shared>,
    slot: usize,
    mut first: Option<Connection>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(shared.cfg.backoff);
    let mut ever_up = false;
    loop {
        let connection = match first.take() {
            Some(c) => c,
            None => match connect_once(&shared).await {
                Ok(c) => {
                    if slot == 0 {
                        let _ = request_remote_forwards(&shared, &c.handle, false).await;
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
        // The jump host sessions (if any) live as long as this binding: until the loop turns.
        let Connection {
            handle,
            closed,
            _hops,
        } = connection;
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
        let retry = async {
            if slot == 0 {
                retry_refused(&shared, &handle).await;
            }
            std::future::pending::<()>().await;
        };
        let probe = async {
            match shared.cfg.probe_interval.filter(|d| !d.is_zero()) {
                Some(interval) => probe_failed(&shared, slot, &handle, interval).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = closed => {}
            () = retry => {}
            why = probe => {
                tracing::warn!("{}: {why}; reconnecting", shared.cfg.name);
                lock(&shared.state).last_error = Some(why);
                let _ = handle.disconnect(Disconnect::ByApplication, "probe failed", "").await;
            }
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

#[cfg(test)]
mod tests {
    use super::denied_methods;
    use russh::MethodKind;

    #[test]
    fn permission_denied_names_what_the_server_offered_in_its_order() {
        let offered = [MethodKind::PublicKey, MethodKind::Password];
        assert_eq!(denied_methods(Some(&offered)), "publickey,password");
        let offered = [
            MethodKind::None,
            MethodKind::KeyboardInteractive,
            MethodKind::PublicKey,
        ];
        assert_eq!(
            denied_methods(Some(&offered)),
            "keyboard-interactive,publickey"
        );
        assert_eq!(denied_methods(None), "publickey");
    }
}
