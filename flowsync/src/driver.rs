//! The engine on a UDP socket (feature `driver`): one task that feeds the socket's datagrams,
//! the owner's changes and the timers to a [`SyncEngine`], sends what it returns to every
//! peer, and hands its events back.
//!
//! Invariants: the task is the only owner of the engine; the clock is read in one place
//! ([`now`]); a datagram larger than [`MAX_DATAGRAM`] is read whole (up to 64 KiB) so the
//! engine refuses it as oversize instead of seeing a truncated prefix; events are handed over
//! in order through a bounded channel, and the task waits for room rather than drop one (a
//! dropped `Updates` would lose state); the task ends when the owner drops its handle.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::engine::{Event, Now, PeerStatus, SyncConfig, SyncEngine, SyncStats};
use crate::record::Update;
#[cfg(doc)]
use crate::wire::MAX_DATAGRAM;

/// Events queued for the owner before the task waits for it.
const EVENT_QUEUE: usize = 1024;
/// Commands queued for the task.
const COMMAND_QUEUE: usize = 256;

/// What the owner asks of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send these changes to every peer.
    Updates(Vec<Update>),
    /// Send the full state as a snapshot (the answer to a request, or unasked when this node
    /// takes over).
    Snapshot {
        /// Every record.
        updates: Vec<Update>,
        /// This node is the master of the VIP (see [`SyncEngine::send_snapshot`]).
        owner: bool,
    },
    /// Ask every live peer for a snapshot again.
    RequestBulk,
}

/// The owner's end of a running sync task.
#[derive(Debug)]
pub struct SyncHandle {
    /// Commands to the task.
    pub commands: mpsc::Sender<Command>,
    /// The engine's events, in order.
    pub events: mpsc::Receiver<Event>,
    /// The engine's counters and whether it is synced, refreshed after every step.
    pub status: watch::Receiver<SyncStatus>,
    /// The task (ends when `commands` is dropped, or on a socket error).
    pub task: JoinHandle<std::io::Result<()>>,
}

/// What `show sync` reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Counters.
    pub stats: SyncStats,
    /// No snapshot asked for is outstanding from a live peer.
    pub synced: bool,
    /// Every peer heard since start (at most [`crate::wire::MAX_PEERS`]).
    pub peers: Vec<PeerStatus>,
    /// Our data messages held until every live peer acknowledged them.
    pub queued: usize,
}

/// The driver's clock: the one place that reads it.
#[allow(clippy::disallowed_methods)]
fn now() -> Now {
    let unix_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Now {
        at: Instant::now(),
        unix_secs,
    }
}

/// An incarnation for a node starting now: its start time in milliseconds (larger than any
/// earlier start's as long as the wall clock does not go back).
#[must_use]
#[allow(clippy::disallowed_methods)]
pub fn incarnation_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs an engine on `socket`, sending every datagram to each of `peers`.
///
/// # Errors
/// The socket cannot be handed to tokio.
pub fn spawn(
    socket: std::net::UdpSocket,
    peers: Vec<SocketAddr>,
    config: SyncConfig,
) -> std::io::Result<SyncHandle> {
    socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(socket)?;
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let engine = SyncEngine::new(now(), config);
    let (status_tx, status) = watch::channel(status_of(&engine));
    let task = tokio::spawn(run(socket, peers, engine, command_rx, event_tx, status_tx));
    Ok(SyncHandle {
        commands,
        events,
        status,
        task,
    })
}

fn status_of(engine: &SyncEngine) -> SyncStatus {
    SyncStatus {
        stats: *engine.stats(),
        synced: engine.synced(),
        peers: engine.peers().collect(),
        queued: engine.queued(),
    }
}

async fn run(
    socket: UdpSocket,
    peers: Vec<SocketAddr>,
    mut engine: SyncEngine,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    status: watch::Sender<SyncStatus>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        while let Some(datagram) = engine.poll_transmit() {
            for peer in &peers {
                // A peer that is unreachable right now is the protocol's business (resend,
                // peer down), not a reason to stop.
                let _ = socket.send_to(&datagram, peer).await;
            }
        }
        while let Some(event) = engine.poll_event() {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
        status.send_replace(status_of(&engine));
        let deadline = engine.poll_timeout().unwrap_or_else(|| now().at);
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (len, _from) = received?;
                let _ = engine.handle_datagram(now(), &buf[..len]);
            }
            command = commands.recv() => match command {
                Some(Command::Updates(updates)) => engine.send_updates(now(), &updates),
                Some(Command::Snapshot { updates, owner }) => {
                    engine.send_snapshot(now(), &updates, owner);
                }
                Some(Command::RequestBulk) => engine.request_bulk(now()),
                None => return Ok(()),
            },
            () = tokio::time::sleep_until(deadline.into()) => engine.handle_timeout(now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::record::{FlowKey, FlowProto};
    use crate::wire::SyncKey;

    fn pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (a, b)
    }

    fn cfg(node: u32) -> SyncConfig {
        let key = SyncKey::new(b"loopback test key!!").unwrap();
        SyncConfig::new(NonZeroU32::new(node).unwrap(), incarnation_now(), key)
    }

    fn gone(port: u16) -> Update {
        Update::FlowGone(FlowKey {
            proto: FlowProto::Udp,
            public: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), port),
            outside: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 53),
        })
    }

    /// The next event matching `want`, answering snapshot requests with `snapshot` meanwhile.
    async fn wait_for(
        h: &mut SyncHandle,
        snapshot: &[Update],
        want: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let e = tokio::time::timeout_at(deadline, h.events.recv())
                .await
                .expect("event before the deadline")
                .expect("task alive");
            if let Event::SnapshotRequested { .. } = e {
                h.commands
                    .send(Command::Snapshot {
                        updates: snapshot.to_vec(),
                        owner: !snapshot.is_empty(),
                    })
                    .await
                    .unwrap();
            }
            if want(&e) {
                return e;
            }
        }
    }

    #[tokio::test]
    async fn two_nodes_on_loopback_exchange_a_snapshot_and_live_updates() {
        let (sa, sb) = pair();
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let mut a = spawn(sa, vec![ab], cfg(1)).unwrap();
        let mut b = spawn(sb, vec![aa], cfg(2)).unwrap();
        let snapshot = [gone(1), gone(2)];
        // b discovers a and pulls its snapshot (a answers from the helper's loop).
        let a_task = tokio::spawn(async move {
            wait_for(&mut a, &snapshot, |e| {
                matches!(e, Event::SnapshotRequested { by: 2 })
            })
            .await;
            a
        });
        let e = wait_for(&mut b, &[], |e| matches!(e, Event::BulkComplete { .. })).await;
        assert_eq!(
            e,
            Event::BulkComplete {
                from: 1,
                records: 2,
                owner: true
            }
        );
        let a = a_task.await.unwrap();
        a.commands
            .send(Command::Updates(vec![gone(3)]))
            .await
            .unwrap();
        let e = wait_for(&mut b, &[], |e| {
            matches!(e, Event::Updates { bulk: false, .. })
        })
        .await;
        assert_eq!(
            e,
            Event::Updates {
                from: 1,
                bulk: false,
                updates: vec![gone(3)]
            }
        );
        assert!(b.status.borrow().synced);
        assert_eq!(b.status.borrow().peers.len(), 1);
        assert!(b.status.borrow().peers[0].up);
        assert_eq!(b.status.borrow().stats.auth_failures, 0);
        drop(a.commands);
        assert!(
            a.task.await.unwrap().is_ok(),
            "the task ends with its handle"
        );
    }
}
