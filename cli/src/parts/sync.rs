//! `[sync]` in `vipgate run` and `vipgate show sync`: flow sync between the nodes of a VRRP
//! pair, so that a failover keeps established connections.
//!
//! The part joins three things it finds in [`super::wiring`]: the flowsync UDP transport it
//! starts (`flowsync::driver`), the gateway whose flows this node owns (`[nat]`'s, or the one
//! a director's `[[service]]`s run in) and the state of the VRRP instance `[sync] vrrp` names.
//! One task follows that state:
//!
//! - **master**: the gateway journals its flows and its services' persistence templates;
//!   every [`DRAIN_EVERY`] the journal is drained and streamed to the peers, every
//!   [`REFRESH_EVERY`] everything is sent again (a standby flow not refreshed expires), and a
//!   peer that asks for a snapshot gets everything, marked as the owner's (the master's);
//! - **backup** (or INIT, FAULT): the journal is off; the flows and templates peers send are
//!   held as standby (bounded, outside every limit, never seen by the packet path), a snapshot
//!   request is answered with nothing (this node owns no flow, and says it is no owner), and
//!   standby state past its deadline is dropped every second; the VRRP instance's preemption
//!   gate opens at the first snapshot a peer sent as the owner;
//! - **becoming master**: the standby flows are promoted into the table at once (VRRP changes
//!   the state watch before it moves the addresses, so the promotion races only with the
//!   first packets to the VIP: a mid-stream TCP segment that wins the race is dropped as
//!   `not_syn` and retransmitted), the standby templates go into the services' pools, then the
//!   journal starts and everything is sent as an owner's snapshot, so the peers (the old
//!   master, when it comes back) hold it as standby in turn and know whose state it is.
//!
//! Invariants: only this part's task touches the gateway's sync state (journal, standby,
//! promotion), always under the gateway's lock and briefly; nothing a peer sends reaches the
//! table except through a promotion (flowsync authenticates every datagram first). Any change
//! of `[sync]` restarts the part (new socket, key, incarnation: the peers pull a snapshot
//! again); the standby flows live in the gateway, so a restart keeps them.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flowsync::driver::{Command, SyncStatus as TransportStatus};
use flowsync::{BulkStatus, Event, SyncConfig, SyncKey, SyncStats, Update};
use natgw::driver::NatDriver;
use netsys::sync::lock_unpoisoned;
use netutil::{DropCounters, Reconfigured};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vrrp::State;

use super::{BoxFuture, Kind, Part, StartCtx, ready, wiring};
use crate::config::SiteConfig;
use crate::config::sync::{SyncSection, read_key};

/// How often a master drains its journal and streams the changes.
pub(crate) const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often a master sends every flow again (standby flows expire unrefreshed after their
/// remaining timeout plus `natgw::STANDBY_GRACE`, 60 s).
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How often expired standby flows are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

netutil::drop_reasons! {
    /// Why a sync datagram was dropped (flowsync's counters, one per reason).
    pub(crate) enum SyncDrop {
        /// The HMAC did not match: a wrong key, or altered in transit.
        AuthFailure => "auth_failures",
        /// A control message not newer than the last one seen from that peer.
        Replay => "replays",
        /// Not a well-formed message.
        Malformed => "malformed",
        /// Stamped more than 30 s away from our clock.
        ClockSkew => "clock_skew",
        /// From an earlier run of a known peer.
        OldIncarnation => "old_incarnation",
        /// Another protocol version: a peer running an older or newer vipgate.
        UnsupportedVersion => "unsupported_version",
        /// Our own message, looped back.
        OwnMessage => "own_messages",
        /// A data message already delivered or buffered (a resend that crossed its ack).
        Duplicate => "duplicates",
        /// A data message too far ahead of the stream to buffer.
        OutOfWindow => "out_of_window",
        /// A new peer beyond the bound of 16.
        TooManyPeers => "too_many_peers",
    }
}

fn drops_of(s: &SyncStats) -> DropCounters<SyncDrop> {
    let mut d = DropCounters::default();
    for (reason, n) in [
        (SyncDrop::AuthFailure, s.auth_failures),
        (SyncDrop::Replay, s.replays),
        (SyncDrop::Malformed, s.malformed),
        (SyncDrop::ClockSkew, s.clock_skew),
        (SyncDrop::OldIncarnation, s.old_incarnation),
        (SyncDrop::UnsupportedVersion, s.unsupported_version),
        (SyncDrop::OwnMessage, s.own_messages),
        (SyncDrop::Duplicate, s.duplicates),
        (SyncDrop::OutOfWindow, s.out_of_window),
        (SyncDrop::TooManyPeers, s.too_many_peers),
    ] {
        d.add(reason, n);
    }
    d
}

/// What this node does with flows, following its VRRP instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Master: streams its flows.
    Master,
    /// Anything else: holds the peers' flows as standby.
    Backup,
}

/// `show sync --json`: one object per node (a site has one `[sync]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SyncStatus {
    /// `listen:port`.
    pub(crate) name: String,
    /// What this node does with flows.
    pub(crate) state: Role,
    /// The VRRP instance followed, and its state.
    pub(crate) vrrp: String,
    pub(crate) vrrp_state: State,
    /// No snapshot asked for is outstanding from a live peer.
    pub(crate) synced: bool,
    /// The VRRP instance may preempt: a snapshot from the master (the peer that owned the
    /// VIP when it sent it) is in, or `[sync] ready_timeout` passed first. Until then it stays
    /// backup under a lower-priority master.
    pub(crate) ready: bool,
    /// Peers heard within the peer timeout (3 s).
    pub(crate) peers_up: u64,
    /// Our data messages not yet acknowledged by every live peer: the sending side's lag.
    pub(crate) queued: u64,
    /// Standby flows held, and their bound.
    pub(crate) standby_flows: u64,
    pub(crate) standby_cap: u64,
    /// Standby persistence templates held (bounded by `standby_cap` too).
    #[serde(default)]
    pub(crate) standby_templates: u64,
    /// How long ago the last snapshot from a peer completed, how many records it held, and
    /// whether that peer was the master.
    #[serde(with = "netutil::serde_ms::option")]
    pub(crate) last_bulk_ago_ms: Option<Duration>,
    pub(crate) last_bulk_flows: Option<u32>,
    #[serde(default)]
    pub(crate) last_bulk_from_master: Option<bool>,
    pub(crate) peers: Vec<PeerView>,
    pub(crate) counters: SyncCounters,
}

/// One peer in `show sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerView {
    /// Its sync address (its node id).
    pub(crate) address: Ipv4Addr,
    pub(crate) up: bool,
    #[serde(with = "netutil::serde_ms")]
    pub(crate) last_heard_ago_ms: Duration,
    /// Our data messages it has not acknowledged (its lag behind us).
    pub(crate) unacked: u32,
    /// Its data messages we hold waiting for missing ones.
    pub(crate) buffered: u64,
    /// Its snapshot: `not requested`, `requested`, `complete`.
    pub(crate) bulk: String,
    /// It announced it takes the `lblc`/`lblcr` destination entries (false: an older
    /// vipgate, or not heard from yet).
    #[serde(default)]
    pub(crate) takes_locality: bool,
}

/// Counters of `show sync` (monotonic: metrics counters).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SyncCounters {
    pub(crate) messages_sent: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) resent: u64,
    pub(crate) flows_sent: u64,
    pub(crate) messages_received: u64,
    pub(crate) bytes_received: u64,
    pub(crate) flows_received: u64,
    pub(crate) bulks_served: u64,
    pub(crate) bulks_received: u64,
    /// Peer messages lost for good (made up by a snapshot).
    pub(crate) lost: u64,
    pub(crate) queue_overflows: u64,
    /// Times this node became master with sync running.
    pub(crate) promotions: u64,
    pub(crate) promoted: u64,
    pub(crate) promote_refused: u64,
    /// Flow changes from a peer while this node was master (not applied).
    pub(crate) ignored_as_master: u64,
    pub(crate) standby_applied: u64,
    pub(crate) standby_removed: u64,
    pub(crate) standby_over_cap: u64,
    pub(crate) standby_expired: u64,
    /// Persistence templates: standby ones applied, removed, expired, over the cap; and at
    /// promotions installed into the pools or refused (unknown service or backend, full).
    #[serde(default)]
    pub(crate) templates_applied: u64,
    #[serde(default)]
    pub(crate) templates_removed: u64,
    #[serde(default)]
    pub(crate) templates_expired: u64,
    #[serde(default)]
    pub(crate) templates_over_cap: u64,
    #[serde(default)]
    pub(crate) templates_installed: u64,
    #[serde(default)]
    pub(crate) templates_refused: u64,
    /// `lblc`/`lblcr` destination entries from the master installed into the pools, and
    /// refused (unknown service, not a locality scheduler, unknown backend, table full).
    #[serde(default)]
    pub(crate) locality_installed: u64,
    #[serde(default)]
    pub(crate) locality_refused: u64,
    /// Destination entries removed from the pools because the master removed them.
    #[serde(default)]
    pub(crate) locality_removed: u64,
    /// Destination entries this node did not send because a live peer does not take them
    /// (an older vipgate), or no peer was up.
    #[serde(default)]
    pub(crate) locality_withheld: u64,
    /// Datagrams dropped, by reason.
    pub(crate) drops: DropCounters<SyncDrop>,
}

/// What the following task knows that the transport and the gateway do not.
#[derive(Debug, Clone)]
struct Followed {
    role: Role,
    vrrp_state: State,
    promotions: u64,
    ignored_as_master: u64,
    /// When the last snapshot completed, its records, and whether its sender was the master.
    last_bulk: Option<(Instant, u32, bool)>,
}

struct SyncPart {
    name: String,
    vrrp: String,
    gateway: Arc<NatDriver>,
    transport: watch::Receiver<TransportStatus>,
    followed: Arc<Mutex<Followed>>,
    /// The followed instance's preemption gate (`None`: VRRP runs without one).
    gate: Option<watch::Receiver<bool>>,
    tasks: Vec<JoinHandle<()>>,
    watch: netutil::task::TaskWatch,
}

#[allow(clippy::disallowed_methods)] // the part's one clock read
fn clock() -> Instant {
    Instant::now()
}

/// Starts the transport and the task that follows the VRRP instance.
///
/// # Errors
/// No gateway or VRRP instance running to follow, an unusable key file, or a socket that
/// cannot be bound.
pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let Some(section) = &site.sync else {
        return Ok(Vec::new());
    };
    let vrrp_name = section.vrrp.get_ref().clone();
    let (gateway, state, gate) = {
        let w = wiring::lock(&ctx.wiring);
        (
            w.gateway.clone(),
            w.vrrp_states.get(&vrrp_name).cloned(),
            w.preempt_gates.get(&vrrp_name).cloned(),
        )
    };
    let gateway = gateway
        .context("[sync] follows the flows of [nat] or [[service]], and neither is running")?;
    let state = state.with_context(|| {
        format!("[sync] follows VRRP instance `{vrrp_name}`, which is not running")
    })?;
    let (socket, peers, config) = transport_config(section)?;
    let name = match &section.group {
        Some(g) => format!(
            "{}:{} (group {})",
            section.listen.get_ref(),
            section.port.get_ref(),
            g.get_ref()
        ),
        None => format!("{}:{}", section.listen.get_ref(), section.port.get_ref()),
    };
    let handle = flowsync::driver::spawn(socket, peers, config)
        .with_context(|| format!("starting flow sync on {name}"))?;
    let followed = Arc::new(Mutex::new(Followed {
        role: Role::Backup,
        vrrp_state: *state.borrow(),
        promotions: 0,
        ignored_as_master: 0,
        last_bulk: None,
    }));
    let watch = netutil::task::TaskWatch::new();
    let transport_task = handle.task;
    let transport = watch.spawn("sync transport", async move {
        match transport_task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the sync socket failed: {e}")),
            Err(e) => Err(format!("the sync transport task ended: {e}")),
        }
    });
    let follower = Follower {
        gw: gateway.gateway(),
        commands: handle.commands,
        followed: Arc::clone(&followed),
        gate: gate.clone(),
    };
    let follow = watch.spawn(
        "sync follower",
        follower.run(state, handle.events, vrrp_name.clone()),
    );
    tracing::info!(listen = %name, vrrp = %vrrp_name, "flow sync started");
    Ok(vec![Box::new(SyncPart {
        name,
        vrrp: vrrp_name,
        gateway,
        transport: handle.status,
        followed,
        gate: gate.as_ref().map(watch::Sender::subscribe),
        tasks: vec![follow, transport],
        watch,
    })])
}

/// A socket on multicast `group`:`port`, joined and sending on the interface that holds
/// `listen` (the node's own address, so its datagrams carry it as their source), with TTL 1
/// (sync stays on its link, as VRRP does) and without loopback of its own datagrams.
fn multicast_socket(
    group: Ipv4Addr,
    listen: Ipv4Addr,
    port: u16,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // Bound to the group, the socket takes that group's datagrams and nothing else.
    socket.bind(&SocketAddr::from((group, port)).into())?;
    socket.join_multicast_v4(&group, &listen)?;
    socket.set_multicast_if_v4(&listen)?;
    socket.set_multicast_ttl_v4(1)?;
    socket.set_multicast_loop_v4(false)?;
    Ok(socket.into())
}

/// The socket, the peers' addresses and the engine's settings of `section`.
fn transport_config(
    section: &SyncSection,
) -> anyhow::Result<(std::net::UdpSocket, Vec<SocketAddr>, SyncConfig)> {
    let key = read_key(section.key_file.get_ref())
        .map_err(|e| anyhow::anyhow!("[sync] key_file: {e}"))?;
    let key = SyncKey::new(&key).context("[sync] key_file")?;
    let node = section
        .node_id()
        .context("[sync] listen: a unicast address is needed")?;
    let port = *section.port.get_ref();
    let listen = *section.listen.get_ref();
    let (socket, peers) = match &section.group {
        Some(group) => {
            let group = *group.get_ref();
            let socket = multicast_socket(group, listen, port).with_context(|| {
                format!(
                    "joining the sync group {group}:{port} on the interface of {listen} (is it an address of this host?)"
                )
            })?;
            (socket, vec![SocketAddr::from((group, port))])
        }
        None => {
            let local = SocketAddr::from((listen, port));
            let socket = std::net::UdpSocket::bind(local).with_context(|| {
                format!("binding the sync socket to {local} (is it an address of this host?)")
            })?;
            let peers = section
                .peers
                .get_ref()
                .iter()
                .map(|p| SocketAddr::from((*p.get_ref(), port)))
                .collect();
            (socket, peers)
        }
    };
    let config = SyncConfig::new(node, flowsync::driver::incarnation_now(), key);
    Ok((socket, peers, config))
}

/// The task that joins the VRRP state, the transport and the gateway.
struct Follower {
    gw: Arc<Mutex<natgw::Gateway>>,
    commands: mpsc::Sender<Command>,
    followed: Arc<Mutex<Followed>>,
    /// Opened at the first snapshot received from the master (the owner flag): VRRP may
    /// preempt from then on.
    gate: Option<watch::Sender<bool>>,
}

impl Follower {
    async fn run(
        self,
        mut state: watch::Receiver<State>,
        mut events: mpsc::Receiver<Event>,
        vrrp_name: String,
    ) -> Result<(), String> {
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        let first = *state.borrow_and_update();
        let mut master = false;
        self.follow(first, &mut master, &vrrp_name).await?;
        loop {
            tokio::select! {
                changed = state.changed() => {
                    changed.map_err(|_| format!("VRRP instance {vrrp_name} stopped"))?;
                    let now = *state.borrow_and_update();
                    self.follow(now, &mut master, &vrrp_name).await?;
                }
                event = events.recv() => {
                    let event = event.ok_or("the sync transport ended")?;
                    self.handle(event, master).await?;
                }
                _ = drain.tick(), if master => {
                    let updates = lock_unpoisoned(&self.gw).take_sync_updates(clock());
                    if !updates.is_empty() {
                        self.send(Command::Updates(updates)).await?;
                    }
                }
                _ = refresh.tick(), if master => {
                    let updates = lock_unpoisoned(&self.gw).export_state(clock());
                    if !updates.is_empty() {
                        self.send(Command::Updates(updates)).await?;
                    }
                }
                _ = expire.tick() => lock_unpoisoned(&self.gw).expire_standby(clock()),
            }
        }
    }

    async fn send(&self, command: Command) -> Result<(), String> {
        self.commands
            .send(command)
            .await
            .map_err(|_| "the sync transport ended".to_string())
    }

    /// Applies the VRRP instance's state `now`: a node that becomes master promotes its
    /// standby flows and templates, starts its journal and sends everything as the owner's
    /// snapshot (peers waiting to preempt wait for it); one that stops being master stops its
    /// journal.
    async fn follow(&self, now: State, master: &mut bool, vrrp_name: &str) -> Result<(), String> {
        let becomes_master = now == State::Master;
        {
            let mut f = lock_unpoisoned(&self.followed);
            f.vrrp_state = now;
            f.role = if becomes_master {
                Role::Master
            } else {
                Role::Backup
            };
        }
        if becomes_master == *master {
            return Ok(());
        }
        *master = becomes_master;
        if !becomes_master {
            lock_unpoisoned(&self.gw).set_sync(false);
            tracing::info!(vrrp = %vrrp_name, state = %now, "flow sync: holding the peers' flows as standby");
            return Ok(());
        }
        let (promotion, all) = {
            let mut gw = lock_unpoisoned(&self.gw);
            let at = clock();
            let p = gw.promote_standby(at);
            gw.set_sync(true);
            // The journal starts empty: everything live now goes out as one snapshot.
            let _ = gw.take_sync_updates(at);
            (p, gw.export_state(at))
        };
        lock_unpoisoned(&self.followed).promotions += 1;
        tracing::info!(
            vrrp = %vrrp_name,
            promoted = promotion.promoted,
            already_live = promotion.already_live,
            refused = promotion.refused,
            templates = promotion.templates,
            templates_refused = promotion.templates_refused,
            "flow sync: master, standby flows promoted; streaming"
        );
        self.send(Command::Snapshot {
            updates: all,
            owner: true,
        })
        .await?;
        Ok(())
    }

    async fn handle(&self, event: Event, master: bool) -> Result<(), String> {
        match event {
            Event::Updates { updates, .. } => {
                if master {
                    let flows = updates.iter().filter(|u| is_flow(u)).count() as u64;
                    lock_unpoisoned(&self.followed).ignored_as_master += flows;
                } else {
                    lock_unpoisoned(&self.gw).apply_standby(clock(), &updates);
                }
            }
            Event::SnapshotRequested { by } => {
                let snapshot = if master {
                    lock_unpoisoned(&self.gw).export_state(clock())
                } else {
                    Vec::new()
                };
                tracing::info!(peer = %Ipv4Addr::from(by), records = snapshot.len(), "flow sync: snapshot requested");
                self.send(Command::Snapshot {
                    updates: snapshot,
                    owner: master,
                })
                .await?;
            }
            Event::BulkComplete {
                from,
                records,
                owner,
            } => {
                lock_unpoisoned(&self.followed).last_bulk = Some((clock(), records, owner));
                tracing::info!(peer = %Ipv4Addr::from(from), records, from_master = owner, "flow sync: snapshot received");
                if !owner {
                    // A backup's (empty) snapshot says nothing of the state this node would
                    // take over: the gate waits for the master's.
                    return Ok(());
                }
                let opened = self
                    .gate
                    .as_ref()
                    .is_some_and(|g| g.send_if_modified(|open| !std::mem::replace(open, true)));
                if opened {
                    tracing::info!(peer = %Ipv4Addr::from(from), "flow sync: ready, VRRP may preempt");
                }
            }
            Event::PeerUp { node } => {
                tracing::info!(peer = %Ipv4Addr::from(node), "flow sync: peer up");
            }
            Event::PeerDown { node } => {
                tracing::warn!(peer = %Ipv4Addr::from(node), "flow sync: peer down");
            }
            Event::PeerRestarted { node } => {
                tracing::info!(peer = %Ipv4Addr::from(node), "flow sync: peer restarted");
            }
            Event::StreamGap { from, lost } => {
                tracing::warn!(peer = %Ipv4Addr::from(from), lost, "flow sync: messages lost for good, pulling a snapshot");
            }
        }
        Ok(())
    }
}

fn is_flow(u: &Update) -> bool {
    matches!(u, Update::Flow(_) | Update::FlowGone(_))
}

impl SyncPart {
    fn typed_status(&self) -> SyncStatus {
        let now = clock();
        let t = self.transport.borrow().clone();
        let f = lock_unpoisoned(&self.followed).clone();
        let (standby_flows, standby_cap, standby_templates, sb) = {
            let gw = self.gateway.gateway();
            let gw = lock_unpoisoned(&gw);
            let s = gw.standby();
            (
                s.len() as u64,
                s.cap() as u64,
                s.templates() as u64,
                *s.stats(),
            )
        };
        let s = &t.stats;
        SyncStatus {
            name: self.name.clone(),
            state: f.role,
            vrrp: self.vrrp.clone(),
            vrrp_state: f.vrrp_state,
            synced: t.synced,
            ready: self.gate.as_ref().is_none_or(|g| *g.borrow()),
            peers_up: t.peers.iter().filter(|p| p.up).count() as u64,
            queued: t.queued as u64,
            standby_flows,
            standby_cap,
            standby_templates,
            last_bulk_ago_ms: f
                .last_bulk
                .map(|(at, _, _)| now.saturating_duration_since(at)),
            last_bulk_flows: f.last_bulk.map(|(_, n, _)| n),
            last_bulk_from_master: f.last_bulk.map(|(_, _, owner)| owner),
            peers: t
                .peers
                .iter()
                .map(|p| PeerView {
                    address: Ipv4Addr::from(p.node),
                    up: p.up,
                    last_heard_ago_ms: now.saturating_duration_since(p.last_heard),
                    unacked: p.unacked,
                    buffered: p.buffered as u64,
                    bulk: match p.bulk {
                        BulkStatus::NotRequested => "not requested".into(),
                        BulkStatus::Requested { .. } => "requested".into(),
                        BulkStatus::Complete { records, owner, .. } => format!(
                            "complete ({records} records{})",
                            if owner { ", from the master" } else { "" }
                        ),
                    },
                    takes_locality: p.features & flowsync::FEATURE_LOCALITY != 0,
                })
                .collect(),
            counters: SyncCounters {
                messages_sent: s.messages_sent,
                bytes_sent: s.bytes_sent,
                resent: s.resent,
                flows_sent: s.updates_sent,
                messages_received: s.messages_received,
                bytes_received: s.bytes_received,
                flows_received: s.updates_received,
                bulks_served: s.bulks_served,
                bulks_received: s.bulks_received,
                lost: s.lost,
                queue_overflows: s.queue_overflows,
                promotions: f.promotions,
                promoted: sb.promoted,
                promote_refused: sb.promote_refused,
                ignored_as_master: f.ignored_as_master,
                standby_applied: sb.applied,
                standby_removed: sb.removed,
                standby_over_cap: sb.over_cap,
                standby_expired: sb.expired,
                templates_applied: sb.templates_applied,
                templates_removed: sb.templates_removed,
                templates_expired: sb.templates_expired,
                templates_over_cap: sb.templates_over_cap,
                templates_installed: sb.templates_installed,
                templates_refused: sb.templates_refused,
                locality_installed: sb.locality_installed,
                locality_refused: sb.locality_refused,
                locality_removed: sb.locality_removed,
                locality_withheld: s.locality_withheld,
                drops: drops_of(s),
            },
        }
    }
}

impl Part for SyncPart {
    fn kind(&self) -> Kind {
        Kind::Sync
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn status(&self) -> Value {
        serde_json::to_value(self.typed_status()).unwrap_or_default()
    }

    fn reconfigure(&self, _site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(Ok(Reconfigured::restart(
            "the sync socket, peers, key and VRRP instance are fixed at start",
        )))
    }

    fn dead_task(&self) -> Option<String> {
        self.watch.dead()
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.watch.stopping();
            // The follower holds the transport's command channel: ending it ends the transport.
            for t in &self.tasks {
                t.abort();
            }
            for t in self.tasks {
                let _ = t.await;
            }
            lock_unpoisoned(&self.gateway.gateway()).set_sync(false);
        })
    }
}

/// Human text for `vipgate show sync`.
pub(crate) fn render(items: &[Value]) -> String {
    super::render_each(items, render_one)
}

fn ago(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".into(),
        |d| format!("{:.1}s ago", d.as_secs_f64()),
    )
}

fn render_one(out: &mut String, s: &SyncStatus) {
    let c = &s.counters;
    let role = match s.state {
        Role::Master => "master, streaming its flows",
        Role::Backup => "backup, holding the peers' flows as standby",
    };
    let _ = writeln!(
        out,
        "sync {}: {role} (vrrp {} is {}), {}",
        s.name,
        s.vrrp,
        s.vrrp_state,
        if s.synced {
            "synced"
        } else {
            "snapshot pending"
        }
    );
    out.push_str(if s.ready {
        "  sync ready: VRRP may preempt\n"
    } else {
        "  preempt waits for sync: VRRP stays backup until the master's snapshot is in\n"
    });
    let _ = writeln!(
        out,
        "  standby flows {}/{}, templates {}   last snapshot {}{}   unacknowledged messages {}",
        s.standby_flows,
        s.standby_cap,
        s.standby_templates,
        ago(s.last_bulk_ago_ms),
        s.last_bulk_flows
            .map(|n| {
                let whose = if s.last_bulk_from_master == Some(true) {
                    ", from the master"
                } else {
                    ""
                };
                format!(" ({n} records{whose})")
            })
            .unwrap_or_default(),
        s.queued
    );
    let _ = writeln!(
        out,
        "  sent     {} messages, {} bytes, {} records ({} resent, {} snapshots served)",
        c.messages_sent, c.bytes_sent, c.flows_sent, c.resent, c.bulks_served
    );
    let _ = writeln!(
        out,
        "  received {} messages, {} bytes, {} records ({} snapshots)",
        c.messages_received, c.bytes_received, c.flows_received, c.bulks_received
    );
    let _ = writeln!(
        out,
        "  promotions {}: {} flows promoted, {} refused; standby applied {}, removed {}, expired {}, over cap {}",
        c.promotions,
        c.promoted,
        c.promote_refused,
        c.standby_applied,
        c.standby_removed,
        c.standby_expired,
        c.standby_over_cap
    );
    let _ = writeln!(
        out,
        "  persistence templates: {} installed, {} refused; standby applied {}, removed {}, expired {}, over cap {}",
        c.templates_installed,
        c.templates_refused,
        c.templates_applied,
        c.templates_removed,
        c.templates_expired,
        c.templates_over_cap
    );
    let _ = writeln!(
        out,
        "  lblc/lblcr destinations: {} installed, {} removed, {} refused; {} withheld from peers that do not take them",
        c.locality_installed, c.locality_removed, c.locality_refused, c.locality_withheld
    );
    let _ = writeln!(out, "  drops: {}", super::drops_text(&c.drops));
    let _ = writeln!(
        out,
        "  {:<16} {:<5} {:>10} {:>8} {:>8} {:<8}  SNAPSHOT",
        "PEER", "STATE", "HEARD", "UNACKED", "BUFFERED", "LOCALITY"
    );
    for p in &s.peers {
        let _ = writeln!(
            out,
            "  {:<16} {:<5} {:>10} {:>8} {:>8} {:<8}  {}",
            p.address,
            if p.up { "up" } else { "down" },
            ago(Some(p.last_heard_ago_ms)),
            p.unacked,
            p.buffered,
            if p.takes_locality { "yes" } else { "no" },
            p.bulk
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;
    use testkit::packet::{TcpFlags, ipv4_tcp};

    const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn gateway() -> Arc<Mutex<natgw::Gateway>> {
        let cfg = natgw::GatewayConfig {
            overload: Some(PUBLIC),
            inside_networks: vec!["192.168.1.0/24".parse().expect("a network")],
            local_addresses: vec![PUBLIC],
            ..natgw::GatewayConfig::default()
        };
        Arc::new(Mutex::new(
            natgw::Gateway::new(clock(), cfg).expect("a gateway"),
        ))
    }

    fn follower(gw: &Arc<Mutex<natgw::Gateway>>) -> (Follower, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(8);
        let f = Follower {
            gw: Arc::clone(gw),
            commands: tx,
            followed: Arc::new(Mutex::new(Followed {
                role: Role::Backup,
                vrrp_state: State::Initialize,
                promotions: 0,
                ignored_as_master: 0,
                last_bulk: None,
            })),
            gate: None,
        };
        (f, rx)
    }

    /// The master's snapshot opens the VRRP instance's preemption gate; a backup's (which
    /// owns nothing) does not.
    #[tokio::test]
    async fn the_masters_snapshot_opens_the_preemption_gate() {
        let gw = gateway();
        let (mut f, _rx) = follower(&gw);
        let (gate, ready) = watch::channel(false);
        f.gate = Some(gate);
        f.handle(Event::PeerUp { node: 7 }, false).await.unwrap();
        assert!(!*ready.borrow(), "a peer alone is not a snapshot");
        let snapshot = |from, owner| Event::BulkComplete {
            from,
            records: 0,
            owner,
        };
        f.handle(snapshot(8, false), false).await.unwrap();
        assert!(!*ready.borrow(), "a backup's snapshot");
        assert_eq!(
            lock_unpoisoned(&f.followed).last_bulk.map(|(_, _, o)| o),
            Some(false)
        );
        f.handle(snapshot(7, true), false).await.unwrap();
        assert!(*ready.borrow(), "the master's");
    }

    /// A snapshot command's records and owner flag.
    fn snapshot(c: Option<Command>) -> (usize, bool) {
        match c {
            Some(Command::Snapshot { updates, owner }) => (updates.len(), owner),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    /// The master's journal reaches the backup as standby flows; the backup promotes them
    /// when its instance becomes MASTER and then streams them itself; a master ignores a
    /// peer's changes and answers snapshot requests with its flows.
    #[tokio::test]
    async fn a_backup_holds_the_masters_flows_and_promotes_them_on_mastership() {
        let master = gateway();
        lock_unpoisoned(&master).set_sync(true);
        let mut syn = ipv4_tcp(
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 40_000),
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80),
            TcpFlags::SYN,
            b"",
        );
        {
            let mut g = lock_unpoisoned(&master);
            let d = g.direction(&syn);
            let _ = g.handle_packet(clock(), d, &mut syn);
        }
        let updates = lock_unpoisoned(&master).take_sync_updates(clock());
        assert_eq!(updates.len(), 1);

        let backup = gateway();
        let (f, mut sent) = follower(&backup);
        let mut is_master = false;
        f.follow(State::Backup, &mut is_master, "vip")
            .await
            .expect("followed");
        let event = Event::Updates {
            from: 1,
            bulk: false,
            updates: updates.clone(),
        };
        f.handle(event.clone(), is_master).await.expect("handled");
        assert_eq!(lock_unpoisoned(&backup).standby().len(), 1);
        assert_eq!(lock_unpoisoned(&backup).table().len(), 0);

        f.follow(State::Master, &mut is_master, "vip")
            .await
            .expect("followed");
        assert!(is_master);
        assert_eq!(lock_unpoisoned(&backup).standby().len(), 0);
        assert_eq!(lock_unpoisoned(&backup).table().len(), 1, "promoted");
        assert_eq!(
            snapshot(sent.try_recv().ok()),
            (1, true),
            "the new master sends its flows as the owner's snapshot"
        );
        assert_eq!(lock_unpoisoned(&f.followed).promotions, 1);

        f.handle(event, is_master).await.expect("handled");
        assert_eq!(lock_unpoisoned(&f.followed).ignored_as_master, 1);
        assert_eq!(lock_unpoisoned(&backup).standby().len(), 0);
        f.handle(Event::SnapshotRequested { by: 2 }, is_master)
            .await
            .expect("handled");
        assert_eq!(
            snapshot(sent.try_recv().ok()),
            (1, true),
            "a snapshot of its flows"
        );

        f.follow(State::Backup, &mut is_master, "vip")
            .await
            .expect("followed");
        f.handle(Event::SnapshotRequested { by: 2 }, is_master)
            .await
            .expect("handled");
        assert_eq!(
            snapshot(sent.try_recv().ok()),
            (0, false),
            "a backup owns no flow"
        );
    }

    #[test]
    fn status_round_trips_and_renders() {
        let mut counters = SyncCounters::default();
        let stats = SyncStats {
            auth_failures: 2,
            replays: 1,
            ..SyncStats::default()
        };
        counters.drops = drops_of(&stats);
        let status = SyncStatus {
            name: "10.0.0.11:8849".into(),
            state: Role::Backup,
            vrrp: "vip-web".into(),
            vrrp_state: State::Backup,
            synced: true,
            ready: true,
            peers_up: 1,
            queued: 0,
            standby_flows: 4,
            standby_cap: 100,
            last_bulk_ago_ms: Some(Duration::from_millis(1500)),
            last_bulk_flows: Some(4),
            last_bulk_from_master: Some(true),
            standby_templates: 2,
            peers: vec![PeerView {
                address: Ipv4Addr::new(10, 0, 0, 12),
                up: true,
                last_heard_ago_ms: Duration::from_millis(200),
                unacked: 0,
                buffered: 0,
                bulk: "complete (4 flows)".into(),
                takes_locality: true,
            }],
            counters,
        };
        let json = serde_json::to_value(&status).expect("serialises");
        assert_eq!(json["state"], "backup");
        assert_eq!(json["vrrp_state"], "BACKUP");
        assert_eq!(json["counters"]["drops"]["auth_failures"], 2);
        assert_eq!(json["last_bulk_ago_ms"], 1500);
        let text = render(&[json]);
        assert!(text.contains("standby flows 4/100, templates 2"), "{text}");
        assert!(text.contains("(4 records, from the master)"), "{text}");
        assert!(
            text.contains("lblc/lblcr destinations: 0 installed, 0 removed, 0 refused; 0 withheld"),
            "{text}"
        );
        assert!(
            text.contains(" yes      "),
            "the peer takes locality records: {text}"
        );
        assert!(text.contains("drops: auth_failures 2, replays 1"), "{text}");
        assert!(text.contains("10.0.0.12"), "{text}");
    }
}
