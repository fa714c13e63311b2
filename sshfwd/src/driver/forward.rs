//! Forwarded connections on this side: the `-L` (TCP and unix socket) and `-D` (SOCKS)
//! listeners with their per-connection tasks, and the local end of each `-R` channel.
//!
//! A listener is bound synchronously (at start, or inside a reload) and then handed to the
//! thread of a connection slot, which accepts on it until it is closed. Its forward can be
//! swapped while it listens (a reload that keeps the address but changes the target).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::copy::{ForwardCounters, pump};
use super::lock;
use super::session::{RemoteForward, Shared, pick};
use crate::config::ForwardStatus;
use crate::error::SshFwdError;
use crate::socks::{self, Socks5Reply, SocksHello, SocksTarget};
use crate::spec::{Endpoint, ForwardSpec, ListenAddress, LocalForward};

/// A local forward and where it ended up listening.
#[derive(Debug, Clone)]
pub(crate) struct BoundForward {
    pub(crate) forward: LocalForward,
    /// The bound address (`127.0.0.1:8585`, or the socket path).
    pub(crate) bound: String,
}

enum Listener {
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

/// Binds one listener (synchronously: it runs inside `reconfigure` too).
///
/// # Errors
/// The address cannot be bound; the message names it and the forward.
fn bind(
    fwd: &LocalForward,
    gateway_ports: bool,
) -> Result<(BoundForward, StdListener), SshFwdError> {
    let what = match fwd {
        LocalForward::Local(spec) => format!("-L {spec}"),
        LocalForward::Dynamic(d) => format!("-D {d}"),
    };
    match fwd.listen_address(gateway_ports) {
        ListenAddress::Unix(path) => {
            let l = std::os::unix::net::UnixListener::bind(&path)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|error| SshFwdError::Bind {
                    addr: path.clone(),
                    what: what.clone(),
                    error,
                })?;
            let bound = BoundForward {
                forward: fwd.clone(),
                bound: path,
            };
            Ok((bound, StdListener::Unix(l)))
        }
        ListenAddress::Tcp { host, port } => {
            let (l, bound) = bind_tcp(&host, port, &what)?;
            let l = l.into_std().map_err(|error| SshFwdError::Bind {
                addr: bound.clone(),
                what,
                error,
            })?;
            let bound = BoundForward {
                forward: fwd.clone(),
                bound,
            };
            Ok((bound, StdListener::Tcp(l)))
        }
    }
}

/// Binds a listener for each forward, or none: after a failure the unix sockets already
/// created are removed again (the TCP listeners close as they are dropped).
///
/// # Errors
/// The first address that cannot be bound.
pub(crate) fn bind_all(
    forwards: &[LocalForward],
    gateway_ports: bool,
) -> Result<Vec<(BoundForward, StdListener)>, SshFwdError> {
    let mut bound = Vec::new();
    for fwd in forwards {
        match bind(fwd, gateway_ports) {
            Ok(b) => bound.push(b),
            Err(e) => {
                for (b, _) in &bound {
                    if let Some(path) = b.forward.unix_path() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(bound)
}

/// A bound `-L` / `-D` listener and the task accepting on it.
struct LocalEntry {
    /// What it forwards to; swapped in place when a reload changes only the target.
    current: Arc<Mutex<Arc<BoundForward>>>,
    counters: Arc<ForwardCounters>,
    /// Where it listens: what a reload matches it by.
    address: ListenAddress,
    task: JoinHandle<()>,
}

impl LocalEntry {
    /// Stops accepting (connections already accepted carry on) and removes its unix socket.
    fn close(&self) {
        self.task.abort();
        if let Some(path) = lock(&self.current).forward.unix_path() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The `-L` / `-D` listeners of one destination, in the order they were opened.
#[derive(Default)]
pub(crate) struct Listeners(Mutex<Vec<LocalEntry>>);

impl Listeners {
    /// Starts accepting on bound listeners, each on the thread of the next slot.
    pub(crate) fn add(&self, shared: &Arc<Shared>, bound: Vec<(BoundForward, StdListener)>) {
        for (fwd, listener) in bound {
            let address = fwd.forward.listen_address(shared.cfg.gateway_ports);
            let current = Arc::new(Mutex::new(Arc::new(fwd)));
            let counters: Arc<ForwardCounters> = Arc::default();
            let slot = shared.next_slot();
            let task = shared.runtimes[slot].spawn(serve(
                shared.clone(),
                current.clone(),
                listener,
                counters.clone(),
                slot,
            ));
            lock(&self.0).push(LocalEntry {
                current,
                counters,
                address,
                task,
            });
        }
    }

    /// Closes the listeners on `addresses`.
    pub(crate) fn close(&self, addresses: &[ListenAddress]) {
        lock(&self.0).retain(|e| {
            let closing = addresses.contains(&e.address);
            if closing {
                e.close();
            }
            !closing
        });
    }

    /// Makes each listener on one of these addresses forward as its new forward says, from
    /// the next accepted connection on.
    pub(crate) fn retarget(&self, changes: &[(ListenAddress, LocalForward)]) {
        for e in lock(&self.0).iter() {
            if let Some((_, fwd)) = changes.iter().find(|(a, _)| *a == e.address) {
                let mut current = lock(&e.current);
                *current = Arc::new(BoundForward {
                    forward: fwd.clone(),
                    bound: current.bound.clone(),
                });
            }
        }
    }

    /// Closes every listener.
    pub(crate) fn close_all(&self) {
        for e in lock(&self.0).drain(..) {
            e.close();
        }
    }

    /// One line per listener for `vipgate show ssh`.
    pub(crate) fn status(&self) -> Vec<ForwardStatus> {
        lock(&self.0)
            .iter()
            .map(|e| {
                let fwd = lock(&e.current).clone();
                e.counters.status(
                    fwd.forward.kind(),
                    fwd.forward.to_string(),
                    fwd.bound.clone(),
                )
            })
            .collect()
    }
}

/// An accepted stream that can move to another connection slot's runtime.
trait Accepted: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The stream between runtimes, registered with neither.
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    /// Registers with the runtime of the calling thread.
    fn from_std(std: Self::Std) -> std::io::Result<Self>;
}

impl Accepted for TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        TcpStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        TcpStream::from_std(std)
    }
}

impl Accepted for UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        UnixStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        UnixStream::from_std(std)
    }
}

/// Accepts on `listener` from the thread of connection slot `slot`; each accepted connection
/// is served on the thread of the next slot, round-robin, so that its copy loop runs next to
/// the session that encrypts its channel.
///
/// `current` is what the listener forwards to; a reload may swap it (same listening address,
/// new target) without closing the listener.
async fn serve(
    shared: Arc<Shared>,
    current: Arc<Mutex<Arc<BoundForward>>>,
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
                dispatch(&shared, &fwd, &counters, slot, s, peer);
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                let peer = SocketAddr::from(([127, 0, 0, 1], 0));
                dispatch(&shared, &fwd, &counters, slot, s, peer);
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off briefly instead of spinning.
            tracing::warn!("{}: accept on {bound} failed: {e}", shared.cfg.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Serves one accepted connection on the thread of the next slot: here if that is `slot`,
/// else moved to that slot's runtime.
fn dispatch<S: Accepted>(
    shared: &Arc<Shared>,
    fwd: &Arc<BoundForward>,
    counters: &Arc<ForwardCounters>,
    slot: usize,
    stream: S,
    peer: SocketAddr,
) {
    let target = shared.next_slot();
    let (sh, fwd, counters) = (shared.clone(), fwd.clone(), counters.clone());
    if target == slot {
        tokio::spawn(async move { handle(sh, &fwd.forward, stream, peer, &counters, slot).await });
    } else if let Ok(s) = stream.into_std() {
        shared.runtimes[target].spawn(async move {
            if let Ok(s) = S::from_std(s) {
                handle(sh, &fwd.forward, s, peer, &counters, target).await;
            }
        });
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
    match fwd {
        LocalForward::Local(
            spec @ ForwardSpec {
                connect: Some(target),
                ..
            },
        ) => {
            let Some(handle) = pick(&shared, slot).await else {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "{}: -L {spec}: no connection to the server; closing client",
                    shared.cfg.name
                );
                return;
            };
            let opened = match target {
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
        // An `-L` without a target is how OpenSSH itself stores a `-D` (parse_local never
        // makes one).
        LocalForward::Local(_) | LocalForward::Dynamic(_) => {
            if let Err(why) = socks_session(&shared, stream, peer, counters, slot).await {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!("{}: SOCKS client {peer}: {why}", shared.cfg.name);
            }
        }
    }
}

/// The client's side of a SOCKS negotiation: a local socket (`-D`), or a channel the server
/// opened for a reverse dynamic `-R`.
trait SocksPeer {
    /// Appends the next bytes the client sent to `buf`.
    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), String>;
    /// Sends a SOCKS reply.
    async fn reply(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// A local socket being negotiated with (borrowed: it is pumped afterwards).
struct SocketPeer<'a, S>(&'a mut S);

impl<S: AsyncRead + AsyncWrite + Unpin> SocksPeer for SocketPeer<'_, S> {
    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let mut chunk = [0u8; 512];
        let n = self.0.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during SOCKS negotiation".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn reply(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.write_all(bytes).await.map_err(|e| e.to_string())
    }
}

impl SocksPeer for Channel<Msg> {
    /// One data message (at most a packet, which russh bounds).
    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        loop {
            match self.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    buf.extend_from_slice(&data);
                    return Ok(());
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    return Err("closed during SOCKS negotiation".into());
                }
                Some(_) => {}
            }
        }
    }

    async fn reply(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.data_bytes(bytes::Bytes::copy_from_slice(bytes))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Reads until `parse` yields a message, within a bounded buffer.
async fn read_message<P, T>(
    peer: &mut P,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks::SocksError>,
) -> Result<(T, usize), String>
where
    P: SocksPeer,
{
    loop {
        if let Some(done) = parse(buf).map_err(|e| e.to_string())? {
            return Ok(done);
        }
        if buf.len() >= socks::MAX_REQUEST {
            return Err("request too long".into());
        }
        peer.more(buf).await?;
    }
}

/// Reads the client's SOCKS4/4a/5 CONNECT request (answering SOCKS5's method negotiation)
/// within 10 s; returns the SOCKS version and the target. Bytes the client sent behind its
/// request stay in `buf`. `what` names the forward in errors (`-D`, `-R`).
async fn negotiate<P: SocksPeer>(
    peer: &mut P,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(u8, SocksTarget), String> {
    let work = async {
        let (hello, used) = read_message(peer, buf, socks::parse_hello).await?;
        buf.drain(..used);
        match hello {
            SocksHello::V4 { target } => Ok((4u8, target)),
            SocksHello::V5 { no_auth_offered } => {
                peer.reply(&socks::socks5_method_reply(no_auth_offered))
                    .await?;
                if !no_auth_offered {
                    return Err(format!(
                        "SOCKS5 client requires authentication, which {what} does not offer"
                    ));
                }
                match read_message(peer, buf, socks::parse_socks5_request).await {
                    Ok((target, used)) => {
                        buf.drain(..used);
                        Ok((5u8, target))
                    }
                    Err(e) => {
                        let _ = peer
                            .reply(&socks::socks5_reply(Socks5Reply::CommandNotSupported))
                            .await;
                        Err(e)
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "SOCKS negotiation timed out".to_string())?
}

/// The reply of SOCKS `version` that grants (or refuses) the request.
fn socks_answer(version: u8, granted: bool) -> Vec<u8> {
    match (version, granted) {
        (4, granted) => socks::socks4_reply(granted).to_vec(),
        (_, true) => socks::socks5_reply(Socks5Reply::Succeeded).to_vec(),
        (_, false) => socks::socks5_reply(Socks5Reply::HostUnreachable).to_vec(),
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
    let mut buf = Vec::with_capacity(64);
    let mut client = SocketPeer(&mut owned);
    let (version, target) = negotiate(&mut client, &mut buf, "-D").await?;
    let Some(handle) = pick(shared, slot).await else {
        let _ = client.reply(&socks_answer(version, false)).await;
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
            let _ = client.reply(&socks_answer(version, false)).await;
            return Err(format!(
                "channel to {}:{} refused: {e}",
                target.host, target.port
            ));
        }
    };
    client.reply(&socks_answer(version, true)).await?;
    // Bytes the client sent right behind its request belong to the tunnelled stream.
    pump(owned, channel, &buf, counters).await;
    Ok(())
}

/// Serves a channel of a reverse dynamic `-R [bind:]port` (no target): its first bytes are a
/// SOCKS request, answered on the channel, and the target it names is connected to from this
/// side (within `connect_timeout`). A malformed, oversized or refused request closes the
/// channel and counts as a failure.
async fn serve_reverse_socks(
    shared: &Shared,
    r: &RemoteForward,
    mut channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    reply.accept().await;
    let mut buf = Vec::with_capacity(64);
    // A channel closed before its first byte (a port check, or a probe) is no failed request.
    let first = tokio::time::timeout(Duration::from_secs(10), channel.more(&mut buf)).await;
    if let Ok(Err(why)) = first {
        tracing::debug!("{}: -R {}: {why}", shared.cfg.name, r.spec);
        let _ = channel.close().await;
        return;
    }
    let connected = async {
        let (version, target) = negotiate(&mut channel, &mut buf, "-R").await?;
        let to = format!("{}:{}", target.host, target.port);
        let connect = TcpStream::connect((target.host.as_str(), target.port));
        let why = match tokio::time::timeout(shared.cfg.connect_timeout, connect).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                channel.reply(&socks_answer(version, true)).await?;
                return Ok(tcp);
            }
            Ok(Err(e)) => format!("connect to {to} failed: {e}"),
            Err(_) => format!("connect to {to} timed out"),
        };
        let _ = channel.reply(&socks_answer(version, false)).await;
        Err(why)
    }
    .await;
    match connected {
        Ok(mut tcp) => {
            // Bytes the client sent right behind its request belong to the target.
            if !buf.is_empty() {
                if tcp.write_all(&buf).await.is_err() {
                    let _ = channel.close().await;
                    return;
                }
                r.counters
                    .bytes_in
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            pump(tcp, channel, &[], &r.counters).await;
        }
        Err(why) => {
            r.counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "{}: -R {}: SOCKS request: {why}; channel closed",
                shared.cfg.name,
                r.spec
            );
            let _ = channel.close().await;
        }
    }
}

/// Connects a channel the server opened for a `-R` forward to its local target.
pub(crate) async fn serve_remote(
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
        None => serve_reverse_socks(&shared, &r, channel, reply).await,
        Some(Endpoint::Tcp { host, port }) => {
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
        Some(Endpoint::Unix(path)) => match UnixStream::connect(path).await {
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
