//! Connections to the backends of a pool with `proxy_protocol` (HAProxy `send-proxy-v2`).
//!
//! Each such connection starts with a PROXY protocol v2 header naming one client's address and
//! the address it connected to, so it may carry that client connection's requests only: it is
//! never pooled for others. A client connection keeps the ones it opened idle between its
//! requests (at most [`MAX_KEPT`], one per backend as a rule), and they close with it.
//!
//! The header is written here rather than by a crate: it is 28 fixed bytes for IPv4 (the
//! protocol's section 2.2), and the crates that build it pull a second major version of
//! `thiserror` into the tree.

use std::net::SocketAddrV4;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Idle backend connections a client connection keeps at most (its requests go to one
/// backend at a time; more than one appear only with HTTP/2's concurrent streams).
pub(super) const MAX_KEPT: usize = 8;

/// The PROXY protocol v2 signature (section 2.2).
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The PROXY protocol v2 header of a TCP connection from `client` to `local` (the address
/// the client connected to): version 2, command PROXY, TCP over IPv4, no TLVs.
#[must_use]
pub(crate) fn proxy_v2_header(client: SocketAddrV4, local: SocketAddrV4) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..12].copy_from_slice(&SIGNATURE);
    h[12] = 0x21; // version 2, PROXY
    h[13] = 0x11; // AF_INET, STREAM
    h[14..16].copy_from_slice(&12u16.to_be_bytes());
    h[16..20].copy_from_slice(&client.ip().octets());
    h[20..24].copy_from_slice(&local.ip().octets());
    h[24..26].copy_from_slice(&client.port().to_be_bytes());
    h[26..28].copy_from_slice(&local.port().to_be_bytes());
    h
}

/// Why a request on a client's own backend connection got no answer.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection to the backend (refused, timed out, the header not written): the
    /// request was not sent.
    Connect(String),
    /// The request was sent (or being sent) and the exchange failed.
    Exchange(Box<dyn std::error::Error + Send + Sync>),
}

/// The backend connections of one client connection, idle between its requests.
#[derive(Default)]
pub(super) struct Kept(Mutex<Vec<(SocketAddrV4, SendRequest<Full<Bytes>>)>>);

impl Kept {
    /// An idle connection to `addr` ready for a request, if one is kept; closed ones are
    /// dropped on the way.
    fn take(&self, addr: SocketAddrV4) -> Option<SendRequest<Full<Bytes>>> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.retain(|(_, s)| !s.is_closed());
        let i = kept.iter().position(|(a, s)| *a == addr && s.is_ready())?;
        Some(kept.swap_remove(i).1)
    }

    fn put(&self, addr: SocketAddrV4, sender: SendRequest<Full<Bytes>>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < MAX_KEPT && !sender.is_closed() {
            kept.push((addr, sender));
        }
    }
}

/// Sends `req` to `addr` on a connection of this client connection's own (`kept`), opening
/// one (within `connect_timeout`, the PROXY header first) when none is idle.
pub(super) async fn send(
    kept: &Kept,
    connect_timeout: Duration,
    client: SocketAddrV4,
    local: SocketAddrV4,
    addr: SocketAddrV4,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    let mut sender = match kept.take(addr) {
        Some(s) => s,
        None => connect(connect_timeout, client, local, addr).await?,
    };
    let answer = sender
        .send_request(req)
        .await
        .map_err(|e| SendError::Exchange(e.into()))?;
    kept.put(addr, sender);
    Ok(answer)
}

async fn connect(
    timeout: Duration,
    client: SocketAddrV4,
    local: SocketAddrV4,
    addr: SocketAddrV4,
) -> Result<SendRequest<Full<Bytes>>, SendError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| SendError::Connect(format!("{what}: {e}"));
    let open = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| failed("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&proxy_v2_header(client, local))
            .await
            .map_err(|e| failed("PROXY header", &e))?;
        let (mut sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed("handshake", &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(backend = %addr, "proxied backend connection: {e}");
            }
        });
        sender.ready().await.map_err(|e| failed("connection", &e))?;
        Ok(sender)
    };
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or_else(|_| Err(SendError::Connect("connect timed out".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_specs_layout() {
        let h = proxy_v2_header(
            "198.51.100.200:40000".parse().unwrap(),
            "198.51.100.11:80".parse().unwrap(),
        );
        assert_eq!(
            &h[..12],
            b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
        );
        assert_eq!(
            &h[12..],
            &[
                0x21, 0x11, 0, 12, 198, 51, 100, 200, 198, 51, 100, 11, 0x9c, 0x40, 0, 80
            ]
        );
    }
}
