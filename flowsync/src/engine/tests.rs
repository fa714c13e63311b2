//! Engines wired together through a simulated network with a seeded fate per datagram
//! (loss, duplication, reordering), on a simulated clock.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use testkit::epoch;

use super::*;
use crate::record::{FlowKey, FlowProto, FlowState, LocalityKey, LocalityState, TcpPhase};

const UNIX: u64 = 1_800_000_000;

fn key() -> SyncKey {
    SyncKey::new(b"a shared key for the tests").unwrap()
}

fn cfg(node: u32, incarnation: u64) -> SyncConfig {
    SyncConfig::new(NonZeroU32::new(node).unwrap(), incarnation, key())
}

fn flow(n: u32) -> FlowState {
    FlowState {
        key: FlowKey {
            proto: FlowProto::Tcp,
            public: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 1024 + (n % 60000) as u16),
            outside: SocketAddrV4::new(Ipv4Addr::from(0xc633_6400 + n / 60000), 443),
        },
        inside: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 30000),
        listener: None,
        tcp: TcpPhase::Established,
        first_fin_from_originator: false,
        from_inside: true,
        replied: true,
        assured: true,
        expires_in_secs: 7440,
    }
}

/// One simulated node: its engine, the flows it owns, and the standby flows it learned.
struct Node {
    engine: SyncEngine,
    own: HashMap<FlowKey, FlowState>,
    standby: HashMap<FlowKey, FlowState>,
    events: Vec<Event>,
}

impl Node {
    fn apply(&mut self, now: Now) {
        while let Some(e) = self.engine.poll_event() {
            match &e {
                Event::Updates { updates, .. } => {
                    for u in updates {
                        match u {
                            Update::Flow(f) => {
                                self.standby.insert(f.key, *f);
                            }
                            Update::FlowGone(k) => {
                                self.standby.remove(k);
                            }
                            Update::Persist(_)
                            | Update::PersistGone(_)
                            | Update::Locality(_)
                            | Update::LocalityGone(_) => {}
                        }
                    }
                }
                Event::SnapshotRequested { .. } => {
                    let all: Vec<Update> = self.own.values().map(|f| Update::Flow(*f)).collect();
                    // The node with flows of its own plays the master.
                    self.engine.send_snapshot(now, &all, !all.is_empty());
                }
                _ => {}
            }
            self.events.push(e);
        }
    }
}

/// What the network does to each datagram.
#[derive(Clone, Copy)]
struct Fate {
    loss_pct: u64,
    dup_pct: u64,
    /// Datagrams held back and delivered in a shuffled order each step.
    reorder: bool,
}

const CLEAN: Fate = Fate {
    loss_pct: 0,
    dup_pct: 0,
    reorder: false,
};

struct Net {
    nodes: Vec<Node>,
    at: Instant,
    fate: Fate,
    rng: u64,
    /// Every datagram sent, by sender (for replay tests).
    captured: Vec<(usize, Vec<u8>)>,
    /// Datagrams a node's socket buffer holds between two of its reads (one pass of
    /// `route`); more are dropped and counted in `overflowed`. `None`: unbounded.
    socket_buffer: Option<usize>,
    overflowed: usize,
}

impl Net {
    fn new(count: u32, fate: Fate) -> Net {
        let at = epoch();
        let nodes = (1..=count)
            .map(|n| Node {
                engine: SyncEngine::new(now_at(at), cfg(n, 1)),
                own: HashMap::new(),
                standby: HashMap::new(),
                events: Vec::new(),
            })
            .collect();
        Net {
            nodes,
            at,
            fate,
            rng: 0x9e37_79b9_7f4a_7c15,
            captured: Vec::new(),
            socket_buffer: None,
            overflowed: 0,
        }
    }

    fn now(&self) -> Now {
        now_at(self.at)
    }

    fn roll(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100
    }

    /// Moves every pending datagram once (with its fate) and lets every node react.
    fn route(&mut self) {
        for _ in 0..64 {
            let mut flight = Vec::new();
            for (i, n) in self.nodes.iter_mut().enumerate() {
                while let Some(d) = n.engine.poll_transmit() {
                    flight.push((i, d));
                }
            }
            if flight.is_empty() {
                return;
            }
            if self.fate.reorder {
                for i in (1..flight.len()).rev() {
                    let j = (self.roll() as usize * 7919) % (i + 1);
                    flight.swap(i, j);
                }
            }
            let now = self.now();
            let mut queued = vec![0usize; self.nodes.len()];
            for (from, d) in flight {
                self.captured.push((from, d.clone()));
                if self.roll() < self.fate.loss_pct {
                    continue;
                }
                let copies = if self.roll() < self.fate.dup_pct {
                    2
                } else {
                    1
                };
                for (to, (node, queued)) in self.nodes.iter_mut().zip(&mut queued).enumerate() {
                    if to == from {
                        continue;
                    }
                    *queued += 1;
                    if self.socket_buffer.is_some_and(|b| *queued > b) {
                        self.overflowed += 1;
                        continue;
                    }
                    for _ in 0..copies {
                        let _ = node.engine.handle_datagram(now, &d);
                    }
                }
            }
            for n in &mut self.nodes {
                n.apply(now);
            }
        }
    }

    /// Runs the clock for `ms` in steps of 10 ms.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.at += Duration::from_millis(10);
            let now = self.now();
            for n in &mut self.nodes {
                n.engine.handle_timeout(now);
                n.apply(now);
            }
            self.route();
        }
    }

    /// Node `i` creates flows `range` and syncs them in batches of `batch`.
    fn create(&mut self, i: usize, range: std::ops::Range<u32>, batch: usize) {
        let flows: Vec<FlowState> = range.map(flow).collect();
        for chunk in flows.chunks(batch) {
            let updates: Vec<Update> = chunk.iter().map(|f| Update::Flow(*f)).collect();
            for f in chunk {
                self.nodes[i].own.insert(f.key, *f);
            }
            let now = self.now();
            self.nodes[i].engine.send_updates(now, &updates);
            self.route();
        }
    }

    fn restart(&mut self, i: usize, incarnation: u64) {
        let node = u32::try_from(i + 1).unwrap();
        self.nodes[i] = Node {
            engine: SyncEngine::new(self.now(), cfg(node, incarnation)),
            own: HashMap::new(),
            standby: HashMap::new(),
            events: Vec::new(),
        };
    }
}

fn now_at(at: Instant) -> Now {
    Now {
        at,
        unix_secs: UNIX + at.duration_since(epoch()).as_secs(),
    }
}

fn in_sync(net: &Net, from: usize, to: usize) -> bool {
    net.nodes[to].standby == net.nodes[from].own
}

#[test]
fn a_clean_link_delivers_everything_once_and_drains_the_queue() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.create(0, 0..1000, 50);
    net.run(500);
    assert!(in_sync(&net, 0, 1));
    let a = net.nodes[0].engine.stats();
    let b = net.nodes[1].engine.stats();
    assert_eq!(a.updates_sent, 1000);
    assert_eq!(b.updates_received, 1000);
    assert_eq!(a.resent, 0);
    assert_eq!(b.duplicates, 0);
    assert_eq!(
        net.nodes[0].engine.queued(),
        0,
        "every message acknowledged"
    );
    assert!(net.nodes[0].engine.synced() && net.nodes[1].engine.synced());
    // Removals travel too.
    let gone: Vec<Update> = (0..10).map(|n| Update::FlowGone(flow(n).key)).collect();
    for n in 0..10 {
        net.nodes[0].own.remove(&flow(n).key);
    }
    let now = net.now();
    net.nodes[0].engine.send_updates(now, &gone);
    net.run(100);
    assert!(in_sync(&net, 0, 1));
    assert_eq!(net.nodes[1].standby.len(), 990);
}

#[test]
fn loss_reordering_and_duplication_recover() {
    let mut net = Net::new(
        2,
        Fate {
            loss_pct: 20,
            dup_pct: 10,
            reorder: true,
        },
    );
    net.run(3000);
    net.create(0, 0..5000, 40);
    net.run(5000);
    assert!(
        in_sync(&net, 0, 1),
        "standby {} of 5000",
        net.nodes[1].standby.len()
    );
    let a = net.nodes[0].engine.stats();
    let b = net.nodes[1].engine.stats();
    assert!(a.resent > 0);
    assert!(b.duplicates > 0);
    assert_eq!(b.lost, 0);
    // Updates of one flow arrive in the order they were made: the last state wins.
    let mut f = flow(7);
    for state in [TcpPhase::FinWait, TcpPhase::LastAck, TcpPhase::TimeWait] {
        f.tcp = state;
        net.nodes[0].own.insert(f.key, f);
        let now = net.now();
        net.nodes[0].engine.send_updates(now, &[Update::Flow(f)]);
        net.route();
    }
    net.run(3000);
    assert_eq!(net.nodes[1].standby[&f.key].tcp, TcpPhase::TimeWait);
}

#[test]
fn a_lost_tail_is_resent_without_a_later_message() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.fate.loss_pct = 100;
    net.create(0, 0..10, 10);
    net.fate.loss_pct = 0;
    assert!(net.nodes[1].standby.is_empty());
    net.run(300);
    assert!(in_sync(&net, 0, 1));
    assert!(net.nodes[0].engine.stats().resent >= 1);
}

#[test]
fn a_restarted_backup_pulls_a_snapshot() {
    let mut net = Net::new(
        2,
        Fate {
            loss_pct: 5,
            dup_pct: 0,
            reorder: true,
        },
    );
    net.run(2000);
    net.create(0, 0..3000, 100);
    net.run(2000);
    assert!(in_sync(&net, 0, 1));
    net.restart(1, 2);
    assert!(!net.nodes[1].engine.synced() || net.nodes[1].engine.peers().count() == 0);
    net.run(5000);
    assert!(
        in_sync(&net, 0, 1),
        "standby {} of 3000",
        net.nodes[1].standby.len()
    );
    assert!(net.nodes[1].engine.synced());
    assert!(
        net.nodes[0]
            .events
            .contains(&Event::PeerRestarted { node: 2 })
    );
    assert!(net.nodes[1].events.iter().any(|e| matches!(
        e,
        Event::BulkComplete {
            from: 1,
            records: 3000,
            owner: true
        }
    )));
    let status: Vec<PeerStatus> = net.nodes[1].engine.peers().collect();
    assert!(matches!(
        status[0].bulk,
        BulkStatus::Complete {
            records: 3000,
            owner: true,
            ..
        }
    ));
}

#[test]
fn an_overflowed_resend_queue_ends_in_a_snapshot() {
    let mut net = Net::new(2, CLEAN);
    net.nodes[0].engine.cfg.resend_queue = 4;
    net.run(100);
    // The backup hears nothing while 20 messages go out: 16 fall out of the queue.
    net.fate.loss_pct = 100;
    net.create(0, 0..200, 10);
    net.fate.loss_pct = 0;
    net.run(3000);
    assert!(in_sync(&net, 0, 1));
    assert!(net.nodes[0].engine.stats().queue_overflows >= 16);
    assert!(net.nodes[1].engine.stats().lost >= 16);
    assert!(
        net.nodes[1]
            .events
            .iter()
            .any(|e| matches!(e, Event::StreamGap { from: 1, .. }))
    );
}

#[test]
fn a_silent_peer_goes_down_and_releases_the_queue() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.fate.loss_pct = 100;
    net.create(0, 0..10, 5);
    net.run(3500);
    assert!(net.nodes[0].events.contains(&Event::PeerDown { node: 2 }));
    let resent = net.nodes[0].engine.stats().resent;
    net.run(1000);
    assert_eq!(
        net.nodes[0].engine.stats().resent,
        resent,
        "no resends to nobody"
    );
    net.fate.loss_pct = 0;
    net.run(2000);
    assert!(in_sync(&net, 0, 1));
    assert!(
        net.nodes[0]
            .events
            .iter()
            .filter(|e| **e == Event::PeerUp { node: 2 })
            .count()
            >= 2
    );
}

#[test]
fn a_wrong_key_is_counted_and_installs_nothing() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    let mut rogue = SyncEngine::new(
        net.now(),
        SyncConfig::new(
            NonZeroU32::new(9).unwrap(),
            1,
            SyncKey::new(b"not the group's shared key").unwrap(),
        ),
    );
    rogue.send_updates(net.now(), &[Update::Flow(flow(1))]);
    let now = net.now();
    while let Some(d) = rogue.poll_transmit() {
        assert_eq!(
            net.nodes[1].engine.handle_datagram(now, &d),
            Err(Rejected::Malformed(WireError::BadMac))
        );
    }
    net.nodes[1].apply(now);
    assert!(net.nodes[1].standby.is_empty());
    assert!(net.nodes[1].engine.stats().auth_failures >= 2);
    assert_eq!(net.nodes[1].engine.peers().count(), 1);
}

#[test]
fn replays_are_dropped_and_counted() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.create(0, 0..3, 3);
    net.run(200);
    net.nodes[0].own.remove(&flow(0).key);
    let now = net.now();
    net.nodes[0]
        .engine
        .send_updates(now, &[Update::FlowGone(flow(0).key)]);
    net.run(200);
    assert!(in_sync(&net, 0, 1));
    let from_a: Vec<Vec<u8>> = net
        .captured
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| d.clone())
        .collect();
    let before = *net.nodes[1].engine.stats();
    let now = net.now();
    for d in &from_a {
        let verdict = net.nodes[1].engine.handle_datagram(now, d);
        assert!(
            matches!(verdict, Err(Rejected::Replay) | Ok(())),
            "{verdict:?}"
        );
    }
    net.nodes[1].apply(now);
    // The created-then-removed flow does not come back, nothing is delivered twice.
    assert!(in_sync(&net, 0, 1));
    let after = net.nodes[1].engine.stats();
    assert_eq!(after.updates_received, before.updates_received);
    assert!(after.replays > 0);
    assert!(after.duplicates > 0);
}

#[test]
fn stale_stamps_and_old_incarnations_are_refused() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    // A message stamped a minute away from the receiver's clock.
    let mut far = SyncEngine::new(
        Now {
            at: net.at,
            unix_secs: UNIX - 60,
        },
        cfg(3, 1),
    );
    let d = far.poll_transmit().unwrap();
    let now = net.now();
    assert_eq!(
        net.nodes[1].engine.handle_datagram(now, &d),
        Err(Rejected::ClockSkew { skew_secs: 60 })
    );
    // Node 1 restarts; what its first incarnation sent is refused afterwards.
    let old: Vec<Vec<u8>> = net
        .captured
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| d.clone())
        .collect();
    net.restart(0, 5);
    net.run(100);
    let now = net.now();
    for d in &old {
        assert_eq!(
            net.nodes[1].engine.handle_datagram(now, d),
            Err(Rejected::OldIncarnation)
        );
    }
    assert_eq!(
        net.nodes[1].engine.stats().old_incarnation,
        old.len() as u64
    );
}

#[test]
fn oversize_and_garbage_are_malformed() {
    let mut net = Net::new(1, CLEAN);
    let now = net.now();
    let e = &mut net.nodes[0].engine;
    assert!(matches!(
        e.handle_datagram(now, &[0u8; 2000]),
        Err(Rejected::Malformed(WireError::Oversize { len: 2000, .. }))
    ));
    assert!(matches!(
        e.handle_datagram(now, b"hello"),
        Err(Rejected::Malformed(WireError::Truncated { .. }))
    ));
    assert_eq!(
        e.handle_datagram(now, &[0u8; 100]),
        Err(Rejected::Malformed(WireError::BadMagic))
    );
    assert_eq!(e.stats().malformed, 3);
    // Our own datagram looped back.
    let own = e.poll_transmit().unwrap();
    assert_eq!(e.handle_datagram(now, &own), Err(Rejected::OwnMessage));
    net.run(10);
}

/// A peer of protocol version 1 (before the owner flag): every message refused before its
/// HMAC is even checked, counted apart from garbage, nothing delivered.
#[test]
fn messages_of_another_version_are_refused_and_counted() {
    let mut net = Net::new(1, CLEAN);
    let now = net.now();
    let mut old = SyncEngine::new(now, cfg(2, 1));
    let mut hello = old.poll_transmit().unwrap();
    hello[4] = 1;
    let e = &mut net.nodes[0].engine;
    assert_eq!(
        e.handle_datagram(now, &hello),
        Err(Rejected::Malformed(WireError::UnsupportedVersion(1)))
    );
    assert_eq!(e.stats().unsupported_version, 1);
    assert_eq!(e.stats().malformed, 0);
    assert_eq!(e.peers().count(), 0);
}

/// A node that takes over sends its state unasked, marked as the owner's: each peer gets it
/// as a complete snapshot (what a backup's preemption waits for); a snapshot answered by a
/// node that owns nothing says so.
#[test]
fn an_unasked_snapshot_reaches_every_peer_with_its_owner_flag() {
    let mut net = Net::new(3, CLEAN);
    net.run(100);
    let now = net.now();
    let all: Vec<Update> = (0..10).map(|n| Update::Flow(flow(n))).collect();
    net.nodes[0].engine.send_snapshot(now, &all, true);
    net.run(100);
    for i in [1, 2] {
        let n = &net.nodes[i];
        assert!(n.events.contains(&Event::BulkComplete {
            from: 1,
            records: 10,
            owner: true
        }));
        assert_eq!(n.standby.len(), 10);
        // The start-up snapshots from the other nodes, which own nothing.
        let from_backup = if i == 1 { 3 } else { 2 };
        assert!(n.events.contains(&Event::BulkComplete {
            from: from_backup,
            records: 0,
            owner: false
        }));
    }
}

#[test]
fn peers_are_bounded() {
    let mut net = Net::new(1, CLEAN);
    let now = net.now();
    for n in 2..=u32::try_from(MAX_PEERS).unwrap() + 2 {
        let mut other = SyncEngine::new(now, cfg(n, 1));
        let d = other.poll_transmit().unwrap();
        let verdict = net.nodes[0].engine.handle_datagram(now, &d);
        if n <= u32::try_from(MAX_PEERS).unwrap() + 1 {
            assert_eq!(verdict, Ok(()));
        } else {
            assert_eq!(verdict, Err(Rejected::TooManyPeers));
        }
    }
    assert_eq!(net.nodes[0].engine.peers().count(), MAX_PEERS);
    assert_eq!(net.nodes[0].engine.stats().too_many_peers, 1);
}

#[test]
fn big_batches_fit_a_datagram() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.create(0, 0..10_000, 10_000);
    net.run(200);
    assert!(in_sync(&net, 0, 1));
    for (_, d) in &net.captured {
        assert!(d.len() <= wire::MAX_DATAGRAM);
    }
}

#[test]
fn the_fuzz_corpus_replays() {
    let n = testkit::replay_corpus("sync_stream", |data| {
        crate::fuzzing::check_stream(data, epoch());
    });
    assert!(n > 0);
}

/// A backup that restarts and pulls a snapshot of 100,000 flows (2,300 messages) from a
/// master with `send_window`, reading at most 90 datagrams between two reads (a default
/// 212,992-byte socket buffer).
fn pull_through_a_small_socket_buffer(send_window: u32) -> Net {
    let mut net = Net::new(2, CLEAN);
    net.nodes[0].engine.cfg.send_window = send_window;
    net.nodes[0].own = (0..100_000).map(flow).map(|f| (f.key, f)).collect();
    net.run(100);
    net.socket_buffer = Some(90);
    net.restart(1, 2);
    net.run(3000);
    net
}

#[test]
fn a_snapshot_is_paced_by_the_send_window() {
    let net = pull_through_a_small_socket_buffer(64);
    assert!(in_sync(&net, 0, 1));
    assert_eq!(net.overflowed, 0, "no burst beyond the receiver's buffer");
    assert_eq!(net.nodes[0].engine.stats().resent, 0);
    assert_eq!(net.nodes[1].engine.stats().out_of_window, 0);
    assert!(net.nodes[1].events.contains(&Event::BulkComplete {
        from: 1,
        records: 100_000,
        owner: true
    }));
    assert_eq!(
        net.nodes[0].engine.queued(),
        0,
        "every message acknowledged"
    );
}

#[test]
fn without_the_window_the_same_snapshot_overflows_the_buffer() {
    // The control of the test above: one burst of every message overflows the buffer (and
    // still recovers, through negative acknowledgements and resends).
    let net = pull_through_a_small_socket_buffer(u32::MAX);
    assert!(net.overflowed > 1000);
    assert!(net.nodes[0].engine.stats().resent > 0);
    assert!(in_sync(&net, 0, 1));
}

#[test]
fn with_no_peer_up_everything_goes_out_at_once() {
    let mut engine = SyncEngine::new(now_at(epoch()), cfg(1, 1));
    while engine.poll_transmit().is_some() {}
    let updates: Vec<Update> = (0..10_000).map(|n| Update::Flow(flow(n))).collect();
    engine.send_updates(now_at(epoch()), &updates);
    let mut sent = 0;
    while engine.poll_transmit().is_some() {
        sent += 1;
    }
    assert_eq!(engine.queued(), 0, "sent to nobody, so held for nobody");
    assert!(
        sent > 200,
        "10,000 flows are more than the window: {sent} messages"
    );
}

#[test]
fn messages_dropped_from_the_queue_before_they_were_sent_end_in_a_snapshot() {
    let mut net = Net::new(2, CLEAN);
    net.nodes[0].engine.cfg.resend_queue = 4;
    net.nodes[0].engine.cfg.send_window = 2;
    net.run(100);
    // Nothing is acknowledged: 2 messages go out, the rest wait, and most of those fall out
    // of the 4-message queue unsent.
    net.fate.loss_pct = 100;
    net.create(0, 0..200, 10);
    assert!(net.nodes[0].engine.stats().queue_overflows >= 16);
    net.fate.loss_pct = 0;
    net.run(3000);
    assert!(in_sync(&net, 0, 1));
    assert!(net.nodes[1].engine.stats().lost >= 16);
}

fn locality_entry() -> Update {
    Update::Locality(LocalityState {
        key: LocalityKey {
            listener: 0,
            dest: Ipv4Addr::new(192, 0, 2, 80),
        },
        backends: vec![SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 3128)],
        idle_secs: 0,
        unchanged_secs: 0,
    })
}

/// The locality records a node received (live and in snapshots).
fn locality_received(n: &Node) -> usize {
    n.events
        .iter()
        .map(|e| match e {
            Event::Updates { updates, .. } => updates.iter().filter(|u| u.feature() != 0).count(),
            _ => 0,
        })
        .sum()
}

/// Locality records go out only while every live peer announced it takes them: a node
/// alone withholds them, two current nodes exchange them, and once a peer that announces
/// nothing (an older vipgate) is up they are withheld, live and in snapshots, and counted,
/// while the flows still reach everyone.
#[test]
fn locality_records_reach_only_peers_that_take_them() {
    let mut net = Net::new(2, CLEAN);
    let now = net.now();
    net.nodes[0].engine.send_updates(now, &[locality_entry()]);
    assert_eq!(
        net.nodes[0].engine.stats().locality_withheld,
        1,
        "no peer up"
    );
    net.run(100);
    assert!(
        net.nodes[0]
            .engine
            .peers()
            .all(|p| p.features == wire::FEATURES)
    );
    let now = net.now();
    net.nodes[0]
        .engine
        .send_updates(now, &[Update::Flow(flow(1)), locality_entry()]);
    net.run(100);
    assert_eq!(locality_received(&net.nodes[1]), 1);

    let mut older = cfg(3, 1);
    older.features = 0;
    net.nodes.push(Node {
        engine: SyncEngine::new(net.now(), older),
        own: HashMap::new(),
        standby: HashMap::new(),
        events: Vec::new(),
    });
    net.run(300);
    let now = net.now();
    net.nodes[0]
        .engine
        .send_updates(now, &[Update::Flow(flow(2)), locality_entry()]);
    net.nodes[0]
        .engine
        .send_snapshot(now, &[Update::Flow(flow(2)), locality_entry()], true);
    net.run(300);
    assert_eq!(net.nodes[0].engine.stats().locality_withheld, 3);
    assert_eq!(locality_received(&net.nodes[1]), 1, "withheld from both");
    assert_eq!(locality_received(&net.nodes[2]), 0);
    for n in &net.nodes[1..] {
        assert!(n.standby.contains_key(&flow(2).key));
        assert!(n.events.iter().any(|e| matches!(
            e,
            Event::BulkComplete {
                from: 1,
                records: 1,
                owner: true
            }
        )));
    }
}

/// A locality removal goes out only while every live peer announced it takes removals: a
/// peer of the previous version (locality entries, no removals) still gets the entries, and
/// the removal is withheld from both peers and counted.
#[test]
fn locality_removals_reach_only_peers_that_take_them() {
    let gone = Update::LocalityGone(LocalityKey {
        listener: 0,
        dest: Ipv4Addr::new(192, 0, 2, 80),
    });
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    let now = net.now();
    net.nodes[0]
        .engine
        .send_updates(now, &[locality_entry(), gone.clone()]);
    net.run(100);
    assert_eq!(locality_received(&net.nodes[1]), 2, "entry and removal");
    assert_eq!(net.nodes[0].engine.stats().locality_withheld, 0);

    let mut previous = cfg(3, 1);
    previous.features = wire::FEATURE_LOCALITY;
    net.nodes.push(Node {
        engine: SyncEngine::new(net.now(), previous),
        own: HashMap::new(),
        standby: HashMap::new(),
        events: Vec::new(),
    });
    net.run(300);
    let now = net.now();
    net.nodes[0]
        .engine
        .send_updates(now, &[Update::Flow(flow(3)), locality_entry(), gone]);
    net.run(300);
    assert_eq!(net.nodes[0].engine.stats().locality_withheld, 1);
    assert_eq!(
        locality_received(&net.nodes[1]),
        3,
        "the entry, not the removal"
    );
    assert_eq!(locality_received(&net.nodes[2]), 1, "the entry alone");
    for n in &net.nodes[1..] {
        assert!(n.standby.contains_key(&flow(3).key));
    }
}

/// A node alone (master with no peer up: its unasked owner's snapshot, empty then, and the
/// flows it made since went to nobody) holds no history: the first peer that comes up gets
/// none of it resent, and the first snapshot it completes is the one it asked for, with
/// every flow, not the outdated empty one.
#[test]
fn a_node_alone_keeps_no_history_for_the_first_peer() {
    let mut net = Net::new(1, CLEAN);
    let now = net.now();
    net.nodes[0].engine.send_snapshot(now, &[], true);
    net.create(0, 0..500, 50);
    net.run(1000);
    assert_eq!(net.nodes[0].engine.queued(), 0, "nothing held for nobody");
    assert_eq!(net.nodes[0].engine.stats().resent, 0);

    net.nodes.push(Node {
        engine: SyncEngine::new(net.now(), cfg(2, 1)),
        own: HashMap::new(),
        standby: HashMap::new(),
        events: Vec::new(),
    });
    net.run(2000);
    assert!(in_sync(&net, 0, 1));
    let first = net.nodes[1]
        .events
        .iter()
        .find(|e| matches!(e, Event::BulkComplete { from: 1, .. }));
    assert_eq!(
        first,
        Some(&Event::BulkComplete {
            from: 1,
            records: 500,
            owner: true
        })
    );
    assert_eq!(net.nodes[1].engine.stats().duplicates, 0);
}

/// A snapshot slower than `bulk_retry` (a narrow send window) is not asked for again while
/// its messages keep arriving: one copy is served, and it completes.
#[test]
fn a_snapshot_under_way_is_not_asked_for_again() {
    let mut net = Net::new(2, CLEAN);
    net.run(100);
    net.create(0, 0..2000, 100);
    net.run(500);
    net.nodes[0].engine.cfg.send_window = 2;
    let served = net.nodes[0].engine.stats().bulks_served;
    net.restart(1, 2);
    net.nodes[1].engine.cfg.bulk_retry = Duration::from_millis(300);
    net.run(3000);
    assert!(in_sync(&net, 0, 1));
    assert_eq!(net.nodes[0].engine.stats().bulks_served, served + 1);
    assert_eq!(net.nodes[1].engine.stats().lost, 0);
}

/// A restarted node pulls its snapshot one round trip after its first `Hello`, not at the
/// peer's next `Hello` (up to `hello_interval`, 1 s, later): the peer answers a new
/// incarnation with a `Hello` at once.
#[test]
fn a_restarted_node_is_answered_at_once() {
    let mut net = Net::new(2, CLEAN);
    net.run(2000);
    net.create(0, 0..3000, 100);
    net.run(500);
    assert!(in_sync(&net, 0, 1));
    // Right after node 0's regular `Hello`, so the next one is a whole interval away.
    net.run(1000 - (net.at.duration_since(epoch()).as_millis() as u64 % 1000));
    net.restart(1, 2);
    net.run(100);
    assert!(
        in_sync(&net, 0, 1),
        "standby {} of 3000 after 100 ms",
        net.nodes[1].standby.len()
    );
    assert!(net.nodes[1].engine.synced());
}
