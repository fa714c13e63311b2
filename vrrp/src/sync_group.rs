//! Instances that move together (keepalived's `vrrp_sync_group`).
//!
//! A director holds the public VIP on one link and the real servers' gateway on another;
//! both must sit on the same router or traffic is routed into a black hole. Rules:
//!
//! - a member that becomes Master pulls every Backup sibling to Master;
//! - a member that falls from Master to Backup pushes every Master sibling to Backup (they
//!   resign with priority 0, so the peer takes those links over after its skew time);
//! - a member in Fault puts the whole group in Fault;
//! - a Backup member whose master-down timer fires while a sibling still hears a live master
//!   stays Backup (otherwise the group would split across the two routers and flap).
//!
//! A standalone instance is a group of one; the driver only ever runs groups.

use std::net::Ipv4Addr;
use std::time::Instant;

use netutil::Reconfigured;

use crate::instance::{Action, DropReason, InstanceConfig, ReceivedAdvert, State, VrrpInstance};
use crate::track::Tracker;

/// A member of a [`SyncGroup`]: its position in the list given to [`SyncGroup::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberId(pub usize);

/// A tracked object of one member: its position in that member's [`Tracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub usize);

/// What a member is attached to outside the state machine: the link its socket is bound to,
/// whom it talks to, and which of its VIPs another component makes live. None of it changes
/// in place; a reconfigure that changes it needs a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// The interface the adverts and addresses live on.
    pub interface: String,
    /// Unicast peers (adverts go to them instead of 224.0.0.18).
    pub unicast_peers: Vec<Ipv4Addr>,
    /// Accepted multicast sources (empty = any).
    pub peers: Vec<Ipv4Addr>,
    /// The VIPs made live through a hook instead of as interface addresses.
    pub hooked: Vec<Ipv4Addr>,
}

/// A set of instances that change state together, each with its tracked objects.
///
/// Invariant: `members`, `trackers` and `bindings` have one entry per member, in the order
/// given to [`SyncGroup::new`]; every member's fault and priority penalty are its
/// tracker's.
#[derive(Debug)]
pub struct SyncGroup {
    members: Vec<VrrpInstance>,
    trackers: Vec<Tracker>,
    bindings: Vec<Binding>,
    next_poll: usize,
}

impl SyncGroup {
    /// Groups `members` (in the order their [`MemberId`]s are used by every method).
    pub fn new(members: Vec<(VrrpInstance, Tracker, Binding)>) -> Self {
        let mut group = Self {
            members: Vec::with_capacity(members.len()),
            trackers: Vec::with_capacity(members.len()),
            bindings: Vec::with_capacity(members.len()),
            next_poll: 0,
        };
        for (instance, tracker, binding) in members {
            group.members.push(instance);
            group.trackers.push(tracker);
            group.bindings.push(binding);
        }
        group
    }

    /// The members' state machines.
    pub fn members(&self) -> &[VrrpInstance] {
        &self.members
    }

    /// The members' tracked objects.
    pub fn trackers(&self) -> &[Tracker] {
        &self.trackers
    }

    /// Starts every member.
    pub fn startup(&mut self, now: Instant) {
        for i in 0..self.members.len() {
            self.dispatch(now, i, |m| m.startup(now));
        }
    }

    /// Shuts every member down (masters send priority 0 and withdraw their addresses).
    pub fn shutdown(&mut self, now: Instant) {
        for m in &mut self.members {
            m.shutdown(now);
            m.take_last_transition();
        }
    }

    /// An advert arrived on `member`'s link.
    ///
    /// # Errors
    /// Why the member ignored it; an unknown member ignores it as `NotListening`.
    pub fn handle_advert(
        &mut self,
        now: Instant,
        member: MemberId,
        adv: &ReceivedAdvert,
    ) -> Result<(), DropReason> {
        if member.0 >= self.members.len() {
            return Err(DropReason::NotListening);
        }
        let mut result = Ok(());
        self.dispatch(now, member.0, |m| result = m.handle_advert(now, adv));
        result
    }

    /// Opens or closes the preemption gate ([`VrrpInstance::set_preempt_allowed`]) of
    /// `member` and of every other member: the group moves as one, so an ungated sibling that
    /// preempted would take the gated member to MASTER with it. An unknown member is ignored.
    pub fn set_preempt_allowed(&mut self, member: MemberId, allowed: bool) {
        if member.0 < self.members.len() {
            for m in &mut self.members {
                m.set_preempt_allowed(allowed);
            }
        }
    }

    /// Sets `member`'s runtime priority ([`VrrpInstance::set_runtime_priority`]); applied at
    /// once, no member changes state here. An unknown member is ignored.
    ///
    /// # Errors
    /// `priority` outside 1..=254; nothing was changed.
    pub fn set_runtime_priority(
        &mut self,
        now: Instant,
        member: MemberId,
        priority: u8,
    ) -> Result<(), crate::ReconfigureError> {
        if member.0 >= self.members.len() {
            return Ok(());
        }
        let mut result = Ok(());
        self.dispatch(now, member.0, |m| {
            result = m.set_runtime_priority(now, priority);
        });
        result
    }

    /// Runs every member whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.members.len() {
            if self.members[i].poll_timeout().is_some_and(|t| t <= now) {
                self.dispatch(now, i, |m| m.handle_timeout(now));
            }
        }
    }

    /// A tracked object of `member` went up or down: updates its tracker and, if that
    /// changed, the member's priority penalty and fault (a weight-0 object down faults the
    /// whole group). Returns whether the object's health changed.
    pub fn handle_tracked(
        &mut self,
        now: Instant,
        member: MemberId,
        object: ObjectId,
        up: bool,
    ) -> bool {
        let changed = self
            .trackers
            .get_mut(member.0)
            .is_some_and(|t| t.set(object.0, up));
        if changed {
            self.apply_tracking(now, member.0);
        }
        changed
    }

    /// Whether `member` can take `config` and the `tracked` objects (name and weight, in
    /// tracker order) bound as `binding` in place. The VRID, the primary address, the
    /// binding and the names of the tracked objects are fixed: they need a new socket or new
    /// link and health subscriptions. Everything else (priority, preemption, intervals,
    /// addresses, weights) changes live.
    pub fn check_reconfigure(
        &self,
        member: MemberId,
        config: &InstanceConfig,
        tracked: &[(String, u8)],
        binding: &Binding,
    ) -> Reconfigured {
        let (Some(instance), Some(tracker), Some(old)) = (
            self.members.get(member.0),
            self.trackers.get(member.0),
            self.bindings.get(member.0),
        ) else {
            return Reconfigured::restart("not a member of this group");
        };
        if let Err(e) = instance.check_reconfigure(config) {
            Reconfigured::restart(e.to_string())
        } else if old.interface != binding.interface {
            Reconfigured::restart(format!(
                "the interface changed from {} to {}",
                old.interface, binding.interface
            ))
        } else if old.unicast_peers != binding.unicast_peers {
            Reconfigured::restart("unicast_peers changed")
        } else if old.peers != binding.peers {
            Reconfigured::restart("peers changed")
        } else if !tracker
            .objects()
            .iter()
            .map(|o| &o.name)
            .eq(tracked.iter().map(|(name, _)| name))
        {
            Reconfigured::restart("the tracked interfaces or services changed")
        } else if old.hooked != binding.hooked {
            Reconfigured::restart("a VIP made live through a hook was added or removed")
        } else {
            Reconfigured::Live
        }
    }

    /// Applies a changed configuration to `member` in place when
    /// [`check_reconfigure`](Self::check_reconfigure) allows it (see
    /// [`VrrpInstance::reconfigure`]): new tracking weights take effect at once; no member
    /// changes state. A `NeedsRestart` answer changed nothing.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        member: MemberId,
        config: InstanceConfig,
        tracked: &[(String, u8)],
        binding: &Binding,
    ) -> Reconfigured {
        let check = self.check_reconfigure(member, &config, tracked, binding);
        if !check.is_live() {
            return check;
        }
        let i = member.0;
        if let Err(e) = self.members[i].reconfigure(now, config) {
            return Reconfigured::restart(e.to_string());
        }
        let mut changed = false;
        for (k, (_, weight)) in tracked.iter().enumerate() {
            changed |= self.trackers[i].set_weight(k, *weight);
        }
        if changed {
            self.apply_tracking(now, i);
        }
        Reconfigured::Live
    }

    /// The next action, with the index of the member it belongs to.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<(MemberId, Action)> {
        let n = self.members.len();
        for k in 0..n {
            let i = (self.next_poll + k) % n;
            if let Some(a) = self.members[i].poll_action() {
                // Stay on this member so its actions come out in order, before moving on.
                self.next_poll = i;
                return Some((MemberId(i), a));
            }
        }
        self.next_poll = 0;
        None
    }

    /// The earliest deadline of any member.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.members
            .iter()
            .filter_map(VrrpInstance::poll_timeout)
            .min()
    }

    /// Hands member `i`'s tracker verdict to its state machine: the penalty first, then the
    /// fault, which every sibling follows.
    fn apply_tracking(&mut self, now: Instant, i: usize) {
        let (fault, penalty) = (self.trackers[i].fault(), self.trackers[i].penalty());
        self.members[i].set_priority_penalty(now, penalty);
        self.dispatch(now, i, |m| m.set_fault(now, fault));
        let faulty: Vec<bool> = self.members.iter().map(VrrpInstance::own_fault).collect();
        for j in 0..self.members.len() {
            let others = faulty.iter().enumerate().any(|(k, f)| k != j && *f);
            self.members[j].set_group_fault(now, others);
            self.members[j].take_last_transition();
        }
    }

    fn dispatch(&mut self, now: Instant, i: usize, f: impl FnOnce(&mut VrrpInstance)) {
        let n = self.members.len();
        let hears: Vec<bool> = self.members.iter().map(|m| m.hears_master(now)).collect();
        for j in 0..n {
            let hold = hears.iter().enumerate().any(|(k, h)| k != j && *h);
            self.members[j].set_hold_backup(hold);
        }
        f(&mut self.members[i]);
        let Some(t) = self.members[i].take_last_transition() else {
            return;
        };
        let target = match (t.from, t.to) {
            (_, State::Master) => State::Master,
            (State::Master, State::Backup) => State::Backup,
            _ => return,
        };
        for j in (0..n).filter(|&j| j != i) {
            self.members[j].force(now, target);
            self.members[j].take_last_transition();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::VirtualAddress;
    use std::time::Duration;
    use testkit::epoch;

    const OWN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);

    fn tracked(web_weight: u8) -> Vec<(String, u8)> {
        vec![
            ("interface eth0".to_owned(), 0),
            ("service web".to_owned(), web_weight),
        ]
    }

    fn binding() -> Binding {
        Binding {
            interface: "eth0".to_owned(),
            unicast_peers: vec![Ipv4Addr::new(198, 51, 100, 12)],
            peers: Vec::new(),
            hooked: vec![Ipv4Addr::new(198, 51, 100, 10)],
        }
    }

    fn group() -> (SyncGroup, InstanceConfig) {
        let mut config = InstanceConfig::new("v", 51, OWN);
        config.priority = 150;
        config.addresses = vec![VirtualAddress {
            address: Ipv4Addr::new(198, 51, 100, 10),
            prefix_len: 24,
        }];
        let member = (
            VrrpInstance::new(config.clone()),
            Tracker::new(tracked(20)),
            binding(),
        );
        (SyncGroup::new(vec![member]), config)
    }

    #[test]
    fn live_changes_and_restart_reasons() {
        let (g, config) = group();
        let m = MemberId(0);
        let mut live = config.clone();
        live.priority = 90;
        live.preempt = false;
        live.advert_interval = Duration::from_millis(100);
        live.addresses.push(VirtualAddress {
            address: Ipv4Addr::new(198, 51, 100, 20),
            prefix_len: 24,
        });
        assert_eq!(
            g.check_reconfigure(m, &live, &tracked(60), &binding()),
            Reconfigured::Live
        );

        let mut vrid = config.clone();
        vrid.vrid = 52;
        let mut primary = config.clone();
        primary.primary_address = Ipv4Addr::new(198, 51, 100, 99);
        let restart = |c: &InstanceConfig, t: &[(String, u8)], b: &Binding| match g
            .check_reconfigure(m, c, t, b)
        {
            Reconfigured::NeedsRestart(why) => why.into_owned(),
            Reconfigured::Live => panic!("{c:?} {t:?} {b:?} applied live"),
        };
        assert_eq!(
            restart(&vrid, &tracked(20), &binding()),
            "the VRID changed from 51 to 52"
        );
        assert!(restart(&primary, &tracked(20), &binding()).contains("primary address"));
        let other = |f: fn(&mut Binding)| {
            let mut b = binding();
            f(&mut b);
            restart(&config, &tracked(20), &b)
        };
        assert!(other(|b| b.interface = "eth1".to_owned()).contains("interface changed"));
        assert_eq!(other(|b| b.unicast_peers.clear()), "unicast_peers changed");
        assert_eq!(
            other(|b| b.peers.push(Ipv4Addr::new(198, 51, 100, 13))),
            "peers changed"
        );
        assert!(other(|b| b.hooked.clear()).contains("hook"));
        let mut renamed = tracked(20);
        renamed[1].0 = "service api".to_owned();
        assert!(restart(&config, &renamed, &binding()).contains("tracked"));
        assert!(restart(&config, &tracked(20)[..1], &binding()).contains("tracked"));
        assert!(
            !g.check_reconfigure(MemberId(1), &config, &tracked(20), &binding())
                .is_live()
        );
    }

    #[test]
    fn tracking_faults_lowers_priority_and_reweighs_live() {
        let (mut g, config) = group();
        let now = epoch();
        let m = MemberId(0);
        g.startup(now);
        while g.poll_action().is_some() {}
        assert!(g.handle_tracked(now, m, ObjectId(1), false));
        assert!(!g.handle_tracked(now, m, ObjectId(1), false));
        assert_eq!(g.members()[0].priority(), 130);
        assert_ne!(g.members()[0].state(), State::Fault);
        // A reload that drops the weight to 0 turns the same failure into a fault.
        let r = g.reconfigure(now, m, config.clone(), &tracked(0), &binding());
        assert_eq!(r, Reconfigured::Live);
        assert_eq!(g.trackers()[0].objects()[1].weight, 0);
        assert_eq!(g.members()[0].state(), State::Fault);
        // A refused reconfigure changes nothing.
        let mut vrid = config.clone();
        vrid.vrid = 52;
        assert!(
            !g.reconfigure(now, m, vrid, &tracked(20), &binding())
                .is_live()
        );
        assert_eq!(g.trackers()[0].objects()[1].weight, 0);
        assert!(g.handle_tracked(now, m, ObjectId(1), true));
        assert_ne!(g.members()[0].state(), State::Fault);
        assert!(!g.handle_tracked(now, MemberId(3), ObjectId(0), false));
        assert!(!g.handle_tracked(now, m, ObjectId(9), false));
    }
}
