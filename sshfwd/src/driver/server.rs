//! The forwarding-only SSH server (`vipgate sshd`): public-key authentication against an
//! authorized_keys file (user certificates signed by its `cert-authority` keys or by the
//! `trusted_user_ca_keys` file too; a host certificate presented when configured), `direct-tcpip` (clients' `-L`/`-D`) and `tcpip-forward` (clients'
//! `-R`) within permit lists, and their unix socket forms (`direct-streamlocal@openssh.com`,
//! `streamlocal-forward@openssh.com`: `-L ...:/path`, `-R /path:...`) within path permit
//! lists (default none; see [`crate::sockpath`] and `unixsock.rs`); sessions may be opened (OpenSSH's `ssh` without `-N` opens one)
//! but shells, commands and subsystems are refused with a message on the client's stderr.
//!
//! authorized_keys is re-read whenever its modification time or size changes (checked on
//! every offer, as sshd re-reads it), so keys can be added or revoked without a restart.
//!
//! Bounds (see [`crate::ServerLimits`]): unauthenticated connections are admitted as OpenSSH's
//! `MaxStartups`/`PerSourceMaxStartups` do and closed after `login_grace_time` (also one that
//! never sends its version line); an authenticated session holds at most
//! `max_channels_per_session` forwarded channels and `max_listeners_per_session` `-R`
//! listeners, the server at most `max_channels` and `max_listeners`. A refusal is an SSH-level
//! failure (channel open failure, request failure) counted in [`ServerCounters`]; the session
//! stays up. Client-supplied text (user names, hosts) is logged escaped (`{:?}`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::task::AtomicWaker;
use netutil::task::TaskWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use russh::keys::{HashAlg, PrivateKey, PublicKeyBase64};
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::certs;
use super::copy::{ForwardCounters, pump};
use super::lock;
use super::unixsock::{self, HeldPaths, SocketFile};
use crate::config::{ServerConfig, ServerCounts, ServerStatus};
use crate::error::SshFwdError;
use crate::policy::{AuthorizedKey, KeyOptions, Now, PermitList, Unusable, parse_authorized_keys};
use crate::sockpath::{PathPermit, check_path};
use crate::startups::{Refusal, Startups};

/// Largest `trusted_user_ca_keys` file read.
const MAX_CA_FILE: u64 = 1024 * 1024;

fn ca_fingerprint(cert: &russh::keys::Certificate) -> String {
    russh::keys::PublicKey::new(cert.signature_key().clone(), "")
        .fingerprint(HashAlg::Sha256)
        .to_string()
}

/// Counters for `vipgate show ssh`.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Sessions now open (authenticated or not).
    pub sessions: AtomicU64,
    /// Logins accepted since start.
    pub logins: AtomicU64,
    /// Public keys refused.
    pub auth_refused: AtomicU64,
    /// Forward requests refused by policy.
    pub forwards_refused: AtomicU64,
    /// Shell/exec/subsystem requests refused.
    pub sessions_refused: AtomicU64,
    /// Forwarded connections (both directions).
    pub channels: ForwardCounters,
    /// Connections not yet authenticated (gauge).
    pub pending: AtomicU64,
    /// Connections refused by `max_startups` (full, or the random early drop).
    pub refused_max_startups: AtomicU64,
    /// Connections refused by `per_source_max_startups`.
    pub refused_per_source: AtomicU64,
    /// Connections closed because they did not authenticate within `login_grace_time`.
    pub login_grace_expired: AtomicU64,
    /// Channels refused because a per-session or global channel cap was reached.
    pub channels_refused: AtomicU64,
    /// `-R` requests refused because a per-session or global listener cap was reached.
    pub listeners_refused: AtomicU64,
    /// accept() errors (EMFILE and the like) on the sshd listener.
    pub accept_errors: AtomicU64,
}

/// The host key and whether it was just created (the CLI prints the fingerprint either way).
#[derive(Debug, Clone)]
pub struct HostKeyInfo {
    /// `ssh-ed25519` etc.
    pub algorithm: String,
    /// `SHA256:...`.
    pub fingerprint: String,
    /// The key was generated at this start.
    pub generated: bool,
    /// The public key line (`ssh-ed25519 AAAA...`) for clients' known_hosts.
    pub public_line: String,
}

/// Loads the host key, generating an ed25519 key (mode 0600, plus a `.pub`) if the file is absent.
///
/// # Errors
/// Unreadable or unwritable key files.
pub fn load_or_generate_host_key(path: &Path) -> Result<(PrivateKey, HostKeyInfo), SshFwdError> {
    let file_err = |error| SshFwdError::File {
        path: path.to_path_buf(),
        error,
    };
    let (key, generated) = if path.exists() {
        check_file_mode(path, true)?;
        let key = russh::keys::load_secret_key(path, None).map_err(|e| SshFwdError::Identity {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        (key, false)
    } else {
        let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
            .map_err(|e| SshFwdError::Config(format!("cannot generate host key: {e}")))?;
        let pem = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| SshFwdError::Config(format!("cannot encode host key: {e}")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(file_err)?;
        }
        write_private(path, pem.as_bytes()).map_err(file_err)?;
        let public = key.public_key().to_openssh().unwrap_or_default();
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        std::fs::write(&pub_path, format!("{public}\n")).map_err(file_err)?;
        (key, true)
    };
    let info = HostKeyInfo {
        algorithm: key.algorithm().as_str().to_string(),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        generated,
        public_line: key.public_key().to_openssh().unwrap_or_default(),
    };
    Ok((key, info))
}

/// StrictModes-style check of a key or policy file: owned by root or by this process's user,
/// not writable by group or others, and for a `secret` not readable by them either.
///
/// # Errors
/// [`SshFwdError::Insecure`] saying what is wrong; [`SshFwdError::File`] if it cannot be read.
pub fn check_file_mode(path: &Path, secret: bool) -> Result<(), SshFwdError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|error| SshFwdError::File {
        path: path.to_path_buf(),
        error,
    })?;
    // The owner of /proc/self is the process's effective uid (no unsafe geteuid needed).
    let me = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    let insecure = |why: String| SshFwdError::Insecure {
        path: path.to_path_buf(),
        why,
    };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(insecure(format!(
            "owned by uid {}, not root or uid {me}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "mode {mode:04o} is writable by group or others (chmod go-w)"
        )));
    }
    if secret && mode & 0o044 != 0 {
        return Err(insecure(format!(
            "mode {mode:04o}: a secret must not be readable by group or others (chmod 600)"
        )));
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

struct Shared {
    cfg: ServerConfig,
    counters: ServerCounters,
    fingerprint: String,
    startups: Mutex<Startups>,
    /// Forwarded channels open now in the whole server.
    channels_open: AtomicU32,
    /// `-R` listeners now bound in the whole server.
    listeners_open: AtomicU32,
    /// Socket paths the `-R /path` listeners of every session hold.
    held_paths: HeldPaths,
    keys_cache: Mutex<Option<KeysCache>>,
}

/// The parsed authorized_keys and what identified the file version it came from.
struct KeysCache {
    stamp: (SystemTime, u64, u64),
    keys: Arc<Vec<AuthorizedKey>>,
}

/// A running `vipgate sshd`.
pub struct SshServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    watch: TaskWatch,
    host_key: HostKeyInfo,
}

impl SshServer {
    /// Loads (or creates) the host key, binds, and serves in the background.
    ///
    /// # Errors
    /// Host key problems, or the listen address cannot be bound.
    pub async fn start(cfg: ServerConfig) -> Result<SshServer, SshFwdError> {
        let (key, host_key) = load_or_generate_host_key(&cfg.host_key)?;
        let certificates = match &cfg.host_certificate {
            Some(path) => {
                let cert = certs::load_certificate(path)?;
                if cert.public_key() != key.public_key().key_data() {
                    return Err(SshFwdError::Identity {
                        path: path.clone(),
                        why: format!(
                            "the certificate is not for the host key {}",
                            cfg.host_key.display()
                        ),
                    });
                }
                if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::Host {
                    return Err(SshFwdError::Identity {
                        path: path.clone(),
                        why: "not a host certificate".into(),
                    });
                }
                vec![cert]
            }
            None => Vec::new(),
        };
        if let Some(path) = &cfg.trusted_user_ca_keys {
            check_file_mode(path, false)?;
        }
        if cfg.authorized_keys.exists() {
            check_file_mode(&cfg.authorized_keys, false)?;
        } else {
            tracing::warn!(
                "{} does not exist: every login will be refused",
                cfg.authorized_keys.display()
            );
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|error| SshFwdError::Bind {
                addr: cfg.listen.to_string(),
                what: "sshd".into(),
                error,
            })?;
        let local_addr = listener.local_addr().map_err(|error| SshFwdError::Bind {
            addr: cfg.listen.to_string(),
            what: "sshd".into(),
            error,
        })?;
        let russh_cfg = Arc::new(server::Config {
            keys: vec![key],
            certificates,
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: cfg.idle_timeout,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            // 2 MiB per channel keeps a 1 Gbit/s × 16 ms path full while bounding what a
            // client can make us buffer per channel.
            window_size: 2 * 1024 * 1024,
            maximum_packet_size: 65_535,
            channel_buffer_size: 32,
            max_auth_attempts: 6,
            ..server::Config::default()
        });
        let l = &cfg.limits;
        let startups = Startups::new(
            l.max_startups,
            l.per_source_max_startups,
            l.per_source_netblock,
        );
        let shared = Arc::new(Shared {
            cfg,
            counters: ServerCounters::default(),
            fingerprint: host_key.fingerprint.clone(),
            startups: Mutex::new(startups),
            channels_open: AtomicU32::new(0),
            listeners_open: AtomicU32::new(0),
            held_paths: HeldPaths::default(),
            keys_cache: Mutex::new(None),
        });
        let watch = TaskWatch::new();
        let task = watch.spawn(
            "sshd accept loop",
            accept_loop(shared.clone(), listener, russh_cfg),
        );
        Ok(SshServer {
            shared,
            local_addr,
            task,
            watch,
            host_key,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The host key in use.
    #[must_use]
    pub fn host_key(&self) -> &HostKeyInfo {
        &self.host_key
    }

    /// Counters for `vipgate show ssh`.
    #[must_use]
    pub fn status(&self) -> ServerStatus {
        let c = &self.shared.counters;
        ServerStatus {
            listen: self.local_addr.to_string(),
            fingerprint: self.shared.fingerprint.clone(),
            sessions: c.sessions.load(Ordering::Relaxed),
            channels_active: c.channels.active.load(Ordering::Relaxed),
            pending: c.pending.load(Ordering::Relaxed),
            counters: ServerCounts {
                logins: c.logins.load(Ordering::Relaxed),
                auth_refused: c.auth_refused.load(Ordering::Relaxed),
                forwards_refused: c.forwards_refused.load(Ordering::Relaxed),
                channels_total: c.channels.total.load(Ordering::Relaxed),
                bytes_out: c.channels.bytes_out.load(Ordering::Relaxed),
                bytes_in: c.channels.bytes_in.load(Ordering::Relaxed),
                refused_max_startups: c.refused_max_startups.load(Ordering::Relaxed),
                refused_per_source: c.refused_per_source.load(Ordering::Relaxed),
                login_grace_expired: c.login_grace_expired.load(Ordering::Relaxed),
                channels_refused: c.channels_refused.load(Ordering::Relaxed),
                listeners_refused: c.listeners_refused.load(Ordering::Relaxed),
                accept_errors: c.accept_errors.load(Ordering::Relaxed),
            },
        }
    }

    /// The accept loop's end, if it ended while the server was not being stopped.
    #[must_use]
    pub fn dead_task(&self) -> Option<String> {
        self.watch.dead()
    }

    /// Stops accepting and waits until the listener is closed; open sessions end with the
    /// process.
    pub async fn stop(self) {
        self.watch.stopping();
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Backoff after accept errors (EMFILE, ENFILE, ENOBUFS): doubles from 10 ms to 1 s, so a
/// full descriptor table neither spins the loop nor delays recovery long.
pub(crate) struct AcceptBackoff(Duration);

impl AcceptBackoff {
    pub(crate) fn new() -> Self {
        AcceptBackoff(Duration::ZERO)
    }
    pub(crate) fn reset(&mut self) {
        self.0 = Duration::ZERO;
    }
    pub(crate) fn next(&mut self) -> Duration {
        self.0 = (self.0 * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.0
    }
}

/// Lets the login-grace timer close a connection whose session task russh owns: once killed,
/// every read and write fails, so the session ends and the socket is closed.
#[derive(Default)]
struct Kill {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl Kill {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }
    fn check(&self, cx: &Context<'_>) -> Result<(), std::io::Error> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::Acquire) {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "login grace time exceeded",
            ))
        } else {
            Ok(())
        }
    }
}

struct KillableStream {
    inner: TcpStream,
    kill: Arc<Kill>,
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.kill.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.kill.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.kill.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A pending (unauthenticated) connection's place in [`Startups`]; released once.
struct StartupSlot {
    shared: Arc<Shared>,
    source: Option<IpAddr>,
}

impl StartupSlot {
    fn release(&mut self) {
        if let Some(source) = self.source.take() {
            lock(&self.shared.startups).release(source);
            self.shared.counters.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// One open session in [`ServerCounters::sessions`].
struct SessionCount(Arc<Shared>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    cfg: Arc<server::Config>,
) -> Result<(), std::io::Error> {
    let mut backoff = AcceptBackoff::new();
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                shared
                    .counters
                    .accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next();
                tracing::warn!("sshd accept failed: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let admitted = lock(&shared.startups).admit(peer.ip(), rand::random());
        let source = match admitted {
            Ok(source) => source,
            Err(why) => {
                let counter = match why {
                    Refusal::MaxStartups => &shared.counters.refused_max_startups,
                    Refusal::PerSource => &shared.counters.refused_per_source,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("sshd: refused connection from {peer}: {why:?}");
                drop(socket);
                continue;
            }
        };
        shared.counters.pending.fetch_add(1, Ordering::Relaxed);
        let slot = StartupSlot {
            shared: shared.clone(),
            source: Some(source),
        };
        let _ = socket.set_nodelay(true);
        tokio::spawn(serve_connection(
            shared.clone(),
            cfg.clone(),
            socket,
            peer,
            slot,
        ));
    }
}

/// Runs one connection: closed at the login grace time unless it authenticated by then.
async fn serve_connection(
    shared: Arc<Shared>,
    cfg: Arc<server::Config>,
    socket: TcpStream,
    peer: SocketAddr,
    mut slot: StartupSlot,
) {
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    let _count = SessionCount(shared.clone());
    let kill = Arc::new(Kill::default());
    let stream = KillableStream {
        inner: socket,
        kill: kill.clone(),
    };
    let (authed_tx, authed_rx) = tokio::sync::oneshot::channel();
    let handler = ServerHandler {
        shared: shared.clone(),
        peer,
        user: String::new(),
        options: None,
        listeners: Arc::new(Mutex::new(HashMap::new())),
        session_channels: Arc::new(AtomicU32::new(0)),
        authenticated: Some(authed_tx),
    };
    let conn = async move {
        match server::run_stream(cfg, stream, handler).await {
            Ok(session) => {
                if let Err(e) = session.await {
                    tracing::debug!("session from {peer} ended: {e:?}");
                }
            }
            Err(e) => tracing::debug!("handshake with {peer} failed: {e:?}"),
        }
    };
    tokio::pin!(conn);
    let grace = tokio::time::sleep(shared.cfg.limits.login_grace_time);
    tokio::select! {
        biased;
        () = &mut conn => return,
        Ok(()) = authed_rx => slot.release(),
        () = grace => {
            shared.counters.login_grace_expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("sshd: {peer} did not authenticate in time; closing");
            kill.kill();
            slot.release();
        }
    }
    conn.await;
}

/// What a `-R` listens on, as the client named it (the key of its cancel request).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ListenKey {
    Tcp(String, u32),
    Unix(String),
}

/// A `-R` listener: its accept task, and for a unix socket the file (removed with it).
struct ActiveListener {
    task: JoinHandle<()>,
    _file: Option<SocketFile>,
}

impl Drop for ActiveListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Listeners = Arc<Mutex<HashMap<ListenKey, ActiveListener>>>;

struct ServerHandler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    user: String,
    /// The authorized_keys options of the key that logged in.
    options: Option<KeyOptions>,
    listeners: Listeners,
    /// Forwarded channels open now in this session.
    session_channels: Arc<AtomicU32>,
    /// Told once the client has authenticated (its startup slot is then released).
    authenticated: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ServerHandler {
    fn drop(&mut self) {
        // A client's -R listeners live exactly as long as its session.
        let n = lock(&self.listeners).drain().count();
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.shared.listeners_open.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One forwarded channel counted against the session's and the server's caps.
struct ChannelSlot {
    session: Arc<AtomicU32>,
    shared: Arc<Shared>,
}

impl ChannelSlot {
    /// Takes a slot, or counts a refusal and returns `None` when a cap is reached.
    fn take(shared: &Arc<Shared>, session: &Arc<AtomicU32>) -> Option<ChannelSlot> {
        let l = &shared.cfg.limits;
        let under = |n: &AtomicU32, cap: u32| {
            n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v < cap).then_some(v + 1)
            })
            .is_ok()
        };
        if !under(session, l.max_channels_per_session) {
            shared
                .counters
                .channels_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !under(&shared.channels_open, l.max_channels) {
            session.fetch_sub(1, Ordering::AcqRel);
            shared
                .counters
                .channels_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ChannelSlot {
            session: session.clone(),
            shared: shared.clone(),
        })
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.session.fetch_sub(1, Ordering::AcqRel);
        self.shared.channels_open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The current time for `expiry-time=`.
fn now() -> Now {
    let civil = |t: chrono::NaiveDateTime| -> u64 {
        t.format("%Y%m%d%H%M%S")
            .to_string()
            .parse()
            .unwrap_or(u64::MAX)
    };
    Now {
        local: civil(chrono::Local::now().naive_local()),
        utc: civil(chrono::Utc::now().naive_utc()),
    }
}

const REFUSAL: &str = "vipgate sshd: this server only forwards ports (ssh -N -L/-R/-D); \
                       shells, commands and subsystems are refused\r\n";

impl ServerHandler {
    /// The parsed authorized_keys, re-read only when the file's mtime, size or inode changed.
    fn authorized_keys(&self) -> Option<Arc<Vec<AuthorizedKey>>> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.shared.cfg.authorized_keys;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", path.display());
                return None;
            }
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
            meta.ino(),
        );
        let mut cache = lock(&self.shared.keys_cache);
        if let Some(c) = cache.as_ref().filter(|c| c.stamp == stamp) {
            return Some(c.keys.clone());
        }
        if let Err(e) = check_file_mode(path, false) {
            tracing::warn!("{e}; every login is refused");
            return None;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", path.display());
                return None;
            }
        };
        let (keys, errors) = parse_authorized_keys(&text);
        for (line, e) in errors {
            tracing::warn!("{}:{line}: {e}; line ignored", path.display());
        }
        let keys = Arc::new(keys);
        *cache = Some(KeysCache {
            stamp,
            keys: keys.clone(),
        });
        Some(keys)
    }

    /// What every accepted login records, by key or by certificate: who, under which options,
    /// the signal that releases its startup slot, and the login counter.
    fn accept(&mut self, user: &str, options: KeyOptions) {
        self.user = user.to_string();
        self.options = Some(options);
        if let Some(tx) = self.authenticated.take() {
            let _ = tx.send(());
        }
        self.shared.counters.logins.fetch_add(1, Ordering::Relaxed);
    }

    fn find_key(&self, key: &russh::keys::PublicKey) -> Option<KeyOptions> {
        let path = &self.shared.cfg.authorized_keys;
        let keys = self.authorized_keys()?;
        let blob = key.public_key_bytes();
        let now = now();
        let mut refused = None;
        for entry in keys.iter().filter(|k| k.blob == blob) {
            match entry.usable_at(self.peer.ip(), now) {
                Ok(()) => return Some(entry.options.clone()),
                Err(Unusable::CertAuthority) => tracing::debug!(
                    "{}:{}: cert-authority line skipped for a plain key",
                    path.display(),
                    entry.line
                ),
                Err(why) => refused = Some((entry.line, why)),
            }
        }
        if let Some((line, why)) = refused {
            let why = match why {
                Unusable::Expired => "its expiry-time has passed",
                Unusable::From | Unusable::CertAuthority | Unusable::NotCertAuthority => {
                    "from= does not allow this address"
                }
            };
            tracing::warn!(
                "key {}:{line} refused for {}: {why}",
                path.display(),
                self.peer.ip()
            );
        }
        None
    }

    /// Whether certificates can log in at all: a `cert-authority` line in authorized_keys or
    /// a `trusted_user_ca_keys` file. russh offers a certificate's key to
    /// `auth_publickey_offered` as a plain key, so that check must let it through then.
    fn accepts_certificates(&self) -> bool {
        self.shared.cfg.trusted_user_ca_keys.is_some()
            || self
                .authorized_keys()
                .is_some_and(|keys| keys.iter().any(|k| k.options.cert_authority))
    }

    /// The CA keys of `trusted_user_ca_keys` (lines with options are skipped with a warning:
    /// sshd's file has none).
    fn trusted_cas(&self) -> Vec<Vec<u8>> {
        let Some(path) = &self.shared.cfg.trusted_user_ca_keys else {
            return Vec::new();
        };
        if let Err(e) = check_file_mode(path, false) {
            tracing::warn!("{e}; no certificate is trusted through it");
            return Vec::new();
        }
        let text = match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_CA_FILE => {
                tracing::warn!(
                    "{}: larger than {MAX_CA_FILE} bytes; ignored",
                    path.display()
                );
                return Vec::new();
            }
            Ok(_) => std::fs::read_to_string(path).unwrap_or_default(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", path.display());
                return Vec::new();
            }
        };
        let (keys, errors) = parse_authorized_keys(&text);
        for (line, e) in errors {
            tracing::warn!("{}:{line}: {e}; line ignored", path.display());
        }
        keys.into_iter()
            .filter(|k| {
                let plain = k.options == KeyOptions::default();
                if !plain {
                    tracing::warn!(
                        "{}:{}: options are not allowed here; line ignored",
                        path.display(),
                        k.line
                    );
                }
                plain
            })
            .map(|k| k.blob)
            .collect()
    }

    /// Judges a user certificate (its CA signature and validity already checked by russh):
    /// signed by a CA of authorized_keys (`cert-authority`, with the line's `principals=`,
    /// `from=`, `expiry-time=` and forwarding options) or of `trusted_user_ca_keys` (the user
    /// name must be a principal). Returns the options of the login.
    fn certificate_options(
        &self,
        user: &str,
        cert: &russh::keys::Certificate,
    ) -> Result<KeyOptions, String> {
        let ca = certs::ca_blob(cert);
        let facts = certs::facts(cert);
        let peer = self.peer.ip();
        let unix = certs::unix_now();
        let mut why = format!("its CA {} is not trusted", ca_fingerprint(cert));
        if let Some(keys) = self.authorized_keys() {
            for entry in keys.iter().filter(|k| k.blob == ca) {
                match entry.usable_as_ca_at(peer, now()) {
                    Ok(()) => {}
                    Err(Unusable::NotCertAuthority) => continue,
                    Err(Unusable::Expired) => {
                        why = format!("cert-authority line {} is past its expiry-time", entry.line);
                        continue;
                    }
                    Err(_) => {
                        why = format!(
                            "cert-authority line {}: from= does not allow this address",
                            entry.line
                        );
                        continue;
                    }
                }
                match crate::cert::check_user(
                    &facts,
                    user,
                    entry.options.principals.as_deref(),
                    peer,
                    unix,
                    &entry.options,
                ) {
                    Ok(options) => return Ok(options),
                    Err(e) => why = format!("{e} (cert-authority line {})", entry.line),
                }
            }
        }
        if self.trusted_cas().contains(&ca) {
            return crate::cert::check_user(&facts, user, None, peer, unix, &KeyOptions::default())
                .map_err(|e| e.to_string());
        }
        Err(why)
    }

    /// A slot under the channel caps for a new `what` channel, with its open handle; at the
    /// cap the channel is refused (resource shortage) and logged, and `None` returned.
    async fn channel_slot(
        &self,
        what: &str,
        reply: ChannelOpenHandle,
    ) -> Option<(ChannelSlot, ChannelOpenHandle)> {
        if let Some(slot) = ChannelSlot::take(&self.shared, &self.session_channels) {
            return Some((slot, reply));
        }
        tracing::info!(
            "{:?}@{}: {what} refused: channel cap reached",
            self.user,
            self.peer
        );
        reply.reject(ChannelOpenFailure::ResourceShortage).await;
        None
    }

    fn refuse_forward(&self, what: &str) {
        self.shared
            .counters
            .forwards_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{:?}@{}: refused {what}", self.user, self.peer);
    }

    fn refuse_session_request(
        &self,
        channel: ChannelId,
        what: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        self.shared
            .counters
            .sessions_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!("{:?}@{}: refused {what}", self.user, self.peer);
        // Answered with success so that OpenSSH's client prints our message and exits with
        // status 1; a failure reply makes it exit at once without showing stderr.
        session.channel_success(channel)?;
        session.extended_data(channel, 1, REFUSAL.as_bytes().to_vec())?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)
    }

    /// Whether a unix socket forward on `path` may go ahead: the key allows port forwarding
    /// (`no-port-forwarding` and `restrict` cover unix sockets too, as in OpenSSH), the text
    /// of the path is clean and `list` names it.
    fn admit_path(&self, path: &str, list: &PathPermit) -> Result<(), String> {
        if !self.options.as_ref().is_some_and(|o| o.port_forwarding) {
            return Err("not allowed by the key's options".into());
        }
        check_path(path).map_err(|e| e.to_string())?;
        if !list.allows(path) {
            return Err(if list.is_empty() {
                "unix socket forwarding is not enabled".into()
            } else {
                format!("not in {list}")
            });
        }
        Ok(())
    }

    /// Takes a `-R` listener place under the session's and the server's caps, or counts
    /// the refusal.
    fn take_listener(&self, what: &str) -> bool {
        let l = &self.shared.cfg.limits;
        let session_listeners = lock(&self.listeners).len();
        let global_ok = self
            .shared
            .listeners_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v < l.max_listeners).then_some(v + 1)
            })
            .is_ok();
        if !global_ok || session_listeners >= l.max_listeners_per_session as usize {
            if global_ok {
                self.shared.listeners_open.fetch_sub(1, Ordering::AcqRel);
            }
            self.shared
                .counters
                .listeners_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "{:?}@{}: {what} refused: listener cap reached",
                self.user,
                self.peer
            );
            return false;
        }
        true
    }

    /// Stops a `-R` listener (a unix socket's file goes with it); whether there was one.
    fn remove_listener(&self, key: &ListenKey) -> bool {
        let removed = lock(&self.listeners).remove(key);
        if removed.is_some() {
            self.shared.listeners_open.fetch_sub(1, Ordering::AcqRel);
        }
        removed.is_some()
    }

    fn listen_address(&self, requested: &str) -> String {
        if !self.shared.cfg.gateway_ports {
            return "127.0.0.1".to_string();
        }
        match requested {
            "" | "*" | "0.0.0.0" => "0.0.0.0".to_string(),
            "::" => "::".to_string(),
            "localhost" => "127.0.0.1".to_string(),
            other => other.to_string(),
        }
    }
}

impl server::Handler for ServerHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.find_key(offer.public_key).is_some() || self.accepts_certificates() {
            Ok(Auth::Accept)
        } else {
            tracing::info!(
                "{user:?}@{}: key {} not authorized",
                self.peer,
                offer.public_key.fingerprint(HashAlg::Sha256)
            );
            self.shared
                .counters
                .auth_refused
                .fetch_add(1, Ordering::Relaxed);
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.find_key(key.public_key) {
            Some(options) => {
                self.accept(user, options);
                tracing::info!(
                    "accepted key {} for {user:?} from {}",
                    key.public_key.fingerprint(HashAlg::Sha256),
                    self.peer
                );
                Ok(Auth::Accept)
            }
            None => {
                self.shared
                    .counters
                    .auth_refused
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        match self.certificate_options(user, certificate) {
            Ok(options) => {
                self.accept(user, options);
                tracing::info!(
                    "accepted certificate {:?} (serial {}) signed by {} for {user:?} from {}",
                    certificate.key_id(),
                    certificate.serial(),
                    ca_fingerprint(certificate),
                    self.peer
                );
                Ok(Auth::Accept)
            }
            Err(why) => {
                tracing::info!(
                    "{user:?}@{}: certificate {:?} refused: {why}",
                    self.peer,
                    certificate.key_id()
                );
                self.shared
                    .counters
                    .auth_refused
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted so that the refusal of the shell/exec that follows can carry a message.
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    /// `ssh -A`: refused. This server runs no programs, so nothing on its side could use a
    /// forwarded agent; a socket for it would only let another login's forwards reach the
    /// client's keys.
    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(
            "{:?}@{}: refused agent forwarding (this server runs no programs that could use it)",
            self.user,
            self.peer
        );
        Ok(false)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, "shell", session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let what = format!("exec {:?}", String::from_utf8_lossy(data));
        self.refuse_session_request(channel, &what, session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, &format!("subsystem {name:?}"), session)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let key_ok = self
            .options
            .as_ref()
            .is_some_and(|o| o.allows_open(host_to_connect, port));
        if !key_ok || !self.shared.cfg.permit_open.allows(host_to_connect, port) {
            let why = if key_ok {
                "permit_open"
            } else {
                "the key's options"
            };
            self.refuse_forward(&format!(
                "direct-tcpip to {host_to_connect:?}:{port} (not allowed by {why})"
            ));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some((slot, reply)) = self.channel_slot("direct-tcpip", reply).await else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let host = host_to_connect.to_string();
        let key_list = self
            .options
            .as_ref()
            .map(|o| o.permit_open.clone())
            .unwrap_or_default();
        // Never connect inside the callback: it would stall every channel of the session.
        tokio::spawn(async move {
            let _slot = slot;
            let counters = &shared.counters.channels;
            counters.total.fetch_add(1, Ordering::Relaxed);
            let key_list = if key_list.is_empty() {
                PermitList::Any
            } else {
                PermitList::Only(key_list)
            };
            match tokio::time::timeout(
                Duration::from_secs(10),
                connect_checked(&host, port, &shared.cfg.permit_open, &key_list),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    reply.accept().await;
                    pump(s, channel, &[], counters).await;
                }
                Ok(Err(ConnectRefusal::Policy(addr))) => {
                    shared
                        .counters
                        .forwards_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "direct-tcpip to {host:?}:{port} refused: it resolved to {addr}, which the permit lists do not name"
                    );
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                }
                Ok(Err(ConnectRefusal::Io(e))) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("direct-tcpip to {host:?}:{port} failed: {e}");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Err(why) = self.admit_path(socket_path, &self.shared.cfg.permit_open_paths) {
            self.refuse_forward(&format!("direct-streamlocal to {socket_path:?} ({why})"));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some((slot, reply)) = self.channel_slot("direct-streamlocal", reply).await else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let path = std::path::PathBuf::from(socket_path);
        tokio::spawn(async move {
            let _slot = slot;
            let counters = &shared.counters.channels;
            counters.total.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(Duration::from_secs(10), unixsock::connect(&path)).await {
                Ok(Ok(s)) => {
                    reply.accept().await;
                    pump(s, channel, &[], counters).await;
                }
                Ok(Err(unixsock::SocketRefusal::Symlink(real))) => {
                    shared
                        .counters
                        .forwards_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "direct-streamlocal to {path:?} refused: it resolves to {real:?}"
                    );
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                }
                Ok(Err(e)) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("direct-streamlocal to {path:?} failed: {e}");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(want) = u16::try_from(*port) else {
            return Ok(false);
        };
        let bind = self.listen_address(address);
        let key_ok = self
            .options
            .as_ref()
            .is_some_and(|o| o.allows_listen(address, want) || o.allows_listen(&bind, want));
        let global_ok = self.shared.cfg.permit_listen.allows(address, want)
            || self.shared.cfg.permit_listen.allows(&bind, want);
        if !key_ok || !global_ok {
            let why = if key_ok {
                "permit_listen"
            } else {
                "the key's options"
            };
            self.refuse_forward(&format!(
                "tcpip-forward on {address:?}:{want} (not allowed by {why})"
            ));
            return Ok(false);
        }
        // Ports below 1024 need an entry naming the port (vipgate may hold
        // CAP_NET_BIND_SERVICE; OpenSSH allows them only to root logins).
        if want != 0 && want < 1024 {
            let list = &self.shared.cfg.permit_listen;
            if !(list.names_port(address, want) || list.names_port(&bind, want)) {
                self.refuse_forward(&format!(
                    "tcpip-forward on {address:?}:{want} (a port below 1024 needs a permit_listen entry naming it)"
                ));
                return Ok(false);
            }
        }
        if !self.take_listener("tcpip-forward") {
            return Ok(false);
        }
        let listener = match TcpListener::bind((bind.as_str(), want)).await {
            Ok(l) => l,
            Err(e) => {
                self.shared.listeners_open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(
                    "{:?}@{}: cannot listen on {bind:?}:{want} for tcpip-forward: {e}",
                    self.user,
                    self.peer
                );
                return Ok(false);
            }
        };
        let actual = listener.local_addr().map(|a| a.port()).unwrap_or(want);
        if want == 0 {
            *port = u32::from(actual);
        }
        tracing::info!(
            "{:?}@{}: remote forward listening on {bind:?}:{actual}",
            self.user,
            self.peer
        );
        let handle = session.handle();
        let shared = self.shared.clone();
        let connected_address = address.to_string();
        let connected_port = u32::from(if want == 0 { actual } else { want });
        let session_channels = self.session_channels.clone();
        let task = tokio::spawn(async move {
            let mut backoff = AcceptBackoff::new();
            loop {
                let (s, peer) = match listener.accept().await {
                    Ok(a) => {
                        backoff.reset();
                        a
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                };
                // Over the cap the connection is closed at once: the session stays up.
                let Some(slot) = ChannelSlot::take(&shared, &session_channels) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let handle = handle.clone();
                let shared = shared.clone();
                let connected_address = connected_address.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let counters = &shared.counters.channels;
                    counters.total.fetch_add(1, Ordering::Relaxed);
                    let orig = match peer.ip() {
                        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                        v4 => v4,
                    };
                    match handle
                        .channel_open_forwarded_tcpip(
                            connected_address,
                            connected_port,
                            orig.to_string(),
                            u32::from(peer.port()),
                        )
                        .await
                    {
                        Ok(ch) => pump(s, ch, &[], counters).await,
                        Err(e) => {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("forwarded-tcpip channel refused by client: {e:?}");
                        }
                    }
                });
            }
        });
        let key = ListenKey::Tcp(address.to_string(), connected_port);
        let active = ActiveListener { task, _file: None };
        if lock(&self.listeners).insert(key, active).is_some() {
            self.shared.listeners_open.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remove_listener(&ListenKey::Tcp(address.to_string(), port)))
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if let Err(why) = self.admit_path(socket_path, &self.shared.cfg.permit_listen_paths) {
            self.refuse_forward(&format!("streamlocal-forward on {socket_path:?} ({why})"));
            return Ok(false);
        }
        if !self.take_listener("streamlocal-forward") {
            return Ok(false);
        }
        let path = Path::new(socket_path);
        let (listener, file) =
            match unixsock::bind(path, self.shared.cfg.socket_mode, &self.shared.held_paths) {
                Ok(bound) => bound,
                Err(e) => {
                    self.shared.listeners_open.fetch_sub(1, Ordering::AcqRel);
                    self.refuse_forward(&format!(
                        "streamlocal-forward on {socket_path:?} (cannot listen there: {e})"
                    ));
                    return Ok(false);
                }
            };
        tracing::info!(
            "{:?}@{}: remote forward listening on {socket_path:?}",
            self.user,
            self.peer
        );
        let handle = session.handle();
        let shared = self.shared.clone();
        let session_channels = self.session_channels.clone();
        let name = socket_path.to_string();
        let task = tokio::spawn(async move {
            let mut backoff = AcceptBackoff::new();
            loop {
                let s = match listener.accept().await {
                    Ok((s, _)) => {
                        backoff.reset();
                        s
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                };
                let Some(slot) = ChannelSlot::take(&shared, &session_channels) else {
                    continue;
                };
                let handle = handle.clone();
                let shared = shared.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let counters = &shared.counters.channels;
                    counters.total.fetch_add(1, Ordering::Relaxed);
                    match handle.channel_open_forwarded_streamlocal(name).await {
                        Ok(ch) => pump(s, ch, &[], counters).await,
                        Err(e) => {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                "forwarded-streamlocal channel refused by client: {e:?}"
                            );
                        }
                    }
                });
            }
        });
        let active = ActiveListener {
            task,
            _file: Some(file),
        };
        // The path was free in `held_paths`, so no listener of this session had it.
        lock(&self.listeners).insert(ListenKey::Unix(socket_path.to_string()), active);
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remove_listener(&ListenKey::Unix(socket_path.to_string())))
    }
}

/// Why a checked direct-tcpip connect did not happen.
enum ConnectRefusal {
    /// Every address the name resolved to is refused by a permit list.
    Policy(IpAddr),
    /// Resolution or connect failed.
    Io(std::io::Error),
}

/// Resolves `host` once and connects to the first resolved address both permit lists allow
/// ([`PermitList::allows_resolved`]): the address connected to is the one checked, so a name
/// cannot be re-pointed (DNS rebinding) between check and connect.
async fn connect_checked(
    host: &str,
    port: u16,
    global: &PermitList,
    key: &PermitList,
) -> Result<TcpStream, ConnectRefusal> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(ConnectRefusal::Io)?
        .take(16)
        .collect();
    let mut last_err = None;
    let mut refused = None;
    for addr in addrs {
        if !(global.allows_resolved(addr.ip(), port) && key.allows_resolved(addr.ip(), port)) {
            refused = Some(addr.ip());
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    match (last_err, refused) {
        (Some(e), _) => Err(ConnectRefusal::Io(e)),
        (None, Some(ip)) => Err(ConnectRefusal::Policy(ip)),
        (None, None) => Err(ConnectRefusal::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "name resolved to no address",
        ))),
    }
}
