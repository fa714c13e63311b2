//! Scenario and property tests across the whole pool.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use testkit::{epoch, replay_corpus};

use crate::*;

fn be(last: u8, weight: u32) -> BackendConfig {
    BackendConfig {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80),
        weight,
    }
}

fn pool(scheduler: SchedulerKind, backends: Vec<BackendConfig>) -> Pool {
    Pool::new(PoolConfig {
        scheduler,
        backends,
        ..PoolConfig::default()
    })
    .unwrap()
}

/// Client number `n`: distinct addresses spread over a /16, a distinct port each.
fn client(n: u32) -> SocketAddrV4 {
    let ip = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n;
    SocketAddrV4::new(ip.into(), 1024 + (n % 60_000) as u16)
}

fn pick(pool: &mut Pool, now: Instant, c: SocketAddrV4) -> Option<BackendId> {
    match pool.schedule(now, c) {
        Decision::Backend { id, .. } => Some(id),
        _ => None,
    }
}

/// Schedules `n` connections (closing each at once) and counts them per backend address.
fn spread(pool: &mut Pool, n: u32) -> HashMap<u8, u32> {
    let now = epoch();
    let mut counts = HashMap::new();
    for i in 0..n {
        let c = client(i);
        let id = pick(pool, now, c).expect("a backend");
        *counts
            .entry(pool.backend(id).unwrap().addr().ip().octets()[3])
            .or_default() += 1;
        pool.closed(now, id, ConnState::Inactive, *c.ip());
    }
    counts
}

#[test]
fn wrr_is_exact_over_a_cycle() {
    let mut p = pool(SchedulerKind::Wrr, vec![be(1, 1), be(2, 2), be(3, 3)]);
    let counts = spread(&mut p, 600);
    assert_eq!((counts[&1], counts[&2], counts[&3]), (100, 200, 300));
}

#[test]
fn wrr_interleaves_instead_of_bursting() {
    let mut p = pool(SchedulerKind::Wrr, vec![be(1, 5), be(2, 1), be(3, 1)]);
    let now = epoch();
    let seq: Vec<u8> = (0..7)
        .map(|i| {
            let id = pick(&mut p, now, client(i)).unwrap();
            p.backend(id).unwrap().addr().ip().octets()[3]
        })
        .collect();
    assert_eq!(seq, [1, 1, 2, 1, 3, 1, 1]);
}

#[test]
fn rr_is_exact_and_ignores_weights_except_zero() {
    let mut p = pool(
        SchedulerKind::Rr,
        vec![be(1, 1), be(2, 5), be(3, 0), be(4, 1)],
    );
    let counts = spread(&mut p, 300);
    assert_eq!(
        (counts[&1], counts[&2], counts.get(&3), counts[&4]),
        (100, 100, None, 100)
    );
}

#[test]
fn lc_prefers_the_backend_with_fewer_connections() {
    let mut p = pool(SchedulerKind::Lc, vec![be(1, 1), be(2, 1)]);
    let now = epoch();
    // Ten long-lived established connections, alternating by tie-break.
    let long: Vec<BackendId> = (0..10)
        .map(|i| pick(&mut p, now, client(i)).unwrap())
        .collect();
    for &id in &long {
        p.established(now, id, Ipv4Addr::UNSPECIFIED);
    }
    // Close four of backend 1's, which now holds 1 active against backend 2's 5.
    let b1 = p.find(be(1, 1).addr).unwrap();
    for &id in long.iter().filter(|&&id| id == b1).take(4) {
        p.closed(now, id, ConnState::Active, Ipv4Addr::UNSPECIFIED);
    }
    // New short connections (inactive, weight 1/256) all go to backend 1 until loads meet.
    let next: Vec<BackendId> = (10..20)
        .map(|i| pick(&mut p, now, client(i)).unwrap())
        .collect();
    assert!(next.iter().all(|&id| id == b1), "{next:?}");
    assert_eq!(p.backend(b1).unwrap().overhead(), 256 + 10);
}

#[test]
fn wlc_divides_load_by_weight() {
    let mut p = pool(SchedulerKind::Wlc, vec![be(1, 1), be(2, 3)]);
    let now = epoch();
    for i in 0..400 {
        let id = pick(&mut p, now, client(i)).unwrap();
        p.established(now, id, Ipv4Addr::UNSPECIFIED);
    }
    let b1 = p.backend(p.find(be(1, 1).addr).unwrap()).unwrap().active();
    let b2 = p.backend(p.find(be(2, 3).addr).unwrap()).unwrap().active();
    assert_eq!((b1, b2), (100, 300));
}

#[test]
fn sh_pins_each_client_and_spreads_clients() {
    let mut p = pool(SchedulerKind::Sh, vec![be(1, 1), be(2, 1), be(3, 1)]);
    let now = epoch();
    for n in 0..50 {
        let c = client(n * 7919);
        let first = pick(&mut p, now, c).unwrap();
        for port in [1, 2, 3, 60_000] {
            let again = pick(&mut p, now, SocketAddrV4::new(*c.ip(), port)).unwrap();
            assert_eq!(again, first);
        }
    }
    let counts = spread(&mut p, 3000);
    assert!(counts.values().all(|&c| c > 700), "{counts:?}");
}

/// The Maglev requirement: 10,000 source tuples over five backends, each within 1 %
/// of its share; removing one moves its own flows and at most a few percent of the others.
#[test]
fn mh_distribution_and_disruption_on_10000_tuples() {
    let five: Vec<BackendConfig> = (1..=5).map(|i| be(i, 1)).collect();
    let mut p = Pool::new(PoolConfig {
        scheduler: SchedulerKind::Mh,
        hash_port: true,
        backends: five.clone(),
        ..PoolConfig::default()
    })
    .unwrap();
    let now = epoch();
    let tuples: Vec<SocketAddrV4> = (0..10_000).map(client).collect();
    let addr_of = |p: &mut Pool, c| {
        let id = pick(p, now, c).unwrap();
        p.closed(now, id, ConnState::Inactive, *c.ip());
        p.backend(id).unwrap().addr()
    };
    let before: Vec<SocketAddrV4> = tuples.iter().map(|&c| addr_of(&mut p, c)).collect();
    // Measured: 1975 / 1954 / 1954 / 2075 / 2042.
    for b in &five {
        let n = before.iter().filter(|&&a| a == b.addr).count();
        assert!((1_900..=2_100).contains(&n), "{} got {n} of 10000", b.addr);
    }

    let gone = five[2].addr;
    let mut cfg_four = five.clone();
    cfg_four.remove(2);
    p.reconfigure(PoolConfig {
        scheduler: SchedulerKind::Mh,
        hash_port: true,
        backends: cfg_four,
        ..PoolConfig::default()
    })
    .unwrap();
    let after: Vec<SocketAddrV4> = tuples.iter().map(|&c| addr_of(&mut p, c)).collect();
    assert!(after.iter().all(|&a| a != gone));
    let others = before.iter().filter(|&&a| a != gone).count();
    let moved_others = before
        .iter()
        .zip(&after)
        .filter(|&(&b, &a)| b != gone && a != b)
        .count();
    // Measured: 8 of the 8,046 other flows (0.1 %) move with the 65,537-entry table. The bound
    // is the "a few percent"; a broken fill (plain modulo hashing) would move ~80 %.
    assert!(
        moved_others * 100 <= others * 3,
        "{moved_others} of {others} moved"
    );
}

#[test]
fn mh_removing_a_backend_is_the_same_as_marking_it_down() {
    let five: Vec<BackendConfig> = (1..=5).map(|i| be(i, 1)).collect();
    let mut removed = pool(SchedulerKind::Mh, five[1..].to_vec());
    let mut down = pool(SchedulerKind::Mh, five);
    down.set_health(down.find(be(1, 1).addr).unwrap(), Health::Down);
    let now = epoch();
    for n in 0..2_000 {
        let c = client(n);
        let a = pick(&mut removed, now, c).unwrap();
        let b = pick(&mut down, now, c).unwrap();
        assert_eq!(
            removed.backend(a).unwrap().addr(),
            down.backend(b).unwrap().addr()
        );
    }
}

#[test]
fn persistence_pins_a_client_until_the_timeout_after_its_last_connection() {
    let mut p = Pool::new(PoolConfig {
        scheduler: SchedulerKind::Rr,
        persistence: Some(Persistence::new(Duration::from_secs(300))),
        backends: vec![be(1, 1), be(2, 1), be(3, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    let t0 = epoch();
    let sticky = client(0);
    let first = pick(&mut p, t0, sticky).unwrap();
    p.closed(t0, first, ConnState::Inactive, *sticky.ip());
    let mut others = HashMap::new();
    for s in 1..=60u32 {
        let now = t0 + Duration::from_secs(u64::from(s) * 4);
        let id = pick(
            &mut p,
            now,
            SocketAddrV4::new(*sticky.ip(), 2000 + s as u16),
        )
        .unwrap();
        assert_eq!(id, first);
        p.closed(now, id, ConnState::Inactive, *sticky.ip());
        let o = client(s);
        let oid = pick(&mut p, now, o).unwrap();
        *others.entry(oid).or_insert(0) += 1;
        p.closed(now, oid, ConnState::Inactive, *o.ip());
        p.handle_timeout(now);
    }
    assert_eq!(others.len(), 3, "other clients still spread: {others:?}");
    assert_eq!(p.stats().persistent_hits, 60);

    // The template lives until 300 s after the last connection (at t0 + 240 s); a driver
    // that sleeps until each poll_timeout sees it go exactly then.
    let gone = t0 + Duration::from_secs(540);
    while let Some(at) = p.poll_timeout().filter(|&at| at < gone) {
        p.handle_timeout(at);
    }
    // Left: the sticky client and client(60), both last seen at t0 + 240 s.
    assert_eq!(p.templates(), 2);
    assert_eq!(p.poll_timeout(), Some(gone));
    p.handle_timeout(gone);
    assert_eq!((p.templates(), p.poll_timeout()), (0, None));
    let moved = (0..3).map(|i| pick(&mut p, gone, SocketAddrV4::new(*sticky.ip(), i)).unwrap());
    assert_eq!(
        moved.collect::<std::collections::HashSet<_>>().len(),
        1,
        "pinned again, afresh"
    );
}

#[test]
fn closed_connections_lingering_in_the_flow_table_do_not_hold_a_template() {
    let mut p = Pool::new(PoolConfig {
        scheduler: SchedulerKind::Rr,
        persistence: Some(Persistence::new(Duration::from_secs(2))),
        backends: vec![be(1, 1), be(2, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    let t0 = epoch();
    let c = client(0);
    let id = pick(&mut p, t0, c).unwrap();
    p.established(t0, id, *c.ip());
    // Established for 10 s: the template holds.
    let t1 = t0 + Duration::from_secs(10);
    p.handle_timeout(t1);
    assert_eq!(
        p.pick(t1, SocketAddrV4::new(*c.ip(), 1)),
        Decision::Backend {
            id,
            addr: p.backend(id).unwrap().addr()
        }
    );
    // FIN at t1; the flow lingers (inactive) in the flow table, but 2 s later the client is free.
    p.transition(t1, id, ConnState::Active, ConnState::Inactive, *c.ip());
    let t2 = t1 + Duration::from_secs(2);
    p.handle_timeout(t2);
    assert_eq!(p.templates(), 0);
    assert_eq!(
        p.backend(id).unwrap().inactive(),
        1,
        "still counted for lc/wlc"
    );
}

#[test]
fn drain_keeps_existing_connections_and_sends_nothing_new() {
    let mut p = Pool::new(PoolConfig {
        scheduler: SchedulerKind::Wrr,
        persistence: Some(Persistence::new(Duration::from_secs(300))),
        backends: vec![be(1, 1), be(2, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    let now = epoch();
    let c = client(0);
    let held = pick(&mut p, now, c).unwrap();
    p.established(now, held, *c.ip());
    let addr = p.backend(held).unwrap().addr();
    p.set_weight(addr, 0).unwrap();
    assert_eq!(p.backend(held).unwrap().state(), BackendState::Draining);
    assert_eq!(p.backend(held).unwrap().active(), 1);
    // Not even the persistent client goes back to it.
    for i in 0..20 {
        assert_ne!(
            pick(&mut p, now, SocketAddrV4::new(*c.ip(), 3000 + i)).unwrap(),
            held
        );
        assert_ne!(pick(&mut p, now, client(100 + u32::from(i))).unwrap(), held);
    }
    p.closed(now, held, ConnState::Active, *c.ip());
    assert_eq!(p.backend(held).unwrap().active(), 0);
    assert_eq!(
        p.set_weight(addr, 70_000),
        Err(PoolError::WeightOutOfRange(70_000))
    );
    let unknown = be(9, 1).addr;
    assert_eq!(
        p.set_weight(unknown, 1),
        Err(PoolError::UnknownBackend(unknown))
    );
}

#[test]
fn all_down_goes_to_the_sorry_server_or_refuses() {
    let sorry = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 200), 80);
    let mut p = Pool::new(PoolConfig {
        scheduler: SchedulerKind::Wlc,
        sorry: Some(sorry),
        backends: vec![be(1, 1), be(2, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    let now = epoch();
    let ids: Vec<BackendId> = p.backends().map(|(id, _)| id).collect();
    assert!(p.set_health(ids[0], Health::Down));
    assert!(!p.set_health(ids[0], Health::Down));
    assert_eq!(pick(&mut p, now, client(1)), Some(ids[1]));
    p.set_health(ids[1], Health::Down);
    assert!(!p.has_eligible());
    assert_eq!(p.schedule(now, client(2)), Decision::Sorry(sorry));
    p.reconfigure(PoolConfig {
        scheduler: SchedulerKind::Wlc,
        backends: vec![be(1, 1), be(2, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    assert_eq!(p.schedule(now, client(3)), Decision::Refuse);
    assert_eq!((p.stats().sorry, p.stats().refused), (1, 1));
    p.set_health(ids[1], Health::Up);
    assert_eq!(pick(&mut p, now, client(4)), Some(ids[1]));
}

#[test]
fn reconfigure_keeps_counters_and_lets_removed_backends_drain() {
    let mut p = pool(SchedulerKind::Rr, vec![be(1, 1), be(2, 1)]);
    let now = epoch();
    let a = pick(&mut p, now, client(0)).unwrap();
    let b = pick(&mut p, now, client(1)).unwrap();
    p.established(now, a, *client(0).ip());
    p.established(now, b, *client(1).ip());
    let b_addr = p.backend(b).unwrap().addr();
    p.reconfigure(PoolConfig {
        scheduler: SchedulerKind::Wrr,
        backends: vec![be(1, 4), be(3, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    assert_eq!(p.scheduler(), SchedulerKind::Wrr);
    assert_eq!(p.backend(a).unwrap().weight(), 4);
    assert_eq!(p.backend(a).unwrap().active(), 1);
    assert_eq!(p.backend(b).unwrap().state(), BackendState::Removed);
    assert_eq!(
        p.set_weight(b_addr, 1),
        Err(PoolError::UnknownBackend(b_addr))
    );
    for i in 2..12 {
        assert_ne!(pick(&mut p, now, client(i)).unwrap(), b);
    }
    p.closed(now, b, ConnState::Active, *client(1).ip());
    assert!(
        p.backend(b).is_none(),
        "slot freed with its last connection"
    );
    assert_eq!(p.backends().count(), 2);
    // A fresh backend may reuse the freed id.
    p.reconfigure(PoolConfig {
        scheduler: SchedulerKind::Wrr,
        backends: vec![be(1, 4), be(3, 1), be(4, 1)],
        ..PoolConfig::default()
    })
    .unwrap();
    assert_eq!(p.find(be(4, 1).addr), Some(b));
    assert_eq!(p.backend(b).unwrap().stats().connections, 0);
}

#[test]
fn bad_configurations_are_rejected() {
    let dup = PoolConfig {
        backends: vec![be(1, 1), be(1, 2)],
        ..PoolConfig::default()
    };
    assert_eq!(
        Pool::new(dup).unwrap_err(),
        PoolError::DuplicateBackend(be(1, 1).addr)
    );
    let mask = PoolConfig {
        persistence: Some(Persistence {
            timeout: Duration::from_secs(1),
            netmask: 33,
        }),
        ..PoolConfig::default()
    };
    assert_eq!(Pool::new(mask).unwrap_err(), PoolError::BadNetmask(33));
    let zero = PoolConfig {
        persistence: Some(Persistence::new(Duration::ZERO)),
        ..PoolConfig::default()
    };
    assert_eq!(Pool::new(zero).unwrap_err(), PoolError::ZeroPersistence);
    let mut ok = pool(SchedulerKind::Rr, vec![be(1, 1)]);
    let bad = PoolConfig {
        mh_table_size: 1000,
        ..PoolConfig::default()
    };
    assert_eq!(ok.reconfigure(bad), Err(PoolError::BadTableSize(1000)));
    assert_eq!(
        ok.backends().count(),
        1,
        "a rejected reconfigure changes nothing"
    );
}

#[test]
fn scheduler_names_round_trip() {
    for k in SchedulerKind::ALL {
        assert_eq!(k.as_str().parse::<SchedulerKind>(), Ok(k));
    }
    assert!("sed".parse::<SchedulerKind>().is_err());
}

#[test]
fn traffic_counters_add_up() {
    let mut p = pool(SchedulerKind::Rr, vec![be(1, 1)]);
    let id = pick(&mut p, epoch(), client(0)).unwrap();
    p.count_packet(id, Direction::ToBackend, 60);
    p.count_packet(id, Direction::ToClient, 1500);
    p.count_packet(id, Direction::ToClient, 40);
    let s = *p.backend(id).unwrap().stats();
    assert_eq!(
        (
            s.connections,
            s.packets_in,
            s.bytes_in,
            s.packets_out,
            s.bytes_out
        ),
        (1, 1, 60, 2, 1540)
    );
}

/// Replays the `lb_pool` fuzz corpus so CI exercises it on stable.
#[test]
fn fuzz_corpus_replays() {
    let n = replay_corpus("lb_pool", |data| fuzzing::run_pool_ops(epoch(), data));
    assert!(n > 0, "empty lb_pool corpus");
}

proptest! {
    /// Arbitrary operation runs keep every invariant `run_pool_ops` checks.
    #[test]
    fn arbitrary_op_runs_keep_the_invariants(data in prop::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::run_pool_ops(epoch(), &data);
    }
}

/// An operator or health event in a random run.
#[derive(Debug, Clone)]
enum Op {
    Connect(u32),
    Establish(usize),
    Close(usize),
    Weight(u8, u32),
    Health(u8, bool),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u32..64).prop_map(Op::Connect),
        2 => any::<usize>().prop_map(Op::Establish),
        3 => any::<usize>().prop_map(Op::Close),
        1 => (0u8..6, 0u32..5).prop_map(|(b, w)| Op::Weight(b, w)),
        1 => (0u8..6, any::<bool>()).prop_map(|(b, up)| Op::Health(b, up)),
        1 => (0u64..400).prop_map(Op::Advance),
    ]
}

fn scheduler() -> impl Strategy<Value = SchedulerKind> {
    prop::sample::select(SchedulerKind::ALL.to_vec())
}

proptest! {
    /// Smooth WRR: every window of Σweights consecutive picks (after any warm-up) holds each
    /// backend exactly `weight` times.
    #[test]
    fn wrr_every_window_meets_the_weights(
        weights in prop::collection::vec(1u32..12, 1..7),
        warmup in 0usize..50,
    ) {
        let backends: Vec<BackendConfig> =
            weights.iter().enumerate().map(|(i, &w)| be(i as u8 + 1, w)).collect();
        let mut p = pool(SchedulerKind::Wrr, backends);
        let now = epoch();
        let total: u32 = weights.iter().sum();
        for i in 0..warmup {
            pick(&mut p, now, client(i as u32));
        }
        let mut counts = vec![0u32; weights.len()];
        for i in 0..total {
            counts[pick(&mut p, now, client(i)).unwrap().index()] += 1;
        }
        prop_assert_eq!(counts, weights);
    }

    /// Whatever happens to weights and health, a new flow never lands on a backend that is
    /// down, draining or removed; the counters always equal the flows the caller holds; and a
    /// decision other than a backend happens only when no backend is eligible.
    #[test]
    fn new_flows_only_go_to_eligible_backends(
        kind in scheduler(),
        persistent in any::<bool>(),
        weights in prop::collection::vec(0u32..4, 1..6),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let backends: Vec<BackendConfig> =
            weights.iter().enumerate().map(|(i, &w)| be(i as u8 + 1, w)).collect();
        let mut p = Pool::new(PoolConfig {
            scheduler: kind,
            persistence: persistent.then(|| Persistence { timeout: Duration::from_secs(60), netmask: 30 }),
            backends: backends.clone(),
            mh_table_size: 251,
            ..PoolConfig::default()
        }).unwrap();
        let mut now = epoch();
        let mut flows: Vec<(BackendId, ConnState, Ipv4Addr)> = Vec::new();
        for op in ops {
            match op {
                Op::Connect(n) => {
                    let eligible = p.has_eligible();
                    match p.schedule(now, client(n)) {
                        Decision::Backend { id, addr } => {
                            let b = p.backend(id).unwrap();
                            prop_assert_eq!(b.addr(), addr);
                            // Counted already, so check the state, not the counters.
                            prop_assert!(b.is_eligible(), "{:?} got a new flow", b.state());
                            flows.push((id, ConnState::Inactive, *client(n).ip()));
                        }
                        Decision::Sorry(_) => prop_assert!(false, "no sorry server configured"),
                        Decision::Refuse => prop_assert!(!eligible),
                    }
                }
                Op::Establish(i) if !flows.is_empty() => {
                    let len = flows.len();
                    let f = &mut flows[i % len];
                    if f.1 == ConnState::Inactive {
                        p.established(now, f.0, f.2);
                        f.1 = ConnState::Active;
                    }
                }
                Op::Close(i) if !flows.is_empty() => {
                    let (id, st, c) = flows.swap_remove(i % flows.len());
                    p.closed(now, id, st, c);
                }
                Op::Weight(b, w) => {
                    let addr = backends[usize::from(b) % backends.len()].addr;
                    p.set_weight(addr, w).unwrap();
                }
                Op::Health(b, up) => {
                    let id = p.find(backends[usize::from(b) % backends.len()].addr).unwrap();
                    p.set_health(id, if up { Health::Up } else { Health::Down });
                }
                Op::Advance(s) => {
                    now += Duration::from_secs(s);
                    p.handle_timeout(now);
                }
                Op::Establish(_) | Op::Close(_) => {}
            }
            for (id, b) in p.backends() {
                let held = |s| flows.iter().filter(|f| f.0 == id && f.1 == s).count() as u32;
                prop_assert_eq!(b.active(), held(ConnState::Active));
                prop_assert_eq!(b.inactive(), held(ConnState::Inactive));
            }
        }
    }

    /// rr over k full rounds gives every eligible backend exactly k flows.
    #[test]
    fn rr_is_exact_per_round(n in 1u8..10, rounds in 1u32..20) {
        let mut p = pool(SchedulerKind::Rr, (1..=n).map(|i| be(i, 1)).collect());
        let counts = spread(&mut p, u32::from(n) * rounds);
        prop_assert!(counts.values().all(|&c| c == rounds));
    }

    /// Maglev with equal weights: every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots, i.e. the share of
    /// uniformly spread clients is within one slot.
    #[test]
    fn mh_weighted_shares_follow_weights(weights in prop::collection::vec(1u32..4, 1..8)) {
        let backends: Vec<BackendConfig> =
            weights.iter().enumerate().map(|(i, &w)| be(i as u8 + 1, w)).collect();
        let mut p = Pool::new(PoolConfig {
            scheduler: SchedulerKind::Mh,
            hash_port: true,
            backends,
            mh_table_size: 4_093,
            ..PoolConfig::default()
        }).unwrap();
        let n = 20_000;
        let counts = spread(&mut p, n);
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let got = f64::from(*counts.get(&(i as u8 + 1)).unwrap_or(&0));
            let want = f64::from(n) * f64::from(w) / f64::from(total);
            // Sampling noise of 20,000 flows is about 1 % of the total; allow 2.5 %.
            prop_assert!((got - want).abs() <= f64::from(n) * 0.025, "backend {} got {} want {}", i, got, want);
        }
    }
}
