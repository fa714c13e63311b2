//! The tokio driver: runs one [`SyncGroup`] (a standalone instance is a group of one).
//!
//! Per member it owns a raw IP protocol 112 socket bound to the interface (read by a small
//! blocking thread, so no `AsyncFd` is needed), an AF_PACKET socket for gratuitous ARP, and
//! shares one rtnetlink connection for addresses and link state. It performs the core's
//! [`Action`]s in order, sleeps until the core's next deadline, polls link state every
//! 100 ms for tracked interfaces, and follows service health through `watch` channels.
//!
//! Its long-lived tasks (the group's loop, the netlink connection, one socket reader per
//! member on the blocking pool) run under a [`TaskWatch`]: one that ends before
//! [`VrrpDriver::stop`] is reported by [`VrrpDriver::dead_task`].
//!
//! The driver makes no protocol decisions: tracking, and which reloads apply live, are the
//! [`SyncGroup`]'s. Everything it does to the system goes through the `VrrpIo` seam.
//!
//! Notify scripts (keepalived's `notify`, `notify_master`, ... with its arguments; see
//! [`NotifyScripts`]) run one transition at a time per instance, and per sync group for the
//! group's own scripts: while one runs, only the latest pending transition is kept and run
//! after it (latest state wins; the ones replaced are counted as skipped). A sync group
//! reports a state once all its members are in it.
//!
//! ```text
//!  reader thread(s) ──bytes──┐
//!  link poll (100 ms) ───────┤
//!  process scan (1 s) ───────┤
//!  service health watch ─────┼──> select! ──> SyncGroup ──> actions: socket / netlink / ARP
//!  deadline (sleep_until) ───┤                                        / notify / AddressHook
//!  stop() ───────────────────┘
//! ```

mod io;
mod netlink;
mod notify;
mod procscan;
mod sys;

pub use notify::{NOTIFY_PATH, NotifyScripts, ScriptCommand};
pub use procscan::MAX_CMDLINE;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netutil::task::TaskWatch;
use netutil::{DropCounters, Reconfigured};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{DriverError, WireError};
use crate::instance::{
    Action, Counters, DropReason, InstanceConfig, ReceivedAdvert, State, VirtualAddress,
    VrrpInstance,
};
use crate::sync_group::{Binding, MemberId, ObjectId, SyncGroup};
use crate::track::Tracker;
use crate::wire;
use io::{MemberIo, NetIo, VrrpIo};
use notify::{NotifyEvent, NotifyOutcome, NotifyScope, NotifyState};

/// Makes a virtual address live without adding it to an interface; natgw implements it for a
/// VIP its services own (route into its TUN plus a proxy neighbour entry).
pub trait AddressHook: Send + Sync {
    /// This router became master: make `vip` live.
    fn activate(&self, vip: VirtualAddress);
    /// This router stopped being master: withdraw `vip`.
    fn deactivate(&self, vip: VirtualAddress);
}

/// A service whose health lowers the priority (or faults the instance when `weight` is 0).
#[derive(Debug, Clone)]
pub struct TrackedService {
    /// Service name.
    pub name: String,
    /// Priority penalty while unhealthy; 0 = fault.
    pub weight: u8,
    /// `true` while the service has a healthy backend.
    pub health: watch::Receiver<bool>,
}

/// A check run every `interval` (keepalived `vrrp_script` + `track_script`): exit 0 is a
/// success, anything else or running past `timeout` a failure; `fall` failures in a row make
/// it down, `rise` successes in a row up again ([`crate::RiseFall`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackScript {
    /// The program and its arguments.
    pub command: ScriptCommand,
    /// Time between the starts of two runs.
    pub interval: Duration,
    /// A run still going after this is killed and counts as a failure.
    pub timeout: Duration,
    /// Successes in a row to come back up.
    pub rise: u32,
    /// Failures in a row to go down.
    pub fall: u32,
    /// Priority penalty while down; 0 = fault.
    pub weight: u8,
}

impl TrackScript {
    /// The tracked object's name: the command itself, so a changed command is a different
    /// object (and a reload restarts the instance for it).
    fn object_name(&self) -> String {
        format!("script {}", self.command)
    }
}

/// Processes tracked by name (keepalived `vrrp_track_process` + `track_process`): up while
/// `quorum..=quorum_max` of them run, as a `/proc` scan every [`PROCESS_SCAN_INTERVAL`]
/// finds them; a lost quorum counts once it has lasted `delay` ([`crate::ProcessQuorum`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackProcess {
    /// The process name as `/proc/PID/comm` has it (at most 15 bytes).
    pub name: String,
    /// When set, only processes whose arguments (`/proc/PID/cmdline` after the program)
    /// match these under `param_match` count; `Some(vec![])` with `Exact` = no arguments.
    pub parameters: Option<Vec<String>>,
    /// How `parameters` are compared.
    pub param_match: crate::ParamMatch,
    /// Fewest processes for the instance to be healthy (at least 1).
    pub quorum: u32,
    /// Most processes for the instance to be healthy.
    pub quorum_max: u32,
    /// How long the quorum must be lost before it counts.
    pub delay: Duration,
    /// Priority penalty while down; 0 = fault.
    pub weight: u8,
}

impl TrackProcess {
    /// The tracked object's name.
    fn object_name(&self) -> String {
        match &self.parameters {
            None => format!("process {}", self.name),
            Some(params) => {
                let rule = match self.param_match {
                    crate::ParamMatch::Exact => "",
                    crate::ParamMatch::Initial => " ...",
                    crate::ParamMatch::Partial => "...",
                };
                format!("process {} [{}{rule}]", self.name, params.join(" "))
            }
        }
    }
}

/// Time spent in BACKUP, MASTER and FAULT (INIT is not counted), the current stay included
/// when asked.
#[derive(Debug, Clone, Default)]
struct StateClock {
    spent: [Duration; 3],
    current: Option<(usize, Instant)>,
}

impl StateClock {
    fn slot(state: State) -> Option<usize> {
        match state {
            State::Backup => Some(0),
            State::Master => Some(1),
            State::Fault => Some(2),
            State::Initialize => None,
        }
    }

    /// The instance entered `state` at `at`.
    fn enter(&mut self, state: State, at: Instant) {
        if let Some((slot, since)) = self.current.take() {
            self.spent[slot] += at.saturating_duration_since(since);
        }
        self.current = Self::slot(state).map(|slot| (slot, at));
    }

    /// Time spent in `state` up to `at`.
    fn spent(&self, state: State, at: Instant) -> Duration {
        let Some(slot) = Self::slot(state) else {
            return Duration::ZERO;
        };
        let ongoing = match self.current {
            Some((current, since)) if current == slot => at.saturating_duration_since(since),
            _ => Duration::ZERO,
        };
        self.spent[slot] + ongoing
    }
}

/// Time between two `/proc` scans for tracked processes.
pub const PROCESS_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Everything one instance needs besides the core config.
#[derive(Clone)]
pub struct MemberSpec {
    /// Core config; an unspecified `primary_address` is read from the interface.
    pub config: InstanceConfig,
    /// Interface the adverts and addresses live on.
    pub interface: String,
    /// Send adverts to these addresses instead of 224.0.0.18, and accept only theirs.
    pub unicast_peers: Vec<Ipv4Addr>,
    /// Multicast instances: accept adverts only from these sources (empty = any). Adverts
    /// from other sources are dropped and counted as `unknown_peer`, as with unicast peers.
    pub peers: Vec<Ipv4Addr>,
    /// Interfaces whose loss of link faults the instance (weight 0) or lowers its priority.
    /// The instance's own interface is always tracked with weight 0, as keepalived does.
    pub track_interfaces: Vec<(String, u8)>,
    /// Services whose health is tracked.
    pub track_services: Vec<TrackedService>,
    /// Scripts run again and again whose result is tracked (keepalived `track_script`).
    pub track_scripts: Vec<TrackScript>,
    /// Processes whose number running is tracked (keepalived `track_process`).
    pub track_processes: Vec<TrackProcess>,
    /// Scripts run on this instance's transitions (keepalived's notify family).
    pub notify: NotifyScripts,
    /// A notify script still running after this is killed (default 30 s).
    pub notify_timeout: Duration,
    /// Gratuitous ARPs per burst (keepalived `garp_master_repeat`, default 5).
    pub garp_count: u32,
    /// Gratuitous ARPs per VIP in a re-assertion against a lower-priority master
    /// (keepalived `garp_lower_prio_repeat`, default 5 like `garp_count`; 0 = advert only).
    pub garp_lower_prio_repeat: u32,
    /// VIPs made live through this hook instead of as interface addresses.
    pub hooked: Vec<(Ipv4Addr, Arc<dyn AddressHook>)>,
    /// Preemption of a lower-priority master is allowed only while this is `true` (flow
    /// sync holds it `false` until it pulled the master's flows); `None` = never gated.
    pub preempt_gate: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for MemberSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberSpec")
            .field("config", &self.config)
            .field("interface", &self.interface)
            .field("unicast_peers", &self.unicast_peers)
            .field("track_interfaces", &self.track_interfaces)
            .field("notify", &self.notify)
            .field("notify_timeout", &self.notify_timeout)
            .field("peers", &self.peers)
            .field("garp_count", &self.garp_count)
            .field("garp_lower_prio_repeat", &self.garp_lower_prio_repeat)
            .field(
                "preempt_gate",
                &self.preempt_gate.as_ref().map(|g| *g.borrow()),
            )
            .field(
                "hooked",
                &self.hooked.iter().map(|h| h.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl MemberSpec {
    /// A spec with defaults: multicast, own interface tracked, 5 gratuitous ARPs, no hooks.
    pub fn new(config: InstanceConfig, interface: &str) -> Self {
        Self {
            config,
            interface: interface.to_owned(),
            unicast_peers: Vec::new(),
            peers: Vec::new(),
            track_interfaces: Vec::new(),
            track_services: Vec::new(),
            track_scripts: Vec::new(),
            track_processes: Vec::new(),
            notify: NotifyScripts::default(),
            notify_timeout: Duration::from_secs(30),
            garp_count: 5,
            garp_lower_prio_repeat: 5,
            hooked: Vec::new(),
            preempt_gate: None,
        }
    }
}

/// A snapshot of one instance for `show vrrp`; with the `serde` feature its serialisation
/// is `show vrrp --json` (durations as `…_ms`, monotonic counts under `counters`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VrrpStatus {
    /// Instance name.
    pub name: String,
    /// Sync group name, if any.
    pub group: Option<String>,
    /// Interface.
    pub interface: String,
    /// VRID.
    pub vrid: u8,
    /// Current state.
    pub state: State,
    /// Advertised priority (after tracking penalties).
    pub priority: u8,
    /// Configured priority (the file's).
    pub configured_priority: u8,
    /// The priority set at run time in place of the configured one (`vipgate vrrp
    /// set-priority`), if any; a status from an older daemon has none.
    #[cfg_attr(feature = "serde", serde(default))]
    pub runtime_priority: Option<u8>,
    /// Our primary address.
    pub primary_address: Ipv4Addr,
    /// Current master, if known.
    pub master: Option<Ipv4Addr>,
    /// The current master's priority, if known.
    pub master_priority: Option<u8>,
    /// Our advert interval.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "advert_interval_ms", with = "netutil::serde_ms")
    )]
    pub advert_interval: Duration,
    /// Master_Adver_Interval (learnt from the master while backup).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "master_advert_interval_ms", with = "netutil::serde_ms")
    )]
    pub master_advert_interval: Duration,
    /// Master_Down_Interval with the current interval and priority.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "master_down_interval_ms", with = "netutil::serde_ms")
    )]
    pub master_down_interval: Duration,
    /// Virtual addresses.
    pub addresses: Vec<VirtualAddress>,
    /// Counters.
    pub counters: VrrpCounters,
    /// Recent transitions, oldest first (at most [`crate::instance::TRANSITION_HISTORY`]).
    pub transitions: Vec<TransitionRecord>,
    /// Tracked objects.
    pub tracked: Vec<TrackedStatus>,
    /// The preemption gate: `None` when not gated, `Some(false)` while preemption waits for
    /// flow sync, `Some(true)` once sync is ready.
    pub preempt_gate: Option<bool>,
}

/// The counters of one instance: the state machine's and the driver's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VrrpCounters {
    /// State-machine counters.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub instance: Counters,
    /// Packets that did not parse, by parse error.
    pub malformed: DropCounters<WireError>,
    /// Adverts from addresses that are not unicast peers.
    pub unknown_peer: u64,
    /// Send or netlink failures.
    pub io_errors: u64,
    /// State transitions since the instance started.
    pub transitions: u64,
    /// Time spent as master since the instance started (updated whenever the instance acts,
    /// at least every advert interval while master).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "master_ms", with = "netutil::serde_ms")
    )]
    pub master_time: Duration,
    /// Time spent as backup since the instance started.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "backup_ms", with = "netutil::serde_ms")
    )]
    pub backup_time: Duration,
    /// Time spent in fault since the instance started.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "fault_ms", with = "netutil::serde_ms")
    )]
    pub fault_time: Duration,
    /// How many times the instance became master.
    pub became_master: u64,
    /// Notify runs.
    pub notify: NotifyCounters,
}

/// One remembered transition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TransitionRecord {
    /// Wall-clock time, unix milliseconds.
    pub at_unix_ms: u64,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Why.
    pub reason: String,
}

/// A tracked object and its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TrackedStatus {
    /// What is tracked (`interface eth1`, `service web`).
    pub name: String,
    /// Priority penalty while down; 0 means fault.
    pub weight: u8,
    /// Whether it is up.
    pub up: bool,
    /// A tracked process: how many run (as of the last scan).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub running: Option<u32>,
    /// A tracked process: the fewest that must run.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub quorum: Option<u32>,
    /// A tracked process: the most that may run.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub quorum_max: Option<u32>,
}

/// What the notify runs of one instance did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NotifyCounters {
    /// Programs started.
    pub runs: u64,
    /// Runs killed after `notify_timeout`.
    pub timeouts: u64,
    /// Transitions never notified because a later one replaced them while a run was going.
    pub skipped: u64,
    /// Programs that could not be started or exited unsuccessfully.
    pub failed: u64,
}

/// A sync group's own settings (keepalived's `vrrp_sync_group` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// Group name, as the members' `group`.
    pub name: String,
    /// Scripts run when the whole group changes state (`GROUP NAME STATE 0`).
    pub notify: NotifyScripts,
    /// A group notify script still running after this is killed.
    pub notify_timeout: Duration,
}

impl GroupSpec {
    /// A group without scripts.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            notify: NotifyScripts::default(),
            notify_timeout: Duration::from_secs(30),
        }
    }
}

/// How long `stop` waits for the last notify runs (STOP) before leaving them to be killed.
const STOP_NOTIFY_GRACE: Duration = Duration::from_secs(5);

enum Command {
    Stop(oneshot::Sender<()>),
    Reconfigure(MemberId, Box<MemberSpec>, oneshot::Sender<Reconfigured>),
    SetPriority(MemberId, u8),
}

enum Event {
    Packet(usize, Vec<u8>),
    Service {
        member: MemberId,
        object: ObjectId,
        up: bool,
    },
    /// A scan's verdict on member `member`'s tracked process `index` (its object in the
    /// tracker is `object`).
    Process {
        member: MemberId,
        index: usize,
        object: ObjectId,
        running: u32,
        up: bool,
    },
    NotifyDone {
        target: NotifyTarget,
        outcomes: Vec<NotifyOutcome>,
    },
    PreemptGate {
        member: MemberId,
        open: bool,
    },
}

/// Whose scripts a notify run is: a member's or the sync group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotifyTarget {
    Member(usize),
    Group,
}

/// One instance's (or group's) notify runs: at most one transition's scripts running, at
/// most one transition pending.
#[derive(Debug, Default)]
struct NotifyQueue {
    running: bool,
    pending: Option<NotifyEvent>,
    counters: NotifyCounters,
}

/// A running sync group (a standalone instance is a group of one); dropping it without
/// [`VrrpDriver::stop`] aborts without cleanup.
#[derive(Debug)]
pub struct VrrpDriver {
    status: Arc<Mutex<Vec<VrrpStatus>>>,
    /// Each member's state, in member order.
    states: Vec<watch::Receiver<State>>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    watch: TaskWatch,
}

impl VrrpDriver {
    /// The current status of every member.
    pub fn status(&self) -> Vec<VrrpStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Member `member`'s state (its index in the specs given to [`start`](Self::start)),
    /// changed at each transition before the member's addresses are added or removed: what
    /// a part that follows mastership (flow sync) waits on. `None`: no such member.
    pub fn state_watch(&self, member: usize) -> Option<watch::Receiver<State>> {
        self.states.get(member).cloned()
    }

    /// Applies a changed spec to member `member` (its index in the specs given to
    /// [`start`](Self::start)) without leaving its state (a live reload): priority,
    /// preemption, advert interval, addresses, gratuitous ARP settings, notify and tracking
    /// weights. What [`SyncGroup::check_reconfigure`] fixes (interface, peers, the names of
    /// the tracked objects, the VIPs made live through hooks, the VRID and the primary
    /// address) answers `NeedsRestart` with the reason, and the member keeps its old config.
    ///
    /// The returned future does not borrow the handle; it resolves once the group's task has
    /// answered.
    ///
    /// # Errors
    /// The driver has stopped, or has a backlog of commands.
    pub fn reconfigure(
        &self,
        member: usize,
        spec: MemberSpec,
    ) -> impl Future<Output = Result<Reconfigured, DriverError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent =
            self.commands
                .try_send(Command::Reconfigure(MemberId(member), Box::new(spec), tx));
        async move {
            sent.map_err(|_| DriverError::NotRunning)?;
            rx.await.map_err(|_| DriverError::NotRunning)
        }
    }

    /// Sets member `member`'s priority at run time in place of the configured one, until a
    /// reload changes the configured one (see [`VrrpInstance::set_runtime_priority`]); the
    /// group's task applies it at once, and [`status`](Self::status) shows it after.
    ///
    /// # Errors
    /// `priority` outside 1..=254, the driver has stopped, or has a backlog of commands.
    pub fn set_priority(&self, member: usize, priority: u8) -> Result<(), DriverError> {
        if !(1..=254).contains(&priority) {
            return Err(DriverError::Priority(priority));
        }
        self.commands
            .try_send(Command::SetPriority(MemberId(member), priority))
            .map_err(|_| DriverError::NotRunning)
    }

    /// The first of the group's long-lived tasks (loop, netlink connection, socket readers)
    /// that ended while the group should run, with its cause; `None` while all run.
    pub fn dead_task(&self) -> Option<String> {
        self.watch.dead()
    }

    /// Orderly stop: masters send priority 0 and every virtual address is withdrawn.
    pub async fn stop(self) {
        self.watch.stopping();
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// The most gratuitous ARPs per VIP in one burst, whatever a library caller configures
/// (`vipgate check` refuses more).
pub const MAX_GARP_REPEAT: u32 = 100;

/// Reads the monotonic clock: the only place the driver does.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Wall-clock milliseconds for transition times in `show vrrp`.
#[allow(clippy::disallowed_methods)]
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Member {
    spec: MemberSpec,
    primary: Ipv4Addr,
    /// The spec left `primary_address` unspecified and `primary` was read from the interface.
    primary_from_interface: bool,
    /// The tracked interfaces: entry `k` is tracked object `ObjectId(k)` (own interface
    /// first); the tracked services follow them in the member's tracker.
    interfaces: Vec<String>,
    malformed: DropCounters<WireError>,
    unknown_peer: u64,
    io_errors: u64,
    transitions: VecDeque<TransitionRecord>,
    transitions_total: u64,
    /// Time spent in each state so far.
    state_clock: StateClock,
    /// Transitions into MASTER.
    became_master: u64,
    /// Per tracked process, how many ran at the last scan.
    processes_running: Vec<u32>,
    notify: NotifyQueue,
    /// The member's state, sent at each transition (before its addresses move).
    state: watch::Sender<State>,
}

/// The tracked objects of `spec` as the core's tracker holds them, names and weights: its own
/// interface (weight 0) first, then the other tracked interfaces, then the services.
fn tracked_objects(spec: &MemberSpec) -> Vec<(String, u8)> {
    let mut objects = vec![(format!("interface {}", spec.interface), 0u8)];
    for (name, weight) in &spec.track_interfaces {
        if *name != spec.interface {
            objects.push((format!("interface {name}"), *weight));
        }
    }
    for s in &spec.track_services {
        objects.push((format!("service {}", s.name), s.weight));
    }
    for s in &spec.track_scripts {
        objects.push((s.object_name(), s.weight));
    }
    for p in &spec.track_processes {
        objects.push((p.object_name(), p.weight));
    }
    objects
}

/// The tracked interfaces of `spec`, own interface first, in tracker order.
fn tracked_interfaces(spec: &MemberSpec) -> Vec<String> {
    let mut names = vec![spec.interface.clone()];
    for (name, _) in &spec.track_interfaces {
        if *name != spec.interface {
            names.push(name.clone());
        }
    }
    names
}

fn binding(spec: &MemberSpec) -> Binding {
    Binding {
        interface: spec.interface.clone(),
        unicast_peers: spec.unicast_peers.clone(),
        peers: spec.peers.clone(),
        hooked: spec.hooked.iter().map(|h| h.0).collect(),
    }
}

impl VrrpDriver {
    /// Starts a sync group (pass one member for a standalone instance).
    ///
    /// # Errors
    /// A missing interface or primary address, or a socket that cannot be opened (needs
    /// CAP_NET_RAW), before anything was changed on the system.
    pub async fn start(
        group: Option<GroupSpec>,
        specs: Vec<MemberSpec>,
    ) -> Result<VrrpDriver, DriverError> {
        let (handle, conn) = netsys::netlink::connection().map_err(DriverError::NetlinkSocket)?;
        let watch = TaskWatch::new();
        let conn_task = watch.spawn("vrrp netlink connection", async move {
            conn.await;
            Ok::<(), std::convert::Infallible>(())
        });
        let (events_tx, events_rx) = mpsc::channel(256);
        let stop_flag = Arc::new(AtomicBool::new(false));
        let opened = open_members(&handle, specs, &events_tx, &stop_flag, &watch).await;
        let (members, cores, io) = match opened {
            Ok(v) => v,
            Err(e) => {
                // Reader threads of members opened before the failure exit on this flag.
                watch.stopping();
                stop_flag.store(true, Ordering::Relaxed);
                conn_task.abort();
                return Err(e);
            }
        };
        let status = Arc::new(Mutex::new(Vec::new()));
        let states = members.iter().map(|m| m.state.subscribe()).collect();
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let mut driver = Driver {
            group_notify: GroupNotify::new(group),
            group: SyncGroup::new(cores),
            members,
            io: NetIo {
                handle,
                members: io,
            },
            status: status.clone(),
            events_tx,
        };
        let task = watch.spawn("vrrp group loop", async move {
            driver.run(events_rx, cmd_rx).await;
            stop_flag.store(true, Ordering::Relaxed);
            conn_task.abort();
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(VrrpDriver {
            status,
            states,
            commands: cmd_tx,
            task,
            watch,
        })
    }
}

/// Opens sockets and resolves addresses for every member; nothing on the system changes.
/// The driver side, the core side and the I/O side of every member, in member order.
type OpenedMembers = (
    Vec<Member>,
    Vec<(VrrpInstance, Tracker, Binding)>,
    Vec<MemberIo>,
);

async fn open_members(
    handle: &rtnetlink::Handle,
    specs: Vec<MemberSpec>,
    events_tx: &mpsc::Sender<Event>,
    stop_flag: &Arc<AtomicBool>,
    watch: &TaskWatch,
) -> Result<OpenedMembers, DriverError> {
    let mut members = Vec::new();
    let mut cores = Vec::new();
    let mut io = Vec::new();
    for (i, mut spec) in specs.into_iter().enumerate() {
        let link = netlink::link(handle, &spec.interface).await?;
        let vips: Vec<Ipv4Addr> = spec.config.addresses.iter().map(|a| a.address).collect();
        let primary_from_interface = spec.config.primary_address.is_unspecified();
        let primary = if primary_from_interface {
            netlink::primary_address(handle, link.index, &vips)
                .await?
                .ok_or_else(|| DriverError::NoPrimaryAddress(spec.interface.clone()))?
        } else {
            spec.config.primary_address
        };
        spec.config.primary_address = primary;
        let socket = sys::vrrp_socket(&spec.interface, link.index, primary).map_err(|source| {
            DriverError::Socket {
                interface: spec.interface.clone(),
                source,
            }
        })?;
        let socket = Arc::new(socket);
        let arp = sys::ArpSocket::open(link.index).map_err(|source| DriverError::ArpSocket {
            interface: spec.interface.clone(),
            source,
        })?;
        let interfaces = tracked_interfaces(&spec);
        for (k, s) in spec.track_services.iter().enumerate() {
            let mut rx = s.health.clone();
            let tx = events_tx.clone();
            let object = ObjectId(interfaces.len() + k);
            tokio::spawn(async move {
                loop {
                    let up = *rx.borrow_and_update();
                    let ev = Event::Service {
                        member: MemberId(i),
                        object,
                        up,
                    };
                    if tx.send(ev).await.is_err() || rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        if let Some(gate) = &spec.preempt_gate {
            let mut rx = gate.clone();
            let tx = events_tx.clone();
            tokio::spawn(async move {
                loop {
                    let open = *rx.borrow_and_update();
                    let ev = Event::PreemptGate {
                        member: MemberId(i),
                        open,
                    };
                    if tx.send(ev).await.is_err() || rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let first_script = interfaces.len() + spec.track_services.len();
        for (k, script) in spec.track_scripts.iter().enumerate() {
            let object = ObjectId(first_script + k);
            tokio::spawn(run_track_script(
                script.clone(),
                MemberId(i),
                object,
                events_tx.clone(),
            ));
        }
        if !spec.track_processes.is_empty() {
            let first = first_script + spec.track_scripts.len();
            tokio::spawn(run_process_scan(
                spec.track_processes.clone(),
                MemberId(i),
                ObjectId(first),
                events_tx.clone(),
            ));
        }
        let (sock, tx, stop) = (socket.clone(), events_tx.clone(), stop_flag.clone());
        watch.spawn("vrrp socket reader", async move {
            tokio::task::spawn_blocking(move || read_adverts(i, &sock, &tx, &stop))
                .await
                .map_err(|e| e.to_string())
        });
        cores.push((
            VrrpInstance::new(spec.config.clone()),
            Tracker::new(tracked_objects(&spec)),
            binding(&spec),
        ));
        io.push(MemberIo { link, socket, arp });
        members.push(Member {
            interfaces,
            processes_running: vec![0; spec.track_processes.len()],
            spec,
            primary,
            primary_from_interface,
            malformed: DropCounters::default(),
            unknown_peer: 0,
            io_errors: 0,
            transitions: VecDeque::new(),
            transitions_total: 0,
            state_clock: StateClock::default(),
            became_master: 0,
            notify: NotifyQueue::default(),
            state: watch::Sender::new(State::Initialize),
        });
    }
    Ok((members, cores, io))
}

/// A member's socket reader, on the blocking pool: returns when the group stops (the flag,
/// or its loop is gone), which the [`TaskWatch`] judges expected or not.
fn read_adverts(
    member: usize,
    socket: &socket2::Socket,
    tx: &mpsc::Sender<Event>,
    stop: &AtomicBool,
) {
    {
        use std::io::Read;
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
            match (&*socket).read(&mut buf) {
                Ok(n) => {
                    let packet = buf.get(..n).unwrap_or_default().to_vec();
                    if tx.blocking_send(Event::Packet(member, packet)).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "VRRP socket read failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// The sync group's own notify state (none for a standalone instance).
struct GroupNotify {
    spec: Option<GroupSpec>,
    /// The state last reported for the whole group.
    reported: Option<State>,
    queue: NotifyQueue,
}

impl GroupNotify {
    fn new(spec: Option<GroupSpec>) -> Self {
        Self {
            spec,
            reported: None,
            queue: NotifyQueue::default(),
        }
    }

    fn name(&self) -> Option<String> {
        self.spec.as_ref().map(|g| g.name.clone())
    }
}

struct Driver<Io> {
    group_notify: GroupNotify,
    group: SyncGroup,
    members: Vec<Member>,
    io: Io,
    status: Arc<Mutex<Vec<VrrpStatus>>>,
    /// For the notify runs to report their end.
    events_tx: mpsc::Sender<Event>,
}

impl<Io: VrrpIo> Driver<Io> {
    async fn run(
        &mut self,
        mut events: mpsc::Receiver<Event>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        // Track links before starting so a node that boots with a dead link starts in Fault.
        self.poll_links().await;
        self.group.startup(now());
        self.perform().await;
        let mut link_poll = tokio::time::interval(Duration::from_millis(100));
        link_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.group.poll_timeout();
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    let reply = match cmd {
                        Some(Command::Reconfigure(i, spec, reply)) => {
                            let outcome = self.reconfigure(i, *spec);
                            self.perform().await;
                            let _ = reply.send(outcome);
                            continue;
                        }
                        Some(Command::SetPriority(i, priority)) => {
                            self.set_priority(i, priority);
                            self.perform().await;
                            continue;
                        }
                        Some(Command::Stop(reply)) => Some(reply),
                        None => None,
                    };
                    self.group.shutdown(now());
                    self.perform().await;
                    self.finish_notifies(&mut events).await;
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                    return;
                }
                Some(ev) = events.recv() => self.handle_event(ev),
                () = netsys::timer::sleep_until(deadline) => self.group.handle_timeout(now()),
                _ = link_poll.tick() => self.poll_links().await,
            }
            self.perform().await;
        }
    }

    /// Asks the core whether `spec` applies live and, if it does, applies it there and
    /// keeps the driver's own settings (notify, gratuitous ARP) in step.
    fn reconfigure(&mut self, member: MemberId, spec: MemberSpec) -> Reconfigured {
        let Some(m) = self.members.get_mut(member.0) else {
            return Reconfigured::restart("not a member of this group");
        };
        // The same command with other timing or thresholds: its task runs with the old ones.
        let timing = |s: &TrackScript| (s.interval, s.timeout, s.rise, s.fall);
        let retimed = m.spec.track_scripts.len() == spec.track_scripts.len()
            && m.spec
                .track_scripts
                .iter()
                .zip(&spec.track_scripts)
                .any(|(old, new)| timing(old) != timing(new));
        if m.spec.preempt_gate.is_some() != spec.preempt_gate.is_some() {
            return Reconfigured::restart("flow sync started or stopped gating preemption");
        }
        if retimed {
            return Reconfigured::restart(
                "a track script's interval, timeout, rise or fall changed",
            );
        }
        // The scan task runs with the quorum and delay it started with.
        let requorum = |p: &TrackProcess| (p.quorum, p.quorum_max, p.delay);
        if m.spec.track_processes.len() == spec.track_processes.len()
            && m.spec
                .track_processes
                .iter()
                .zip(&spec.track_processes)
                .any(|(old, new)| requorum(old) != requorum(new))
        {
            return Reconfigured::restart("a tracked process's quorum or delay changed");
        }
        let name = m.spec.config.name.clone();
        let mut config = spec.config.clone();
        // Left to the interface again: the address read at start. An address given now where
        // it was read before (or the reverse) is compared as given.
        if config.primary_address.is_unspecified() && m.primary_from_interface {
            config.primary_address = m.primary;
        }
        let outcome = self.group.reconfigure(
            now(),
            member,
            config.clone(),
            &tracked_objects(&spec),
            &binding(&spec),
        );
        if let Reconfigured::NeedsRestart(why) = &outcome {
            tracing::info!(instance = %name, reason = %why, "reconfigure needs a restart");
            return outcome;
        }
        m.spec.config = config;
        m.spec.notify = spec.notify;
        m.spec.garp_count = spec.garp_count;
        m.spec.garp_lower_prio_repeat = spec.garp_lower_prio_repeat;
        m.spec.track_interfaces = spec.track_interfaces;
        for (old, new) in m.spec.track_services.iter_mut().zip(spec.track_services) {
            old.weight = new.weight;
        }
        for (old, new) in m.spec.track_scripts.iter_mut().zip(spec.track_scripts) {
            old.weight = new.weight;
        }
        for (old, new) in m.spec.track_processes.iter_mut().zip(spec.track_processes) {
            old.weight = new.weight;
        }
        tracing::info!(instance = %name, "reconfigured live");
        outcome
    }

    /// Applies an operator's runtime priority to the core.
    fn set_priority(&mut self, member: MemberId, priority: u8) {
        let Some(core) = self.group.members().get(member.0) else {
            return;
        };
        let (name, before) = (core.config().name.clone(), core.base_priority());
        match self.group.set_runtime_priority(now(), member, priority) {
            Ok(()) => {
                tracing::info!(instance = %name, from = before, to = priority, "priority set at run time");
            }
            Err(e) => tracing::warn!(instance = %name, error = %e, "runtime priority refused"),
        }
    }

    /// Lets the notify runs of the final transitions (STOP) finish, for a bounded time.
    async fn finish_notifies(&mut self, events: &mut mpsc::Receiver<Event>) {
        let deadline = tokio::time::Instant::now() + STOP_NOTIFY_GRACE;
        while self.members.iter().any(|m| m.notify.running) || self.group_notify.queue.running {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev @ Event::NotifyDone { .. })) => self.handle_event(ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Runs the scripts for a transition now, or queues the transition behind the running
    /// one (replacing, and counting as skipped, any transition already queued).
    fn notify(&mut self, target: NotifyTarget, event: NotifyEvent) {
        let (scripts, timeout, queue) = match target {
            NotifyTarget::Member(i) => {
                let Some(m) = self.members.get_mut(i) else {
                    return;
                };
                (&m.spec.notify, m.spec.notify_timeout, &mut m.notify)
            }
            NotifyTarget::Group => {
                let g = &mut self.group_notify;
                let Some(spec) = &g.spec else {
                    return;
                };
                (&spec.notify, spec.notify_timeout, &mut g.queue)
            }
        };
        let invocations = scripts.invocations(&event);
        if invocations.is_empty() {
            return;
        }
        if queue.running {
            if queue.pending.replace(event).is_some() {
                queue.counters.skipped += 1;
            }
            return;
        }
        queue.running = true;
        queue.counters.runs += invocations.len() as u64;
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let outcomes = notify::run_all(invocations, timeout).await;
            let _ = tx.send(Event::NotifyDone { target, outcomes }).await;
        });
    }

    /// Once every member is in the same state (other than the INIT of a stop), and it is not
    /// the state last reported, the group's scripts run for it.
    fn notify_group_state(&mut self) {
        let Some(name) = self.group_notify.name() else {
            return;
        };
        let mut states = self.group.members().iter().map(VrrpInstance::state);
        let Some(first) = states.next() else {
            return;
        };
        if !states.all(|s| s == first)
            || first == State::Initialize
            || self.group_notify.reported == Some(first)
        {
            return;
        }
        self.group_notify.reported = Some(first);
        tracing::info!(group = %name, state = %first, "VRRP sync group transition");
        let event = NotifyEvent {
            scope: NotifyScope::Group,
            name,
            state: NotifyState::from_state(first),
            priority: 0,
        };
        self.notify(NotifyTarget::Group, event);
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Packet(i, bytes) => self.handle_packet(i, &bytes),
            Event::NotifyDone { target, outcomes } => {
                let queue = match target {
                    NotifyTarget::Member(i) => match self.members.get_mut(i) {
                        Some(m) => &mut m.notify,
                        None => return,
                    },
                    NotifyTarget::Group => &mut self.group_notify.queue,
                };
                queue.running = false;
                for outcome in outcomes {
                    match outcome {
                        NotifyOutcome::Ok => {}
                        NotifyOutcome::Failed => queue.counters.failed += 1,
                        NotifyOutcome::TimedOut => queue.counters.timeouts += 1,
                    }
                }
                if let Some(event) = queue.pending.take() {
                    self.notify(target, event);
                }
            }
            Event::PreemptGate { member, open } => {
                self.group.set_preempt_allowed(member, open);
                let name = &self.group.members()[member.0].config().name;
                tracing::info!(instance = %name, open, "preemption gate changed");
            }
            Event::Process {
                member,
                index,
                object,
                running,
                up,
            } => {
                if let Some(r) = self
                    .members
                    .get_mut(member.0)
                    .and_then(|m| m.processes_running.get_mut(index))
                {
                    *r = running;
                }
                self.handle_event(Event::Service { member, object, up });
            }
            Event::Service { member, object, up } => {
                if self.group.handle_tracked(now(), member, object, up) {
                    let name = &self.group.members()[member.0].config().name;
                    let tracked = &self.group.trackers()[member.0].objects()[object.0].name;
                    tracing::info!(instance = %name, object = %tracked, up, "tracked object changed");
                }
            }
        }
    }

    fn handle_packet(&mut self, i: usize, bytes: &[u8]) {
        let m = &mut self.members[i];
        let (env, repr) = match wire::parse_ipv4(bytes) {
            Ok(v) => v,
            Err(e) => {
                m.malformed.count(e);
                tracing::debug!(instance = %m.spec.config.name, reason = %e, "malformed advert dropped");
                return;
            }
        };
        let allowed = if m.spec.unicast_peers.is_empty() {
            &m.spec.peers
        } else {
            &m.spec.unicast_peers
        };
        if !allowed.is_empty() && !allowed.contains(&env.src) {
            m.unknown_peer += 1;
            tracing::debug!(instance = %m.spec.config.name, src = %env.src, "advert from an unknown peer dropped");
            return;
        }
        let adv = ReceivedAdvert {
            src: env.src,
            ttl: env.ttl,
            repr,
        };
        if let Err(reason) = self.group.handle_advert(now(), MemberId(i), &adv)
            && !matches!(reason, DropReason::OtherVrid | DropReason::LowerPriority)
        {
            tracing::debug!(instance = %self.members[i].spec.config.name, src = %adv.src, ?reason, "advert ignored");
        }
    }

    async fn poll_links(&mut self) {
        let t = now();
        for i in 0..self.members.len() {
            for k in 0..self.members[i].interfaces.len() {
                let up = self.io.link_up(&self.members[i].interfaces[k]).await;
                if self.group.handle_tracked(t, MemberId(i), ObjectId(k), up) {
                    let m = &self.members[i];
                    tracing::info!(instance = %m.spec.config.name, interface = %m.interfaces[k], up, "tracked interface changed");
                }
            }
        }
    }

    async fn perform(&mut self) {
        while let Some((id, action)) = self.group.poll_action() {
            let i = id.0;
            let m = &mut self.members[i];
            let name = m.spec.config.name.clone();
            match action {
                Action::SendAdvert(repr) => {
                    let dsts = if m.spec.unicast_peers.is_empty() {
                        vec![wire::MULTICAST_GROUP]
                    } else {
                        m.spec.unicast_peers.clone()
                    };
                    for dst in dsts {
                        if let Err(e) = self.io.send_advert(id, &repr, m.primary, dst) {
                            m.io_errors += 1;
                            // A dead link makes sends fail every interval: keep it quiet.
                            tracing::debug!(instance = %name, %dst, error = %e, "advert send failed");
                        }
                    }
                }
                Action::Transition(t) => {
                    let prio = self.group.members()[i].priority();
                    tracing::info!(instance = %name, from = %t.from, to = %t.to, reason = %t.reason, priority = prio, "VRRP transition");
                    if m.transitions.len() == crate::instance::TRANSITION_HISTORY {
                        m.transitions.pop_front();
                    }
                    m.transitions.push_back(TransitionRecord {
                        at_unix_ms: wall_ms(),
                        from: t.from,
                        to: t.to,
                        reason: t.reason.to_string(),
                    });
                    m.transitions_total += 1;
                    let at = now();
                    m.state_clock.enter(t.to, at);
                    if t.to == State::Master {
                        m.became_master += 1;
                    }
                    m.state.send_replace(t.to);
                    let event = NotifyEvent {
                        scope: NotifyScope::Instance,
                        name,
                        state: NotifyState::from_state(t.to),
                        priority: prio,
                    };
                    self.notify(NotifyTarget::Member(i), event);
                }
                Action::AddAddresses | Action::RemoveAddresses => {
                    let add = matches!(action, Action::AddAddresses);
                    for vip in m.spec.config.addresses.clone() {
                        if let Some((_, hook)) =
                            m.spec.hooked.iter().find(|(a, _)| *a == vip.address)
                        {
                            if add {
                                hook.activate(vip);
                            } else {
                                hook.deactivate(vip);
                            }
                            continue;
                        }
                        let r = if add {
                            self.io.add_address(id, vip).await
                        } else {
                            self.io.remove_address(id, vip).await
                        };
                        if let Err(e) = r {
                            m.io_errors += 1;
                            tracing::warn!(instance = %name, vip = %vip.address, error = %e, "address change failed");
                        }
                    }
                }
                Action::WithdrawAddresses(vips) => {
                    for vip in vips {
                        // Hooked VIPs never change live (see `SyncGroup::check_reconfigure`).
                        if let Err(e) = self.io.remove_address(id, vip).await {
                            m.io_errors += 1;
                            tracing::warn!(instance = %name, vip = %vip.address, error = %e, "address change failed");
                        }
                    }
                }
                Action::GratuitousArp | Action::ReassertArp => {
                    let repeat = if matches!(action, Action::ReassertArp) {
                        m.spec.garp_lower_prio_repeat
                    } else {
                        m.spec.garp_count
                    };
                    // Bounded: repeat <= MAX_GARP_REPEAT per VIP, <= 255 VIPs per advert.
                    let repeat = repeat.min(MAX_GARP_REPEAT);
                    for vip in &m.spec.config.addresses {
                        for _ in 0..repeat {
                            if let Err(e) = self.io.send_garp(id, vip.address) {
                                m.io_errors += 1;
                                tracing::debug!(instance = %name, error = %e, "gratuitous ARP failed");
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.notify_group_state();
        self.publish();
    }

    fn publish(&self) {
        let at = now();
        let snapshot = self
            .members
            .iter()
            .zip(self.group.members())
            .zip(self.group.trackers())
            .map(|((m, core), tracker)| {
                let master_time = m.state_clock.spent(State::Master, at);
                VrrpStatus {
                    name: m.spec.config.name.clone(),
                    group: self.group_notify.name(),
                    interface: m.spec.interface.clone(),
                    vrid: m.spec.config.vrid,
                    state: core.state(),
                    priority: core.priority(),
                    configured_priority: m.spec.config.priority,
                    runtime_priority: core.runtime_priority(),
                    primary_address: m.primary,
                    master: core.master().map(|(a, _)| a),
                    master_priority: core.master().map(|(_, p)| p),
                    advert_interval: m.spec.config.advert_interval,
                    master_advert_interval: core.master_advert_interval(),
                    master_down_interval: core.master_down_interval(),
                    addresses: m.spec.config.addresses.clone(),
                    counters: VrrpCounters {
                        instance: core.counters().clone(),
                        malformed: m.malformed.clone(),
                        unknown_peer: m.unknown_peer,
                        io_errors: m.io_errors,
                        transitions: m.transitions_total,
                        master_time,
                        backup_time: m.state_clock.spent(State::Backup, at),
                        fault_time: m.state_clock.spent(State::Fault, at),
                        became_master: m.became_master,
                        notify: m.notify.counters,
                    },
                    transitions: m.transitions.iter().cloned().collect(),
                    tracked: tracked_status(m, tracker),
                    preempt_gate: m.spec.preempt_gate.as_ref().map(|_| core.preempt_allowed()),
                }
            })
            .collect();
        if let Ok(mut s) = self.status.lock() {
            *s = snapshot;
        }
    }
}

/// The tracker's objects for `show vrrp`, the processes with their counts (they come last,
/// in the spec's order).
fn tracked_status(m: &Member, tracker: &Tracker) -> Vec<TrackedStatus> {
    let objects = tracker.objects();
    let first_process = objects.len().saturating_sub(m.spec.track_processes.len());
    objects
        .iter()
        .enumerate()
        .map(|(k, o)| {
            let process = k.checked_sub(first_process).and_then(|p| {
                m.spec
                    .track_processes
                    .get(p)
                    .zip(m.processes_running.get(p))
            });
            TrackedStatus {
                name: o.name.clone(),
                weight: o.weight,
                up: o.up,
                running: process.map(|(_, r)| *r),
                quorum: process.map(|(p, _)| p.quorum),
                quorum_max: process.map(|(p, _)| p.quorum_max),
            }
        })
        .collect()
}

/// Scans `/proc` every [`PROCESS_SCAN_INTERVAL`] for member `member`'s tracked processes
/// (objects `first`, `first + 1`, ...) until the group's loop is gone, reporting each
/// process's count and verdict after every scan.
async fn run_process_scan(
    processes: Vec<TrackProcess>,
    member: MemberId,
    first: ObjectId,
    tx: mpsc::Sender<Event>,
) {
    let names: Vec<String> = processes.iter().map(TrackProcess::object_name).collect();
    let patterns: Arc<[TrackProcess]> = processes.iter().cloned().collect();
    let mut quorums: Vec<crate::ProcessQuorum> = processes
        .iter()
        .map(|p| crate::ProcessQuorum::new(p.quorum, p.quorum_max, p.delay))
        .collect();
    let mut tick = tokio::time::interval(PROCESS_SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        let scan = Arc::clone(&patterns);
        let Ok(counts) = tokio::task::spawn_blocking(move || {
            procscan::count(std::path::Path::new("/proc"), &scan)
        })
        .await
        else {
            continue;
        };
        let at = now();
        for (index, (q, running)) in quorums.iter_mut().zip(counts).enumerate() {
            if q.record(at, running) {
                tracing::debug!(process = %names[index], running, up = q.up(), "tracked process changed");
            }
            let ev = Event::Process {
                member,
                index,
                object: ObjectId(first.0 + index),
                running,
                up: q.up(),
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

/// Runs one track script every `interval` until the group's loop is gone, reporting its
/// state after each run (the core ignores reports that change nothing).
async fn run_track_script(
    script: TrackScript,
    member: MemberId,
    object: ObjectId,
    tx: mpsc::Sender<Event>,
) {
    let mut state = crate::RiseFall::new(script.rise, script.fall);
    let mut tick = tokio::time::interval(script.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        let ok = notify::run_check(&script.command, script.timeout).await;
        if state.record(ok) {
            tracing::debug!(script = %script.command, up = state.up(), "track script changed");
        }
        let ev = Event::Service {
            member,
            object,
            up: state.up(),
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// What the driver did to the (in-memory) system.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Advert { dst: Ipv4Addr, priority: u8 },
        Add(Ipv4Addr),
        Remove(Ipv4Addr),
        Garp(Ipv4Addr),
        Activate(Ipv4Addr),
        Deactivate(Ipv4Addr),
    }

    /// An in-memory [`VrrpIo`] (and [`AddressHook`]) that records every call; the links
    /// named in `down` have no carrier.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
        down: Mutex<Vec<String>>,
    }

    impl Recorder {
        fn push(&self, c: Call) {
            self.calls.lock().expect("calls").push(c);
        }
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().expect("calls"))
        }
    }

    impl VrrpIo for Arc<Recorder> {
        fn send_advert(
            &self,
            _: MemberId,
            repr: &wire::VrrpRepr,
            _: Ipv4Addr,
            dst: Ipv4Addr,
        ) -> std::io::Result<()> {
            self.push(Call::Advert {
                dst,
                priority: repr.priority,
            });
            Ok(())
        }
        async fn add_address(&self, _: MemberId, vip: VirtualAddress) -> Result<(), DriverError> {
            self.push(Call::Add(vip.address));
            Ok(())
        }
        async fn remove_address(
            &self,
            _: MemberId,
            vip: VirtualAddress,
        ) -> Result<(), DriverError> {
            self.push(Call::Remove(vip.address));
            Ok(())
        }
        fn send_garp(&self, _: MemberId, address: Ipv4Addr) -> std::io::Result<()> {
            self.push(Call::Garp(address));
            Ok(())
        }
        async fn link_up(&self, interface: &str) -> bool {
            !self
                .down
                .lock()
                .expect("down")
                .iter()
                .any(|d| d == interface)
        }
    }

    impl AddressHook for Recorder {
        fn activate(&self, vip: VirtualAddress) {
            self.push(Call::Activate(vip.address));
        }
        fn deactivate(&self, vip: VirtualAddress) {
            self.push(Call::Deactivate(vip.address));
        }
    }

    const OWN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const HOOKED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
    const EXTRA: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);

    fn vip(address: Ipv4Addr) -> VirtualAddress {
        VirtualAddress {
            address,
            prefix_len: 24,
        }
    }

    /// A priority-255 spec (master at startup) on eth0 holding `addresses`.
    fn owner_spec(addresses: &[Ipv4Addr]) -> MemberSpec {
        let mut config = InstanceConfig::new("v", 51, OWN);
        config.priority = 255;
        config.addresses = addresses.iter().copied().map(vip).collect();
        MemberSpec::new(config, "eth0")
    }

    /// A driver over `spec` whose I/O and hooks are `rec`.
    fn driver(spec: MemberSpec, rec: &Arc<Recorder>) -> Driver<Arc<Recorder>> {
        group_driver(None, vec![spec], rec).0
    }

    /// A driver over the sync group `group` of `specs`, and the receiver of its events (the
    /// ends of notify runs).
    fn group_driver(
        group: Option<GroupSpec>,
        specs: Vec<MemberSpec>,
        rec: &Arc<Recorder>,
    ) -> (Driver<Arc<Recorder>>, mpsc::Receiver<Event>) {
        let (events_tx, events_rx) = mpsc::channel(16);
        let mut cores = Vec::new();
        let mut members = Vec::new();
        for spec in specs {
            cores.push((
                VrrpInstance::new(spec.config.clone()),
                Tracker::new(tracked_objects(&spec)),
                binding(&spec),
            ));
            members.push(Member {
                interfaces: tracked_interfaces(&spec),
                processes_running: vec![0; spec.track_processes.len()],
                primary: spec.config.primary_address,
                primary_from_interface: false,
                spec,
                malformed: DropCounters::default(),
                unknown_peer: 0,
                io_errors: 0,
                transitions: VecDeque::new(),
                transitions_total: 0,
                state_clock: StateClock::default(),
                became_master: 0,
                notify: NotifyQueue::default(),
                state: watch::Sender::new(State::Initialize),
            });
        }
        let driver = Driver {
            group_notify: GroupNotify::new(group),
            group: SyncGroup::new(cores),
            members,
            io: rec.clone(),
            status: Arc::new(Mutex::new(Vec::new())),
            events_tx,
        };
        (driver, events_rx)
    }

    fn count(calls: &[Call], c: &Call) -> usize {
        calls.iter().filter(|x| *x == c).count()
    }

    #[tokio::test]
    async fn master_sends_to_unicast_peers_adds_interface_vips_and_activates_hooked_ones() {
        let rec = Arc::new(Recorder::default());
        let peers = [
            Ipv4Addr::new(198, 51, 100, 12),
            Ipv4Addr::new(198, 51, 100, 13),
        ];
        let mut spec = owner_spec(&[VIP, HOOKED]);
        spec.unicast_peers = peers.to_vec();
        spec.garp_count = 3;
        spec.hooked = vec![(HOOKED, rec.clone() as Arc<dyn AddressHook>)];
        let mut d = driver(spec, &rec);
        d.poll_links().await;
        d.group.startup(now());
        d.perform().await;
        let calls = rec.take();
        for dst in peers {
            assert_eq!(
                count(&calls, &Call::Advert { dst, priority: 255 }),
                1,
                "{calls:?}"
            );
        }
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Advert { dst, .. } if *dst == wire::MULTICAST_GROUP))
        );
        assert_eq!(count(&calls, &Call::Add(VIP)), 1, "{calls:?}");
        assert_eq!(count(&calls, &Call::Activate(HOOKED)), 1, "{calls:?}");
        assert_eq!(
            count(&calls, &Call::Add(HOOKED)),
            0,
            "a hooked VIP is not an interface address"
        );
        assert_eq!(count(&calls, &Call::Garp(VIP)), 3, "{calls:?}");
        assert_eq!(count(&calls, &Call::Garp(HOOKED)), 3, "{calls:?}");
        let add = calls.iter().position(|c| *c == Call::Add(VIP));
        let garp = calls.iter().position(|c| *c == Call::Garp(VIP));
        assert!(add < garp, "addresses before the announcement: {calls:?}");
        assert_eq!(d.status.lock().expect("status")[0].state, State::Master);
        assert_eq!(
            *d.members[0].state.borrow(),
            State::Master,
            "the state watch follows"
        );

        // Shutdown: priority 0 to each peer, the interface VIP removed, the hooked one
        // deactivated.
        d.group.shutdown(now());
        d.perform().await;
        let calls = rec.take();
        for dst in peers {
            assert_eq!(
                count(&calls, &Call::Advert { dst, priority: 0 }),
                1,
                "{calls:?}"
            );
        }
        assert_eq!(count(&calls, &Call::Remove(VIP)), 1, "{calls:?}");
        assert_eq!(count(&calls, &Call::Deactivate(HOOKED)), 1, "{calls:?}");
        assert_eq!(count(&calls, &Call::Remove(HOOKED)), 0, "{calls:?}");
        // INIT -> MASTER -> INIT: two transitions; the mastership is over and counted.
        let status = d.status.lock().expect("status")[0].clone();
        assert_eq!(status.counters.transitions, 2);
        assert_eq!(status.counters.became_master, 1);
        assert_eq!(status.transitions.len(), 2);
        assert_eq!(*d.members[0].state.borrow(), State::Initialize);
        let mastership = status.counters.master_time;
        assert!(mastership < Duration::from_secs(60), "{mastership:?}");
        d.publish();
        assert_eq!(
            d.status.lock().expect("status")[0].counters.master_time,
            mastership,
            "time as master stops growing once the instance is no longer master"
        );
    }

    #[tokio::test]
    async fn live_reload_withdraws_just_the_dropped_vip_and_refuses_fixed_changes() {
        let rec = Arc::new(Recorder::default());
        let mut spec = owner_spec(&[VIP, EXTRA]);
        spec.garp_count = 1;
        let mut d = driver(spec.clone(), &rec);
        d.group.startup(now());
        d.perform().await;
        let calls = rec.take();
        assert!(calls.contains(&Call::Advert {
            dst: wire::MULTICAST_GROUP,
            priority: 255
        }));
        assert_eq!(count(&calls, &Call::Garp(EXTRA)), 1, "{calls:?}");

        let mut smaller = spec.clone();
        smaller.config.addresses = vec![vip(VIP)];
        smaller.garp_count = 2;
        assert_eq!(d.reconfigure(MemberId(0), smaller), Reconfigured::Live);
        d.perform().await;
        let calls = rec.take();
        assert_eq!(count(&calls, &Call::Remove(EXTRA)), 1, "{calls:?}");
        assert_eq!(count(&calls, &Call::Remove(VIP)), 0, "{calls:?}");
        assert_eq!(d.members[0].spec.garp_count, 2);

        let mut moved = spec.clone();
        moved.interface = "eth1".to_owned();
        let mut tracked = spec.clone();
        tracked.track_interfaces = vec![("eth2".to_owned(), 10)];
        for refused in [moved, tracked] {
            let r = d.reconfigure(MemberId(0), refused);
            assert!(!r.is_live(), "{r:?}");
        }
        assert_eq!(d.members[0].spec.interface, "eth0");
        assert_eq!(d.group.members()[0].config().addresses, vec![vip(VIP)]);
    }

    #[tokio::test]
    async fn a_tracked_link_going_down_faults_and_removes_the_vips() {
        let rec = Arc::new(Recorder::default());
        let mut spec = owner_spec(&[VIP]);
        spec.track_interfaces = vec![("eth1".to_owned(), 0)];
        let mut d = driver(spec, &rec);
        d.poll_links().await;
        d.group.startup(now());
        d.perform().await;
        rec.take();
        rec.down.lock().expect("down").push("eth1".to_owned());
        d.poll_links().await;
        d.perform().await;
        let calls = rec.take();
        assert_eq!(count(&calls, &Call::Remove(VIP)), 1, "{calls:?}");
        let status = d.status.lock().expect("status")[0].clone();
        assert_eq!(status.state, State::Fault);
        let tracked: Vec<_> = status
            .tracked
            .iter()
            .map(|t| (t.name.as_str(), t.weight, t.up))
            .collect();
        assert_eq!(
            tracked,
            [("interface eth0", 0, true), ("interface eth1", 0, false)]
        );
    }

    #[tokio::test]
    async fn a_tracked_process_below_quorum_lowers_the_priority_and_shows_its_count() {
        let rec = Arc::new(Recorder::default());
        let mut spec = owner_spec(&[VIP]);
        spec.config.priority = 200;
        spec.track_processes = vec![TrackProcess {
            name: "vgtrackd".to_owned(),
            parameters: None,
            param_match: crate::ParamMatch::Exact,
            quorum: 2,
            quorum_max: 3,
            delay: Duration::ZERO,
            weight: 30,
        }];
        let mut d = driver(spec, &rec);
        d.group.startup(now());
        d.perform().await;
        let process = |running, up| Event::Process {
            member: MemberId(0),
            index: 0,
            object: ObjectId(1),
            running,
            up,
        };
        d.handle_event(process(1, false));
        d.perform().await;
        let status = d.status.lock().expect("status")[0].clone();
        assert_eq!(status.priority, 170);
        let tracked = &status.tracked[1];
        assert_eq!(
            (
                tracked.name.as_str(),
                tracked.up,
                tracked.running,
                tracked.quorum,
                tracked.quorum_max
            ),
            ("process vgtrackd", false, Some(1), Some(2), Some(3))
        );
        assert_eq!(status.tracked[0].running, None, "an interface has no count");
        d.handle_event(process(2, true));
        d.perform().await;
        assert_eq!(d.status.lock().expect("status")[0].priority, 200);
    }

    /// A script that appends its arguments as one line to `out`.
    fn recorder_script(dir: &std::path::Path, name: &str, out: &std::path::Path) -> ScriptCommand {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", out.display()),
        )
        .expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ScriptCommand {
            program: path,
            args: vec![name.to_owned()],
        }
    }

    /// Handles notify ends until `out` has `lines` lines, and returns them.
    async fn notified(
        d: &mut Driver<Arc<Recorder>>,
        events: &mut mpsc::Receiver<Event>,
        out: &std::path::Path,
        lines: usize,
    ) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(out).unwrap_or_default();
            let got: Vec<String> = text.lines().map(str::to_owned).collect();
            if got.len() >= lines {
                return got;
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => d.handle_event(ev),
                _ => panic!("expected {lines} notify lines, got {got:?}"),
            }
        }
    }

    #[tokio::test]
    async fn instances_and_their_group_notify_as_keepalived_does_and_stop_reports_stop() {
        let dir = std::env::temp_dir().join(format!("vrrp-group-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let out = dir.join("calls");
        let _ = std::fs::remove_file(&out);
        let rec = Arc::new(Recorder::default());
        let mut a = owner_spec(&[VIP]);
        a.notify.notify = Some(recorder_script(&dir, "notify", &out));
        a.notify.master = Some(recorder_script(&dir, "notify_master", &out));
        a.notify.stop = Some(recorder_script(&dir, "notify_stop", &out));
        let mut b = owner_spec(&[EXTRA]);
        b.config.name = "w".into();
        b.config.vrid = 52;
        let mut group = GroupSpec::new("g");
        group.notify.notify = Some(recorder_script(&dir, "group", &out));
        group.notify.backup = Some(recorder_script(&dir, "group_backup", &out));
        let (mut d, mut events) = group_driver(Some(group), vec![a, b], &rec);
        d.group.startup(now());
        d.perform().await;
        // Instance v: its notify_master, then notify; the group once both are master.
        let mut lines = notified(&mut d, &mut events, &out, 3).await;
        lines.sort();
        assert_eq!(
            lines,
            [
                "group GROUP g MASTER 0",
                "notify INSTANCE v MASTER 255",
                "notify_master",
            ]
        );
        std::fs::remove_file(&out).expect("reset");
        d.group.shutdown(now());
        d.perform().await;
        let lines = notified(&mut d, &mut events, &out, 2).await;
        assert_eq!(lines, ["notify_stop", "notify INSTANCE v STOP 255"]);
        // The runs are counted when they start; the status is the snapshot published after
        // the last event the driver handled, which may be older than the STOP runs.
        d.publish();
        let status = d.status.lock().expect("status")[0].clone();
        assert_eq!(status.group.as_deref(), Some("g"));
        assert!(
            status.counters.notify.runs >= 4,
            "{:?}",
            status.counters.notify
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
