//! Unit tests, quinn-style pair simulations with a simulated clock, and property tests.

use super::*;
use crate::sync_group::{Binding, MemberId, ObjectId, SyncGroup};
use crate::track::Tracker;
use netutil::Reconfigured;
use proptest::prelude::*;
use testkit::epoch as t0;

const A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

fn config(primary: Ipv4Addr, priority: u8, interval_ms: u64) -> InstanceConfig {
    let mut c = InstanceConfig::new("vip", 51, primary);
    c.priority = priority;
    c.advert_interval = Duration::from_millis(interval_ms);
    c.addresses = vec![VirtualAddress {
        address: VIP,
        prefix_len: 24,
    }];
    c
}

fn drain(i: &mut VrrpInstance) -> Vec<Action> {
    std::iter::from_fn(|| i.poll_action()).collect()
}

fn advert(src: Ipv4Addr, priority: u8, interval_cs: u16) -> ReceivedAdvert {
    ReceivedAdvert {
        src,
        ttl: 255,
        repr: VrrpRepr {
            vrid: 51,
            priority,
            max_advert_interval_cs: interval_cs,
            addresses: vec![VIP],
        },
    }
}

#[test]
fn timers_follow_rfc_5798() {
    let i = VrrpInstance::new(config(A, 100, 1000));
    assert_eq!(i.skew_time(), Duration::from_micros(609_375));
    assert_eq!(i.master_down_interval(), Duration::from_micros(3_609_375));
    let i = VrrpInstance::new(config(A, 100, 100));
    assert_eq!(
        i.skew_time(),
        Duration::from_micros(60_937) + Duration::from_nanos(500)
    );
}

#[test]
fn owner_starts_as_master() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 255, 1000));
    i.startup(now);
    let acts = drain(&mut i);
    assert!(matches!(acts[0], Action::Transition(t) if t.to == State::Master));
    assert_eq!(acts[1], Action::AddAddresses);
    assert!(matches!(&acts[2], Action::SendAdvert(r) if r.priority == 255));
    assert_eq!(acts[3], Action::GratuitousArp);
    assert_eq!(i.poll_timeout(), Some(now + Duration::from_secs(1)));
}

#[test]
fn backup_startup_removes_stale_addresses_and_waits_master_down() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    let acts = drain(&mut i);
    assert!(matches!(acts[0], Action::Transition(t) if t.to == State::Backup));
    assert_eq!(acts[1], Action::RemoveAddresses);
    assert_eq!(i.poll_timeout(), Some(now + i.master_down_interval()));
    i.handle_timeout(now + i.master_down_interval());
    assert_eq!(i.state(), State::Master);
}

#[test]
fn backup_learns_master_interval() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    i.handle_advert(now, &advert(B, 200, 10)).unwrap();
    assert_eq!(i.master_advert_interval(), Duration::from_millis(100));
    assert_eq!(
        i.poll_timeout(),
        Some(now + Duration::from_millis(300) + i.skew_time())
    );
    assert_eq!(i.master(), Some((B, 200)));
}

#[test]
fn priority_zero_makes_backup_wait_only_skew() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    i.handle_advert(now, &advert(B, 200, 100)).unwrap();
    i.handle_advert(now, &advert(B, 0, 100)).unwrap();
    assert_eq!(i.poll_timeout(), Some(now + i.skew_time()));
    drain(&mut i);
    i.handle_timeout(now + i.skew_time());
    let acts = drain(&mut i);
    assert!(matches!(acts[0], Action::Transition(t)
        if t.to == State::Master && t.reason == Reason::MasterResigned));
}

#[test]
fn master_yields_to_higher_priority_and_to_equal_priority_with_higher_address() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    assert_eq!(i.state(), State::Master);
    // Lower priority, or equal with a lower address: ignored.
    let lower = Ipv4Addr::new(198, 51, 100, 5);
    assert_eq!(
        i.handle_advert(now, &advert(B, 99, 100)),
        Err(DropReason::LowerPriority)
    );
    assert_eq!(
        i.handle_advert(now, &advert(lower, 100, 100)),
        Err(DropReason::LowerPriority)
    );
    assert_eq!(i.state(), State::Master);
    // Like keepalived, the master re-asserts itself against a lower-priority master.
    let acts = drain(&mut i);
    assert!(acts.contains(&Action::ReassertArp), "{acts:?}");
    assert!(matches!(&acts[acts.len() - 2], Action::SendAdvert(r) if r.priority == 100));
    i.handle_advert(now, &advert(B, 100, 100)).unwrap();
    assert_eq!(i.state(), State::Backup);
    assert_eq!(
        drain(&mut i)[1],
        Action::RemoveAddresses,
        "addresses withdrawn on leaving master"
    );
}

fn master_at(now: Instant, c: InstanceConfig) -> VrrpInstance {
    let mut i = VrrpInstance::new(c);
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    assert_eq!(i.state(), State::Master);
    drain(&mut i);
    i
}

#[test]
fn reassertion_against_lower_priority_is_rate_limited() {
    let now = t0();
    let mut i = master_at(now, config(A, 150, 1000));
    let start = now + Duration::from_secs(4);
    // A flood: 1,000 lower-priority adverts over 2.5 s from many sources.
    let mut sent = Vec::new();
    for k in 0..1000u32 {
        let at = start + Duration::from_micros(u64::from(k) * 2500);
        let src = Ipv4Addr::from(0x0a00_0000 + k);
        assert_eq!(
            i.handle_advert(at, &advert(src, 100, 100)),
            Err(DropReason::LowerPriority)
        );
        for a in drain(&mut i) {
            match a {
                Action::SendAdvert(_) | Action::ReassertArp => sent.push((at, a)),
                Action::GratuitousArp => panic!("a full burst on a lower-priority advert"),
                _ => {}
            }
        }
    }
    // At start, +1 s, +2 s: three adverts and three re-assertion bursts, nothing else.
    let bursts: Vec<Instant> = sent
        .iter()
        .filter(|(_, a)| *a == Action::ReassertArp)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(bursts.len(), 3, "{sent:?}");
    assert_eq!(sent.len(), 6, "{sent:?}");
    assert!(
        bursts
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_secs(1))
    );
    assert_eq!(i.counters().reassert_tx, 3);
    assert_eq!(i.counters().reassert_suppressed, 997);
    assert_eq!(i.counters().drops.get(DropReason::LowerPriority), 1000);
    assert_eq!(i.state(), State::Master);
}

#[test]
fn foreign_priority_zero_to_a_master_is_rate_limited_too() {
    let now = t0();
    let mut i = master_at(now, config(A, 150, 1000));
    let at = now + Duration::from_secs(4);
    for _ in 0..100 {
        i.handle_advert(at, &advert(B, 0, 100)).unwrap();
    }
    let adverts = drain(&mut i)
        .into_iter()
        .filter(|a| matches!(a, Action::SendAdvert(_)))
        .count();
    assert_eq!(adverts, 1);
    assert_eq!(i.counters().reassert_suppressed, 99);
}

#[test]
fn priority_zero_only_from_the_followed_master() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    // No master known yet: priority 0 from anyone is ignored.
    assert_eq!(
        i.handle_advert(now, &advert(B, 0, 100)),
        Err(DropReason::PriorityZeroNotMaster)
    );
    i.handle_advert(now, &advert(B, 200, 100)).unwrap();
    let down = i.poll_timeout();
    let spoofer = Ipv4Addr::new(198, 51, 100, 66);
    assert_eq!(
        i.handle_advert(now, &advert(spoofer, 0, 100)),
        Err(DropReason::PriorityZeroNotMaster)
    );
    assert_eq!(i.poll_timeout(), down, "the master-down timer is untouched");
    assert_eq!(i.counters().drops.get(DropReason::PriorityZeroNotMaster), 2);
    assert_eq!(i.master(), Some((B, 200)));
    // The real master resigns: skew time only.
    i.handle_advert(now, &advert(B, 0, 100)).unwrap();
    assert_eq!(i.poll_timeout(), Some(now + i.skew_time()));
}

#[test]
fn learnt_interval_is_capped() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    // 40.95 s spoofed: learnt as 3 s (three times our own 1 s).
    i.handle_advert(now, &advert(B, 200, 4095)).unwrap();
    assert_eq!(i.master_advert_interval(), Duration::from_secs(3));
    assert_eq!(i.counters().interval_capped, 1);
    // Within the ceiling: learnt as RFC 5798 has it.
    i.handle_advert(now, &advert(B, 200, 200)).unwrap();
    assert_eq!(i.master_advert_interval(), Duration::from_secs(2));
    // Configured for plain RFC behaviour.
    let mut c = config(A, 100, 1000);
    c.max_learnt_advert_interval = Some(Duration::from_millis(40_950));
    let mut i = VrrpInstance::new(c);
    i.startup(now);
    i.handle_advert(now, &advert(B, 200, 4095)).unwrap();
    assert_eq!(i.master_advert_interval(), Duration::from_millis(40_950));
    // A ceiling below our own interval is raised to it.
    let mut c = config(A, 100, 1000);
    c.max_learnt_advert_interval = Some(Duration::from_millis(10));
    assert_eq!(
        VrrpInstance::new(c).config().learnt_interval_ceiling(),
        Duration::from_secs(1)
    );
}

#[test]
fn backup_with_preempt_ignores_lower_master() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    assert_eq!(
        i.handle_advert(now, &advert(B, 100, 100)),
        Err(DropReason::LowerPriority)
    );
    let mut c = config(A, 150, 1000);
    c.preempt = false;
    let mut i = VrrpInstance::new(c);
    i.startup(now);
    i.handle_advert(now, &advert(B, 100, 100)).unwrap();
}

#[test]
fn malformed_inputs_are_counted() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    let mut a = advert(B, 200, 100);
    a.ttl = 64;
    assert_eq!(i.handle_advert(now, &a), Err(DropReason::BadTtl));
    let mut a = advert(B, 200, 100);
    a.repr.vrid = 52;
    assert_eq!(i.handle_advert(now, &a), Err(DropReason::OtherVrid));
    assert_eq!(
        i.handle_advert(now, &advert(A, 200, 100)),
        Err(DropReason::OwnAdvert)
    );
    assert_eq!(i.counters().drops.get(DropReason::BadTtl), 1);
    assert_eq!(i.counters().drops.get(DropReason::OtherVrid), 1);
    assert_eq!(i.counters().drops.get(DropReason::OwnAdvert), 1);
    assert_eq!(i.state(), State::Backup);
}

#[test]
fn fault_resigns_and_recovers_as_backup() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 255, 1000));
    i.startup(now);
    drain(&mut i);
    i.set_fault(now, true);
    let acts = drain(&mut i);
    assert!(matches!(&acts[0], Action::SendAdvert(r) if r.priority == 0));
    assert!(matches!(acts[1], Action::Transition(t) if t.to == State::Fault));
    assert_eq!(acts[2], Action::RemoveAddresses);
    assert_eq!(i.poll_timeout(), None);
    i.set_fault(now, false);
    assert_eq!(i.state(), State::Backup);
}

#[test]
fn penalty_lowers_advertised_priority() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    drain(&mut i);
    i.set_priority_penalty(now, 60);
    assert_eq!(i.priority(), 90);
    assert!(matches!(&drain(&mut i)[0], Action::SendAdvert(r) if r.priority == 90));
}

#[test]
fn runtime_priority_replaces_the_configured_one_until_the_file_changes_it() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    drain(&mut i);
    assert_eq!(
        i.set_runtime_priority(now, 0),
        Err(ReconfigureError::RuntimePriority(0))
    );
    assert_eq!(
        i.set_runtime_priority(now, 255),
        Err(ReconfigureError::RuntimePriority(255))
    );
    assert!(
        drain(&mut i).is_empty(),
        "a refused priority changes nothing"
    );
    i.set_runtime_priority(now, 120).expect("in range");
    assert_eq!((i.priority(), i.runtime_priority()), (120, Some(120)));
    let acts = drain(&mut i);
    assert!(
        matches!(&acts[..], [Action::SendAdvert(r)] if r.priority == 120),
        "a master announces the new priority at once: {acts:?}"
    );
    assert_eq!(i.master(), Some((A, 120)));
    // Penalties apply to the runtime priority.
    i.set_priority_penalty(now, 30);
    assert_eq!(i.priority(), 90);
    i.set_priority_penalty(now, 0);
    drain(&mut i);
    // A reload that keeps the file's priority keeps the runtime one...
    let mut same = i.config().clone();
    same.preempt = false;
    i.reconfigure(now, same).expect("live");
    assert!(
        drain(&mut i).is_empty(),
        "nothing to announce: {:?}",
        i.priority()
    );
    assert_eq!(i.priority(), 120);
    // ...one that changes it replaces it.
    let mut changed = i.config().clone();
    changed.priority = 140;
    i.reconfigure(now, changed).expect("live");
    assert_eq!((i.priority(), i.runtime_priority()), (140, None));
    // Setting the file's priority is the same as clearing the runtime one.
    i.set_runtime_priority(now, 130).expect("in range");
    i.set_runtime_priority(now, 140).expect("in range");
    assert_eq!(i.runtime_priority(), None);
}

// ---------------------------------------------------------------------------------------
// Pair simulation: nodes on one simulated link, a simulated clock, latency, link state.

/// The tracked objects every simulated member has: its own link, weight 0.
fn tracked_link() -> Vec<(String, u8)> {
    vec![("interface eth0".to_owned(), 0)]
}

/// A simulated group member: tracks its own link, bound to nothing in particular.
fn member(config: InstanceConfig) -> (VrrpInstance, Tracker, Binding) {
    (
        VrrpInstance::new(config),
        Tracker::new(tracked_link()),
        Binding::default(),
    )
}

struct Node {
    group: SyncGroup,
    /// Per member: link up (sends and receives).
    link: Vec<bool>,
    /// Per member: the virtual address is live here.
    holds: Vec<bool>,
    alive: bool,
}

struct Sim {
    now: Instant,
    latency: Duration,
    nodes: Vec<Node>,
    /// (deliver at, from node, member, advert)
    wire: Vec<(Instant, usize, usize, ReceivedAdvert)>,
    /// (time, node, member, transition)
    log: Vec<(Instant, usize, usize, Transition)>,
    /// Time spent with no holder / with two holders, per member index 0.
    gaps: Vec<(Instant, Instant)>,
}

impl Sim {
    fn new(groups: Vec<Vec<InstanceConfig>>) -> Self {
        let now = t0();
        let nodes = groups
            .into_iter()
            .map(|cs| Node {
                link: vec![true; cs.len()],
                holds: vec![false; cs.len()],
                group: SyncGroup::new(cs.into_iter().map(member).collect()),
                alive: true,
            })
            .collect();
        let mut sim = Self {
            now,
            latency: Duration::from_micros(200),
            nodes,
            wire: Vec::new(),
            log: Vec::new(),
            gaps: Vec::new(),
        };
        for n in 0..sim.nodes.len() {
            sim.nodes[n].group.startup(now);
            sim.flush(n);
        }
        sim
    }

    fn pair(a: InstanceConfig, b: InstanceConfig) -> Self {
        Self::new(vec![vec![a], vec![b]])
    }

    fn flush(&mut self, n: usize) {
        while let Some((MemberId(m), action)) = self.nodes[n].group.poll_action() {
            match action {
                Action::SendAdvert(repr) => {
                    if !self.nodes[n].alive || !self.nodes[n].link[m] {
                        continue;
                    }
                    let src = self.nodes[n].group.members()[m].config().primary_address;
                    for to in 0..self.nodes.len() {
                        if to != n {
                            let adv = ReceivedAdvert {
                                src,
                                ttl: 255,
                                repr: repr.clone(),
                            };
                            self.wire.push((self.now + self.latency, to, m, adv));
                        }
                    }
                }
                Action::Transition(t) => self.log.push((self.now, n, m, t)),
                Action::AddAddresses => self.nodes[n].holds[m] = true,
                Action::RemoveAddresses => self.nodes[n].holds[m] = false,
                Action::GratuitousArp | Action::ReassertArp | Action::WithdrawAddresses(_) => {}
            }
        }
    }

    fn next_event(&self) -> Option<Instant> {
        let timers = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .filter_map(|n| n.group.poll_timeout());
        let wire = self.wire.iter().map(|w| w.0);
        timers.chain(wire).min()
    }

    fn holders(&self, member: usize) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.alive && n.holds[member])
            .count()
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut last_holders = self.holders(0);
        let mut bad_since = (last_holders != 1).then_some(self.now);
        while let Some(t) = self.next_event().filter(|t| *t <= end) {
            assert!(t >= self.now, "time went backwards");
            self.now = t;
            let (due, rest): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|w| w.0 <= t);
            self.wire = rest;
            for (_, to, m, adv) in due {
                if self.nodes[to].alive && self.nodes[to].link[m] {
                    let _ = self.nodes[to].group.handle_advert(t, MemberId(m), &adv);
                    self.flush(to);
                }
            }
            for n in 0..self.nodes.len() {
                if self.nodes[n].alive {
                    self.nodes[n].group.handle_timeout(t);
                    self.flush(n);
                    if let Some(d) = self.nodes[n].group.poll_timeout() {
                        assert!(d > t, "deadline {d:?} not after now {t:?}");
                    }
                }
            }
            let h = self.holders(0);
            if h != last_holders {
                match (bad_since, h == 1) {
                    (Some(s), true) => {
                        self.gaps.push((s, t));
                        bad_since = None;
                    }
                    (None, false) => bad_since = Some(t),
                    _ => {}
                }
                last_holders = h;
            }
        }
        self.now = end;
    }

    fn state(&self, n: usize) -> State {
        self.nodes[n].group.members()[0].state()
    }

    /// Host death: link down and process gone.
    fn kill(&mut self, n: usize) {
        self.nodes[n].alive = false;
        self.nodes[n].link.iter_mut().for_each(|l| *l = false);
        self.wire.retain(|w| w.1 != n);
    }

    fn restart(&mut self, n: usize) {
        let configs: Vec<_> = self.nodes[n]
            .group
            .members()
            .iter()
            .map(|m| m.config().clone())
            .collect();
        let len = configs.len();
        self.nodes[n] = Node {
            group: SyncGroup::new(configs.into_iter().map(member).collect()),
            link: vec![true; len],
            // A process killed with -9 leaves its addresses behind.
            holds: self.nodes[n].holds.clone(),
            alive: true,
        };
        self.nodes[n].group.startup(self.now);
        self.flush(n);
    }

    fn stop(&mut self, n: usize) {
        self.nodes[n].group.shutdown(self.now);
        self.flush(n);
        self.nodes[n].alive = false;
    }

    /// A live reload of node `n`'s member `m`.
    fn reconfigure(&mut self, n: usize, m: usize, config: InstanceConfig) {
        let tracked = tracked_link();
        let r = self.nodes[n].group.reconfigure(
            self.now,
            MemberId(m),
            config,
            &tracked,
            &Binding::default(),
        );
        assert_eq!(r, Reconfigured::Live);
        self.flush(n);
    }

    /// `vipgate vrrp set-priority` on node `n`'s member `m`.
    fn set_priority(&mut self, n: usize, m: usize, priority: u8) {
        let r = self.nodes[n]
            .group
            .set_runtime_priority(self.now, MemberId(m), priority);
        assert_eq!(r, Ok(()));
        self.flush(n);
    }

    fn last_transition_to(&self, node: usize, state: State) -> Option<Instant> {
        self.log
            .iter()
            .rev()
            .find(|(_, n, _, t)| *n == node && t.to == state)
            .map(|e| e.0)
    }
}

#[test]
fn pair_elects_higher_priority_and_fails_over_on_host_death() {
    let mut sim = Sim::pair(config(A, 150, 1000), config(B, 100, 1000));
    sim.run_for(Duration::from_secs(10));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    assert_eq!(sim.holders(0), 1);
    let died = sim.now;
    sim.kill(0);
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.state(1), State::Master);
    let took_over = sim.last_transition_to(1, State::Master).unwrap();
    let mdi = Duration::from_micros(3_609_375);
    // The backup's timer started at the last advert, at most one interval before the death.
    assert!(took_over - died <= mdi, "{:?}", took_over - died);
    assert!(took_over - died >= mdi - Duration::from_secs(1));
}

#[test]
fn pair_follows_runtime_priorities_both_ways() {
    let mut sim = Sim::pair(config(A, 150, 1000), config(B, 100, 1000));
    sim.run_for(Duration::from_secs(10));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    // The backup raised above the master preempts as RFC 5798 has it: it stops resetting its
    // Master_Down_Timer on the lower master's adverts, so it takes over within one
    // Master_Down_Interval for its new priority.
    let raised = sim.now;
    sim.set_priority(1, 0, 200);
    sim.run_for(Duration::from_secs(4));
    assert_eq!((sim.state(0), sim.state(1)), (State::Backup, State::Master));
    let took_over = sim.last_transition_to(1, State::Master).unwrap();
    let mdi = Duration::from_micros(3_218_750);
    assert!(took_over - raised <= mdi, "{:?}", took_over - raised);
    // The master lowered below the backup announces it at once, and the backup (200) stops
    // resetting its timer on it.
    sim.set_priority(0, 0, 220);
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.state(0), State::Master);
    let lowered = sim.now;
    sim.set_priority(0, 0, 50);
    sim.run_for(Duration::from_secs(4));
    assert_eq!((sim.state(0), sim.state(1)), (State::Backup, State::Master));
    let took_over = sim.last_transition_to(1, State::Master).unwrap();
    assert!(took_over - lowered <= mdi, "{:?}", took_over - lowered);
    assert_eq!(sim.holders(0), 1);
}

#[test]
fn pair_graceful_stop_hands_over_after_skew() {
    let mut sim = Sim::pair(config(A, 150, 100), config(B, 100, 100));
    sim.run_for(Duration::from_secs(2));
    let stopped = sim.now;
    sim.stop(0);
    sim.run_for(Duration::from_secs(2));
    let took_over = sim.last_transition_to(1, State::Master).unwrap();
    let skew = Duration::from_micros(60_938);
    assert!(took_over - stopped <= skew + Duration::from_millis(1));
}

#[test]
fn pair_preempt_on_and_off() {
    for preempt in [true, false] {
        let mut high = config(A, 150, 1000);
        high.preempt = preempt;
        let mut sim = Sim::pair(high, config(B, 100, 1000));
        sim.run_for(Duration::from_secs(6));
        sim.kill(0);
        sim.run_for(Duration::from_secs(6));
        assert_eq!(sim.state(1), State::Master);
        sim.restart(0);
        // The restarted node found its stale address and removed it at once.
        assert!(!sim.nodes[0].holds[0]);
        sim.run_for(Duration::from_secs(10));
        let expect = if preempt {
            (State::Master, State::Backup)
        } else {
            (State::Backup, State::Master)
        };
        assert_eq!((sim.state(0), sim.state(1)), expect, "preempt = {preempt}");
        assert_eq!(sim.holders(0), 1);
    }
}

#[test]
fn closed_preempt_gate_follows_lower_master() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    i.set_preempt_allowed(false);
    // Followed like a higher master, not dropped as a lower one.
    i.handle_advert(now, &advert(B, 100, 100)).unwrap();
    assert_eq!(i.master(), Some((B, 100)));
    i.set_preempt_allowed(true);
    assert!(i.preempt_allowed());
    assert_eq!(
        i.handle_advert(now, &advert(B, 100, 100)),
        Err(DropReason::LowerPriority)
    );
}

#[test]
fn pair_preempt_waits_for_the_gate_but_not_for_a_dead_master() {
    let mut sim = Sim::pair(config(A, 150, 100), config(B, 100, 100));
    sim.kill(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.state(1), State::Master);
    sim.restart(0);
    sim.nodes[0].group.set_preempt_allowed(MemberId(0), false);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(
        (sim.state(0), sim.state(1)),
        (State::Backup, State::Master),
        "a closed gate holds preemption"
    );
    sim.nodes[0].group.set_preempt_allowed(MemberId(0), true);
    sim.run_for(Duration::from_secs(1));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    // Back again with the gate closed: B is master, A follows it until B dies.
    sim.kill(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.state(1), State::Master);
    sim.restart(0);
    sim.nodes[0].group.set_preempt_allowed(MemberId(0), false);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.state(0), State::Backup, "gated, follows B");
    sim.kill(1);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.state(0), State::Master, "master down is not gated");
}

#[test]
fn pair_preempt_delay_postpones_takeover() {
    let mut high = config(A, 150, 100);
    high.preempt_delay = Duration::from_secs(5);
    let mut sim = Sim::pair(high, config(B, 100, 100));
    sim.kill(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.state(1), State::Master);
    let back = sim.now;
    sim.restart(0);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.state(0), State::Backup, "still inside preempt_delay");
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.state(0), State::Master);
    let t = sim.last_transition_to(0, State::Master).unwrap();
    assert!(t - back >= Duration::from_secs(5) && t - back < Duration::from_millis(5100));
}

#[test]
fn pair_equal_priority_higher_address_wins() {
    let mut sim = Sim::pair(config(A, 100, 100), config(B, 100, 100));
    sim.run_for(Duration::from_secs(3));
    assert_eq!((sim.state(0), sim.state(1)), (State::Backup, State::Master));
}

#[test]
fn pair_split_brain_heals_within_one_interval() {
    let mut sim = Sim::pair(config(A, 150, 1000), config(B, 100, 1000));
    sim.run_for(Duration::from_secs(6));
    sim.nodes[0].link[0] = false;
    sim.nodes[1].link[0] = false;
    sim.run_for(Duration::from_secs(6));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Master));
    sim.nodes[0].link[0] = true;
    sim.nodes[1].link[0] = true;
    let healed = sim.now;
    sim.run_for(Duration::from_secs(3));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    let t = sim.last_transition_to(1, State::Backup).unwrap();
    assert!(t - healed <= Duration::from_millis(1001));
}

#[test]
fn a_gated_member_holds_its_whole_sync_group() {
    let inside = |addr: Ipv4Addr, priority: u8| {
        let mut c = config(addr, priority, 100);
        c.vrid = 52;
        c
    };
    let mut sim = Sim::new(vec![
        vec![config(A, 150, 100), inside(Ipv4Addr::new(10, 0, 0, 2), 150)],
        vec![config(B, 100, 100), inside(Ipv4Addr::new(10, 0, 0, 3), 100)],
    ]);
    sim.kill(0);
    sim.run_for(Duration::from_secs(1));
    sim.restart(0);
    // Only member 0 is gated; its ungated sibling must not preempt and drag it along.
    sim.nodes[0].group.set_preempt_allowed(MemberId(0), false);
    sim.run_for(Duration::from_secs(3));
    let states = |sim: &Sim, n: usize| -> Vec<State> {
        sim.nodes[n]
            .group
            .members()
            .iter()
            .map(|m| m.state())
            .collect()
    };
    assert_eq!(states(&sim, 0), [State::Backup, State::Backup]);
    sim.nodes[0].group.set_preempt_allowed(MemberId(0), true);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(states(&sim, 0), [State::Master, State::Master]);
    assert_eq!(states(&sim, 1), [State::Backup, State::Backup]);
}

#[test]
fn pair_of_sync_groups_moves_together_on_fault() {
    let inside_a = {
        let mut c = config(Ipv4Addr::new(10, 0, 0, 2), 150, 100);
        c.vrid = 52;
        c
    };
    let inside_b = {
        let mut c = config(Ipv4Addr::new(10, 0, 0, 3), 100, 100);
        c.vrid = 52;
        c
    };
    let mut sim = Sim::new(vec![
        vec![config(A, 150, 100), inside_a],
        vec![config(B, 100, 100), inside_b],
    ]);
    sim.run_for(Duration::from_secs(2));
    let states = |sim: &Sim, n: usize| -> Vec<State> {
        sim.nodes[n]
            .group
            .members()
            .iter()
            .map(|m| m.state())
            .collect()
    };
    assert_eq!(states(&sim, 0), vec![State::Master, State::Master]);
    assert_eq!(states(&sim, 1), vec![State::Backup, State::Backup]);
    // Node 0's public link fails: its tracked interface puts the whole group in Fault.
    sim.nodes[0].link[0] = false;
    let now = sim.now;
    assert!(
        sim.nodes[0]
            .group
            .handle_tracked(now, MemberId(0), ObjectId(0), false)
    );
    sim.flush(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(states(&sim, 0), vec![State::Fault, State::Fault]);
    assert_eq!(states(&sim, 1), vec![State::Master, State::Master]);
    // Recovery: node 0 preempts on both links again.
    sim.nodes[0].link[0] = true;
    let now = sim.now;
    assert!(
        sim.nodes[0]
            .group
            .handle_tracked(now, MemberId(0), ObjectId(0), true)
    );
    sim.flush(0);
    sim.run_for(Duration::from_secs(2));
    assert_eq!(states(&sim, 0), vec![State::Master, State::Master]);
    assert_eq!(states(&sim, 1), vec![State::Backup, State::Backup]);
}

#[test]
fn sync_group_holds_a_member_whose_sibling_hears_a_master() {
    let now = t0();
    let mut inside = config(Ipv4Addr::new(10, 0, 0, 2), 100, 100);
    inside.vrid = 52;
    let mut g = SyncGroup::new(vec![member(config(A, 100, 100)), member(inside)]);
    g.startup(now);
    while g.poll_action().is_some() {}
    // Only member 0 hears the master; member 1's timer fires but it must not take over.
    let mut t = now;
    for _ in 0..20 {
        t += Duration::from_millis(100);
        g.handle_advert(t, MemberId(0), &advert(B, 200, 10))
            .unwrap();
        g.handle_timeout(t);
    }
    assert_eq!(g.members()[1].state(), State::Backup);
    assert!(g.members()[1].counters().held_by_group > 0);
}

// ---------------------------------------------------------------------------------------
// Property tests: random event sequences against one instance.

#[derive(Debug, Clone)]
enum Event {
    Advert {
        from_b: bool,
        priority: u8,
        interval_cs: u16,
        ttl: u8,
    },
    Timeout,
    Wait(u64),
    Fault(bool),
    Penalty(u8),
    Shutdown,
    Startup,
    Reconfigure {
        priority: u8,
        preempt: bool,
        interval_cs: u16,
    },
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            any::<bool>(),
            any::<u8>(),
            0u16..300,
            prop_oneof![Just(255u8), any::<u8>()]
        )
            .prop_map(|(from_b, priority, interval_cs, ttl)| Event::Advert {
                from_b,
                priority,
                interval_cs,
                ttl
            }),
        Just(Event::Timeout),
        (0u64..5000).prop_map(Event::Wait),
        any::<bool>().prop_map(Event::Fault),
        (0u8..120).prop_map(Event::Penalty),
        Just(Event::Shutdown),
        Just(Event::Startup),
        (1u8..=254, any::<bool>(), 1u16..300).prop_map(|(priority, preempt, interval_cs)| {
            Event::Reconfigure {
                priority,
                preempt,
                interval_cs,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn one_transition_per_event_and_deadlines_in_future(
        priority in 1u8..=255,
        preempt in any::<bool>(),
        delay_ms in prop_oneof![Just(0u64), 0u64..3000],
        events in proptest::collection::vec(arb_event(), 1..80),
    ) {
        let mut c = config(A, priority, 1000);
        c.preempt = preempt;
        c.preempt_delay = Duration::from_millis(delay_ms);
        let mut i = VrrpInstance::new(c);
        let mut now = t0();
        i.startup(now);
        drain(&mut i);
        for e in events {
            match e {
                Event::Advert { from_b, priority, interval_cs, ttl } => {
                    let src = if from_b { B } else { Ipv4Addr::new(198, 51, 100, 3) };
                    let mut a = advert(src, priority, interval_cs);
                    a.ttl = ttl;
                    let _ = i.handle_advert(now, &a);
                }
                Event::Timeout => {
                    // Jump to the deadline, as a driver would.
                    if let Some(t) = i.poll_timeout() { now = t; }
                    i.handle_timeout(now);
                }
                Event::Wait(ms) => { now += Duration::from_millis(ms); i.handle_timeout(now); }
                Event::Fault(f) => i.set_fault(now, f),
                Event::Penalty(p) => i.set_priority_penalty(now, p),
                Event::Shutdown => i.shutdown(now),
                Event::Startup => i.startup(now),
                Event::Reconfigure { priority, preempt, interval_cs } => {
                    let mut c = i.config().clone();
                    c.priority = priority;
                    c.preempt = preempt;
                    c.advert_interval = Duration::from_millis(u64::from(interval_cs) * 10);
                    let before = i.state();
                    prop_assert_eq!(i.reconfigure(now, c), Ok(()));
                    prop_assert_eq!(i.state(), before, "a reconfigure never changes state");
                }
            }
            let acts = drain(&mut i);
            let transitions = acts.iter().filter(|a| matches!(a, Action::Transition(_))).count();
            prop_assert!(transitions <= 1, "{transitions} transitions for one event: {acts:?}");
            if let Some(d) = i.poll_timeout() {
                prop_assert!(d > now, "deadline not in the future");
            }
            // Addresses are added only on entering Master and removed on leaving it.
            for a in &acts {
                if *a == Action::AddAddresses { prop_assert_eq!(i.state(), State::Master); }
            }
            if i.state() == State::Master {
                prop_assert!(i.poll_timeout().is_some(), "a master always has an advert timer");
            }
            prop_assert!(i.priority() >= 1);
        }
    }
}

#[test]
fn reconfigure_master_announces_new_priority_and_interval_without_transition() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    assert_eq!(i.state(), State::Master);
    drain(&mut i);
    let later = now + Duration::from_secs(5);
    let mut c = config(A, 120, 200);
    c.preempt = false;
    assert_eq!(i.reconfigure(later, c), Ok(()));
    let acts = drain(&mut i);
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert!(
        matches!(&acts[0], Action::SendAdvert(r) if r.priority == 120 && r.max_advert_interval_cs == 20),
        "{acts:?}"
    );
    assert_eq!(i.state(), State::Master);
    assert_eq!(i.priority(), 120);
    assert_eq!(i.master(), Some((A, 120)));
    assert_eq!(i.poll_timeout(), Some(later + Duration::from_millis(200)));
    // Nothing that matters on the wire changed: nothing to do.
    assert_eq!(i.reconfigure(later, i.config().clone()), Ok(()));
    assert_eq!(drain(&mut i), vec![]);
}

#[test]
fn reconfigure_master_swaps_only_the_changed_addresses() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    i.handle_timeout(now + i.master_down_interval());
    drain(&mut i);
    let other = VirtualAddress {
        address: Ipv4Addr::new(198, 51, 100, 20),
        prefix_len: 24,
    };
    let mut c = config(A, 150, 1000);
    c.addresses = vec![other];
    assert_eq!(i.reconfigure(now, c), Ok(()));
    let acts = drain(&mut i);
    let old = VirtualAddress {
        address: VIP,
        prefix_len: 24,
    };
    assert_eq!(acts[0], Action::WithdrawAddresses(vec![old]));
    assert_eq!(acts[1], Action::AddAddresses);
    assert!(matches!(&acts[2], Action::SendAdvert(r) if r.addresses == vec![other.address]));
    assert_eq!(acts[3], Action::GratuitousArp);
    assert_eq!(acts.len(), 4);
    assert!(!acts.contains(&Action::RemoveAddresses));
}

#[test]
fn reconfigure_refuses_a_new_vrid_or_primary_address_and_keeps_the_old_config() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 150, 1000));
    i.startup(now);
    let mut c = config(A, 120, 1000);
    c.vrid = 52;
    assert_eq!(
        i.reconfigure(now, c),
        Err(ReconfigureError::VridChanged { old: 51, new: 52 })
    );
    assert_eq!(
        i.reconfigure(now, config(B, 120, 1000)),
        Err(ReconfigureError::PrimaryAddressChanged { old: A, new: B })
    );
    assert_eq!(i.config().priority, 150);
}

#[test]
fn reconfigure_backup_rearms_master_down_for_its_new_skew() {
    let now = t0();
    let mut i = VrrpInstance::new(config(A, 100, 1000));
    i.startup(now);
    i.handle_advert(now, &advert(B, 200, 100))
        .expect("accepted");
    drain(&mut i);
    let before = i.poll_timeout().expect("master down timer");
    let later = now + Duration::from_millis(500);
    let mut c = config(A, 250, 1000);
    c.preempt = false;
    assert_eq!(i.reconfigure(later, c), Ok(()));
    assert_eq!(
        drain(&mut i)
            .iter()
            .filter(|a| matches!(a, Action::Transition(_)))
            .count(),
        0
    );
    assert_eq!(i.state(), State::Backup);
    let after = i.poll_timeout().expect("master down timer");
    assert!(after < before, "a higher priority has a shorter skew");
    assert_eq!(after, now + i.master_down_interval());
}

#[test]
fn pair_reload_lowering_the_master_moves_only_below_the_peer() {
    let mut sim = Sim::pair(config(A, 150, 100), config(B, 100, 100));
    sim.run_for(Duration::from_secs(2));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    // Still above the peer: mastership stays, the VIP never has a gap.
    let gaps = sim.gaps.len();
    sim.reconfigure(0, 0, config(A, 120, 100));
    sim.run_for(Duration::from_secs(2));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    assert_eq!(sim.gaps.len(), gaps, "{:?}", sim.gaps);
    // Below the peer, which preempts: it takes over after one master down interval.
    let at = sim.now;
    sim.reconfigure(0, 0, config(A, 90, 100));
    sim.run_for(Duration::from_secs(2));
    assert_eq!((sim.state(0), sim.state(1)), (State::Backup, State::Master));
    let took = sim.last_transition_to(1, State::Master).expect("took over") - at;
    let mdi = Duration::from_millis(300) + Duration::from_millis(100) * (256 - 100) / 256;
    assert!(took <= mdi + Duration::from_millis(2), "{took:?}");
    assert_eq!(sim.holders(0), 1);
    // Back above: the old master preempts again.
    sim.reconfigure(0, 0, config(A, 150, 100));
    sim.run_for(Duration::from_secs(2));
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
}

#[test]
fn pair_reload_below_a_peer_without_preempt_keeps_the_master() {
    let mut b = config(B, 100, 100);
    b.preempt = false;
    let mut sim = Sim::pair(config(A, 150, 100), b);
    sim.run_for(Duration::from_secs(2));
    sim.reconfigure(0, 0, config(A, 90, 100));
    sim.run_for(Duration::from_secs(3));
    // RFC 5798: a backup without Preempt_Mode accepts any master.
    assert_eq!((sim.state(0), sim.state(1)), (State::Master, State::Backup));
    // Turning preemption on at the peer with a live reload makes it take over.
    let mut b = config(B, 100, 100);
    b.preempt = true;
    sim.reconfigure(1, 0, b);
    sim.run_for(Duration::from_secs(2));
    assert_eq!((sim.state(0), sim.state(1)), (State::Backup, State::Master));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// The `vrrp_instance` fuzz harness on random inputs: its invariants hold.
    #[test]
    fn instance_fuzz_invariants_hold(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        crate::fuzzing::check_instance(&data);
    }
}
