//! Flow sync on the gateway: what the master sends ([`Gateway::take_sync_updates`],
//! [`Gateway::export_state`]: its flows, its services' persistence templates and its
//! `lblc`/`lblcr` services' destination entries) and what a backup does with it ([`Gateway::apply_standby`],
//! [`Gateway::promote_standby`]); and the flows a restarted daemon finds in its kernel path's
//! maps ([`Gateway::adopt_fast_path_flows`]), which go through the same promotion.
//!
//! Call order in a daemon with sync: turn the journal on ([`Gateway::set_sync`]); after each
//! batch of packets (and after `handle_timeout`), send `take_sync_updates`; answer a peer's
//! snapshot request with `export_state`, and send `export_state` again every refresh period
//! so a backup's standby flows never expire under a live flow; apply what peers send with
//! `apply_standby`; when VRRP makes this node master, `promote_standby` at once.

use std::time::Instant;

use flowsync::{LocalityKey, Update};

use super::Gateway;
use crate::flow::{FlowEvent, ListenerId, Proto};
use crate::sync::{
    LocalityOutcome, Promotion, StandbyFlows, flow_key, locality_image, locality_state, state_of,
    template_key, template_state,
};
use crate::table::{FlowChange, FlowImage, InstallError, JournalDrain, PublicOwner};
use crate::tcp::TcpState;

impl Gateway {
    /// Turns the change journal on (a node that syncs) or off: the flow table's and every
    /// service's persistence templates' and destination table's.
    pub fn set_sync(&mut self, on: bool) {
        self.table.set_journal(on);
        for l in self.listeners.iter_mut().flatten() {
            if let Some(svc) = l.selector.as_service_mut() {
                svc.set_sync_journal(on);
            }
        }
    }

    /// The flows and persistence templates created, changed or removed since the last call,
    /// flows in order, and the destination entries created or changed. After the flow
    /// journal overflowed, every flow instead.
    pub fn take_sync_updates(&mut self, now: Instant) -> Vec<Update> {
        let JournalDrain {
            changes,
            overflowed,
        } = self.table.drain_journal(now);
        let mut updates = if overflowed {
            self.export_flow_records(now)
        } else {
            changes
                .into_iter()
                .map(|c| match c {
                    FlowChange::Live(img) => Update::Flow(state_of(&img)),
                    FlowChange::Removed(proto, public, outside) => {
                        Update::FlowGone(flow_key(proto, public, outside))
                    }
                })
                .collect()
        };
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let Some(svc) = l.as_mut().and_then(|l| l.selector.as_service_mut()) else {
                continue;
            };
            let id = ListenerId(u16::try_from(i).unwrap_or(u16::MAX));
            updates.extend(svc.take_template_changes(now).into_iter().map(|c| match c {
                balance::TemplateChange::Live(t) => Update::Persist(template_state(id, &t)),
                balance::TemplateChange::Gone(client) => {
                    Update::PersistGone(template_key(id, client))
                }
            }));
            updates.extend(
                svc.take_locality_changes(now)
                    .iter()
                    .map(|e| Update::Locality(locality_state(id, e))),
            );
            updates.extend(svc.take_locality_removals(now).into_iter().map(|dest| {
                Update::LocalityGone(LocalityKey {
                    listener: id.0,
                    dest,
                })
            }));
        }
        updates
    }

    /// Everything sync holds: every live flow, and every persistence template and
    /// destination entry in force of every service (a snapshot, or a periodic refresh).
    #[must_use]
    pub fn export_state(&self, now: Instant) -> Vec<Update> {
        let mut updates = self.export_flow_records(now);
        for (id, l) in self.listeners() {
            if let Some(svc) = l.selector.as_service() {
                updates.extend(
                    svc.export_templates(now)
                        .iter()
                        .map(|t| Update::Persist(template_state(id, t))),
                );
                updates.extend(
                    svc.export_locality(now)
                        .iter()
                        .map(|e| Update::Locality(locality_state(id, e))),
                );
            }
        }
        updates
    }

    fn export_flow_records(&self, now: Instant) -> Vec<Update> {
        self.table
            .export(now)
            .iter()
            .map(|img| Update::Flow(state_of(img)))
            .collect()
    }

    /// Applies a peer's changes to the standby flows (not used until promoted), and its
    /// destination entries to the services' pools at once (a backup schedules nothing, so
    /// they change no decision before it is master). An entry is refused (and counted,
    /// `locality_refused`) unless its listener is an `lblc`/`lblcr` service that has every
    /// backend it names (by address, never by a peer's index) and room for it. A removal
    /// takes the entry out of its pool (`locality_removed`); one for a listener that is no
    /// `lblc`/`lblcr` service here, or for a destination the pool holds no entry for, is
    /// counted `locality_refused` and changes nothing.
    pub fn apply_standby(&mut self, now: Instant, updates: &[Update]) {
        self.standby.apply(now, updates);
        for u in updates {
            if let Some(outcome) = self.apply_locality(now, u) {
                self.standby.count_locality(outcome);
            }
        }
    }

    /// A peer's locality record applied to its service's pool: what became of it (`None`:
    /// not a locality record, or an entry idle for a day already, which would have expired
    /// on the master too).
    fn apply_locality(&mut self, now: Instant, u: &Update) -> Option<LocalityOutcome> {
        let listener = match u {
            Update::Locality(state) => state.key.listener,
            Update::LocalityGone(key) => key.listener,
            _ => return None,
        };
        let Some(svc) = self
            .selector_mut(ListenerId(listener))
            .and_then(crate::Selector::as_service_mut)
        else {
            return Some(LocalityOutcome::Refused);
        };
        match u {
            Update::Locality(state) => match svc.install_locality(now, &locality_image(state)) {
                Ok(true) => Some(LocalityOutcome::Installed),
                Ok(false) => None,
                Err(_) => Some(LocalityOutcome::Refused),
            },
            Update::LocalityGone(key) => match svc.remove_locality(key.dest) {
                Ok(true) => Some(LocalityOutcome::Removed),
                Ok(false) | Err(_) => Some(LocalityOutcome::Refused),
            },
            _ => None,
        }
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
    ///
    /// Then the standby persistence templates go into their services' pools (after the
    /// flows, whose `Opened` renews their clients' templates on this node: those win). A
    /// template is refused unless its listener is a service with persistence that has a
    /// backend at the template's address (never by a peer's backend index), and when the
    /// pool holds `balance::MAX_TEMPLATES` already.
    pub fn promote_standby(&mut self, now: Instant) -> Promotion {
        let (images, stray): (Vec<FlowImage>, Vec<FlowImage>) =
            self.standby.take_all(now).into_iter().partition(|img| {
                img.listener
                    .is_none_or(|id| self.listener_leads_to(id, img.inside))
            });
        let mut p = self.promote_images(now, images);
        p.refused += stray.len();
        for t in self.standby.take_templates(now) {
            let installed = self
                .selector_mut(t.listener)
                .and_then(crate::Selector::as_service_mut)
                .map(|svc| svc.install_template(now, &t.image));
            match installed {
                Some(Ok(true)) => p.templates += 1,
                Some(Ok(false)) => p.templates_already_live += 1,
                Some(Err(_)) | None => p.templates_refused += 1,
            }
        }
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

    use flowsync::{FlowKey, FlowProto, FlowState, PersistKey, PersistState, TcpPhase};
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
        node_with(balance::SchedulerKind::Rr, [100, 101])
    }

    /// [`node`] with the service scheduled by `scheduler` over backends 10.0.0.`last`:8080,
    /// in that order.
    fn node_with(scheduler: balance::SchedulerKind, backends: [u8; 2]) -> Gateway {
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
            ports: None,
            pool: balance::PoolConfig {
                scheduler,
                backends: backends.into_iter().map(backend).collect(),
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
                refused: 0,
                ..Promotion::default()
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

    /// A synced flow of a multi-port service (here to VIP:443, reaching the backend's 8443
    /// by rport) continues on the backup after the promotion, both ways, and is counted on
    /// its port-less backend.
    #[test]
    fn a_multi_port_services_flow_is_promoted_on_its_port() {
        let now = epoch();
        let multi = || {
            let mut g = node();
            let portless = |last| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 0);
            let ports = crate::ServicePorts::new(
                vec![80..=80, 443..=443],
                vec![crate::PortRule {
                    ports: 443..=443,
                    to: 8443,
                }],
            )
            .unwrap();
            g.add_service(ServiceConfig {
                name: "multi".into(),
                listen: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 80),
                ports: Some(ports),
                pool: balance::PoolConfig {
                    scheduler: balance::SchedulerKind::Rr,
                    backends: vec![
                        balance::BackendConfig::new(portless(110), 1),
                        balance::BackendConfig::new(portless(111), 1),
                    ],
                    ..balance::PoolConfig::default()
                },
                health: None,
                forward: crate::Forward::Nat,
                proto: Proto::Tcp,
                one_packet: false,
            })
            .unwrap();
            g
        };
        let (mut master, mut backup) = (multi(), multi());
        master.set_sync(true);
        let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 443);
        let (_, syn) = send(&mut master, now, ipv4_tcp(CLIENT, vip, TcpFlags::SYN, b""));
        let backend = dst(&syn);
        assert_eq!(backend.port(), 8443);
        let _ = send(
            &mut master,
            now,
            ipv4_tcp(backend, CLIENT, TcpFlags::SYN_ACK, b""),
        );
        let _ = send(&mut master, now, ipv4_tcp(CLIENT, vip, TcpFlags::ACK, b""));
        backup.apply_standby(now, &master.take_sync_updates(now));
        assert_eq!(backup.promote_standby(now).promoted, 1);
        let (v, p) = send(&mut backup, now, ipv4_tcp(CLIENT, vip, TcpFlags::ACK, b"x"));
        assert_eq!((v, dst(&p)), (Verdict::Forward, backend));
        let (v, p) = send(
            &mut backup,
            now,
            ipv4_tcp(backend, CLIENT, TcpFlags::ACK, b"y"),
        );
        assert_eq!((v, src(&p)), (Verdict::Forward, vip));
        let svc = backup.service_mut("multi").unwrap();
        let id = svc.backend_id(SocketAddrV4::new(*backend.ip(), 0)).unwrap();
        assert_eq!(svc.pool().backend(id).unwrap().active(), 1);
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
                refused: 2,
                ..Promotion::default()
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
        assert_eq!(quiet.export_state(now).len(), 3);
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
                refused: 1,
                ..Promotion::default()
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
                refused: 5,
                ..Promotion::default()
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
                        let all = master.export_state(now.at);
                        sync_m.send_snapshot(now, &all, true);
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

    /// A node like `node()` whose service pins clients for 300 s.
    fn persistent_node() -> Gateway {
        let mut g = node();
        let svc = g
            .selector_mut(ListenerId(0))
            .and_then(crate::Selector::as_service_mut)
            .unwrap();
        let mut cfg = ServiceConfig {
            name: "web".into(),
            listen: VIP,
            ports: None,
            pool: balance::PoolConfig {
                scheduler: balance::SchedulerKind::Rr,
                backends: vec![
                    balance::BackendConfig::new(
                        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 8080),
                        1,
                    ),
                    balance::BackendConfig::new(
                        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 8080),
                        1,
                    ),
                ],
                ..balance::PoolConfig::default()
            },
            health: None,
            forward: crate::Forward::Nat,
            proto: crate::Proto::Tcp,
            one_packet: false,
        };
        cfg.pool.persistence = Some(balance::Persistence::new(Duration::from_secs(300)));
        svc.reconfigure(cfg).unwrap();
        g
    }

    /// A whole client connection to the service: SYN to FIN/ACK both ways, the flow gone
    /// from the table; returns the backend that served it.
    fn connection(g: &mut Gateway, now: Instant, client: SocketAddrV4) -> SocketAddrV4 {
        let (v, syn) = send(g, now, ipv4_tcp(client, VIP, TcpFlags::SYN, b""));
        assert_eq!(v, Verdict::Forward);
        let backend = dst(&syn);
        let _ = send(g, now, ipv4_tcp(backend, client, TcpFlags::SYN_ACK, b""));
        let _ = send(g, now, ipv4_tcp(client, VIP, TcpFlags::ACK, b""));
        let _ = send(g, now, ipv4_tcp(client, VIP, TcpFlags::RST, b""));
        backend
    }

    /// The persistence templates travel with the flows: a client whose connection ended on
    /// the master (no flow left to sync) still goes to the same backend on the backup once it
    /// is master, for NEW connections, while the template's time lasts.
    #[test]
    fn a_persistent_client_keeps_its_backend_after_a_promotion() {
        let now = epoch();
        let (mut master, mut backup) = (persistent_node(), persistent_node());
        master.set_sync(true);
        // Another client first, so the persistent one is not on rr's first backend.
        let other = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 50), 6000);
        let other_backend = connection(&mut master, now, other);
        let backend = connection(&mut master, now, CLIENT);
        assert_ne!(backend, other_backend);
        // The reset flows leave the table: only the templates remain to carry the choice.
        let synced = now + Duration::from_secs(60);
        master.handle_timeout(synced);
        assert_eq!(master.table().len(), 0);
        let updates = master.take_sync_updates(synced);
        let templates: Vec<&PersistState> = updates
            .iter()
            .filter_map(|u| match u {
                Update::Persist(t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(templates.len(), 2, "{updates:?}");
        let mine = templates
            .iter()
            .find(|t| t.key.client == *CLIENT.ip())
            .unwrap();
        assert_eq!(
            (mine.backend, mine.key.listener, mine.expires_in_secs),
            (backend, 0, 240)
        );
        assert_eq!(
            master
                .export_state(synced)
                .iter()
                .filter(|u| matches!(u, Update::Persist(_)))
                .count(),
            2,
            "a snapshot carries them too"
        );

        backup.apply_standby(synced, &updates);
        assert_eq!(backup.standby().templates(), 2);
        assert_eq!(backup.standby().len(), 0, "the flows came and went");
        let svc = |g: &Gateway| g.services().next().unwrap().pool().templates();
        assert_eq!(
            svc(&backup),
            0,
            "standby: not in the pool before the promotion"
        );

        let later = now + Duration::from_secs(100);
        let p = backup.promote_standby(later);
        assert_eq!((p.templates, p.templates_refused), (2, 0), "{p:?}");
        assert_eq!(backup.standby().templates(), 0);
        assert_eq!(backup.standby().stats().templates_installed, 2);
        for port in 0..4 {
            let c = SocketAddrV4::new(*CLIENT.ip(), 7000 + port);
            assert_eq!(
                connection(&mut backup, later, c),
                backend,
                "new connection {port}"
            );
        }
        // The template had 200 s left: after them the client is scheduled afresh.
        let after = now + Duration::from_secs(301 + 300);
        let mut seen = std::collections::HashSet::new();
        for port in 0..4 {
            let c = SocketAddrV4::new(*CLIENT.ip(), 8000 + port);
            seen.insert(connection(
                &mut backup,
                after + Duration::from_secs(400 * u64::from(port)),
                c,
            ));
        }
        assert_eq!(seen.len(), 2, "rr again once the templates expired");
    }

    /// A synced template is checked against this node's configuration at promotion: an
    /// unknown listener, a backend this service does not have (matched by address, never by
    /// a peer's index), or a listener that is no service are refused and counted; the
    /// standby store is bounded; a removal and the end of its time drop a standby template.
    #[test]
    fn synced_templates_are_bounded_and_refused_unless_they_fit_this_node() {
        let now = epoch();
        let mut g = persistent_node();
        let template = |listener: u16, client: u8, backend: [u8; 4], secs: u32| {
            Update::Persist(PersistState {
                key: PersistKey {
                    listener,
                    client: Ipv4Addr::new(203, 0, 113, client),
                },
                backend: SocketAddrV4::new(backend.into(), 8080),
                expires_in_secs: secs,
            })
        };
        g.apply_standby(
            now,
            &[
                template(0, 1, [10, 0, 0, 101], 300),
                // No backend 10.0.0.66 in this service.
                template(0, 2, [10, 0, 0, 66], 300),
                // No listener 7.
                template(7, 3, [10, 0, 0, 101], 300),
                // Runs out before the promotion.
                template(0, 4, [10, 0, 0, 100], 5),
                // Removed by its peer.
                template(0, 5, [10, 0, 0, 100], 300),
                Update::PersistGone(PersistKey {
                    listener: 0,
                    client: Ipv4Addr::new(203, 0, 113, 5),
                }),
            ],
        );
        assert_eq!(g.standby().templates(), 4);
        let s = *g.standby().stats();
        assert_eq!((s.templates_applied, s.templates_removed), (5, 1));
        let p = g.promote_standby(now + Duration::from_secs(10));
        assert_eq!((p.templates, p.templates_refused), (1, 2), "{p:?}");
        let s = *g.standby().stats();
        assert_eq!((s.templates_expired, s.templates_refused), (1, 2));
        assert_eq!(g.services().next().unwrap().pool().templates(), 1);

        g.set_standby_cap(2);
        g.apply_standby(
            now,
            &(10..15)
                .map(|c| template(0, c, [10, 0, 0, 100], 300))
                .collect::<Vec<_>>(),
        );
        assert_eq!(g.standby().templates(), 2);
        assert_eq!(g.standby().stats().templates_over_cap, 3);
        assert_eq!(g.table().len(), 0, "templates make no flow");
    }

    /// An `lblc` destination entry goes from the master to the backup's pool as it is made
    /// (by backend address: the two list their backends in another order, so a fresh table on
    /// the backup would pick the other one), survives the promotion and decides the new
    /// master's connections; entries for an unknown service, naming a backend the service
    /// does not have, or past the table's bound are refused and counted.
    #[test]
    fn a_backup_installs_lblc_destinations_and_refuses_hostile_ones() {
        let now = epoch();
        let lblc = balance::SchedulerKind::Lblc;
        let (mut master, mut backup) = (node_with(lblc, [101, 100]), node_with(lblc, [100, 101]));
        master.set_sync(true);
        let (_, syn) = send(&mut master, now, ipv4_tcp(CLIENT, VIP, TcpFlags::SYN, b""));
        let x = dst(&syn);
        assert_eq!(*x.ip(), Ipv4Addr::new(10, 0, 0, 101));
        let updates = master.take_sync_updates(now);
        let entries: Vec<&Update> = updates.iter().filter(|u| u.feature() != 0).collect();
        assert_eq!(entries.len(), 1, "{updates:?}");
        let Update::Locality(good) = entries[0].clone() else {
            unreachable!()
        };
        assert_eq!((good.key.dest, good.backends.clone()), (*VIP.ip(), vec![x]));
        assert!(master.export_state(now).contains(entries[0]));
        backup.apply_standby(now, &updates);
        assert_eq!(backup.standby().stats().locality_installed, 1);
        let pool = |g: &Gateway| {
            g.listeners()
                .find_map(|(_, l)| l.selector.as_service())
                .map(|svc| svc.pool().locality_entries())
        };
        assert_eq!(pool(&backup), Some(1));

        let mut unknown_service = good.clone();
        unknown_service.key.listener = 9;
        let mut stranger = good.clone();
        stranger.backends = vec![SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 200), 8080)];
        backup.apply_standby(
            now,
            &[
                Update::Locality(unknown_service),
                Update::Locality(stranger),
            ],
        );
        assert_eq!(backup.standby().stats().locality_refused, 2);
        let flood: Vec<Update> = (0..balance::MAX_LOCALITY_ENTRIES as u32)
            .map(|i| {
                let mut e = good.clone();
                e.key.dest = Ipv4Addr::from(0xc633_0000 + i);
                Update::Locality(e)
            })
            .collect();
        backup.apply_standby(now, &flood);
        // The table holds the master's entry already: the last of these is one too many.
        assert_eq!(
            backup.standby().stats().locality_refused,
            3,
            "one past the bound"
        );
        assert_eq!(pool(&backup), Some(balance::MAX_LOCALITY_ENTRIES));

        backup.promote_standby(now);
        let other = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 6000);
        let (_, syn) = send(&mut backup, now, ipv4_tcp(other, VIP, TcpFlags::SYN, b""));
        assert_eq!(dst(&syn), x, "the master's cache for the destination");
    }

    /// An `lblc` destination entry that expires on the master leaves the backup's pool too:
    /// the master's next drain carries its removal, and the backup takes the entry out at
    /// once rather than a day later on its own clock. A removal for an unknown service or a
    /// destination the pool does not hold changes nothing and is counted.
    #[test]
    fn a_removal_on_the_master_removes_the_backups_lblc_entry() {
        let now = epoch();
        let lblc = balance::SchedulerKind::Lblc;
        let (mut master, mut backup) = (node_with(lblc, [100, 101]), node_with(lblc, [100, 101]));
        master.set_sync(true);
        let _ = send(&mut master, now, ipv4_tcp(CLIENT, VIP, TcpFlags::SYN, b""));
        backup.apply_standby(now, &master.take_sync_updates(now));
        let pool = |g: &Gateway| {
            g.listeners()
                .find_map(|(_, l)| l.selector.as_service())
                .map(|svc| svc.pool().locality_entries())
        };
        assert_eq!(pool(&backup), Some(1));

        let later = now + balance::LOCALITY_EXPIRY + Duration::from_secs(1);
        let updates = master.take_sync_updates(later);
        let gone: Vec<&Update> = updates
            .iter()
            .filter(|u| matches!(u, Update::LocalityGone(_)))
            .collect();
        assert_eq!(gone.len(), 1, "{updates:?}");
        assert_eq!(pool(&master), Some(0));
        assert!(
            master.take_sync_updates(later).is_empty(),
            "one removal, drained"
        );
        backup.apply_standby(now, &updates);
        assert_eq!(pool(&backup), Some(0));
        assert_eq!(backup.standby().stats().locality_removed, 1);

        let Update::LocalityGone(key) = gone[0].clone() else {
            unreachable!()
        };
        let unknown_service = LocalityKey {
            listener: u16::MAX,
            ..key
        };
        let unknown_dest = LocalityKey {
            dest: Ipv4Addr::new(192, 0, 2, 99),
            ..key
        };
        backup.apply_standby(
            now,
            &[
                Update::LocalityGone(unknown_service),
                Update::LocalityGone(unknown_dest),
                Update::LocalityGone(key),
            ],
        );
        let stats = backup.standby().stats();
        assert_eq!((stats.locality_removed, stats.locality_refused), (1, 3));
    }
}
