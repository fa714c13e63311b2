//! Copying between a local socket and an SSH channel, with live counters.
//!
//! Each direction moves owned buffers instead of going through russh's `AsyncRead` /
//! `AsyncWrite` adapters: bytes read from the socket are handed to the channel as `Bytes`
//! (no copy, no boxed futures per write), and data arriving from the channel is written to
//! the socket straight from the message russh delivered (no intermediate buffer).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use russh::{ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{ForwardCounts, ForwardKind, ForwardState, ForwardStatus};

/// Counters of one forward; shared by all its connections.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    /// Connections now open.
    pub active: AtomicU64,
    /// Connections accepted since start.
    pub total: AtomicU64,
    /// Connections that could not be forwarded (channel refused, local connect failed).
    pub failed: AtomicU64,
    /// Bytes from the local side into the tunnel, counted as they pass.
    pub bytes_out: AtomicU64,
    /// Bytes from the tunnel to the local side, counted as they pass.
    pub bytes_in: AtomicU64,
}

impl ForwardCounters {
    /// A snapshot for `vipgate show ssh` of the forward they count.
    pub(crate) fn status(&self, kind: ForwardKind, spec: String, bound: String) -> ForwardStatus {
        ForwardStatus {
            kind,
            spec,
            bound,
            active: self.active.load(Ordering::Relaxed),
            counters: ForwardCounts {
                total: self.total.load(Ordering::Relaxed),
                failed: self.failed.load(Ordering::Relaxed),
                bytes_out: self.bytes_out.load(Ordering::Relaxed),
                bytes_in: self.bytes_in.load(Ordering::Relaxed),
            },
            state: ForwardState::Listening,
            pending: None,
        }
    }
}

/// Largest read from the local socket: two SSH packets' worth, so one read fills the next
/// two channel messages, while memory per connection stays bounded.
const READ_CHUNK: usize = 64 * 1024;

/// Copies both ways until both directions are done; an EOF in one direction is passed on as
/// a half-close (SSH EOF, or TCP shutdown) while the other keeps flowing. Closes the channel
/// at the end.
pub(crate) async fn pump<L, S>(
    local: L,
    channel: russh::Channel<S>,
    initial: &[u8],
    counters: &ForwardCounters,
) where
    L: AsyncRead + AsyncWrite + Unpin,
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    counters.active.fetch_add(1, Ordering::Relaxed);
    let (mut local_rx, mut local_tx) = tokio::io::split(local);
    let (mut chan_rx, chan_tx) = channel.split();
    let up = async {
        if !initial.is_empty() {
            counters
                .bytes_out
                .fetch_add(initial.len() as u64, Ordering::Relaxed);
            if chan_tx
                .data_bytes(bytes::Bytes::copy_from_slice(initial))
                .await
                .is_err()
            {
                return;
            }
        }
        local_to_channel(&mut local_rx, &chan_tx, counters).await;
    };
    // A channel the server closed outright ends the local-to-channel direction too: nothing
    // more can be sent on it, and the local peer may never close its side by itself.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let up = async {
        tokio::select! {
            () = up => {}
            // Only a send counts: the sender is also dropped when the channel merely saw EOF.
            Ok(()) = closed_rx => {}
        }
    };
    let down = async {
        if channel_to_local(&mut chan_rx, &mut local_tx, counters).await {
            let _ = closed_tx.send(());
        }
    };
    tokio::join!(up, down);
    let _ = chan_tx.close().await;
    counters.active.fetch_sub(1, Ordering::Relaxed);
}

async fn local_to_channel<R, S>(local: &mut R, chan: &ChannelWriteHalf<S>, c: &ForwardCounters)
where
    R: AsyncRead + Unpin,
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    // The buffer's allocation is reused once the previous chunks have been encrypted and
    // dropped by the session, so steady-state copying allocates nothing.
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        match local.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = chan.eof().await;
                return;
            }
            Ok(n) => {
                c.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                if chan.data_bytes(buf.split().freeze()).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("forwarded connection: local read failed: {e}");
                let _ = chan.eof().await;
                return;
            }
        }
    }
}

/// Returns true when the channel was closed (not merely half-closed with EOF).
async fn channel_to_local<W>(chan: &mut ChannelReadHalf, local: &mut W, c: &ForwardCounters) -> bool
where
    W: AsyncWrite + Unpin,
{
    while let Some(msg) = chan.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if let Err(e) = local.write_all(&data).await {
                    tracing::debug!("forwarded connection: local write failed: {e}");
                    return true;
                }
                c.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            ChannelMsg::Eof => {
                let _ = local.shutdown().await;
                return false;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = local.shutdown().await;
    true
}
