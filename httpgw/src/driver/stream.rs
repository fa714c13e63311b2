//! The client socket as hyper reads it: every byte passes the framing guard first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::framing::HeadGuard;
use crate::hygiene::Refusal;

/// Bytes read from the socket per call.
const READ_CHUNK: usize = 16 * 1024;

/// A client stream (TCP, or TLS over it) whose reads come through a [`HeadGuard`]. After a refusal it reads as closed,
/// so hyper finishes what it has and ends the connection; the driver then answers the refusal
/// itself.
pub(super) struct GuardedStream<S> {
    inner: S,
    guard: HeadGuard,
    /// Judged bytes not yet handed to hyper, from `offset`.
    released: Vec<u8>,
    offset: usize,
    scratch: Box<[u8]>,
    refusal: Option<Refusal>,
}

impl<S> GuardedStream<S> {
    pub(super) fn new(inner: S, max_head: usize) -> Self {
        Self {
            inner,
            guard: HeadGuard::new(max_head),
            released: Vec::new(),
            offset: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            refusal: None,
        }
    }

    /// The refusal of a head, if the guard refused one; a refusal inside a body (its head
    /// already with hyper) cannot be answered and only cuts the connection.
    pub(super) fn refused_head(&self) -> Option<Refusal> {
        self.refusal.filter(|_| self.guard.at_head())
    }

    /// Whether the guard refused anything on this connection.
    pub(super) fn refused(&self) -> bool {
        self.refusal.is_some()
    }

    pub(super) fn into_inner(self) -> S {
        self.inner
    }

    /// The stream for a tunnel after an upgrade, and the client's bytes read but not yet
    /// handed on (to go first).
    pub(super) fn into_tunnel(mut self) -> (S, Vec<u8>) {
        let mut first = self.released.split_off(self.offset);
        first.append(&mut self.guard.take_held());
        (self.inner, first)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.offset < this.released.len() {
                let n = buf.remaining().min(this.released.len() - this.offset);
                buf.put_slice(&this.released[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.released.len() {
                    this.released.clear();
                    this.offset = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() {
                return Poll::Ready(Ok(()));
            }
            if this.guard.upgrading() {
                // Not read until the upgrade is answered: a switch makes the rest a tunnel's,
                // anything else closes the connection. hyper needs nothing more for a
                // bodiless request; its task is woken by the answer.
                return Poll::Pending;
            }
            let mut raw = ReadBuf::new(&mut this.scratch);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            let n = raw.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Err(refusal) = this.guard.feed(&this.scratch[..n], &mut this.released) {
                this.refusal = Some(refusal);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
