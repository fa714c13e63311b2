//! Flow sync on the gateway: what the master sends ([`Gateway::take_sync_updates`],
//! [`Gateway::export_flows`]) and what a backup does with it ([`Gateway::apply_standby`],
//! [`Gateway::promote_standby`]); and the flows a restarted daemon finds in its kernel path's
//! maps ([`Gateway::adopt_fast_path_flows`]), which go through the same promotion.
//!
//! Call order in a daemon with sync: turn the journal on ([`Gateway::set_sync`]); after each
//! batch of packets (and after `handle_timeout`), send `take_sync_updates`; answer a peer's
//! snapshot request with `export_flows`, and send `export_flows` again every refresh period
//! so a backup's standby flows never expire under a live flow; apply what peers send with
//! `apply_standby`; when VRRP makes this node master, `promote_standby` at once.

use std::time::Instant;

use flowsync::Update;

use super::Gateway;
use crate::flow::{FlowEvent, ListenerId, Proto};
use crate::sync::{Promotion, StandbyFlows, flow_key, state_of};
use crate::table::{FlowChange, FlowImage, InstallError, JournalDrain, PublicOwner};
use crate::tcp::TcpState;

impl Gateway {
    /// Turns the change journal on (a node that syncs) or off.
    pub fn set_sync(&mut self, on: bool) {
        self.table.set_journal(on);
    }

    /// The flows created, changed or removed since the last call, in order. After the journal
    /// overflowed, every flow instead.
    pub fn take_sync_updates(&mut self, now: Instant) -> Vec<Update> {
        let JournalDrain {
            changes,
            overflowed,
        } = self.table.drain_journal(now);
        if overflowed {
            return self.export_flows(now);
        }
        changes
            .into_iter()
            .map(|c| match c {
                FlowChange::Live(img) => Update::Flow(state_of(&img)),
                FlowChange::Removed(proto, public, outside) => {
                    Update::FlowGone(flow_key(proto, public, outside))
                }
            })
            .collect()
    }

    /// Every live flow, as sync sends it (a snapshot, or a periodic refresh).
    #[must_use]
    pub fn export_flows(&self, now: Instant) -> Vec<Update> {
        self.table
            .export(now)
            .iter()
            .map(|img| Update::Flow(state_of(img)))
            .collect()
    }

    /// Applies a peer's changes to the standby flows (not used until promoted).
    pub fn apply_standby(&mut self, now: Instant, updates: &[Update]) {
        self.standby.apply(now, updates);
    }

    /// Drops the standby flows whose deadline passed (call about once a second).
    pub fn expire_standby(&mut self, now: Instant) {
        self.standby.expire(now);
    }

    /// The standby flows (count, bound, counters).
    #[must_use]
    pub fn standby(&self) -> &StandbyFlows {
        &self.standby
    }

    /// Bounds the standby flows (by default the table's capacity).
    pub fn set_standby_cap(&mut self, cap: usize) {
        self.standby.set_cap(cap);
    }

    /// Makes every standby flow live: this node became master. Each keeps its endpoints and
    /// TCP state and gets the full idle timeout of its state; services hear `Opened` (and
    /// `Established`) for them, so their connection counts include them.
    ///
    /// A flow of a listener is refused unless that listener leads to its inside endpoint (the
    /// static forward's host, a backend or the sorry server of the service): an authenticated
    /// peer with another configuration, or a forged record, never opens a forward's public
    /// port to another inside host.
    pub fn promote_standby(&mut self, now: Instant) -> Promotion {
        let (images, stray): (Vec<FlowImage>, Vec<FlowImage>) =
            self.standby.take_all(now).into_iter().partition(|img| {
                img.listener
                    .is_none_or(|id| self.listener_leads_to(id, img.inside))
            });
        let mut p = self.promote_images(now, images);
        p.refused += stray.len();
        self.standby.count_promotion(&p);
        p
    }

    /// Makes live the flows a second data path was carrying before this gateway existed: a
    /// restarted daemon finds them in its kernel path's pinned maps, which only ever held
    /// flows a core had made eligible ([`Gateway::fast_path_eligible`]). Each becomes the
    /// record a flow-sync peer would have sent and is promoted like a standby flow (same
    /// refusals: a public address or port this gateway does not own, a clash, a full
    /// table); in addition a flow whose public endpoint belongs to a listener is refused
    /// unless that listener still leads to its inside endpoint (the static forward's host, a
    /// backend or the sorry server of the service). The owner of the public endpoint decides
    /// the flow's origin: a listener's flows came from outside, dynamic ones from inside.
    /// TCP flows resume established (the only TCP state the data path carries, but for a
    /// direct-routing service's).
    pub fn adopt_fast_path_flows(&mut self, now: Instant, flows: &[AdoptedFlow]) -> Promotion {
        let mut images = Vec::with_capacity(flows.len());
        let mut refused = 0;
        for f in flows {
            match self.adopted_listener(f) {
                Ok(listener) => images.push(FlowImage {
                    proto: f.proto,
                    inside: f.inside,
                    public: f.public,
                    outside: f.outside,
                    listener,
                    tcp: if f.proto == Proto::Tcp {
                        TcpState::Established
                    } else {
                        TcpState::None
                    },
                    first_fin_orig: false,
                    from_inside: listener.is_none(),
                    replied: true,
                    assured: true,
                    expires_in_secs: 0,
                }),
                Err(()) => refused += 1,
            }
        }
        let mut p = self.promote_images(now, images);
        p.refused += refused;
        p
    }

    /// The listener an adopted flow belongs to (`None`: a dynamic flow); `Err` when its
    /// public endpoint is a listener's that no longer leads to the flow's inside endpoint.
    fn adopted_listener(&self, f: &AdoptedFlow) -> Result<Option<ListenerId>, ()> {
        let Some(idx) = self.table.find_public(*f.public.ip()) else {
            // Refused by the promotion (unknown public address).
            return Ok(None);
        };
        let Some(PublicOwner::Listener(id)) =
            self.table.public_owner(f.proto, idx, f.public.port())
        else {
            return Ok(None);
        };
        if self.listener_leads_to(id, f.inside) {
            Ok(Some(id))
        } else {
            Err(())
        }
    }

    /// Whether listener `id` leads to `inside`: the static forward's host, or a backend or the
    /// sorry server of the service.
    fn listener_leads_to(&self, id: ListenerId, inside: std::net::SocketAddrV4) -> bool {
        let Some(listener) = self.listener(id) else {
            return false;
        };
        match (
            listener.selector.as_static(),
            listener.selector.as_service(),
        ) {
            (Some(s), _) => s.inside == inside,
            (None, Some(svc)) => svc.uses_endpoint(inside),
            (None, None) => false,
        }
    }

    /// Installs `images` in the table (see [`Gateway::promote_standby`]).
    fn promote_images(&mut self, now: Instant, images: Vec<FlowImage>) -> Promotion {
        let mut p = Promotion::default();
        for img in images {
            match self.table.install(now, &img, self.overload) {
                Ok(()) => {
                    p.promoted += 1;
                    self.stats.flows_created += 1;
                    self.announce_promoted(now, &img);
                }
                Err(InstallError::Exists) => p.already_live += 1,
                Err(
                    InstallError::UnknownPublic
                    | InstallError::Clash
                    | InstallError::TableFull
                    | InstallError::NotAllocatable,
                ) => {
                    p.refused += 1;
                }
            }
        }
        self.report_evicted(now);
        p
    }

    fn announce_promoted(&mut self, now: Instant, img: &FlowImage) {
        self.notify(
            now,
            img.listener,
            img.inside,
            img.outside,
            FlowEvent::Opened,
        );
        if img.tcp == TcpState::Established {
            self.notify(
                now,
                img.listener,
                img.inside,
                img.outside,
                FlowEvent::Established,
            );
        }
    }
}

/// A flow the kernel path carried for a previous run of the daemon, as its map entries give
/// it (see [`Gateway::adopt_fast_path_flows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdoptedFlow {
    /// TCP or UDP.
    pub proto: Proto,
    /// The inside endpoint (a direct-routing flow's real server).
    pub inside: std::net::SocketAddrV4,
    /// The public endpoint.
    pub public: std::net::SocketAddrV4,
    /// The remote endpoint.
    pub outside: std::net::SocketAddrV4,
}

/// The default bound on standby flows: as many as the table holds.
pub(super) fn standby_for(table_capacity: usize) -> StandbyFlows {
    StandbyFlows::new(table_capacity)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;

    use flowsync::{FlowKey, FlowProto, FlowState, PersistKey, TcpPhase};
    use testkit::epoch;
    use testkit::packet::{TcpFlags, ipv4_tcp, ipv4_udp};

    use super::*;
    use crate::config::GatewayConfig;
    use crate::flow::{Direction, Proto};
    use crate::gateway::Verdict;
    use crate::service::{ServiceConfig, VirtualService};
    use crate::sync::STANDBY_GRACE;

    const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
    const H1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 40000);
    const SRV: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80);
    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 5555);

    /// A gateway with an overload address and a two-backend service on `VIP`, as both nodes
    /// of a pair are configured.
    fn node() -> Gateway {
        let mut g = Gateway::new(
            epoch(),
            GatewayConfig {
                overload: Some(PUBLIC),
                inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                local_addresses: vec![PUBLIC],
                compensate_ttl: false,
                ..GatewayConfig::default()
            },
        )
        .unwrap();
        let backend = |last| {
            balance::BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080), 1)
        };
        let svc = VirtualService::new(ServiceConfig {
            name: "web".into(),
            listen: VIP,
            pool: balance::PoolConfig {
                scheduler: balance::SchedulerKind::Rr,
                backends: vec![backend(100), backend(101)],
                ..balance::PoolConfig::default()
            },
            health: None,
            forward: crate::Forward::Nat,
            proto: Proto::Tcp,
            one_packet: false,
        })
        .unwrap();
        g.add_listener(Proto::Tcp, VIP, svc).unwrap();
        g
    }

    fn dst(b: &[u8]) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            u16::from_be_bytes([b[22], b[23]]),
        )
    }

    fn src(b: &[u8]) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            u16::from_be_bytes([b[20], b[21]]),
        )
    }

    /// Handles a packet in the direction `nat0` would classify it; returns the verdict and
    /// the rewritten packet.
    fn send(g: &mut Gateway, now: Instant, mut p: Vec<u8>) -> (Verdict, Vec<u8>) {
        let d = g.direction(&p);
        let v = g.handle_packet(now, d, &mut p);
        (v, p)
    }

    /// An established outbound TCP flow, an answered UDP flow and an established flow to the
    /// service; returns the backend the service chose.
    fn traffic(g: &mut Gateway, now: Instant) -> SocketAddrV4 {
        let public = SocketAddrV4::new(PUBLIC, H1.port());
        let _ = send(g, now, ipv4_tcp(H1, SRV, TcpFlags::SYN, b""));
        let _ = send(g, now, ipv4_tcp(SRV, public, TcpFlags::SYN_ACK, b""));
        let _ = send(g, now, ipv4_tcp(H1, SRV, TcpFlags::ACK, b""));
        let _ = send(g, now, ipv4_udp(H1, SRV, b"q"));
        let _ = send(g, now, ipv4_udp(SRV, public, b"a"));
        let (_, syn) = send(g, now, ipv4_tcp(CLIENT, VIP, TcpFlags::SYN, b""));
        let backend = dst(&syn);
        let _ = send(g, now, ipv4_tcp(backend, CLIENT, TcpFlags::SYN_ACK, b""));
        let _ = send(g, now, ipv4_tcp(CLIENT, VIP, TcpFlags::ACK, b""));
        backend
    }

    #[test]
    fn a_backup_holds_synced_flows_apart_and_promotes_them_intact() {
        let now = epoch();
        let (mut master, mut backup) = (node(), node());
        master.set_sync(true);
        let backend = traffic(&mut master, now);
        let updates = master.take_sync_updates(now);
        assert!(master.take_sync_updates(now).is_empty(), "drained");
        backup.apply_standby(now, &updates);
        assert_eq!(backup.standby().len(), 3);
        assert_eq!(
            backup.table().len(),
            0,
            "standby flows are not in the table"
        );

        // Not used before promotion: mid-stream packets are not translated.
        let public = SocketAddrV4::new(PUBLIC, H1.port());
        let (_, p) = send(&mut backup, now, ipv4_tcp(SRV, public, TcpFlags::ACK, b"x"));
        assert_eq!(dst(&p), public);
        let (v, _) = send(&mut backup, now, ipv4_tcp(CLIENT, VIP, TcpFlags::ACK, b"x"));
        assert_eq!(v, Verdict::Drop(crate::DropReason::NotSyn));

        let later = now + Duration::from_secs(5);
        let p = backup.promote_standby(later);
        assert_eq!(
            p,
            Promotion {
                promoted: 3,
                already_live: 0,
                refused: 0
            }
        );
        assert!(backup.standby().is_empty());
        assert_eq!(backup.table().len(), 3);
        // Both directions continue exactly: same public port, same backend.
        let (v, p) = send(
            &mut backup,
            later,
            ipv4_tcp(SRV, public, TcpFlags::ACK, b"x"),
        );
        assert_eq!((v, dst(&p)), (Verdict::Forward, H1));
        let (_, p) = send(&mut backup, later, ipv4_tcp(H1, SRV, TcpFlags::ACK, b"y"));
        assert_eq!(src(&p), public);
        let (v, p) = send(
            &mut backup,
            later,
            ipv4_tcp(CLIENT, VIP, TcpFlags::ACK, b"x"),
        );
        assert_eq!((v, dst(&p)), (Verdict::Forward, backend));
        let (_, p) = send(&mut backup, later, ipv4_udp(SRV, public, b"a"));
        assert_eq!(dst(&p), H1);
        // The promoted flows are established in the table, and the service counts its one.
        let established = backup
            .translations(later)
            .iter()
            .filter(|t| t.established)
            .count();
        assert_eq!(established, 2);
        let id = ListenerId(0);
        let svc = backup.selector_mut(id).unwrap().as_service_mut().unwrap();
        let b = svc
            .pool()
            .backend(svc.backend_id(backend).unwrap())
            .unwrap();
        assert_eq!(b.active(), 1);
    }

    #[test]
    fn flows_adopted_from_the_fast_path_continue_and_stale_ones_are_refused() {
        let now = epoch();
        let mut g = node();
        let public = SocketAddrV4::new(PUBLIC, 40_000);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 8080);
        let flow = |proto, inside, public, outside| AdoptedFlow {
            proto,
            inside,
            public,
            outside,
        };
        let p = g.adopt_fast_path_flows(
            now,
            &[
                flow(Proto::Tcp, H1, public, SRV),
                flow(Proto::Udp, H1, public, SRV),
                flow(Proto::Tcp, backend, VIP, CLIENT),
                // A backend the service no longer has.
                flow(
                    Proto::Tcp,
                    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 8080),
                    VIP,
                    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 5555),
                ),
                // A public address this gateway no longer has.
                flow(
                    Proto::Udp,
                    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 6), 53),
                    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 99), 7000),
                    SRV,
                ),
            ],
        );
        assert_eq!(
            p,
            Promotion {
                promoted: 3,
                already_live: 0,
                refused: 2
            }
        );
        assert_eq!(g.table().len(), 3);
        assert!(g.standby().stats().promoted == 0, "not counted as sync");
        let (v, p) = send(&mut g, now, ipv4_tcp(SRV, public, TcpFlags::ACK, b"x"));
        assert_eq!((v, dst(&p)), (Verdict::Forward, H1));
        let (_, p) = send(&mut g, now, ipv4_tcp(H1, SRV, TcpFlags::ACK, b"y"));
        assert_eq!(src(&p), public);
        let (v, p) = send(&mut g, now, ipv4_tcp(CLIENT, VIP, TcpFlags::ACK, b"x"));
        assert_eq!((v, dst(&p)), (Verdict::Forward, backend));
        let eligible = g
            .translations(now)
            .iter()
            .filter(|t| g.fast_path_eligible(t))
            .count();
        assert_eq!(eligible, 3, "the adopted flows stay on the fast path");
        let svc = g
            .selector_mut(ListenerId(0))
            .unwrap()
            .as_service_mut()
            .unwrap();
        let b = svc
            .pool()
            .backend(svc.backend_id(backend).unwrap())
            .unwrap();
        assert_eq!(b.active(), 1, "the service counts the adopted connection");
        // Adopting again finds them live.
        let again = g.adopt_fast_path_flows(now, &[flow(Proto::Tcp, H1, public, SRV)]);
        assert_eq!(again.already_live, 1);
    }

    #[test]
    fn removals_and_state_changes_are_journaled_in_order() {
        let now = epoch();
        let mut master = node();
        master.set_sync(true);
        traffic(&mut master, now);
        let first = master.take_sync_updates(now);
        let last_tcp = first
            .iter()
            .rev()
            .find_map(|u| match u {
                Update::Flow(f) if f.inside == H1 && f.key.proto == FlowProto::Tcp => Some(f.tcp),
                _ => None,
            })
            .unwrap();
        assert_eq!(last_tcp, TcpPhase::Established);
        master.clear(now);
        let gone = master.take_sync_updates(now);
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|u| matches!(u, Update::FlowGone(_))));
        // A node that does not sync journals nothing.
        let mut quiet = node();
        traffic(&mut quiet, now);
        assert!(quiet.take_sync_updates(now).is_empty());
        assert_eq!(quiet.export_flows(now).len(), 3);
    }

    fn standby_flow(port: u16, expires_in_secs: u32) -> FlowState {
        FlowState {
            key: FlowKey {
                proto: FlowProto::Udp,
                public: SocketAddrV4::new(PUBLIC, port),
                outside: SRV,
            },
            inside: SocketAddrV4::new(*H1.ip(), port),
            listener: None,
            tcp: TcpPhase::None,
            first_fin_from_originator: false,
            from_inside: true,
            replied: true,
            assured: true,
            expires_in_secs,
        }
    }

    #[test]
    fn standby_flows_are_bounded_expire_and_are_removed() {
        let now = epoch();
        let mut g = node();
        g.set_standby_cap(2);
        let flows: Vec<Update> = (1..=3).map(|p| Update::Flow(standby_flow(p, 10))).collect();
        g.apply_standby(now, &flows);
        assert_eq!(g.standby().len(), 2);
        assert_eq!(g.standby().stats().over_cap, 1);
        // A change to a flow held is applied even at the bound; a removal frees a place.
        g.apply_standby(now, &[Update::Flow(standby_flow(1, 300))]);
        g.apply_standby(now, &[Update::FlowGone(standby_flow(2, 0).key)]);
        assert_eq!(g.standby().len(), 1);
        assert_eq!(g.standby().stats().removed, 1);
        g.apply_standby(
            now,
            &[Update::PersistGone(PersistKey {
                listener: 0,
                client: *CLIENT.ip(),
            })],
        );
        assert_eq!(g.standby().stats().persistence_ignored, 1);
        // Unrefreshed past its timeout plus the grace: gone.
        g.apply_standby(now, &[Update::Flow(standby_flow(3, 10))]);
        g.expire_standby(now + Duration::from_secs(10) + STANDBY_GRACE + Duration::from_secs(1));
        assert_eq!(g.standby().len(), 1, "the 300 s flow stays");
        assert_eq!(g.standby().stats().expired, 1);
        assert_eq!(g.table().len(), 0);
    }

    #[test]
    fn promotion_refuses_clashes_and_skips_flows_already_live() {
        let now = epoch();
        let (mut master, mut backup) = (node(), node());
        master.set_sync(true);
        traffic(&mut master, now);
        let updates = master.take_sync_updates(now);
        // The backup's own traffic: the same UDP flow, and another host on the TCP flow's
        // public port (a dynamic mapping the master's flow needs).
        let _ = send(&mut backup, now, ipv4_udp(H1, SRV, b"q"));
        let other = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 6), H1.port());
        let (_, p) = send(&mut backup, now, ipv4_tcp(other, SRV, TcpFlags::SYN, b""));
        assert_eq!(
            src(&p),
            SocketAddrV4::new(PUBLIC, H1.port()),
            "it took the port"
        );
        backup.apply_standby(now, &updates);
        let p = backup.promote_standby(now);
        assert_eq!(
            p,
            Promotion {
                promoted: 1,
                already_live: 1,
                refused: 1
            },
            "the service flow is installed, the UDP flow exists, the TCP flow's port is taken"
        );
        assert_eq!(backup.standby().stats().promote_refused, 1);
        assert_eq!(backup.table().len(), 3);
    }

    /// Sync is a state-injection surface: even an authenticated peer (a misconfigured one, or
    /// a compromised node holding the key) cannot make this node claim a public endpoint its
    /// PAT would never allocate, nor lead a listener to an inside host it does not lead to.
    /// Each such flow is refused at promotion and counted.
    #[test]
    fn promotion_refuses_endpoints_this_node_would_never_use() {
        let now = epoch();
        let mut backup = node();
        let dynamic = |public: SocketAddrV4, proto| {
            let mut f = standby_flow(40_001, 300);
            f.key.public = public;
            f.key.proto = proto;
            f.inside = SocketAddrV4::new(*H1.ip(), public.port());
            Update::Flow(f)
        };
        backup.apply_standby(
            now,
            &[
                // Legitimate: the overload address, a port of the range.
                dynamic(SocketAddrV4::new(PUBLIC, 40_001), FlowProto::Udp),
                // A port below the range (1024-65535): the router's own SSH, say.
                dynamic(SocketAddrV4::new(PUBLIC, 22), FlowProto::Tcp),
                dynamic(SocketAddrV4::new(PUBLIC, 1023), FlowProto::Udp),
                // A service's VIP is no overload address, whatever the port.
                dynamic(SocketAddrV4::new(*VIP.ip(), 40_002), FlowProto::Tcp),
                // An address this node does not have at all.
                dynamic(
                    SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 40_003),
                    FlowProto::Udp,
                ),
                // The service's listener, to an inside host that is none of its backends.
                Update::Flow(FlowState {
                    key: FlowKey {
                        proto: FlowProto::Tcp,
                        public: VIP,
                        outside: CLIENT,
                    },
                    inside: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 66), 22),
                    listener: Some(0),
                    tcp: TcpPhase::Established,
                    ..standby_flow(40_004, 300)
                }),
            ],
        );
        assert_eq!(backup.standby().len(), 6);
        let p = backup.promote_standby(now);
        assert_eq!(
            p,
            Promotion {
                promoted: 1,
                already_live: 0,
                refused: 5
            }
        );
        assert_eq!(backup.standby().stats().promote_refused, 5);
        assert_eq!(backup.table().len(), 1);
        // Only the legitimate flow holds a public endpoint.
        let t = backup.translations(now);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].public, SocketAddrV4::new(PUBLIC, 40_001));
    }

    /// Both halves together: a master gateway's flows travel through two sync engines to a
    /// backup that starts late (so it pulls a snapshot) and then follows live changes; after
    /// promotion the backup continues the flows.
    #[test]
    fn a_late_backup_pulls_the_masters_flows_through_the_protocol_and_takes_over() {
        use flowsync::{Event, Now, SyncConfig, SyncEngine, SyncKey};
        use std::num::NonZeroU32;

        let key = SyncKey::new(b"pair key, at least 16 bytes").unwrap();
        let at = |secs: u64| Now {
            at: epoch() + Duration::from_secs(secs),
            unix_secs: 1_800_000_000 + secs,
        };
        let cfg = |node: u32| SyncConfig::new(NonZeroU32::new(node).unwrap(), 1, key.clone());
        let (mut master, mut backup) = (node(), node());
        master.set_sync(true);
        let mut sync_m = SyncEngine::new(at(0), cfg(1));
        let backend = traffic(&mut master, at(0).at);
        // What the master journaled before the backup existed reaches nobody.
        let early = master.take_sync_updates(at(0).at);
        sync_m.send_updates(at(0), &early);
        while sync_m.poll_transmit().is_some() {}

        let mut sync_b = SyncEngine::new(at(1), cfg(2));
        // Runs both engines until nothing moves, feeding each side's events to its gateway.
        let exchange = |now: Now,
                        master: &mut Gateway,
                        backup: &mut Gateway,
                        sync_m: &mut SyncEngine,
                        sync_b: &mut SyncEngine| {
            for _ in 0..32 {
                sync_m.handle_timeout(now);
                sync_b.handle_timeout(now);
                let mut moved = false;
                while let Some(d) = sync_b.poll_transmit() {
                    let _ = sync_m.handle_datagram(now, &d);
                    moved = true;
                }
                while let Some(d) = sync_m.poll_transmit() {
                    let _ = sync_b.handle_datagram(now, &d);
                    moved = true;
                }
                while let Some(e) = sync_m.poll_event() {
                    if let Event::SnapshotRequested { .. } = e {
                        let all = master.export_flows(now.at);
                        sync_m.send_snapshot(now, &all);
                    }
                }
                while let Some(e) = sync_b.poll_event() {
                    if let Event::Updates { updates, .. } = e {
                        backup.apply_standby(now.at, &updates);
                    }
                }
                if !moved {
                    break;
                }
            }
        };
        exchange(at(1), &mut master, &mut backup, &mut sync_m, &mut sync_b);
        assert!(sync_b.synced());
        assert_eq!(backup.standby().len(), 3, "the snapshot");

        // A live change: the UDP flow ends on the master.
        let mut p = ipv4_udp(H1, SRV, b"q");
        let _ = master.handle_packet(at(2).at, Direction::Outbound, &mut p);
        master.handle_timeout(at(2).at + Duration::from_secs(400));
        let changes = master.take_sync_updates(at(2).at);
        assert!(
            changes
                .iter()
                .any(|u| matches!(u, Update::FlowGone(k) if k.proto == FlowProto::Udp))
        );
        sync_m.send_updates(at(2), &changes);
        exchange(at(2), &mut master, &mut backup, &mut sync_m, &mut sync_b);
        assert_eq!(backup.standby().len(), master.table().len());

        let p = backup.promote_standby(at(3).at);
        assert_eq!(p.promoted, master.table().len());
        let (v, p) = send(
            &mut backup,
            at(3).at,
            ipv4_tcp(CLIENT, VIP, TcpFlags::ACK, b"x"),
        );
        assert_eq!((v, dst(&p)), (Verdict::Forward, backend));
        assert_eq!(sync_b.stats().auth_failures, 0);
    }

    #[test]
    fn an_overflowed_journal_sends_every_flow_once_and_then_journals_again() {
        let now = epoch();
        let mut g = Gateway::new(
            now,
            GatewayConfig {
                overload: Some(PUBLIC),
                inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                local_addresses: vec![PUBLIC],
                max_mappings: 100_000,
                max_per_host: 100_000,
                ..GatewayConfig::default()
            },
        )
        .unwrap();
        g.set_sync(true);
        let remotes = [*SRV.ip(), Ipv4Addr::new(203, 0, 113, 8)];
        let flows = crate::table::sync::JOURNAL_CAP + 1;
        for i in 0..flows {
            let port = u16::try_from(1 + i % 65_000).unwrap();
            let remote = SocketAddrV4::new(remotes[i / 65_000], port);
            let _ = send(&mut g, now, ipv4_udp(H1, remote, b"q"));
        }
        assert_eq!(g.table().len(), flows);
        let updates = g.take_sync_updates(now);
        assert_eq!(updates.len(), flows, "every flow, once");
        assert!(updates.iter().all(|u| matches!(u, Update::Flow(_))));
        let _ = send(&mut g, now, ipv4_udp(H1, CLIENT, b"q"));
        assert_eq!(g.take_sync_updates(now).len(), 1, "journaling again");
    }
}
