//! Copying between a local socket and an SSH channel, with counters.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};

/// Counters of one forward; shared by all its connections.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    /// Connections now open.
    pub active: AtomicU64,
    /// Connections accepted since start.
    pub total: AtomicU64,
    /// Connections that could not be forwarded (channel refused, local connect failed).
    pub failed: AtomicU64,
    /// Bytes from the local side into the tunnel (counted when a connection closes).
    pub bytes_out: AtomicU64,
    /// Bytes from the tunnel to the local side (counted when a connection closes).
    pub bytes_in: AtomicU64,
}

/// Per-direction buffer of the copy loop: two SSH packets' worth, so a full packet is always
/// ready while the other is being written, and memory per connection stays bounded.
const COPY_BUF: usize = 64 * 1024;

/// Copies both ways until both directions saw EOF; an EOF in one direction is passed on as a
/// half-close (TCP shutdown or SSH EOF) while the other keeps flowing.
pub(crate) async fn pump<L, C>(local: &mut L, channel: &mut C, counters: &ForwardCounters)
where
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    counters.active.fetch_add(1, Ordering::Relaxed);
    match tokio::io::copy_bidirectional_with_sizes(local, channel, COPY_BUF, COPY_BUF).await {
        Ok((out, inn)) => {
            counters.bytes_out.fetch_add(out, Ordering::Relaxed);
            counters.bytes_in.fetch_add(inn, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("forwarded connection ended: {e}"),
    }
    counters.active.fetch_sub(1, Ordering::Relaxed);
}
