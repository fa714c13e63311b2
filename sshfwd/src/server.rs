//! The forwarding-only SSH server (`vipgate sshd`): public-key authentication against an
//! authorized_keys file, `direct-tcpip` (clients' `-L`/`-D`) and `tcpip-forward` (clients'
//! `-R`) within permit lists; sessions may be opened (OpenSSH's `ssh` without `-N` opens one)
//! but shells, commands and subsystems are refused with a message on the client's stderr.
//!
//! authorized_keys is re-read on every authentication, as sshd does, so keys can be added or
//! revoked without a restart.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKeyBase64};
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::copy::{ForwardCounters, pump};
use crate::error::SshFwdError;
use crate::policy::{KeyOptions, PermitList, parse_authorized_keys};

/// What `vipgate sshd` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Host key (OpenSSH private key format); an ed25519 key is generated here if absent.
    pub host_key: PathBuf,
    /// authorized_keys file, re-read on each login.
    pub authorized_keys: PathBuf,
    /// Targets clients may open (`PermitOpen`).
    pub permit_open: PermitList,
    /// Addresses clients may listen on (`PermitListen`).
    pub permit_listen: PermitList,
    /// Remote forwards may bind the address the client asks for; otherwise loopback only
    /// (sshd's `GatewayPorts no`).
    pub gateway_ports: bool,
    /// Drop clients that send nothing for this long (keepalives count).
    pub idle_timeout: Option<Duration>,
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
}

/// A snapshot of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// Bound address.
    pub listen: String,
    /// `SHA256:...` of the host key.
    pub fingerprint: String,
    /// Open sessions.
    pub sessions: u64,
    /// Accepted logins.
    pub logins: u64,
    /// Refused keys.
    pub auth_refused: u64,
    /// Refused forward requests.
    pub forwards_refused: u64,
    /// Open forwarded channels.
    pub channels_active: u64,
    /// Forwarded channels since start.
    pub channels_total: u64,
    /// Bytes client→target.
    pub bytes_out: u64,
    /// Bytes target→client.
    pub bytes_in: u64,
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
}

/// A running `vipgate sshd`.
pub struct ForwardServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    host_key: HostKeyInfo,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ForwardServer {
    /// Loads (or creates) the host key, binds, and serves in the background.
    ///
    /// # Errors
    /// Host key problems, or the listen address cannot be bound.
    pub async fn start(cfg: ServerConfig) -> Result<ForwardServer, SshFwdError> {
        let (key, host_key) = load_or_generate_host_key(&cfg.host_key)?;
        if !cfg.authorized_keys.exists() {
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
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: cfg.idle_timeout,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: 65_535,
            channel_buffer_size: 64,
            ..server::Config::default()
        });
        let shared = Arc::new(Shared {
            cfg,
            counters: ServerCounters::default(),
            fingerprint: host_key.fingerprint.clone(),
        });
        let task = tokio::spawn(accept_loop(shared.clone(), listener, russh_cfg));
        Ok(ForwardServer {
            shared,
            local_addr,
            task,
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
            logins: c.logins.load(Ordering::Relaxed),
            auth_refused: c.auth_refused.load(Ordering::Relaxed),
            forwards_refused: c.forwards_refused.load(Ordering::Relaxed),
            channels_active: c.channels.active.load(Ordering::Relaxed),
            channels_total: c.channels.total.load(Ordering::Relaxed),
            bytes_out: c.channels.bytes_out.load(Ordering::Relaxed),
            bytes_in: c.channels.bytes_in.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting; open sessions end with the process.
    pub fn stop(self) {
        self.task.abort();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, cfg: Arc<server::Config>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("sshd accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
            let handler = ServerHandler {
                shared: shared.clone(),
                peer,
                user: String::new(),
                options: None,
                listeners: Arc::new(Mutex::new(HashMap::new())),
            };
            match server::run_stream(cfg, socket, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!("session from {peer} ended: {e:?}");
                    }
                }
                Err(e) => tracing::debug!("handshake with {peer} failed: {e:?}"),
            }
            shared.counters.sessions.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

type Listeners = Arc<Mutex<HashMap<(String, u32), JoinHandle<()>>>>;

struct ServerHandler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    user: String,
    /// The authorized_keys options of the key that logged in.
    options: Option<KeyOptions>,
    listeners: Listeners,
}

impl Drop for ServerHandler {
    fn drop(&mut self) {
        // A client's -R listeners live exactly as long as its session.
        for (_, task) in lock(&self.listeners).drain() {
            task.abort();
        }
    }
}

const REFUSAL: &str = "vipgate sshd: this server only forwards ports (ssh -N -L/-R/-D); \
                       shells, commands and subsystems are refused\r\n";

impl ServerHandler {
    fn find_key(&self, key: &russh::keys::PublicKey) -> Option<KeyOptions> {
        let path = &self.shared.cfg.authorized_keys;
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
        let blob = key.public_key_bytes();
        let entry = keys.into_iter().find(|k| k.blob == blob)?;
        if !entry.options.allows_from(self.peer.ip()) {
            tracing::warn!(
                "key {}:{} refused for {}: from= does not allow this address",
                path.display(),
                entry.line,
                self.peer.ip()
            );
            return None;
        }
        Some(entry.options)
    }

    fn refuse_forward(&self, what: &str) {
        self.shared
            .counters
            .forwards_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{}@{}: refused {what}", self.user, self.peer);
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
        tracing::info!("{}@{}: refused {what}", self.user, self.peer);
        // Answered with success so that OpenSSH's client prints our message and exits with
        // status 1; a failure reply makes it exit at once without showing stderr.
        session.channel_success(channel)?;
        session.extended_data(channel, 1, REFUSAL.as_bytes().to_vec())?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)
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
        if self.find_key(offer.public_key).is_some() {
            Ok(Auth::Accept)
        } else {
            tracing::info!(
                "{user}@{}: key {} not authorized",
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
                self.user = user.to_string();
                self.options = Some(options);
                self.shared.counters.logins.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "accepted key {} for {user} from {}",
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
        self.refuse_session_request(channel, &format!("subsystem {name}"), session)
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
                "direct-tcpip to {host_to_connect}:{port} (not allowed by {why})"
            ));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let shared = self.shared.clone();
        let host = host_to_connect.to_string();
        // Never connect inside the callback: it would stall every channel of the session.
        tokio::spawn(async move {
            let counters = &shared.counters.channels;
            counters.total.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    reply.accept().await;
                    pump(s, channel, &[], counters).await;
                }
                Ok(Err(e)) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("direct-tcpip to {host}:{port} failed: {e}");
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
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forward(&format!(
            "direct-streamlocal to {socket_path} (unix sockets are not forwarded)"
        ));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
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
                "tcpip-forward on {address}:{want} (not allowed by {why})"
            ));
            return Ok(false);
        }
        let listener = match TcpListener::bind((bind.as_str(), want)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "{}@{}: cannot listen on {bind}:{want} for tcpip-forward: {e}",
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
            "{}@{}: remote forward listening on {bind}:{actual}",
            self.user,
            self.peer
        );
        let handle = session.handle();
        let shared = self.shared.clone();
        let connected_address = address.to_string();
        let connected_port = u32::from(if want == 0 { actual } else { want });
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                let handle = handle.clone();
                let shared = shared.clone();
                let connected_address = connected_address.clone();
                tokio::spawn(async move {
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
        lock(&self.listeners).insert((address.to_string(), connected_port), task);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match lock(&self.listeners).remove(&(address.to_string(), port)) {
            Some(task) => {
                task.abort();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
