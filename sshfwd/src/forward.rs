//! Local listeners (`-L` TCP and unix socket, `-D` SOCKS) and their per-connection tasks.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::client::{ClientConfig, Shared, lock, pick};
use crate::copy::{ForwardCounters, pump};
use crate::error::SshFwdError;
use crate::socks::{self, Socks5Reply, SocksHello};
use crate::spec::{DynamicSpec, Endpoint, ForwardSpec};

/// A local forward and where it ended up listening.
#[derive(Debug, Clone)]
pub(crate) struct LocalForward {
    kind: LocalKind,
    /// The bound address (`127.0.0.1:8585`, or the socket path).
    pub(crate) bound: String,
}

#[derive(Debug, Clone)]
enum LocalKind {
    Local(ForwardSpec),
    Dynamic(DynamicSpec),
}

impl LocalForward {
    pub(crate) fn kind(&self) -> &'static str {
        match self.kind {
            LocalKind::Local(_) => "local",
            LocalKind::Dynamic(_) => "dynamic",
        }
    }

    pub(crate) fn spec_text(&self) -> String {
        match &self.kind {
            LocalKind::Local(s) => s.to_string(),
            LocalKind::Dynamic(d) => match &d.bind {
                Some(b) if b.contains(':') => format!("[{b}]:{}", d.port),
                Some(b) => format!("{b}:{}", d.port),
                None => d.port.to_string(),
            },
        }
    }
}

pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A listener on its way to the thread that will accept on it (tokio sockets belong to the
/// runtime they were registered with).
pub(crate) enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl StdListener {
    /// Registers with the runtime of the calling thread.
    fn into_tokio(self) -> std::io::Result<Listener> {
        Ok(match self {
            StdListener::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            StdListener::Unix(l) => Listener::Unix(UnixListener::from_std(l)?),
        })
    }
}

/// Where a listener without an explicit address binds: loopback, unless GatewayPorts.
fn bind_host(host: Option<&str>, gateway_ports: bool) -> String {
    match host {
        None if gateway_ports => "0.0.0.0".to_string(),
        None => "127.0.0.1".to_string(),
        Some("" | "*") => "0.0.0.0".to_string(),
        Some("localhost") => "127.0.0.1".to_string(),
        Some(h) => h.to_string(),
    }
}

/// Binds with a backlog of 1024 (not std's 128): a burst of clients must not see SYNs
/// dropped while the accept loop catches up.
fn bind_tcp(host: &str, port: u16, what: &str) -> Result<(TcpListener, String), SshFwdError> {
    use std::net::ToSocketAddrs;
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let err = |error| SshFwdError::Bind {
        addr: shown.clone(),
        what: what.to_string(),
        error,
    };
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(err)?.collect();
    let mut last = None;
    for a in addrs {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let listener = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(a)?;
            s.listen(1024)
        });
        match listener {
            Ok(l) => {
                let bound = l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| shown.clone());
                return Ok((l, bound));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// The local forwards (`-L` and `-D`) a config asks for, not bound yet.
pub(crate) fn wanted(cfg: &ClientConfig) -> Vec<LocalForward> {
    let local = cfg.local.iter().map(|spec| LocalForward {
        kind: LocalKind::Local(spec.clone()),
        bound: String::new(),
    });
    let dynamic = cfg.dynamic.iter().map(|d| LocalForward {
        kind: LocalKind::Dynamic(d.clone()),
        bound: String::new(),
    });
    local.chain(dynamic).collect()
}

impl LocalForward {
    /// Where this forward listens, normalised (`127.0.0.1:8585`, or the socket path): two
    /// forwards with the same key cannot both be bound.
    pub(crate) fn listen_key(&self, gateway_ports: bool) -> String {
        let (host, port) = match &self.kind {
            LocalKind::Local(spec) => match &spec.listen {
                Endpoint::Tcp { host, port } => (host.as_deref(), *port),
                Endpoint::Unix(path) => return path.clone(),
            },
            LocalKind::Dynamic(d) => (d.bind.as_deref(), d.port),
        };
        let host = bind_host(host, gateway_ports);
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// The unix socket this forward listens on, if any.
    pub(crate) fn unix_path(&self) -> Option<&str> {
        match &self.kind {
            LocalKind::Local(ForwardSpec {
                listen: Endpoint::Unix(path),
                ..
            }) => Some(path),
            _ => None,
        }
    }

    /// Binds the listener (synchronously: it runs inside `reconfigure` too) and returns the
    /// forward with its bound address.
    ///
    /// # Errors
    /// The address cannot be bound; the message names it and the forward.
    pub(crate) fn bind(
        &self,
        gateway_ports: bool,
    ) -> Result<(LocalForward, StdListener), SshFwdError> {
        let what = match &self.kind {
            LocalKind::Local(spec) => format!("-L {spec}"),
            LocalKind::Dynamic(_) => format!("-D {}", self.spec_text()),
        };
        let (host, port) = match &self.kind {
            LocalKind::Local(spec) => match &spec.listen {
                Endpoint::Tcp { host, port } => (host.as_deref(), *port),
                Endpoint::Unix(path) => {
                    let l = std::os::unix::net::UnixListener::bind(path)
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|error| SshFwdError::Bind {
                            addr: path.clone(),
                            what: what.clone(),
                            error,
                        })?;
                    let fwd = LocalForward {
                        kind: self.kind.clone(),
                        bound: path.clone(),
                    };
                    return Ok((fwd, StdListener::Unix(l)));
                }
            },
            LocalKind::Dynamic(d) => (d.bind.as_deref(), d.port),
        };
        let (l, bound) = bind_tcp(&bind_host(host, gateway_ports), port, &what)?;
        let l = l.into_std().map_err(|error| SshFwdError::Bind {
            addr: bound.clone(),
            what,
            error,
        })?;
        let fwd = LocalForward {
            kind: self.kind.clone(),
            bound,
        };
        Ok((fwd, StdListener::Tcp(l)))
    }

    /// Whether `other` is exactly this forward (same kind, listener and target).
    pub(crate) fn same_as(&self, other: &LocalForward) -> bool {
        self.kind() == other.kind() && self.spec_text() == other.spec_text()
    }

    /// `other`'s forwarding on this forward's (already bound) listener.
    pub(crate) fn retargeted(&self, other: &LocalForward) -> LocalForward {
        LocalForward {
            kind: other.kind.clone(),
            bound: self.bound.clone(),
        }
    }
}

/// Accepts on `listener` from the thread of connection slot `slot`; each accepted connection
/// is served on the thread of the next slot, round-robin, so that its copy loop runs next to
/// the session that encrypts its channel.
///
/// `current` is what the listener forwards to; a reload may swap it (same listening address,
/// new target) without closing the listener.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    current: Arc<Mutex<Arc<LocalForward>>>,
    listener: StdListener,
    counters: Arc<ForwardCounters>,
    slot: usize,
) {
    let bound = lock(&current).bound.clone();
    let listener = match listener.into_tokio() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{}: cannot listen on {bound}: {e}", shared.cfg.name);
            return;
        }
    };
    loop {
        let fwd = lock(&current).clone();
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                let target = shared.next_slot();
                let (sh, fwd, counters) = (shared.clone(), fwd.clone(), counters.clone());
                if target == slot {
                    tokio::spawn(async move { handle(sh, &fwd, s, peer, &counters, slot).await });
                } else if let Ok(s) = s.into_std() {
                    shared.runtimes[target].spawn(async move {
                        if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                            handle(sh, &fwd, s, peer, &counters, target).await;
                        }
                    });
                }
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                let peer = SocketAddr::from(([127, 0, 0, 1], 0));
                let target = shared.next_slot();
                let (sh, fwd, counters) = (shared.clone(), fwd.clone(), counters.clone());
                if target == slot {
                    tokio::spawn(async move { handle(sh, &fwd, s, peer, &counters, slot).await });
                } else if let Ok(s) = s.into_std() {
                    shared.runtimes[target].spawn(async move {
                        if let Ok(s) = tokio::net::UnixStream::from_std(s) {
                            handle(sh, &fwd, s, peer, &counters, target).await;
                        }
                    });
                }
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off briefly instead of spinning.
            tracing::warn!("{}: accept on {bound} failed: {e}", shared.cfg.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn handle<S>(
    shared: Arc<Shared>,
    fwd: &LocalForward,
    stream: S,
    peer: SocketAddr,
    counters: &ForwardCounters,
    slot: usize,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    counters.total.fetch_add(1, Ordering::Relaxed);
    match &fwd.kind {
        LocalKind::Local(spec) => {
            let Some(handle) = pick(&shared, slot).await else {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "{}: -L {spec}: no connection to the server; closing client",
                    shared.cfg.name
                );
                return;
            };
            let opened = match &spec.connect {
                Endpoint::Tcp { host, port } => {
                    let host = host.clone().unwrap_or_else(|| "localhost".into());
                    handle
                        .channel_open_direct_tcpip(
                            host,
                            u32::from(*port),
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await
                }
                Endpoint::Unix(path) => handle.channel_open_direct_streamlocal(path.clone()).await,
            };
            match opened {
                Ok(ch) => pump(stream, ch, &[], counters).await,
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{}: -L {spec}: channel open failed: {e}", shared.cfg.name);
                }
            }
        }
        LocalKind::Dynamic(_) => {
            if let Err(why) = socks_session(&shared, stream, peer, counters, slot).await {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!("{}: SOCKS client {peer}: {why}", shared.cfg.name);
            }
        }
    }
}

/// Reads until `parse` yields a message, within a bounded buffer and a deadline.
async fn read_message<S, T>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks::SocksError>,
) -> Result<(T, usize), String>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(done) = parse(buf).map_err(|e| e.to_string())? {
            return Ok(done);
        }
        if buf.len() >= socks::MAX_REQUEST {
            return Err("request too long".into());
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during SOCKS negotiation".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn socks_session<S>(
    shared: &Arc<Shared>,
    mut owned: S,
    peer: SocketAddr,
    counters: &ForwardCounters,
    slot: usize,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let stream = &mut owned;
    let mut buf = Vec::with_capacity(64);
    let negotiate = async {
        let (hello, used) = read_message(stream, &mut buf, socks::parse_hello).await?;
        buf.drain(..used);
        match hello {
            SocksHello::V4 { target } => Ok((4u8, target)),
            SocksHello::V5 { no_auth_offered } => {
                stream
                    .write_all(&socks::socks5_method_reply(no_auth_offered))
                    .await
                    .map_err(|e| e.to_string())?;
                if !no_auth_offered {
                    return Err(
                        "SOCKS5 client requires authentication, which -D does not offer"
                            .to_string(),
                    );
                }
                match read_message(stream, &mut buf, socks::parse_socks5_request).await {
                    Ok((target, used)) => {
                        buf.drain(..used);
                        Ok((5u8, target))
                    }
                    Err(e) => {
                        let _ = stream
                            .write_all(&socks::socks5_reply(Socks5Reply::CommandNotSupported))
                            .await;
                        Err(e)
                    }
                }
            }
        }
    };
    let (version, target) = tokio::time::timeout(Duration::from_secs(10), negotiate)
        .await
        .map_err(|_| "SOCKS negotiation timed out".to_string())??;
    let refuse = async |stream: &mut S| {
        let _ = if version == 4 {
            stream.write_all(&socks::socks4_reply(false)).await
        } else {
            stream
                .write_all(&socks::socks5_reply(Socks5Reply::HostUnreachable))
                .await
        };
    };
    let Some(handle) = pick(shared, slot).await else {
        refuse(stream).await;
        return Err("no connection to the server".into());
    };
    let channel = match handle
        .channel_open_direct_tcpip(
            target.host.clone(),
            u32::from(target.port),
            peer.ip().to_string(),
            u32::from(peer.port()),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            refuse(stream).await;
            return Err(format!(
                "channel to {}:{} refused: {e}",
                target.host, target.port
            ));
        }
    };
    let ok = if version == 4 {
        socks::socks4_reply(true).to_vec()
    } else {
        socks::socks5_reply(Socks5Reply::Succeeded).to_vec()
    };
    stream.write_all(&ok).await.map_err(|e| e.to_string())?;
    // Bytes the client sent right behind its request belong to the tunnelled stream.
    pump(owned, channel, &buf, counters).await;
    Ok(())
}
