//! Backend connections as hyper-util's pooled client takes them, without connection info.
//!
//! hyper-util's own TCP connection reports its addresses (`HttpInfo`), which the client then
//! copies into the extensions of every response: three allocations per request that nothing
//! here reads. A [`Bare`] connection reports none.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// A connection to a backend that tells hyper-util nothing about itself.
pub(super) struct Bare<T>(pub(super) T);

impl<T> Connection for Bare<T> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Bare<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Bare<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// The plain connector: hyper-util's, its connections made [`Bare`].
#[derive(Clone)]
pub(super) struct Plain(pub(super) HttpConnector);

type Error = <HttpConnector as Service<Uri>>::Error;
type Connecting = Pin<Box<dyn Future<Output = Result<Bare<TokioIo<TcpStream>>, Error>> + Send>>;

impl Service<Uri> for Plain {
    type Response = Bare<TokioIo<TcpStream>>;
    type Error = Error;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(Bare) })
    }
}
