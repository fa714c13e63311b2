//! HTTPS to the backends of a pool with `tls` (re-encryption): hyper-util's pooled HTTP/1.1
//! client over a connector that opens the TCP connection as the plain client does (same
//! `HttpConnector` settings) and then a rustls client session configured as natgw's HTTPS
//! checks are (verification on by default, against `ca_file` or the system's roots; the name
//! verified is the `sni` name, sent as SNI, else the backend's address as an IP SAN).
//!
//! One client per distinct setting, so a pool's pooled connections are kept per backend as
//! for plain HTTP; rustls resumes sessions to a backend it already talked to.

use std::future::Future;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use natgw::health::TlsCheck;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use super::bare::Bare;

/// Why a TLS connection to a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamTlsError {
    /// The request's target is not the backend's `IPv4:port` (the gateway always builds
    /// it so; kept as an error rather than a panic).
    #[error("backend address {0:?} is not IPv4:port")]
    Address(String),
    /// The TCP connection failed.
    #[error("connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The handshake failed: the certificate did not verify, the backend speaks no TLS, ...
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    /// The handshake took longer than `connect_timeout`.
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
}

/// The connector of one TLS setting.
#[derive(Clone)]
pub(super) struct TlsUpstream {
    tcp: HttpConnector,
    tls: TlsConnector,
    check: TlsCheck,
    handshake_timeout: Duration,
}

impl TlsUpstream {
    /// Reads the CA file (or the system's roots) now: a setting that cannot be used is
    /// refused at start or reload, not at the first request.
    pub(super) fn new(
        mut tcp: HttpConnector,
        check: &TlsCheck,
        handshake_timeout: Duration,
    ) -> Result<Self, natgw::health::tls::TlsSetupError> {
        // The plain connector refuses https URIs unless told that TLS is layered on top.
        tcp.enforce_http(false);
        Ok(Self {
            tcp,
            tls: natgw::health::tls::connector(check)?,
            check: check.clone(),
            handshake_timeout,
        })
    }
}

/// A TLS connection to a backend, as hyper's client takes it.
pub(super) type TlsConn = Bare<TokioIo<TlsStream<TcpStream>>>;

type Connecting = Pin<Box<dyn Future<Output = Result<TlsConn, UpstreamTlsError>> + Send>>;

impl Service<Uri> for TlsUpstream {
    type Response = TlsConn;
    type Error = UpstreamTlsError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp
            .poll_ready(cx)
            .map_err(|e| UpstreamTlsError::Connect(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let tls = self.tls.clone();
        let check = self.check.clone();
        let handshake_timeout = self.handshake_timeout;
        Box::pin(async move {
            let addr: SocketAddrV4 = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| UpstreamTlsError::Address(uri.to_string()))?;
            let stream = tcp
                .call(uri)
                .await
                .map_err(|e| UpstreamTlsError::Connect(Box::new(e)))?
                .into_inner();
            let name = natgw::health::tls::server_name(&check, addr);
            let session = tokio::time::timeout(handshake_timeout, tls.connect(name, stream))
                .await
                .map_err(|_| UpstreamTlsError::HandshakeTimeout)?
                .map_err(UpstreamTlsError::Handshake)?;
            Ok(Bare(TokioIo::new(session)))
        })
    }
}
