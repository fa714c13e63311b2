//! [`SyncEngine`]: one node's end of the sync protocol, as a sans-IO state machine.
//!
//! Reliability follows conntrackd's FTFW mode: every data message ([`Body::Updates`],
//! [`Body::BulkEnd`]) takes the next number of the sender's stream and stays in a bounded
//! resend queue until every live peer acknowledged it; receivers deliver in order, buffer a
//! bounded window of early messages, ask for the missing ones (`Nack`), and acknowledge
//! cumulatively (`Ack`, after [`ACK_EVERY`] deliveries or `ack_delay`). A data message not
//! acknowledged after `resend_after` is sent again, so a lost tail recovers without a gap to
//! reveal it; a `Hello` every `hello_interval` carries liveness and where the stream stands.
//! A message that fell out of the resend queue cannot be sent again: the `Hello` says which
//! is the oldest still held, and a receiver behind it skips ahead and pulls a full snapshot.
//!
//! Flow control: at most `send_window` data messages are in flight past the slowest live
//! peer's acknowledgement; the rest wait in the resend queue, unsent, and go out as
//! acknowledgements arrive. Without it a snapshot (100,000 flows are 2,300 messages) leaves in
//! one burst that overflows the receiver's socket buffer, and the stream then crawls through
//! `Nack`s and 200 ms resends. With no peer up there is nobody to wait for: everything goes out.
//! Invariant: every peer's acknowledgement is at most `tx_sent` (what was sent), so the queue
//! is trimmed of sent messages only; `Hello` announces `tx_sent`, never a message not sent.
//!
//! Trust: every datagram passes [`crate::wire::decode`] (HMAC-SHA256 with the shared key)
//! before anything else; then its wall-clock stamp must be within `max_clock_skew_secs` of
//! ours, its incarnation not older than the peer's known one, and a control message's number
//! above the last one seen from that peer (a data message's number is checked by the stream
//! itself: one already delivered or buffered is a duplicate). So a captured message replayed
//! later is dropped and counted, never delivered.
//!
//! Features: a node announces what it understands beyond the base protocol (`Features`,
//! with every `Hello`); a record type added later (the locality records, then their
//! removals, each with its own bit: `Update::feature`) is packed only while every live peer
//! announced its bit, and withheld and counted otherwise (`locality_withheld`), since a peer
//! that cannot decode a data message never gets past it.
//! A restarted peer announces again (its incarnation resets what we knew of it).
//!
//! Start and restart: a node starts with a new, larger incarnation; peers that see it reset
//! their view of its stream. A node asks every peer it discovers for a full snapshot
//! (`BulkRequest`), retried after `bulk_retry` without a message of it until that peer's
//! `BulkEnd` arrives: a (re)started backup pulls the state instead of waiting for changes,
//! and a snapshot under way on a slow link is not asked for (and queued) twice.
//!
//! Bounds: at most [`MAX_PEERS`] peers, `resend_queue` data messages held (`send_window` of
//! them in flight), `reorder_window` messages buffered per peer, [`MAX_NACK_SPAN`] numbers
//! asked per `Nack`, [`RESEND_BURST`] messages resent per timeout.
//!
//! Use: after every `handle_*` or `send_*` call, drain [`SyncEngine::poll_transmit`] (each
//! datagram goes to every peer: unicast to each, or one multicast) and
//! [`SyncEngine::poll_event`], then sleep until [`SyncEngine::poll_timeout`].

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use crate::error::WireError;
use crate::record::Update;
use crate::wire::{self, Body, MAX_NACK_SPAN, MAX_PAYLOAD, MAX_PEERS, Message, SyncKey};

/// Deliveries after which a receiver acknowledges at once (not waiting for `ack_delay`).
pub const ACK_EVERY: u32 = 16;
/// The most data messages resent per timeout.
pub const RESEND_BURST: usize = 64;
/// The most records in one `Updates` message (the count is one byte).
const MAX_RECORDS: usize = u8::MAX as usize;

/// The two clocks the engine needs, read by the driver: monotonic for timers, wall clock
/// (Unix seconds) for the replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Wall-clock time in Unix seconds.
    pub unix_secs: u64,
}

/// Settings of a [`SyncEngine`].
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// This node's id (unique in the sync group).
    pub node: NonZeroU32,
    /// This start's incarnation: larger than any earlier start's (the driver uses the start
    /// time in milliseconds).
    pub incarnation: u64,
    /// The group's shared key.
    pub key: SyncKey,
    /// Interval of `Hello` messages.
    pub hello_interval: Duration,
    /// A peer not heard for this long is down (it no longer holds the resend queue).
    pub peer_timeout: Duration,
    /// A data message not acknowledged after this long is sent again.
    pub resend_after: Duration,
    /// The longest a receiver waits before acknowledging.
    pub ack_delay: Duration,
    /// Messages stamped further than this from our wall clock are refused (seconds).
    pub max_clock_skew_secs: u64,
    /// Data messages held for resending (at least 1).
    pub resend_queue: usize,
    /// Early data messages buffered per peer (at least 1).
    pub reorder_window: u32,
    /// Data messages sent and not yet acknowledged by the slowest live peer (at least 1):
    /// small enough that a burst fits a receiver's default socket buffer (212,992 bytes hold
    /// about 90 datagrams of 1,400 bytes), large enough to keep a link busy between the
    /// acknowledgements a receiver sends every [`ACK_EVERY`] messages.
    pub send_window: u32,
    /// Interval of a `BulkRequest` until its snapshot completes.
    pub bulk_retry: Duration,
    /// What this node announces it understands (`wire::FEATURE_*`; 0: no `Features`
    /// message at all).
    pub features: u32,
}

impl SyncConfig {
    /// Settings with the defaults: hello 1 s, peer timeout 3 s, resend after 200 ms, ack
    /// delay 50 ms, clock skew 30 s, 8,192 messages held (about 11 MB at most), reorder
    /// window 128, send window 64, bulk retry 2 s.
    #[must_use]
    pub fn new(node: NonZeroU32, incarnation: u64, key: SyncKey) -> Self {
        SyncConfig {
            node,
            incarnation,
            key,
            hello_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(3),
            resend_after: Duration::from_millis(200),
            ack_delay: Duration::from_millis(50),
            max_clock_skew_secs: 30,
            resend_queue: 8192,
            reorder_window: 128,
            send_window: 64,
            bulk_retry: Duration::from_secs(2),
            features: wire::FEATURES,
        }
    }
}

/// What the engine tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer was heard (first time, or again after it was down).
    PeerUp {
        /// Its node id.
        node: u32,
    },
    /// A peer was not heard for `peer_timeout`.
    PeerDown {
        /// Its node id.
        node: u32,
    },
    /// A peer started again (a larger incarnation): it lost its state and will pull ours.
    PeerRestarted {
        /// Its node id.
        node: u32,
    },
    /// Changes from a peer, in its order: apply them as standby state.
    Updates {
        /// The sender.
        from: u32,
        /// Part of a snapshot.
        bulk: bool,
        /// The changes.
        updates: Vec<Update>,
    },
    /// A peer asked for a full snapshot: answer with [`SyncEngine::send_snapshot`].
    SnapshotRequested {
        /// The asker.
        by: u32,
    },
    /// A peer's snapshot is complete: this node holds everything that peer had.
    BulkComplete {
        /// The sender.
        from: u32,
        /// Records the snapshot held.
        records: u32,
        /// The sender was the master of the VIP when it sent it (it owned the state).
        owner: bool,
    },
    /// Messages of a peer's stream were lost for good (it could no longer resend them); a
    /// snapshot was asked for to make up for them.
    StreamGap {
        /// The sender.
        from: u32,
        /// Messages skipped.
        lost: u32,
    },
}

/// Why a datagram was not accepted (each one is also counted in [`SyncStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not an authentic, well-formed message.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// Our own message (multicast loopback).
    #[error("own message")]
    OwnMessage,
    /// Stamped outside the clock-skew window.
    #[error("stamped {skew_secs} s away from our clock")]
    ClockSkew {
        /// The difference.
        skew_secs: u64,
    },
    /// From an earlier incarnation of a known peer.
    #[error("from an earlier incarnation")]
    OldIncarnation,
    /// A control message not newer than the last one seen from that peer.
    #[error("replayed control message")]
    Replay,
    /// A new peer beyond [`MAX_PEERS`].
    #[error("too many peers")]
    TooManyPeers,
}

/// Counters of a [`SyncEngine`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Datagrams sent (first sends and resends).
    pub messages_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Data messages sent again.
    pub resent: u64,
    /// Records sent (live and bulk).
    pub updates_sent: u64,
    /// Datagrams accepted.
    pub messages_received: u64,
    /// Bytes of every datagram received (accepted or not).
    pub bytes_received: u64,
    /// Records delivered.
    pub updates_received: u64,
    /// Datagrams whose HMAC did not match.
    pub auth_failures: u64,
    /// Authentic-or-not datagrams refused for their form (every other [`WireError`] but
    /// [`WireError::UnsupportedVersion`]).
    pub malformed: u64,
    /// Control messages replayed (not newer than the last seen).
    pub replays: u64,
    /// Messages outside the clock-skew window.
    pub clock_skew: u64,
    /// Messages of an earlier incarnation.
    pub old_incarnation: u64,
    /// Messages of another protocol version (a peer running an older or newer vipgate).
    pub unsupported_version: u64,
    /// Own messages looped back.
    pub own_messages: u64,
    /// Data messages already delivered or buffered.
    pub duplicates: u64,
    /// Data messages too far ahead of the stream to buffer.
    pub out_of_window: u64,
    /// Data messages of peers lost for good (skipped; made up by a snapshot).
    pub lost: u64,
    /// Data messages dropped from a full resend queue before every peer acknowledged them.
    pub queue_overflows: u64,
    /// Datagrams of new peers beyond the bound.
    pub too_many_peers: u64,
    /// Snapshots sent.
    pub bulks_served: u64,
    /// Snapshots received complete.
    pub bulks_received: u64,
    /// Locality records (entries and removals) not sent because some live peer did not
    /// announce it takes that kind (or no peer was up).
    pub locality_withheld: u64,
}

/// Where a snapshot from one peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkStatus {
    /// Not asked for (the peer started after us: it has nothing we lack).
    NotRequested,
    /// Asked for, not complete yet.
    Requested {
        /// When it was last asked for, or when a message of it last arrived (it is asked
        /// for again only after `bulk_retry` without either).
        at: Instant,
    },
    /// Complete.
    Complete {
        /// Records it held.
        records: u32,
        /// The peer was the master of the VIP when it sent it.
        owner: bool,
        /// When it completed.
        at: Instant,
    },
}

/// One peer as `show sync` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its node id.
    pub node: u32,
    /// Its incarnation.
    pub incarnation: u64,
    /// Heard within `peer_timeout`.
    pub up: bool,
    /// When it was last heard.
    pub last_heard: Instant,
    /// Our data messages it has not acknowledged yet.
    pub unacked: u32,
    /// Its data messages we buffer, waiting for missing ones.
    pub buffered: usize,
    /// Its snapshot.
    pub bulk: BulkStatus,
    /// What it announced it understands (`wire::FEATURE_*`; 0 until it did).
    pub features: u32,
}

/// A data message held for resending.
#[derive(Debug, Clone)]
struct Pending {
    seq: u32,
    body: Body,
    last_sent: Instant,
}

#[derive(Debug)]
struct Peer {
    node: u32,
    incarnation: u64,
    up: bool,
    last_heard: Instant,
    /// Next seq of its stream to deliver (`None` until it told us where its stream is).
    rx_next: Option<u32>,
    /// Early data messages, by seq (at most `reorder_window`).
    early: HashMap<u32, Body>,
    /// Last control seq seen.
    last_control: Option<u32>,
    /// Next seq of our stream it has not acknowledged.
    acked: u32,
    /// Deliveries not acknowledged yet, and when the acknowledgement is due.
    ack_owed: u32,
    ack_due: Option<Instant>,
    /// Last negative acknowledgement sent: when, and from which seq.
    last_nack: Option<(Instant, u32)>,
    bulk: BulkStatus,
    features: u32,
}

/// The seq after `seq`.
fn seq_next(seq: u32) -> u32 {
    seq.wrapping_add(1)
}

/// `a` comes after `b` in a wrapping sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// One node's end of the sync protocol. See the module docs.
#[derive(Debug)]
pub struct SyncEngine {
    cfg: SyncConfig,
    /// Seq of our next data message.
    tx_next: u32,
    /// Seq of our first data message not sent yet (held until the window has room).
    tx_sent: u32,
    /// Seq of our next control message.
    control_next: u32,
    /// Data messages held for resending, contiguous in seq, oldest first.
    queue: VecDeque<Pending>,
    peers: Vec<Peer>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    next_hello: Instant,
    /// A snapshot was asked for and not sent yet (requests meanwhile are merged).
    snapshot_owed: bool,
    /// Wall clock of the last call, for stamping.
    unix_secs: u64,
    stats: SyncStats,
}

impl SyncEngine {
    /// A node that announces itself at once (a `Hello`).
    #[must_use]
    pub fn new(now: Now, mut cfg: SyncConfig) -> Self {
        cfg.resend_queue = cfg.resend_queue.max(1);
        cfg.reorder_window = cfg.reorder_window.clamp(1, MAX_NACK_SPAN);
        cfg.send_window = cfg.send_window.max(1);
        let mut engine = SyncEngine {
            cfg,
            tx_next: 1,
            tx_sent: 1,
            control_next: 1,
            queue: VecDeque::new(),
            peers: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_hello: now.at,
            snapshot_owed: false,
            unix_secs: now.unix_secs,
            stats: SyncStats::default(),
        };
        engine.handle_timeout(now);
        engine
    }

    /// This node's id.
    #[must_use]
    pub fn node(&self) -> u32 {
        self.cfg.node.get()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// The peers heard since start.
    pub fn peers(&self) -> impl Iterator<Item = PeerStatus> + '_ {
        self.peers.iter().map(|p| PeerStatus {
            node: p.node,
            incarnation: p.incarnation,
            up: p.up,
            last_heard: p.last_heard,
            unacked: self.tx_next.wrapping_sub(p.acked),
            buffered: p.early.len(),
            bulk: p.bulk,
            features: p.features,
        })
    }

    /// No snapshot asked for is outstanding from a live peer: this node holds what its peers
    /// hold (as far as their messages arrived).
    #[must_use]
    pub fn synced(&self) -> bool {
        !self
            .peers
            .iter()
            .any(|p| p.up && matches!(p.bulk, BulkStatus::Requested { .. }))
    }

    /// Data messages held for resending.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The next datagram to send to every peer.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`SyncEngine::handle_timeout`] must run next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_hello;
        let mut consider = |t: Instant| next = next.min(t);
        let any_up = self.peers.iter().any(|p| p.up);
        for p in &self.peers {
            if let Some(t) = p.ack_due {
                consider(t);
            }
            if p.up {
                consider(p.last_heard + self.cfg.peer_timeout);
                if let BulkStatus::Requested { at } = p.bulk {
                    consider(at + self.cfg.bulk_retry);
                }
            }
        }
        if any_up
            && let Some(t) = self
                .queue
                .iter()
                .take_while(|m| seq_after(self.tx_sent, m.seq))
                .map(|m| m.last_sent)
                .min()
        {
            consider(t + self.cfg.resend_after);
        }
        Some(next)
    }

    /// Queues changes for every peer, batched into as few messages as fit (a record added
    /// later only if every live peer takes its kind).
    pub fn send_updates(&mut self, now: Now, updates: &[Update]) {
        self.unix_secs = now.unix_secs;
        let updates = self.sendable(updates);
        self.pack(now.at, &updates, false);
    }

    /// Whether every live peer (and at least one) announced `feature`.
    fn peers_take(&self, feature: u32) -> bool {
        let mut up = self.peers.iter().filter(|p| p.up).peekable();
        up.peek().is_some() && up.all(|p| p.features & feature != 0)
    }

    /// `updates` without the records of a kind some live peer does not take (every record
    /// of a later kind when no peer is up).
    fn sendable<'a>(&mut self, updates: &'a [Update]) -> std::borrow::Cow<'a, [Update]> {
        let later: u32 = updates.iter().fold(0, |f, u| f | u.feature());
        let refused: u32 = [wire::FEATURE_LOCALITY, wire::FEATURE_LOCALITY_GONE]
            .into_iter()
            .filter(|&f| later & f != 0 && !self.peers_take(f))
            .fold(0, |r, f| r | f);
        if refused == 0 {
            return std::borrow::Cow::Borrowed(updates);
        }
        let kept: Vec<Update> = updates
            .iter()
            .filter(|u| u.feature() & refused == 0)
            .cloned()
            .collect();
        self.stats.locality_withheld += (updates.len() - kept.len()) as u64;
        std::borrow::Cow::Owned(kept)
    }

    /// Answers a [`Event::SnapshotRequested`] (or tells the peers, unasked, what this node
    /// holds when it takes over): the full state, then the end mark. `owner`: this node is
    /// the master of the VIP, so its snapshot is the one a backup waits for before it may
    /// preempt.
    pub fn send_snapshot(&mut self, now: Now, updates: &[Update], owner: bool) {
        self.unix_secs = now.unix_secs;
        let updates = self.sendable(updates);
        let updates = &updates[..];
        self.pack(now.at, updates, true);
        let records = u32::try_from(updates.len()).unwrap_or(u32::MAX);
        self.send_data(now.at, Body::BulkEnd { records, owner });
        self.snapshot_owed = false;
        self.stats.bulks_served += 1;
    }

    /// Asks every live peer for a snapshot again (e.g. before taking the VIP back).
    pub fn request_bulk(&mut self, now: Now) {
        self.unix_secs = now.unix_secs;
        let nodes: Vec<u32> = self.peers.iter().filter(|p| p.up).map(|p| p.node).collect();
        for node in nodes {
            self.ask_bulk(now.at, node);
        }
    }

    /// Timers: hellos, peer liveness, resends, bulk retries, delayed acknowledgements.
    pub fn handle_timeout(&mut self, now: Now) {
        self.unix_secs = now.unix_secs;
        let at = now.at;
        let mut went_down = false;
        for p in &mut self.peers {
            if p.up && at >= p.last_heard + self.cfg.peer_timeout {
                p.up = false;
                went_down = true;
                self.events.push_back(Event::PeerDown { node: p.node });
            }
        }
        if went_down {
            self.trim_queue();
        }
        if at >= self.next_hello {
            self.send_hello();
            self.next_hello = at + self.cfg.hello_interval;
        }
        if self.peers.iter().any(|p| p.up) {
            let due: Vec<usize> = self
                .queue
                .iter()
                .enumerate()
                .take_while(|(_, m)| seq_after(self.tx_sent, m.seq))
                .filter(|(_, m)| at >= m.last_sent + self.cfg.resend_after)
                .map(|(i, _)| i)
                .take(RESEND_BURST)
                .collect();
            for i in due {
                self.resend(at, i);
            }
        }
        let retries: Vec<u32> = self
            .peers
            .iter()
            .filter(|p| {
                p.up && matches!(p.bulk, BulkStatus::Requested { at: asked } if at >= asked + self.cfg.bulk_retry)
            })
            .map(|p| p.node)
            .collect();
        for node in retries {
            self.ask_bulk(at, node);
        }
        self.fill_window(at);
        self.flush_acks(at);
    }

    /// One datagram from the network.
    ///
    /// # Errors
    /// [`Rejected`] says why it was dropped (and the matching counter went up).
    pub fn handle_datagram(&mut self, now: Now, datagram: &[u8]) -> Result<(), Rejected> {
        self.unix_secs = now.unix_secs;
        self.stats.bytes_received += datagram.len() as u64;
        let msg = match wire::decode(datagram, &self.cfg.key) {
            Ok(msg) => msg,
            Err(e) => {
                match e {
                    WireError::BadMac => self.stats.auth_failures += 1,
                    WireError::UnsupportedVersion(_) => self.stats.unsupported_version += 1,
                    _ => self.stats.malformed += 1,
                }
                return Err(e.into());
            }
        };
        if msg.node == self.node() {
            self.stats.own_messages += 1;
            return Err(Rejected::OwnMessage);
        }
        let skew_secs = msg.sent_unix.abs_diff(now.unix_secs);
        if skew_secs > self.cfg.max_clock_skew_secs {
            self.stats.clock_skew += 1;
            return Err(Rejected::ClockSkew { skew_secs });
        }
        let idx = self.peer_for(now.at, &msg)?;
        if !msg.body.is_sequenced() {
            let peer = &mut self.peers[idx];
            if peer
                .last_control
                .is_some_and(|last| !seq_after(msg.seq, last))
            {
                self.stats.replays += 1;
                return Err(Rejected::Replay);
            }
            peer.last_control = Some(msg.seq);
        }
        let peer = &mut self.peers[idx];
        peer.last_heard = now.at;
        if !peer.up {
            peer.up = true;
            self.events.push_back(Event::PeerUp { node: peer.node });
        }
        self.stats.messages_received += 1;
        match msg.body {
            Body::Hello { next, oldest } => self.on_hello(now.at, idx, next, oldest),
            Body::Ack(acks) => {
                let me = self.node();
                for (node, next) in acks {
                    if node == me {
                        self.on_ack(idx, next);
                    }
                }
            }
            Body::Nack { node, from, to } => {
                if node == self.node() {
                    self.on_nack(now.at, from, to);
                }
            }
            Body::Features(bits) => self.peers[idx].features = bits,
            Body::BulkRequest { node } => {
                if (node == 0 || node == self.node()) && !self.snapshot_owed {
                    self.snapshot_owed = true;
                    let by = self.peers[idx].node;
                    self.events.push_back(Event::SnapshotRequested { by });
                }
            }
            body @ (Body::Updates { .. } | Body::BulkEnd { .. }) => {
                self.on_data(now.at, idx, msg.seq, body);
            }
        }
        self.fill_window(now.at);
        self.flush_acks(now.at);
        Ok(())
    }

    /// The index of the message's sender, created or reset as its incarnation says.
    fn peer_for(&mut self, at: Instant, msg: &Message) -> Result<usize, Rejected> {
        let fresh = |node: u32, incarnation: u64, tx_next: u32| Peer {
            node,
            incarnation,
            up: false,
            last_heard: at,
            rx_next: None,
            early: HashMap::new(),
            last_control: None,
            acked: tx_next,
            ack_owed: 0,
            ack_due: None,
            last_nack: None,
            bulk: BulkStatus::NotRequested,
            features: 0,
        };
        if let Some(i) = self.peers.iter().position(|p| p.node == msg.node) {
            let known = self.peers[i].incarnation;
            if msg.incarnation < known {
                self.stats.old_incarnation += 1;
                return Err(Rejected::OldIncarnation);
            }
            if msg.incarnation > known {
                let was_up = self.peers[i].up;
                self.peers[i] = fresh(msg.node, msg.incarnation, self.tx_sent);
                self.peers[i].up = was_up;
                self.events
                    .push_back(Event::PeerRestarted { node: msg.node });
                self.trim_queue();
                self.greet_new_peer();
            }
            return Ok(i);
        }
        if self.peers.len() >= MAX_PEERS {
            self.stats.too_many_peers += 1;
            return Err(Rejected::TooManyPeers);
        }
        self.peers
            .push(fresh(msg.node, msg.incarnation, self.tx_sent));
        // A peer we did not know (we just started, or it did): pull what it holds.
        self.ask_bulk(at, msg.node);
        self.greet_new_peer();
        Ok(self.peers.len() - 1)
    }

    /// Answers a peer heard for the first time (or in a new incarnation) with a `Hello` at
    /// once rather than at the next `hello_interval`: a peer that (re)started discovers this
    /// node, and asks it for its snapshot, one round trip after its own first `Hello`
    /// instead of up to a whole interval later. At most once per new peer or incarnation,
    /// both of which only an authenticated, newer message makes, so a replay cannot trigger
    /// it; the regular `Hello` keeps its schedule.
    fn greet_new_peer(&mut self) {
        self.send_hello();
    }

    fn on_hello(&mut self, at: Instant, idx: usize, next: u32, oldest: u32) {
        let peer = &mut self.peers[idx];
        let Some(rx_next) = peer.rx_next else {
            peer.rx_next = Some(next);
            return;
        };
        if seq_after(oldest, rx_next) {
            // The peer can no longer resend what we miss: skip it, make up with a snapshot.
            let lost = oldest.wrapping_sub(rx_next);
            peer.rx_next = Some(oldest);
            peer.early.retain(|&seq, _| !seq_after(oldest, seq));
            self.stats.lost += u64::from(lost);
            let from = peer.node;
            self.events.push_back(Event::StreamGap { from, lost });
            self.deliver_ready(at, idx);
            self.ask_bulk(at, from);
        }
        let peer = &self.peers[idx];
        if let Some(rx_next) = peer.rx_next
            && seq_after(next, rx_next)
        {
            self.nack(at, idx, rx_next, next.wrapping_sub(1));
        }
    }

    fn on_data(&mut self, at: Instant, idx: usize, seq: u32, body: Body) {
        let window = self.cfg.reorder_window;
        let peer = &mut self.peers[idx];
        let rx_next = *peer.rx_next.get_or_insert(seq);
        let ahead = seq.wrapping_sub(rx_next);
        if seq_after(rx_next, seq) {
            // Already delivered: the sender missed our acknowledgement.
            self.stats.duplicates += 1;
            peer.ack_due = Some(at);
            return;
        }
        if ahead >= window {
            self.stats.out_of_window += 1;
            self.nack(at, idx, rx_next, rx_next.wrapping_add(window - 1));
            return;
        }
        if ahead > 0 {
            if peer.early.insert(seq, body).is_some() {
                self.stats.duplicates += 1;
            }
            self.nack(at, idx, rx_next, seq.wrapping_sub(1));
            return;
        }
        peer.early.insert(seq, body);
        self.deliver_ready(at, idx);
    }

    /// Delivers the peer's buffered messages from `rx_next` on, as far as they run.
    fn deliver_ready(&mut self, at: Instant, idx: usize) {
        loop {
            let peer = &mut self.peers[idx];
            let Some(rx_next) = peer.rx_next else { return };
            let Some(body) = peer.early.remove(&rx_next) else {
                return;
            };
            peer.rx_next = Some(rx_next.wrapping_add(1));
            peer.ack_owed += 1;
            peer.ack_due = if peer.ack_owed >= ACK_EVERY {
                Some(at)
            } else {
                Some(peer.ack_due.unwrap_or(at + self.cfg.ack_delay))
            };
            let from = peer.node;
            if let (Body::Updates { bulk: true, .. }, BulkStatus::Requested { at: progress }) =
                (&body, &mut peer.bulk)
            {
                // The snapshot is under way: asking again would only queue another copy
                // behind it (on a slow link, enough copies to overflow the sender's queue,
                // lose part of each and ask again, for good).
                *progress = at;
            }
            match body {
                Body::Updates { bulk, updates } => {
                    self.stats.updates_received += updates.len() as u64;
                    self.events.push_back(Event::Updates {
                        from,
                        bulk,
                        updates,
                    });
                }
                Body::BulkEnd { records, owner } => {
                    peer.bulk = BulkStatus::Complete { records, owner, at };
                    self.stats.bulks_received += 1;
                    self.events.push_back(Event::BulkComplete {
                        from,
                        records,
                        owner,
                    });
                }
                Body::Hello { .. }
                | Body::Ack(_)
                | Body::Nack { .. }
                | Body::BulkRequest { .. }
                | Body::Features(_) => {}
            }
        }
    }

    fn on_ack(&mut self, idx: usize, next: u32) {
        let peer = &mut self.peers[idx];
        // Only forward, and never past what we sent.
        if seq_after(next, peer.acked) && !seq_after(next, self.tx_sent) {
            peer.acked = next;
            self.trim_queue();
        }
    }

    fn on_nack(&mut self, at: Instant, from: u32, to: u32) {
        let oldest = self.queue.front().map_or(self.tx_next, |m| m.seq);
        if seq_after(oldest, from) {
            // Some of it is gone: say where the queue starts, the peer will skip and pull.
            self.send_hello();
        }
        let mut seq = if seq_after(oldest, from) {
            oldest
        } else {
            from
        };
        while !seq_after(seq, to) && seq_after(self.tx_sent, seq) {
            let i = seq.wrapping_sub(oldest) as usize;
            self.resend(at, i);
            seq = seq.wrapping_add(1);
        }
    }

    /// Drops the messages every live peer acknowledged; with no peer up, every message
    /// already sent: nobody can acknowledge it, and a peer that comes up (or back) pulls a
    /// snapshot instead. Kept, a node alone for a while would resend its whole history to the
    /// first peer that appears, which may take the oldest resend as the start of the stream
    /// and hold an outdated owner's snapshot (the empty one of a node that became master
    /// alone) as the one that opens its sync-ready gate.
    fn trim_queue(&mut self) {
        let tx_next = self.tx_next;
        let floor = self
            .peers
            .iter()
            .filter(|p| p.up)
            .map(|p| p.acked)
            .max_by_key(|&acked| tx_next.wrapping_sub(acked))
            .unwrap_or(self.tx_sent);
        while self.queue.front().is_some_and(|m| seq_after(floor, m.seq)) {
            self.queue.pop_front();
        }
    }

    fn pack(&mut self, at: Instant, updates: &[Update], bulk: bool) {
        let mut batch: Vec<Update> = Vec::new();
        let mut bytes = 1;
        for u in updates {
            let len = u.encoded_len();
            if bytes + len > MAX_PAYLOAD || batch.len() == MAX_RECORDS {
                let updates = std::mem::take(&mut batch);
                self.send_data(at, Body::Updates { bulk, updates });
                bytes = 1;
            }
            batch.push(u.clone());
            bytes += len;
        }
        self.stats.updates_sent += updates.len() as u64;
        if !batch.is_empty() {
            self.send_data(
                at,
                Body::Updates {
                    bulk,
                    updates: batch,
                },
            );
        }
    }

    fn send_data(&mut self, at: Instant, body: Body) {
        let seq = self.tx_next;
        self.tx_next = seq.wrapping_add(1);
        if self.queue.len() >= self.cfg.resend_queue
            && let Some(dropped) = self.queue.pop_front()
        {
            self.stats.queue_overflows += 1;
            if dropped.seq == self.tx_sent {
                // Dropped before it was ever sent: the peers learn of the gap from `Hello`.
                self.tx_sent = seq_next(dropped.seq);
            }
        }
        self.queue.push_back(Pending {
            seq,
            body,
            last_sent: at,
        });
        self.fill_window(at);
    }

    /// Sends held messages while the slowest live peer's acknowledgement leaves room.
    fn fill_window(&mut self, at: Instant) {
        let tx_sent = self.tx_sent;
        let Some(oldest) = self.queue.front().map(|m| m.seq) else {
            return;
        };
        // What fell out of the queue is no longer in flight: the peer cannot acknowledge it
        // (it skips it, as `Hello` tells it, and pulls a snapshot).
        let floor = self
            .peers
            .iter()
            .filter(|p| p.up)
            .map(|p| p.acked)
            .max_by_key(|&acked| tx_sent.wrapping_sub(acked))
            .map(|acked| {
                if seq_after(oldest, acked) {
                    oldest
                } else {
                    acked
                }
            });
        while seq_after(self.tx_next, self.tx_sent)
            && floor.is_none_or(|f| self.tx_sent.wrapping_sub(f) < self.cfg.send_window)
        {
            let i = self.tx_sent.wrapping_sub(oldest) as usize;
            let Some(m) = self.queue.get_mut(i) else {
                break;
            };
            m.last_sent = at;
            let (seq, body) = (m.seq, m.body.clone());
            self.transmit(seq, &body);
            self.tx_sent = seq_next(seq);
        }
        if floor.is_none() {
            // Sent to nobody: nobody will acknowledge it.
            self.trim_queue();
        }
    }

    fn resend(&mut self, at: Instant, i: usize) {
        let Some(m) = self.queue.get_mut(i) else {
            return;
        };
        m.last_sent = at;
        let (seq, body) = (m.seq, m.body.clone());
        self.transmit(seq, &body);
        self.stats.resent += 1;
    }

    fn send_control(&mut self, body: Body) {
        let seq = self.control_next;
        self.control_next = seq.wrapping_add(1);
        self.transmit(seq, &body);
    }

    fn send_hello(&mut self) {
        let oldest = self.queue.front().map_or(self.tx_sent, |m| m.seq);
        // Before the `Hello`: a control message overtaken by a later-numbered one is dropped
        // as a replay, and losing a `Features` (sent again with the next `Hello`) costs
        // nothing, losing a `Hello` delays gap detection.
        if self.cfg.features != 0 {
            self.send_control(Body::Features(self.cfg.features));
        }
        self.send_control(Body::Hello {
            next: self.tx_sent,
            oldest,
        });
    }

    fn ask_bulk(&mut self, at: Instant, node: u32) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.node == node) {
            p.bulk = BulkStatus::Requested { at };
        }
        self.send_control(Body::BulkRequest { node });
    }

    fn nack(&mut self, at: Instant, idx: usize, from: u32, to: u32) {
        let peer = &mut self.peers[idx];
        // One request per gap start per half resend interval: the sender answers in bulk.
        if let Some((when, start)) = peer.last_nack
            && start == from
            && at < when + self.cfg.resend_after / 2
        {
            return;
        }
        peer.last_nack = Some((at, from));
        let span_end = from.wrapping_add(MAX_NACK_SPAN - 1);
        let to = if seq_after(to, span_end) {
            span_end
        } else {
            to
        };
        let node = peer.node;
        self.send_control(Body::Nack { node, from, to });
    }

    fn flush_acks(&mut self, at: Instant) {
        let mut acks = Vec::new();
        for p in &mut self.peers {
            if let (Some(due), Some(next)) = (p.ack_due, p.rx_next)
                && at >= due
            {
                acks.push((p.node, next));
                p.ack_due = None;
                p.ack_owed = 0;
            }
        }
        if !acks.is_empty() {
            self.send_control(Body::Ack(acks));
        }
    }

    fn transmit(&mut self, seq: u32, body: &Body) {
        let msg = Message {
            node: self.node(),
            incarnation: self.cfg.incarnation,
            sent_unix: self.unix_secs,
            seq,
            body: body.clone(),
        };
        let bytes = wire::encode(&msg, &self.cfg.key);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.transmits.push_back(bytes);
    }
}

#[cfg(test)]
mod tests;
