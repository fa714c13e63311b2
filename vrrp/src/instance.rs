//! One virtual router: the RFC 5798 §6.4 state machine, sans-IO.
//!
//! The driver feeds events in and drains outputs, in this order after every input:
//!
//! 1. an input: [`VrrpInstance::startup`], [`VrrpInstance::handle_advert`],
//!    [`VrrpInstance::handle_timeout`], [`VrrpInstance::set_fault`],
//!    [`VrrpInstance::set_priority_penalty`], [`VrrpInstance::set_runtime_priority`],
//!    [`VrrpInstance::reconfigure`] or
//!    [`VrrpInstance::shutdown`];
//! 2. [`VrrpInstance::poll_action`] until `None`, performing each [`Action`] in order;
//! 3. [`VrrpInstance::poll_timeout`]: the instant to call `handle_timeout` next.
//!
//! Invariants (property-tested and fuzzed by `vrrp_instance`): one input causes at most one
//! state transition; every deadline returned by `poll_timeout` lies strictly after the `now`
//! of the last input; a master answers lower-priority (or other masters' priority-0) adverts
//! with a re-assertion at most once per [`InstanceConfig::reassert_interval`]; a priority-0
//! advert moves a backup only when it comes from the master the backup follows; the
//! Master_Adver_Interval learnt from an advert never exceeds
//! [`InstanceConfig::learnt_interval_ceiling`].
//!
//! VRRPv3 has no authentication: anyone on the link with TTL 255 can send adverts. What the
//! state machine bounds is what one spoofed advert can make it do (see the README's Security
//! section); source filtering is the driver's (`unicast_peers`, `peers`).

use std::collections::VecDeque;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netutil::DropCounters;

use crate::error::ReconfigureError;
use crate::wire::{self, VrrpRepr};

/// The owner priority: the router that owns the addresses starts as master at once.
pub const PRIORITY_OWNER: u8 = 255;
/// The priority a resigning master announces.
pub const PRIORITY_STOP: u8 = 0;
/// How many transitions an instance remembers for `show vrrp`.
pub const TRANSITION_HISTORY: usize = 16;

/// A virtual address with the prefix length it is added with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VirtualAddress {
    /// The address.
    pub address: Ipv4Addr,
    /// Prefix length used when it is added to the interface.
    pub prefix_len: u8,
}

/// Typed configuration of one instance; the CLI builds it from TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// Instance name, used in logs, notify hooks and `show vrrp`.
    pub name: String,
    /// Virtual Router ID, 1..=255.
    pub vrid: u8,
    /// Configured priority, 1..=255 (255 = address owner).
    pub priority: u8,
    /// Advertisement_Interval; sent in centiseconds, so it is rounded to 10 ms.
    pub advert_interval: Duration,
    /// Preempt_Mode: take over from a lower-priority master.
    pub preempt: bool,
    /// Wait this long after first seeing a lower-priority master before preempting it
    /// (keepalived's `preempt_delay`); zero = RFC behaviour.
    pub preempt_delay: Duration,
    /// Our primary address: the advert source and the tie-breaker between equal priorities.
    pub primary_address: Ipv4Addr,
    /// The virtual addresses.
    pub addresses: Vec<VirtualAddress>,
    /// Repeat the gratuitous ARP burst this long after becoming master (keepalived's
    /// `garp_master_delay`, default 5 s); `None` = only once.
    pub garp_repeat_delay: Option<Duration>,
    /// A master re-asserts itself (advert plus [`Action::ReassertArp`]) on a lower-priority
    /// advert, or on another master's priority 0, at most once per this interval; the adverts
    /// in between are only counted (`reassert_suppressed`). Bounds what a flood of spoofed
    /// adverts makes the master send, whatever its rate. Default 1 s.
    pub reassert_interval: Duration,
    /// The longest Master_Adver_Interval a backup learns from an advert (RFC 5798 learns any,
    /// up to 40.95 s, so one spoofed advert could stretch failover to about 2 minutes).
    /// `None` = three times our own advert interval (peers of one virtual router normally
    /// share one interval); set 40.95 s for plain RFC behaviour.
    pub max_learnt_advert_interval: Option<Duration>,
}

impl InstanceConfig {
    /// A config with keepalived's and RFC 5798's defaults: priority 100, 1 s, preempt.
    pub fn new(name: &str, vrid: u8, primary_address: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            vrid,
            priority: 100,
            advert_interval: Duration::from_secs(1),
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary_address,
            addresses: Vec::new(),
            garp_repeat_delay: Some(Duration::from_secs(5)),
            reassert_interval: Duration::from_secs(1),
            max_learnt_advert_interval: None,
        }
    }

    /// The ceiling on a learnt Master_Adver_Interval: the configured one, or three times our
    /// own interval; never below our own interval, never above the 12-bit field.
    pub fn learnt_interval_ceiling(&self) -> Duration {
        let own = cs_duration(self.advert_interval_cs());
        let field = cs_duration(wire::MAX_INTERVAL_CS);
        self.max_learnt_advert_interval
            .unwrap_or(own * 3)
            .clamp(own, field.max(own))
    }

    /// The advert interval in centiseconds, clamped to the 12-bit field (1..=4095).
    pub fn advert_interval_cs(&self) -> u16 {
        let cs = self.advert_interval.as_millis() / 10;
        cs.clamp(1, u128::from(wire::MAX_INTERVAL_CS)) as u16
    }
}

/// RFC 5798 states, plus Fault (keepalived's name for "a tracked object failed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "UPPERCASE")
)]
pub enum State {
    /// Not started, or shut down.
    #[cfg_attr(feature = "serde", serde(rename = "INIT"))]
    Initialize,
    /// Listening to a master; addresses not held.
    Backup,
    /// Holding the addresses and advertising.
    Master,
    /// A tracked interface or service failed: silent, addresses not held.
    Fault,
}

impl State {
    /// Upper-case name, as keepalived passes it to notify scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initialize => "INIT",
            Self::Backup => "BACKUP",
            Self::Master => "MASTER",
            Self::Fault => "FAULT",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition happened; logged and shown by `show vrrp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Startup as address owner (priority 255).
    OwnerStartup,
    /// Startup as non-owner: wait for a master.
    Startup,
    /// Master_Down_Timer fired: no advert from a master for Master_Down_Interval.
    MasterDown,
    /// The master resigned (priority 0) and our skew time passed.
    MasterResigned,
    /// A lower-priority master was preempted after `preempt_delay`.
    Preempt,
    /// An advert with higher priority (or equal priority and higher address) arrived.
    HigherPriority {
        /// The new master.
        from: Ipv4Addr,
        /// Its priority.
        priority: u8,
    },
    /// Orderly shutdown.
    Shutdown,
    /// A tracked interface or service failed.
    Fault,
    /// Every tracked object is fine again.
    FaultCleared,
    /// Another instance of the sync group changed state.
    SyncGroup,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OwnerStartup => f.write_str("startup as address owner (priority 255)"),
            Self::Startup => f.write_str("startup"),
            Self::MasterDown => f.write_str("no advert within master down interval"),
            Self::MasterResigned => f.write_str("master resigned (priority 0)"),
            Self::Preempt => f.write_str("preempted a lower-priority master"),
            Self::HigherPriority { from, priority } => {
                write!(f, "advert from {from} with priority {priority}")
            }
            Self::Shutdown => f.write_str("shutdown"),
            Self::Fault => f.write_str("tracked interface or service failed"),
            Self::FaultCleared => f.write_str("tracked objects recovered"),
            Self::SyncGroup => f.write_str("sync group member changed state"),
        }
    }
}

/// One recorded transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// When.
    pub at: Instant,
    /// Old state.
    pub from: State,
    /// New state.
    pub to: State,
    /// Why.
    pub reason: Reason,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this advert (multicast, or to each unicast peer).
    SendAdvert(VrrpRepr),
    /// The state changed: log it and run the notify hook.
    Transition(Transition),
    /// Make every virtual address live (interface address or natgw hook).
    AddAddresses,
    /// Withdraw every virtual address; must succeed quietly when they are absent, since it is
    /// also how a daemon restarted over its own stale addresses cleans up.
    RemoveAddresses,
    /// Send the gratuitous ARP burst for every virtual address (on becoming master, its
    /// repeat, or new addresses).
    GratuitousArp,
    /// Send the (smaller, keepalived's `garp_lower_prio_repeat`) gratuitous ARP burst of a
    /// re-assertion against a lower-priority master; at most one per `reassert_interval`.
    ReassertArp,
    /// A reconfigure dropped these addresses while master: withdraw just them (the ones
    /// still configured stay live).
    WithdrawAddresses(Vec<VirtualAddress>),
}

netutil::drop_reasons! {
    /// Why a received advert was not acted upon; each reason has its own counter.
    pub enum DropReason {
        /// TTL was not 255 (RFC 5798 §7.1: the sender is not on our link).
        BadTtl => "bad_ttl",
        /// Advert for another virtual router on the same link.
        OtherVrid => "other_vrid",
        /// Our own advert looped back.
        OwnAdvert => "own_advert",
        /// Max Adver Int 0 cannot be learnt.
        ZeroInterval => "zero_interval",
        /// Not running (Initialize or Fault).
        NotListening => "not_listening",
        /// Master: a lower-priority advert; Backup with preempt: a lower-priority master.
        LowerPriority => "lower_priority",
        /// Priority 0 from a source other than the master a backup follows.
        PriorityZeroNotMaster => "priority_zero_not_master",
    }
}

/// Counters shown by `show vrrp`: every field only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    /// Adverts accepted by the state machine.
    pub adverts_rx: u64,
    /// Adverts sent (including priority 0).
    pub adverts_tx: u64,
    /// Priority-0 adverts received.
    pub priority_zero_rx: u64,
    /// Priority-0 adverts sent.
    pub priority_zero_tx: u64,
    /// Adverts whose address list differs from ours (accepted, logged: RFC 5798 §7.1).
    pub address_mismatch: u64,
    /// Times the sync group held this backup back from taking over.
    pub held_by_group: u64,
    /// Adverts not acted upon, by reason.
    pub drops: DropCounters<DropReason>,
    /// Re-assertions (advert + gratuitous ARP) sent against a lower-priority master.
    pub reassert_tx: u64,
    /// Lower-priority (or foreign priority-0) adverts not answered because the last
    /// re-assertion was less than `reassert_interval` ago: a flood shows here.
    pub reassert_suppressed: u64,
    /// Adverts whose Max Adver Int was above the learnt-interval ceiling (learnt as the
    /// ceiling).
    pub interval_capped: u64,
}

/// An advert as it arrived, with the IP fields the state machine judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedAdvert {
    /// IP source: the sender's primary address.
    pub src: Ipv4Addr,
    /// IP TTL as received.
    pub ttl: u8,
    /// The parsed advert.
    pub repr: VrrpRepr,
}

/// One VRRP virtual router (RFC 5798 §6).
#[derive(Debug)]
pub struct VrrpInstance {
    config: InstanceConfig,
    state: State,
    /// The operator's priority (`vipgate vrrp set-priority`), in place of the configured one
    /// until a reconfigure changes the configured one.
    runtime_priority: Option<u8>,
    penalty: u8,
    own_fault: bool,
    group_fault: bool,
    hold_backup: bool,
    /// Whether preempting a lower-priority master is allowed now (the driver closes it
    /// while flow sync has not pulled the master's flows); taking over a silent master is not
    /// gated.
    preempt_allowed: bool,
    master_adver_interval: Duration,
    master: Option<(Ipv4Addr, u8)>,
    last_master_advert: Option<Instant>,
    resign_seen: bool,
    adver_timer: Option<Instant>,
    master_down_timer: Option<Instant>,
    preempt_timer: Option<Instant>,
    garp_timer: Option<Instant>,
    last_reassert: Option<Instant>,
    actions: VecDeque<Action>,
    history: VecDeque<Transition>,
    last_transition: Option<Transition>,
    counters: Counters,
}

impl VrrpInstance {
    /// Creates an instance in Initialize; call [`Self::startup`] to run it.
    pub fn new(config: InstanceConfig) -> Self {
        let interval = cs_duration(config.advert_interval_cs());
        Self {
            config,
            state: State::Initialize,
            runtime_priority: None,
            penalty: 0,
            own_fault: false,
            group_fault: false,
            hold_backup: false,
            preempt_allowed: true,
            master_adver_interval: interval,
            master: None,
            last_master_advert: None,
            resign_seen: false,
            adver_timer: None,
            master_down_timer: None,
            preempt_timer: None,
            garp_timer: None,
            last_reassert: None,
            actions: VecDeque::new(),
            history: VecDeque::new(),
            last_transition: None,
            counters: Counters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The priority we advertise: the base priority minus tracking penalties, kept in
    /// 1..=254 once lowered (a penalised owner is no longer the owner).
    pub fn priority(&self) -> u8 {
        if self.penalty == 0 {
            self.base_priority()
        } else {
            self.base_priority()
                .saturating_sub(self.penalty)
                .clamp(1, 254)
        }
    }

    /// The priority before tracking penalties: the runtime priority if one is set, else the
    /// configured one.
    pub fn base_priority(&self) -> u8 {
        self.runtime_priority.unwrap_or(self.config.priority)
    }

    /// The priority set at run time in place of the configured one, if any.
    pub fn runtime_priority(&self) -> Option<u8> {
        self.runtime_priority
    }

    /// The current master's address and priority, if known.
    pub fn master(&self) -> Option<(Ipv4Addr, u8)> {
        self.master
    }

    /// Master_Adver_Interval: ours as master, the learnt one as backup.
    pub fn master_advert_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// Skew_Time = ((256 − Priority) × Master_Adver_Interval) / 256 (RFC 5798 §6.1).
    pub fn skew_time(&self) -> Duration {
        self.master_adver_interval * (256 - u32::from(self.priority())) / 256
    }

    /// Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time (RFC 5798 §6.1).
    pub fn master_down_interval(&self) -> Duration {
        self.master_adver_interval * 3 + self.skew_time()
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Recent transitions, oldest first.
    pub fn transitions(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// Whether this instance is in Fault because of its own tracked objects.
    pub fn own_fault(&self) -> bool {
        self.own_fault
    }

    /// Whether preempting a lower-priority master is allowed now.
    pub fn preempt_allowed(&self) -> bool {
        self.preempt_allowed
    }

    /// Opens or closes the preemption gate. While closed, a backup follows a lower-priority
    /// master that is advertising as if preemption were off; a master that goes silent is
    /// still taken over at once. Closing it cancels a pending delayed preemption; after
    /// opening, the next advert of the lower master is preempted as usual.
    pub fn set_preempt_allowed(&mut self, allowed: bool) {
        self.preempt_allowed = allowed;
        if !allowed {
            self.preempt_timer = None;
        }
    }

    /// The next action to perform.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When `handle_timeout` must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.adver_timer,
            self.master_down_timer,
            self.preempt_timer,
            self.garp_timer,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The advert we would send now with `priority`.
    pub fn advert(&self, priority: u8) -> VrrpRepr {
        VrrpRepr {
            vrid: self.config.vrid,
            priority,
            max_advert_interval_cs: self.config.advert_interval_cs(),
            addresses: self.config.addresses.iter().map(|a| a.address).collect(),
        }
    }

    /// Startup event (RFC 5798 §6.4.1).
    pub fn startup(&mut self, now: Instant) {
        if self.state != State::Initialize {
            return;
        }
        if self.faulty() {
            self.enter_fault(now, Reason::Fault);
        } else if self.base_priority() == PRIORITY_OWNER && self.penalty == 0 {
            self.enter_master(now, Reason::OwnerStartup);
        } else {
            self.master_adver_interval = cs_duration(self.config.advert_interval_cs());
            self.enter_backup(now, Reason::Startup);
        }
    }

    /// Shutdown event: a master sends priority 0 and withdraws its addresses (§6.4.3).
    pub fn shutdown(&mut self, now: Instant) {
        match self.state {
            State::Initialize => {}
            State::Master => {
                self.send_advert(PRIORITY_STOP);
                self.transition(now, State::Initialize, Reason::Shutdown);
                self.actions.push_back(Action::RemoveAddresses);
            }
            State::Backup | State::Fault => {
                self.transition(now, State::Initialize, Reason::Shutdown);
            }
        }
        self.clear_timers();
    }

    /// An advert arrived for this instance's link.
    ///
    /// # Errors
    /// The reason it was ignored (also counted).
    pub fn handle_advert(&mut self, now: Instant, adv: &ReceivedAdvert) -> Result<(), DropReason> {
        let r = self.judge(adv);
        if let Err(reason) = r {
            self.count_drop(reason);
            return r;
        }
        if adv.repr.priority == PRIORITY_STOP {
            self.counters.priority_zero_rx += 1;
            if self.state == State::Backup && self.master.map(|(a, _)| a) != Some(adv.src) {
                // Only the master we follow can resign; anyone else's priority 0 would make
                // us take over after the skew time alone (RFC 5798 has no authentication).
                self.count_drop(DropReason::PriorityZeroNotMaster);
                return Err(DropReason::PriorityZeroNotMaster);
            }
        }
        let ours = self.config.addresses.iter().map(|a| a.address);
        if !ours.eq(adv.repr.addresses.iter().copied()) {
            self.counters.address_mismatch += 1;
        }
        let prio = adv.repr.priority;
        let local = self.priority();
        let mut interval = cs_duration(adv.repr.max_advert_interval_cs);
        let ceiling = self.config.learnt_interval_ceiling();
        if interval > ceiling && prio != PRIORITY_STOP {
            self.counters.interval_capped += 1;
            interval = ceiling;
        }
        match self.state {
            State::Backup if prio == PRIORITY_STOP => {
                self.counters.adverts_rx += 1;
                self.master = None;
                self.last_master_advert = None;
                self.resign_seen = true;
                self.preempt_timer = None;
                self.master_down_timer = Some(now + self.skew_time().max(MIN_TIMER));
            }
            State::Backup if !self.config.preempt || !self.preempt_allowed || prio >= local => {
                self.counters.adverts_rx += 1;
                self.accept_master(now, adv.src, prio, interval);
                self.preempt_timer = None;
            }
            State::Backup => {
                if self.config.preempt_delay.is_zero() {
                    self.count_drop(DropReason::LowerPriority);
                    return Err(DropReason::LowerPriority);
                }
                // Delayed preemption: follow the lower master until the delay is over, so a
                // node that just booted does not take over before its services are ready.
                self.counters.adverts_rx += 1;
                self.accept_master(now, adv.src, prio, interval);
                self.preempt_timer
                    .get_or_insert(now + self.config.preempt_delay);
            }
            State::Master if prio == PRIORITY_STOP => {
                // Another master resigned: assert ourselves at once (§6.4.3), rate-limited
                // like any re-assertion, since anyone can send priority 0.
                self.counters.adverts_rx += 1;
                if self.may_reassert(now) {
                    self.send_advert(local);
                    self.adver_timer = Some(now + self.adver_interval());
                }
            }
            State::Master
                if prio > local || (prio == local && adv.src > self.config.primary_address) =>
            {
                self.counters.adverts_rx += 1;
                self.master_adver_interval = interval;
                self.enter_backup(
                    now,
                    Reason::HigherPriority {
                        from: adv.src,
                        priority: prio,
                    },
                );
                self.accept_master(now, adv.src, prio, interval);
            }
            State::Master => {
                // Another router believes it is master (it started at the same time, or a
                // split brain healed). RFC 5798 says discard; like keepalived we also assert
                // ourselves at once, advert and gratuitous ARP, so the other side yields now
                // and the clients that followed its ARP come back.
                // At most once per `reassert_interval`: a flood of spoofed lower-priority
                // adverts must not turn into a flood of adverts and ARP from us.
                self.count_drop(DropReason::LowerPriority);
                if self.may_reassert(now) {
                    self.send_advert(local);
                    self.actions.push_back(Action::ReassertArp);
                    self.adver_timer = Some(now + self.adver_interval());
                }
                return Err(DropReason::LowerPriority);
            }
            // judge() already turned these away.
            State::Initialize | State::Fault => return Err(DropReason::NotListening),
        }
        Ok(())
    }

    /// A deadline passed: advert timer, master-down timer, preempt delay or ARP repeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        match self.state {
            State::Master => {
                if due(self.garp_timer) {
                    self.garp_timer = None;
                    self.actions.push_back(Action::GratuitousArp);
                }
                if due(self.adver_timer) {
                    self.send_advert(self.priority());
                    self.adver_timer = Some(now + self.adver_interval());
                }
            }
            State::Backup => {
                if due(self.preempt_timer) {
                    self.enter_master(now, Reason::Preempt);
                } else if due(self.master_down_timer) {
                    if self.hold_backup {
                        // A sync-group sibling still hears its master: moving alone would
                        // split the group across two routers.
                        self.counters.held_by_group += 1;
                        self.master_down_timer = Some(now + self.master_down_interval());
                    } else if self.resign_seen {
                        self.enter_master(now, Reason::MasterResigned);
                    } else {
                        self.enter_master(now, Reason::MasterDown);
                    }
                }
            }
            State::Initialize | State::Fault => {}
        }
    }

    /// Sets the fault flag from tracked interfaces and services (weight 0 = fault).
    pub fn set_fault(&mut self, now: Instant, fault: bool) {
        self.own_fault = fault;
        self.apply_fault(now);
    }

    /// Sets the fault imposed by the sync group (another member is faulty).
    pub fn set_group_fault(&mut self, now: Instant, fault: bool) {
        self.group_fault = fault;
        self.apply_fault(now);
    }

    /// Lowers the advertised priority by `penalty` (sum of failed tracked weights).
    pub fn set_priority_penalty(&mut self, now: Instant, penalty: u8) {
        if penalty == self.penalty {
            return;
        }
        self.penalty = penalty;
        if self.state == State::Master {
            // Tell the backups now rather than at the next interval, so a preempting backup
            // starts counting down at once.
            self.send_advert(self.priority());
            self.adver_timer = Some(now + self.adver_interval());
        }
    }

    /// Replaces the configured priority at run time (an operator's command; nothing is
    /// persisted) until [`reconfigure`](Self::reconfigure) brings a different configured
    /// priority. Setting the configured priority itself clears the runtime one. It applies at
    /// once as a changed priority does in a reload: a master announces it (so a better backup
    /// with preemption takes over), a backup re-arms its Master_Down_Timer for its new skew
    /// time and preempts a now lower master at that master's next advert. No transition
    /// happens here.
    ///
    /// # Errors
    /// `priority` outside 1..=254 (0 is the resignation, 255 the address owner's); nothing was
    /// changed.
    pub fn set_runtime_priority(
        &mut self,
        now: Instant,
        priority: u8,
    ) -> Result<(), ReconfigureError> {
        if !(1..=254).contains(&priority) {
            return Err(ReconfigureError::RuntimePriority(priority));
        }
        let before = self.priority();
        self.runtime_priority = Some(priority).filter(|p| *p != self.config.priority);
        if self.priority() != before {
            self.priority_changed(now);
        }
        Ok(())
    }

    /// The advertised priority changed outside the protocol (an operator): a master tells the
    /// backups at once, a backup re-arms its Master_Down_Timer for the new skew time.
    fn priority_changed(&mut self, now: Instant) {
        match self.state {
            State::Master => {
                self.master = Some((self.config.primary_address, self.priority()));
                self.send_advert(self.priority());
                self.adver_timer = Some(now + self.adver_interval());
            }
            State::Backup => {
                if let Some(heard) = self.last_master_advert {
                    self.master_down_timer =
                        Some((heard + self.master_down_interval()).max(now + MIN_TIMER));
                }
            }
            State::Initialize | State::Fault => {}
        }
    }

    /// Whether [`reconfigure`](Self::reconfigure) would take `config`.
    ///
    /// # Errors
    /// A changed VRID or primary address: the instance must restart.
    pub fn check_reconfigure(&self, config: &InstanceConfig) -> Result<(), ReconfigureError> {
        if config.vrid != self.config.vrid {
            return Err(ReconfigureError::VridChanged {
                old: self.config.vrid,
                new: config.vrid,
            });
        }
        if config.primary_address != self.config.primary_address {
            return Err(ReconfigureError::PrimaryAddressChanged {
                old: self.config.primary_address,
                new: config.primary_address,
            });
        }
        Ok(())
    }

    /// Applies a changed configuration without leaving the current state (a live reload).
    ///
    /// Priority, preemption, advert interval, addresses and the gratuitous ARP repeat may
    /// change. A master announces a changed priority, interval or address list at once and
    /// keeps the addresses that stay; it gives way only as RFC 5798 has it, when a backup
    /// with preemption (or a higher-priority master) takes over. A backup re-arms its
    /// Master_Down_Timer for its new skew time. No transition happens here. A changed
    /// configured priority replaces a runtime priority; an unchanged one keeps it.
    ///
    /// # Errors
    /// A changed VRID or primary address (the instance must restart); nothing was changed.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        config: InstanceConfig,
    ) -> Result<(), ReconfigureError> {
        self.check_reconfigure(&config)?;
        let before = self.priority();
        let old = std::mem::replace(&mut self.config, config);
        if old.priority != self.config.priority {
            self.runtime_priority = None;
        }
        if !self.config.preempt || self.config.preempt_delay != old.preempt_delay {
            // A pending delayed preemption was armed under the old rules; the next advert
            // from the lower master arms it again if it still applies.
            self.preempt_timer = None;
        }
        let announce = before != self.priority()
            || old.advert_interval_cs() != self.config.advert_interval_cs()
            || old.addresses != self.config.addresses;
        match self.state {
            State::Master => {
                let dropped: Vec<VirtualAddress> = old
                    .addresses
                    .iter()
                    .filter(|a| !self.config.addresses.contains(a))
                    .copied()
                    .collect();
                if !dropped.is_empty() {
                    self.actions.push_back(Action::WithdrawAddresses(dropped));
                }
                let added = self
                    .config
                    .addresses
                    .iter()
                    .any(|a| !old.addresses.contains(a));
                if added {
                    self.actions.push_back(Action::AddAddresses);
                }
                self.master = Some((self.config.primary_address, self.priority()));
                self.master_adver_interval = self.adver_interval();
                if announce {
                    self.send_advert(self.priority());
                    self.adver_timer = Some(now + self.adver_interval());
                }
                if added {
                    self.actions.push_back(Action::GratuitousArp);
                }
                if self.config.garp_repeat_delay.is_none() {
                    self.garp_timer = None;
                }
            }
            State::Backup => {
                // The skew time depends on our priority.
                if let Some(heard) = self.last_master_advert {
                    self.master_down_timer =
                        Some((heard + self.master_down_interval()).max(now + MIN_TIMER));
                }
            }
            State::Initialize | State::Fault => {}
        }
        Ok(())
    }

    /// Set by the sync group: while true, an expiring Master_Down_Timer re-arms instead of
    /// taking over.
    pub fn set_hold_backup(&mut self, hold: bool) {
        self.hold_backup = hold;
    }

    /// Whether this backup heard a live master within one Master_Down_Interval.
    pub fn hears_master(&self, now: Instant) -> bool {
        self.state == State::Backup
            && self.master.is_some_and(|(_, p)| p != PRIORITY_STOP)
            && self
                .last_master_advert
                .is_some_and(|t| now < t + self.master_down_interval())
    }

    /// Moves to Master or Backup because a sync-group sibling did.
    pub fn force(&mut self, now: Instant, to: State) {
        match (self.state, to) {
            (State::Backup, State::Master) => self.enter_master(now, Reason::SyncGroup),
            (State::Master, State::Backup) => {
                // Resign so the peer on this link takes over after its skew time, as the
                // sibling's peer did on its link.
                self.send_advert(PRIORITY_STOP);
                self.enter_backup(now, Reason::SyncGroup);
            }
            _ => {}
        }
    }

    /// The transition the last input caused, if any (read by the sync group).
    pub fn take_last_transition(&mut self) -> Option<Transition> {
        self.last_transition.take()
    }

    fn judge(&self, adv: &ReceivedAdvert) -> Result<(), DropReason> {
        if adv.ttl != wire::TTL {
            return Err(DropReason::BadTtl);
        }
        if adv.repr.vrid != self.config.vrid {
            return Err(DropReason::OtherVrid);
        }
        if adv.src == self.config.primary_address {
            return Err(DropReason::OwnAdvert);
        }
        if adv.repr.max_advert_interval_cs == 0 {
            return Err(DropReason::ZeroInterval);
        }
        if matches!(self.state, State::Initialize | State::Fault) {
            return Err(DropReason::NotListening);
        }
        Ok(())
    }

    /// Whether a re-assertion may go out now; records it (or the suppression).
    fn may_reassert(&mut self, now: Instant) -> bool {
        let allowed = self
            .last_reassert
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.reassert_interval);
        if allowed {
            self.last_reassert = Some(now);
            self.counters.reassert_tx += 1;
        } else {
            self.counters.reassert_suppressed += 1;
        }
        allowed
    }

    /// When the last re-assertion went out (read by the fuzz harness's rate check).
    pub fn last_reassert(&self) -> Option<Instant> {
        self.last_reassert
    }

    fn count_drop(&mut self, reason: DropReason) {
        self.counters.drops.count(reason);
    }

    fn accept_master(&mut self, now: Instant, src: Ipv4Addr, prio: u8, interval: Duration) {
        self.master = Some((src, prio));
        self.resign_seen = false;
        self.last_master_advert = Some(now);
        self.master_adver_interval = interval;
        self.master_down_timer = Some(now + self.master_down_interval());
    }

    fn faulty(&self) -> bool {
        self.own_fault || self.group_fault
    }

    fn apply_fault(&mut self, now: Instant) {
        match (self.state, self.faulty()) {
            (State::Master, true) => {
                // Resign so the backup takes over after its skew time.
                self.send_advert(PRIORITY_STOP);
                self.enter_fault(now, Reason::Fault);
            }
            (State::Backup, true) => self.enter_fault(now, Reason::Fault),
            (State::Fault, false) => {
                self.master_adver_interval = cs_duration(self.config.advert_interval_cs());
                self.enter_backup(now, Reason::FaultCleared);
            }
            _ => {}
        }
    }

    fn adver_interval(&self) -> Duration {
        cs_duration(self.config.advert_interval_cs())
    }

    fn send_advert(&mut self, priority: u8) {
        self.counters.adverts_tx += 1;
        if priority == PRIORITY_STOP {
            self.counters.priority_zero_tx += 1;
        }
        self.actions
            .push_back(Action::SendAdvert(self.advert(priority)));
    }

    fn clear_timers(&mut self) {
        self.adver_timer = None;
        self.master_down_timer = None;
        self.preempt_timer = None;
        self.garp_timer = None;
    }

    fn enter_master(&mut self, now: Instant, reason: Reason) {
        self.transition(now, State::Master, reason);
        self.clear_timers();
        self.master = Some((self.config.primary_address, self.priority()));
        self.last_master_advert = None;
        self.master_adver_interval = self.adver_interval();
        self.actions.push_back(Action::AddAddresses);
        self.send_advert(self.priority());
        self.actions.push_back(Action::GratuitousArp);
        self.adver_timer = Some(now + self.adver_interval());
        self.garp_timer = self
            .config
            .garp_repeat_delay
            .map(|d| now + d.max(MIN_TIMER));
    }

    fn enter_backup(&mut self, now: Instant, reason: Reason) {
        self.transition(now, State::Backup, reason);
        self.clear_timers();
        self.resign_seen = false;
        self.master = None;
        self.last_master_advert = None;
        self.actions.push_back(Action::RemoveAddresses);
        self.master_down_timer = Some(now + self.master_down_interval());
    }

    fn enter_fault(&mut self, now: Instant, reason: Reason) {
        self.transition(now, State::Fault, reason);
        self.clear_timers();
        self.master = None;
        self.last_master_advert = None;
        self.actions.push_back(Action::RemoveAddresses);
    }

    fn transition(&mut self, now: Instant, to: State, reason: Reason) {
        let t = Transition {
            at: now,
            from: self.state,
            to,
            reason,
        };
        self.state = to;
        if self.history.len() == TRANSITION_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(t);
        self.last_transition = Some(t);
        self.actions.push_back(Action::Transition(t));
    }
}

/// Timers are never armed for "now": a zero skew (priority 255 seen by a backup) still
/// leaves the deadline in the future, so the driver always sleeps before acting.
const MIN_TIMER: Duration = Duration::from_millis(1);

fn cs_duration(cs: u16) -> Duration {
    Duration::from_millis(u64::from(cs.max(1)) * 10)
}

#[cfg(test)]
mod tests;
