//! Local listeners (`-L` TCP and unix socket, `-D` SOCKS) and their per-connection tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::client::{ClientConfig, Shared, pick};
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

async fn bind_tcp(host: &str, port: u16, what: &str) -> Result<(TcpListener, String), SshFwdError> {
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
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(err)?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpListener::bind(a).await {
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

pub(crate) async fn bind_all(
    cfg: &ClientConfig,
) -> Result<Vec<(LocalForward, Listener)>, SshFwdError> {
    let mut out = Vec::new();
    for spec in &cfg.local {
        let what = format!("-L {spec}");
        let (listener, bound) = match &spec.listen {
            Endpoint::Tcp { host, port } => {
                let (l, b) =
                    bind_tcp(&bind_host(host.as_deref(), cfg.gateway_ports), *port, &what).await?;
                (Listener::Tcp(l), b)
            }
            Endpoint::Unix(path) => {
                let l = UnixListener::bind(path).map_err(|error| SshFwdError::Bind {
                    addr: path.clone(),
                    what: what.clone(),
                    error,
                })?;
                (Listener::Unix(l), path.clone())
            }
        };
        out.push((
            LocalForward {
                kind: LocalKind::Local(spec.clone()),
                bound,
            },
            listener,
        ));
    }
    for d in &cfg.dynamic {
        let fwd = LocalForward {
            kind: LocalKind::Dynamic(d.clone()),
            bound: String::new(),
        };
        let what = format!("-D {}", fwd.spec_text());
        let (l, bound) = bind_tcp(
            &bind_host(d.bind.as_deref(), cfg.gateway_ports),
            d.port,
            &what,
        )
        .await?;
        out.push((LocalForward { bound, ..fwd }, Listener::Tcp(l)));
    }
    Ok(out)
}

/// Removes the unix sockets the local forwards created.
pub(crate) fn cleanup_unix_sockets(cfg: &ClientConfig) {
    for spec in &cfg.local {
        if let Endpoint::Unix(path) = &spec.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    fwd: LocalForward,
    listener: Listener,
    counters: Arc<ForwardCounters>,
) {
    let fwd = Arc::new(fwd);
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                let (shared, fwd, counters) = (shared.clone(), fwd.clone(), counters.clone());
                tokio::spawn(async move { handle(shared, &fwd, s, peer, &counters).await });
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                let (shared, fwd, counters) = (shared.clone(), fwd.clone(), counters.clone());
                let peer = SocketAddr::from(([127, 0, 0, 1], 0));
                tokio::spawn(async move { handle(shared, &fwd, s, peer, &counters).await });
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off briefly instead of spinning.
            tracing::warn!("{}: accept on {} failed: {e}", shared.cfg.name, fwd.bound);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn handle<S>(
    shared: Arc<Shared>,
    fwd: &LocalForward,
    mut stream: S,
    peer: SocketAddr,
    counters: &ForwardCounters,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    counters.total.fetch_add(1, Ordering::Relaxed);
    match &fwd.kind {
        LocalKind::Local(spec) => {
            let Some(handle) = pick(&shared).await else {
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
                Ok(ch) => pump(&mut stream, &mut ch.into_stream(), counters).await,
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{}: -L {spec}: channel open failed: {e}", shared.cfg.name);
                }
            }
        }
        LocalKind::Dynamic(_) => {
            if let Err(why) = socks_session(&shared, &mut stream, peer, counters).await {
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
    stream: &mut S,
    peer: SocketAddr,
    counters: &ForwardCounters,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
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
    let Some(handle) = pick(shared).await else {
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
    let mut channel = channel.into_stream();
    if !buf.is_empty() {
        // Bytes the client sent right behind its request belong to the tunnelled stream.
        channel.write_all(&buf).await.map_err(|e| e.to_string())?;
    }
    pump(stream, &mut channel, counters).await;
    Ok(())
}
