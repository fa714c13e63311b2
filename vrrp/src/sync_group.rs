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

use std::time::Instant;

use crate::error::ReconfigureError;
use crate::instance::{Action, DropReason, InstanceConfig, ReceivedAdvert, State, VrrpInstance};

/// A set of instances that change state together.
#[derive(Debug)]
pub struct SyncGroup {
    members: Vec<VrrpInstance>,
    next_poll: usize,
}

impl SyncGroup {
    /// Groups `members` (in the order their indices are used by every method).
    pub fn new(members: Vec<VrrpInstance>) -> Self {
        Self {
            members,
            next_poll: 0,
        }
    }

    /// The members.
    pub fn members(&self) -> &[VrrpInstance] {
        &self.members
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

    /// An advert arrived on member `i`'s link.
    ///
    /// # Errors
    /// Why the member ignored it; an index out of range is ignored as `NotListening`.
    pub fn handle_advert(
        &mut self,
        now: Instant,
        i: usize,
        adv: &ReceivedAdvert,
    ) -> Result<(), DropReason> {
        if i >= self.members.len() {
            return Err(DropReason::NotListening);
        }
        let mut result = Ok(());
        self.dispatch(now, i, |m| result = m.handle_advert(now, adv));
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

    /// Sets member `i`'s own fault (tracked interface down, or a weight-0 service failed).
    pub fn set_fault(&mut self, now: Instant, i: usize, fault: bool) {
        if i >= self.members.len() {
            return;
        }
        self.dispatch(now, i, |m| m.set_fault(now, fault));
        let faulty: Vec<bool> = self.members.iter().map(VrrpInstance::own_fault).collect();
        for j in 0..self.members.len() {
            let others = faulty.iter().enumerate().any(|(k, f)| k != j && *f);
            self.members[j].set_group_fault(now, others);
            self.members[j].take_last_transition();
        }
    }

    /// Sets member `i`'s priority penalty from tracked weights.
    pub fn set_priority_penalty(&mut self, now: Instant, i: usize, penalty: u8) {
        if let Some(m) = self.members.get_mut(i) {
            m.set_priority_penalty(now, penalty);
        }
    }

    /// Applies a changed configuration to member `i` in place (see
    /// [`VrrpInstance::reconfigure`]); no member changes state.
    ///
    /// # Errors
    /// The change needs a restart; an index out of range is a no-op.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        i: usize,
        config: InstanceConfig,
    ) -> Result<(), ReconfigureError> {
        match self.members.get_mut(i) {
            Some(m) => m.reconfigure(now, config),
            None => Ok(()),
        }
    }

    /// The next action, with the index of the member it belongs to.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<(usize, Action)> {
        let n = self.members.len();
        for k in 0..n {
            let i = (self.next_poll + k) % n;
            if let Some(a) = self.members[i].poll_action() {
                // Stay on this member so its actions come out in order, before moving on.
                self.next_poll = i;
                return Some((i, a));
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
