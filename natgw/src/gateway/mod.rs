//! `Gateway`: the sans-IO PAT gateway core.
//!
//! Call order (as in quinn-proto's `Connection`): for every packet read from `nat0`, call
//! [`Gateway::handle_packet`] and write the buffer back if the verdict is
//! [`Verdict::Forward`], or have the data path deliver it by MAC on
//! [`Verdict::DirectRoute`]; whenever [`Gateway::poll_timeout`] has passed, call
//! [`Gateway::handle_timeout`]. Everything else (`show`, `clear`, listeners) is plain method
//! calls between packets.

mod fast_path;
mod icmp;
mod listeners;
mod published;
mod services;
mod stats;
mod sync;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use ipnet::Ipv4Net;
use netutil::Reconfigured;
use netutil::ipv4::Ipv4View;

use crate::acl::{Acl, AclDecision, AclPacket, AclRule};
use crate::config::{Filtering, GatewayConfig};
use crate::error::{DropReason, NatError};
use crate::flow::{Direction, FlowEvent, ListenerId, Proto, TCP_RST, TCP_SYN, is_initial_syn};
use crate::fragments::{FragmentKey, FragmentTable, Rewrite};
use crate::table::{
    HalfOpenLimits, MappingId, PatTable, PublicIdx, PublicOwner, RemovedSession, SessionId,
    StateChange, TableConfig, Translation,
};
use crate::tcp::Segment;
use crate::translate::{self, L4, L4Checksum, Parsed, Side};

pub use fast_path::{FastPathActivity, FastPathFlow};
pub use listeners::Listener;
pub use published::{OpenedSyn, PublishedListener};
pub use services::OnePacketSchedule;
pub use stats::GatewayStats;
pub use sync::AdoptedFlow;

/// What the driver does with the buffer after [`Gateway::handle_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Write the buffer (rewritten in place, same length) back to `nat0`. This includes
    /// packets passed through untouched (to the gateway itself, or not translatable).
    Forward,
    /// Drop it; the reason has been counted.
    Drop(DropReason),
    /// A packet to a direct-routing service (LVS-DR): deliver the buffer, unchanged, to the
    /// chosen backend on its directly connected network (only the frame's MACs change). The
    /// data path must install the flow's entry before writing the packet back to `nat0`,
    /// where the kernel program that delivers it looks the entry up.
    DirectRoute(DirectRoute),
}

/// One direct-routing decision: the client's packets to `vip` go to `backend`'s MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectRoute {
    /// The client's endpoint (the packet's source).
    pub client: SocketAddrV4,
    /// The service's endpoint (the packet's destination, unchanged).
    pub vip: SocketAddrV4,
    /// The real server the packet is delivered to (its address is the next hop; its port is
    /// the VIP's, which the packet keeps).
    pub backend: SocketAddrV4,
}

/// What the reader of a packet knows beyond its bytes (TUN offload's virtio-net header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// What the transport checksum field holds.
    pub l4_checksum: L4Checksum,
    /// How many wire packets the buffer stands for: a GSO super-packet is a run of segments
    /// of one flow sharing one header, and the packet counters count segments.
    pub segments: u32,
}

impl Default for PacketMeta {
    fn default() -> Self {
        PacketMeta {
            l4_checksum: L4Checksum::Full,
            segments: 1,
        }
    }
}

/// The PAT gateway core: ACL, static forwards and listeners, dynamic PAT, the table.
#[derive(Debug)]
pub struct Gateway {
    overload: Option<PublicIdx>,
    inside_networks: Vec<Ipv4Net>,
    /// Addresses assigned to this host: the only destinations untranslated traffic may be
    /// passed through to (see [`GatewayConfig::local_addresses`]).
    local_addresses: Vec<Ipv4Addr>,
    acl: Acl,
    table: PatTable,
    /// Indexed by [`ListenerId`]; a removed listener leaves a tombstone (`None`) so that the
    /// ids of the others stay valid. A tombstone's id is reused only after every flow and
    /// mapping of the removed listener is gone.
    listeners: Vec<Option<Listener>>,
    filtering: Filtering,
    compensate_ttl: bool,
    /// How the first fragments of recent fragmented datagrams were rewritten.
    fragments: FragmentTable,
    stats: GatewayStats,
    /// Set by `inbound` when it turned the packet into its answer (a RST) in place.
    refused_in_place: bool,
    /// Set by `inbound` when the packet goes to a direct-routing backend unchanged.
    direct_route: Option<DirectRoute>,
    /// Whether a data path can deliver direct-routing flows (see
    /// [`Gateway::set_direct_routing`]).
    direct_routing: bool,
    /// Flows a peer synced, held until this node becomes master (see `gateway::sync`).
    standby: crate::sync::StandbyFlows,
    /// TCP flows that became established since the data path last took them (see
    /// [`Gateway::take_fast_path_ready`]); `None` while no second data path asks for them.
    fast_path_ready: Option<Vec<FastPathFlow>>,
}

impl Gateway {
    /// Builds the core. `now` is the epoch of its timers.
    ///
    /// # Errors
    /// When two forwards clash or an address/port setting is unusable.
    pub fn new(now: Instant, config: GatewayConfig) -> Result<Self, NatError> {
        if config.port_range.is_empty() {
            return Err(NatError::EmptyPortRange);
        }
        let mut table = PatTable::new(now, table_config(&config));
        let overload = match config.overload {
            Some(a) => Some(
                table
                    .public_index(a)
                    .ok_or(NatError::TooManyPublicAddresses)?,
            ),
            None => None,
        };
        let mut gw = Gateway {
            overload,
            inside_networks: config.inside_networks,
            local_addresses: config.local_addresses,
            acl: Acl::new(config.acl),
            table,
            listeners: Vec::new(),
            filtering: config.filtering,
            compensate_ttl: config.compensate_ttl,
            fragments: FragmentTable::default(),
            refused_in_place: false,
            direct_route: None,
            direct_routing: true,
            standby: sync::standby_for(config.max_mappings),
            stats: GatewayStats::default(),
            fast_path_ready: None,
        };
        for s in &config.statics {
            gw.add_static(now, *s)?;
        }
        for s in &config.services {
            gw.add_service(s.clone())?;
        }
        Ok(gw)
    }

    /// Applies a changed configuration without dropping other flows: ACL (counters restart),
    /// filtering, timeouts, bounds, port range and TTL compensation change in place; static
    /// forwards that disappeared are removed with their flows, and new ones are added (a
    /// changed one is both). The inside networks are replaced.
    ///
    /// Returns [`Reconfigured::NeedsRestart`], having changed nothing, when the overload
    /// address changed (the caller restarts the gateway then).
    ///
    /// # Errors
    /// An empty port range; a new static forward that clashes with a forward or mapping that
    /// stays. Nothing is changed on error.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        config: GatewayConfig,
    ) -> Result<Reconfigured, NatError> {
        if config.port_range.is_empty() {
            return Err(NatError::EmptyPortRange);
        }
        let overload = config.overload.map(|a| self.table.find_public(a));
        if overload != self.overload.map(Some) {
            return Ok(Reconfigured::restart("the overload address changed"));
        }
        self.reconfigure_statics(now, &config.statics)?;
        self.table.set_config(table_config(&config));
        self.local_addresses = config.local_addresses;
        self.acl = Acl::new(config.acl);
        self.filtering = config.filtering;
        self.compensate_ttl = config.compensate_ttl;
        self.inside_networks = config.inside_networks;
        Ok(Reconfigured::Live)
    }

    /// Says whether the data path can deliver direct-routing services' packets (the kernel
    /// path can; the TUN alone cannot change a frame's MACs). Without it, new connections to
    /// such a service are refused ([`DropReason::DirectRouteUnavailable`]). Default true.
    pub fn set_direct_routing(&mut self, available: bool) {
        self.direct_routing = available;
    }

    /// Whether listener `id` is a direct-routing virtual service.
    fn is_direct_listener(&self, id: Option<ListenerId>) -> bool {
        id.and_then(|id| self.listeners.get(usize::from(id.0))?.as_ref())
            .and_then(|l| l.selector.as_service())
            .is_some_and(|s| s.forward() == crate::service::Forward::DirectRoute)
    }

    /// Classifies a packet read from `nat0`: inbound when it is addressed to a public address
    /// and does not come from an inside network; outbound otherwise (including hairpin).
    #[must_use]
    pub fn direction(&self, buf: &[u8]) -> Direction {
        let Some(ip) = buf.first_chunk::<20>().map(Ipv4View::new_unchecked) else {
            return Direction::Outbound;
        };
        let (src, dst) = (ip.src(), ip.dst());
        if self.table.find_public(dst).is_some()
            && !self.inside_networks.iter().any(|n| n.contains(&src))
        {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }

    /// Processes one packet in place. See [`Verdict`].
    pub fn handle_packet(&mut self, now: Instant, direction: Direction, buf: &mut [u8]) -> Verdict {
        self.handle_super_packet(now, direction, buf, PacketMeta::default())
    }

    /// Processes one packet in place, possibly a GSO super-packet read with TUN offload (a
    /// run of TCP segments or UDP datagrams of one flow behind one set of headers): only the
    /// headers are rewritten, so the kernel segments it on the way out as if it had never left.
    /// `meta.l4_checksum` says whether the transport checksum is complete or a partial sum; the
    /// buffer keeps that form. The TCP flags of a super-packet are those of its segment run
    /// (SYN and RST never come in one; a FIN belongs to its last segment), so state tracking
    /// reads them as for one segment.
    pub fn handle_super_packet(
        &mut self,
        now: Instant,
        direction: Direction,
        buf: &mut [u8],
        meta: PacketMeta,
    ) -> Verdict {
        let n = u64::from(meta.segments.max(1));
        match self.process(now, direction, buf, meta.l4_checksum, n) {
            Ok(None) => Verdict::Forward,
            Ok(Some(route)) => Verdict::DirectRoute(route),
            Err(reason) => {
                self.stats.drops.add(reason, n);
                tracing::debug!(%reason, ?direction, "nat drop");
                Verdict::Drop(reason)
            }
        }
    }

    fn process(
        &mut self,
        now: Instant,
        dir: Direction,
        buf: &mut [u8],
        csum: L4Checksum,
        n: u64,
    ) -> Result<Option<DirectRoute>, DropReason> {
        self.direct_route = None;
        let p = translate::parse(buf)?;
        let buf = &mut buf[..p.len];
        if p.l4 == L4::LaterFragment {
            // Follows its first fragment, which went through the ACL and the table.
            return self.later_fragment(now, buf).map(|()| None);
        }
        if dir == Direction::Outbound
            && !self.inside_networks.is_empty()
            && !self.inside_networks.iter().any(|n| n.contains(&p.src))
        {
            return Err(DropReason::SpoofedSource);
        }
        let (src_port, dst_port) = p.ports();
        let acl_packet = AclPacket {
            src: p.src,
            dst: p.dst,
            proto: p.proto(),
            src_port,
            dst_port,
        };
        let first_fragment = p.first_fragment.then(|| FragmentKey::of(buf));
        if let AclDecision::Deny(_) = self.acl.check(&acl_packet, dir == Direction::Outbound) {
            return Err(DropReason::AclDenied);
        }
        match p.l4 {
            L4::Untranslatable => {
                if dir == Direction::Outbound && self.table.find_public(p.dst).is_none() {
                    return Err(DropReason::Untranslatable);
                }
                return self.not_translated(buf, &p, n).map(|()| None);
            }
            L4::IcmpError => return self.icmp_error(dir, buf, &p, csum).map(|()| None),
            _ => {}
        }
        let translated = match dir {
            Direction::Inbound => self.inbound(now, buf, &p, false, csum, n)?,
            Direction::Outbound => {
                let hairpin = self.table.find_public(p.dst).is_some();
                if hairpin && !self.inbound_would_match(&p) {
                    // To a public address, not a forward: the host's, or answered here.
                    return self.not_translated(buf, &p, n).map(|()| None);
                } else if !self.outbound(now, buf, &p, csum, n)? {
                    false
                } else if hairpin {
                    let p2 = translate::parse(buf)?;
                    self.inbound(now, buf, &p2, true, csum, n)?;
                    self.stats.hairpinned += n;
                    true
                } else {
                    true
                }
            }
        };
        if std::mem::take(&mut self.refused_in_place) {
            // Already answered (a service with no backend): the buffer is the RST.
            self.stats.passed_through += n;
            return Ok(None);
        }
        if !translated {
            return self.not_translated(buf, &p, n).map(|()| None);
        }
        if let Some(route) = self.direct_route.take() {
            // Unchanged, so neither a fragment rewrite to remember (its later fragments
            // carry no ports and are dropped) nor a TTL to give back (the data path delivers
            // it without a second forwarding hop).
            return Ok(Some(route));
        }
        {
            if let Some(key) = first_fragment {
                let rewrite = Rewrite::of(buf, dir == Direction::Outbound);
                self.fragments.record(now, key, rewrite);
            }
            if self.compensate_ttl {
                translate::bump_ttl(buf);
            }
        }
        Ok(None)
    }

    /// A packet the gateway does not translate. To an address of this host it is passed
    /// through (the kernel delivers it). To any other address (a VIP: routed into `nat0`, so
    /// passing it back would loop it until its TTL ran out) it is answered in place, an echo
    /// request with an echo reply from the VIP and a TCP segment with a RST, or dropped.
    fn not_translated(&mut self, buf: &mut [u8], p: &Parsed, n: u64) -> Result<(), DropReason> {
        if self.local_addresses.contains(&p.dst) || self.table.find_public(p.dst).is_none() {
            // The host's own address, or an address that is not routed into `nat0`.
            self.stats.passed_through += n;
            return Ok(());
        }
        match p.l4 {
            L4::IcmpEcho { request: true, .. }
                if !p.first_fragment && translate::echo_reply_in_place(buf, p) =>
            {
                self.stats.answered_echo += 1;
                return Ok(());
            }
            L4::Tcp { flags, .. }
                if flags & TCP_RST == 0
                    && !p.first_fragment
                    && translate::rewrite_syn_as_rst(buf) =>
            {
                self.stats.answered_rst += 1;
                return Ok(());
            }
            _ => {}
        }
        Err(DropReason::Unowned)
    }

    /// A fragment past the first: rewritten like its datagram's first fragment was; dropped
    /// when that one was not seen (or not translated) in the last 30 s.
    fn later_fragment(&mut self, now: Instant, buf: &mut [u8]) -> Result<(), DropReason> {
        let Some(rw) = self.fragments.lookup(now, FragmentKey::of(buf)) else {
            return Err(DropReason::Fragment);
        };
        translate::set_ip_header_only(buf, Side::Src, rw.src);
        translate::set_ip_header_only(buf, Side::Dst, rw.dst);
        if self.compensate_ttl {
            translate::bump_ttl(buf);
        }
        if rw.outbound {
            self.stats.translated_out += 1;
        } else {
            self.stats.translated_in += 1;
        }
        Ok(())
    }

    /// Hairpin check: would a packet to this public endpoint reach an inside endpoint?
    fn inbound_would_match(&self, p: &Parsed) -> bool {
        let Some(idx) = self.table.find_public(p.dst) else {
            return false;
        };
        match p.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => {
                let proto = p.proto().unwrap_or(Proto::Udp);
                match self.table.public_owner(proto, idx, dport) {
                    // A direct-routing backend answers its client directly: an inside host
                    // would get the answer from the VIP it never sent to (not hairpinned).
                    Some(PublicOwner::Listener(id)) => !self.is_direct_listener(Some(id)),
                    Some(PublicOwner::Mapping(_)) => true,
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// Source translation of a packet from the inside. Ok(false): not translated (passed).
    fn outbound(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        p: &Parsed,
        csum: L4Checksum,
        n: u64,
    ) -> Result<bool, DropReason> {
        let (proto, inside_port, remote_port, seg) = match p.l4 {
            L4::Tcp {
                sport, dport, seg, ..
            } => (Proto::Tcp, sport, dport, Some(seg)),
            L4::Udp { sport, dport } => (Proto::Udp, sport, dport, None),
            L4::IcmpEcho { request: true, id } => (Proto::Icmp, id, 0, None),
            _ => return Ok(false),
        };
        let inside = SocketAddrV4::new(p.src, inside_port);
        let remote = SocketAddrV4::new(p.dst, remote_port);
        let mapped = self.table.mapping_of_inside(proto, inside);
        if mapped.is_none()
            && proto == Proto::Udp
            && let Some(vip) = self.one_packet_out(inside, buf.len(), n)
        {
            // A one-packet service's backend answers: it leaves from the VIP, without a flow.
            translate::set_ip(buf, 0, Side::Src, *vip.ip(), csum);
            translate::set_port(buf, 0, Side::Src, vip.port(), csum);
            self.stats.translated_out += n;
            return Ok(true);
        }
        let m = match mapped {
            Some(m) => m,
            // A backend with no flow here answers a connection that started on another
            // director: it gets its service's mapping, and the session is adopted below.
            None if mid_stream(seg.as_ref())
                && let Some((id, public)) = self.adoptable_reply(inside) =>
            {
                let idx = self
                    .table
                    .find_public(*public.ip())
                    .ok_or(DropReason::ServiceEndpointReserved)?;
                self.table.create_mapping(
                    proto,
                    inside,
                    idx,
                    Some(public.port()),
                    Some(id),
                    false,
                )?
            }
            None => {
                let Some(idx) = self.overload else {
                    return Ok(false);
                };
                if self.is_service_endpoint(proto, inside) {
                    // A virtual service's flows to this backend need its endpoint; a dynamic
                    // mapping there would make them all `InsideEndpointBusy`.
                    return Err(DropReason::ServiceEndpointReserved);
                }
                self.table
                    .create_mapping(proto, inside, idx, None, None, false)?
            }
        };
        let view = self.table.mapping(m);
        let s = match self
            .table
            .session(proto, view.public_idx, view.public_port, remote)
        {
            Some(s) => s,
            // Reply-side adoption: the client stays the flow's originator, and its next
            // segment confirms the flow.
            None if let Some(id) = view.listener
                && mid_stream(seg.as_ref())
                && self
                    .adoptable_reply(view.inside)
                    .is_some_and(|(l, _)| l == id) =>
            {
                self.adopt_on_mapping(now, id, m, view.inside, remote, true)?
            }
            None => {
                let created = self.table.create_session(now, m, remote, true);
                self.report_evicted(now);
                let s = created.inspect_err(|_| {
                    // A mapping made for this packet alone must not outlive the refusal.
                    self.table_release_if_unused(m);
                })?;
                self.stats.flows_created += 1;
                self.notify(now, view.listener, view.inside, remote, FlowEvent::Opened);
                s
            }
        };
        let change = self.table.touch(now, s, true, seg.as_ref())?;
        self.notify_change(now, view.listener, view.inside, remote, change);
        self.notify_packet(view.listener, view.inside, false, buf.len());
        let public_ip = self.table.public_addr(view.public_idx);
        if change == StateChange::Established {
            let public = SocketAddrV4::new(public_ip, view.public_port);
            self.fast_path_established(view.listener, view.inside, public, remote);
        }
        translate::set_ip(buf, 0, Side::Src, public_ip, csum);
        translate::set_port(buf, 0, Side::Src, view.public_port, csum);
        self.stats.translated_out += n;
        Ok(true)
    }

    fn table_release_if_unused(&mut self, m: MappingId) {
        self.table.release_unused_mapping(m);
    }

    /// Reports the flows the table removed to make room (early drop).
    fn report_evicted(&mut self, now: Instant) {
        let evicted = self.table.take_evicted();
        if !evicted.is_empty() {
            self.stats.early_drops += evicted.len() as u64;
            self.report_removed(now, evicted);
        }
    }

    /// Destination translation of a packet to a public address. Ok(false): passed through.
    fn inbound(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        p: &Parsed,
        hairpin: bool,
        csum: L4Checksum,
        n: u64,
    ) -> Result<bool, DropReason> {
        let (proto, public_port, remote_port, flags, seg) = match p.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seg,
            } => (Proto::Tcp, dport, sport, flags, Some(seg)),
            L4::Udp { sport, dport } => (Proto::Udp, dport, sport, 0, None),
            L4::IcmpEcho { request: false, id } => (Proto::Icmp, id, 0, 0, None),
            // Echo requests to a public address are for the gateway itself.
            _ => return Ok(false),
        };
        let Some(idx) = self.table.find_public(p.dst) else {
            return Ok(false);
        };
        let remote = SocketAddrV4::new(p.src, remote_port);
        let mut existing = self.table.session(proto, idx, public_port, remote);
        if let Some(old) = existing
            && proto == Proto::Tcp
            && is_initial_syn(flags)
            && self.table.session_closed(old)
            && self
                .table
                .mapping(self.table.session_mapping(old))
                .listener
                .is_some()
        {
            // The client reuses the port of a connection that has ended (the flow lingers
            // in its transitory state): treat it as the new connection it is, so a virtual
            // service schedules it afresh (LVS's conn_reuse_mode) and counts stay exact.
            let removed = self.table.remove_now(old);
            self.report_removed(now, vec![removed]);
            existing = None;
        }
        let s = match existing {
            Some(s) => s,
            None => match self.table.public_owner(proto, idx, public_port) {
                None if hairpin => return Err(DropReason::NoSession),
                None => return Ok(false),
                Some(PublicOwner::Listener(id))
                    if proto == Proto::Udp && self.is_one_packet_listener(id) =>
                {
                    // One-packet scheduling: this datagram alone, and no flow.
                    let inside = self.one_packet_in(now, id, remote, buf.len(), n)?;
                    translate::set_ip(buf, 0, Side::Dst, *inside.ip(), csum);
                    translate::set_port(buf, 0, Side::Dst, inside.port(), csum);
                    self.stats.translated_in += n;
                    return Ok(true);
                }
                Some(PublicOwner::Listener(id)) => {
                    if !self.direct_routing && self.is_direct_listener(Some(id)) {
                        return Err(DropReason::DirectRouteUnavailable);
                    }
                    if proto == Proto::Tcp && !is_initial_syn(flags) {
                        if flags & (TCP_RST | TCP_SYN) != 0 {
                            return Err(DropReason::NotSyn);
                        }
                        self.adopt_listener_flow(now, id, idx, public_port, remote)?
                    } else {
                        match self.open_listener_flow(now, id, idx, public_port, proto, remote) {
                            // A virtual service with no backend left refuses like a closed port.
                            Err(DropReason::NoInsideEndpoint)
                                if proto == Proto::Tcp
                                    && !hairpin
                                    && translate::rewrite_syn_as_rst(buf) =>
                            {
                                self.refused_in_place = true;
                                return Ok(false);
                            }
                            r => r?,
                        }
                    }
                }
                Some(PublicOwner::Mapping(m)) => {
                    let allowed = match self.filtering {
                        Filtering::EndpointIndependent => true,
                        Filtering::AddressDependent => self.table.mapping_has_remote_ip(m, p.src),
                    };
                    if !allowed {
                        return Err(DropReason::Filtered);
                    }
                    if proto == Proto::Tcp && !is_initial_syn(flags) {
                        return Err(DropReason::NotSyn);
                    }
                    let created = self.table.create_session(now, m, remote, false);
                    self.report_evicted(now);
                    let s = created?;
                    self.stats.flows_created += 1;
                    s
                }
            },
        };
        let m = self.table.session_mapping(s);
        let view = self.table.mapping(m);
        let change = self.table.touch(now, s, false, seg.as_ref())?;
        self.notify_change(now, view.listener, view.inside, remote, change);
        self.notify_packet(view.listener, view.inside, true, buf.len());
        if change == StateChange::Established {
            let public = SocketAddrV4::new(p.dst, public_port);
            self.fast_path_established(view.listener, view.inside, public, remote);
        }
        if self.is_direct_listener(view.listener) {
            self.direct_route = Some(DirectRoute {
                client: remote,
                vip: SocketAddrV4::new(p.dst, public_port),
                backend: view.inside,
            });
            self.stats.direct_routed += n;
            return Ok(true);
        }
        translate::set_ip(buf, 0, Side::Dst, *view.inside.ip(), csum);
        translate::set_port(buf, 0, Side::Dst, view.inside.port(), csum);
        self.stats.translated_in += n;
        Ok(true)
    }

    /// The one place where a new inbound flow to a listener gets its inside endpoint.
    fn open_listener_flow(
        &mut self,
        now: Instant,
        id: ListenerId,
        idx: PublicIdx,
        public_port: u16,
        proto: Proto,
        client: SocketAddrV4,
    ) -> Result<SessionId, DropReason> {
        if self.table.len() >= self.table.capacity() && self.table.half_open() == 0 {
            return Err(DropReason::TableFull);
        }
        let listener = self
            .listeners
            .get_mut(usize::from(id.0))
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoInsideEndpoint)?;
        let inside = listener
            .selector
            .select(now, client, public_port)
            .ok_or(DropReason::NoInsideEndpoint)?;
        let m = match self.table.mapping_of_inside(proto, inside) {
            // A multi-port service's backend endpoint serves one of its ports (the ports'
            // invariant), so its mapping's public port is this one.
            Some(m)
                if self.table.mapping(m).listener == Some(id)
                    && self.table.mapping(m).public_port == public_port =>
            {
                m
            }
            Some(_) => return Err(DropReason::InsideEndpointBusy),
            None => {
                self.table
                    .create_mapping(proto, inside, idx, Some(public_port), Some(id), false)?
            }
        };
        let created = self.table.create_session(now, m, client, false);
        self.report_evicted(now);
        let s = created.inspect_err(|_| {
            self.table.release_unused_mapping(m);
        })?;
        if let Some(Some(l)) = self.listeners.get_mut(usize::from(id.0)) {
            l.flows_opened += 1;
        }
        self.stats.flows_created += 1;
        self.notify(now, Some(id), inside, client, FlowEvent::Opened);
        Ok(s)
    }

    /// Stateless adoption: a mid-stream TCP segment (no SYN, no RST) of a connection this
    /// node never saw start, to a listener whose choice any node makes alike — a static
    /// forward, or a virtual service scheduled by `dh`, `sh` or `mh` — continues on the
    /// endpoint the node where it started chose (after a failover without flow sync, or
    /// before the sync caught up). Any other listener refuses it as `not_syn`, as before.
    /// The flow is half-open until the backend answers ([`PatTable::adopt_session`]), so a
    /// flood of stray ACKs is bounded like a SYN flood.
    fn adopt_listener_flow(
        &mut self,
        now: Instant,
        id: ListenerId,
        idx: PublicIdx,
        public_port: u16,
        client: SocketAddrV4,
    ) -> Result<SessionId, DropReason> {
        let listener = self
            .listeners
            .get_mut(usize::from(id.0))
            .and_then(Option::as_mut)
            .ok_or(DropReason::NotSyn)?;
        let inside = listener
            .selector
            .adopt(now, client, public_port)
            .ok_or(DropReason::NotSyn)?;
        let m = match self.table.mapping_of_inside(Proto::Tcp, inside) {
            Some(m)
                if self.table.mapping(m).listener == Some(id)
                    && self.table.mapping(m).public_port == public_port =>
            {
                m
            }
            Some(_) => return Err(DropReason::InsideEndpointBusy),
            None => self.table.create_mapping(
                Proto::Tcp,
                inside,
                idx,
                Some(public_port),
                Some(id),
                false,
            )?,
        };
        self.adopt_on_mapping(now, id, m, inside, client, false)
    }

    /// Opens the adopted session of `client` on listener `id`'s mapping `m` (to `inside`;
    /// `by_reply`: `inside` sent the segment), counting it as the listener's new flow; a
    /// mapping made for it alone goes on refusal.
    fn adopt_on_mapping(
        &mut self,
        now: Instant,
        id: ListenerId,
        m: MappingId,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        by_reply: bool,
    ) -> Result<SessionId, DropReason> {
        let adopted = self.table.adopt_session(now, m, client, by_reply);
        self.report_evicted(now);
        let s = adopted.inspect_err(|_| {
            self.table.release_unused_mapping(m);
        })?;
        if let Some(Some(l)) = self.listeners.get_mut(usize::from(id.0)) {
            l.flows_opened += 1;
        }
        self.stats.flows_created += 1;
        self.stats.flows_adopted += 1;
        self.notify(now, Some(id), inside, client, FlowEvent::Opened);
        Ok(s)
    }

    fn notify(
        &mut self,
        now: Instant,
        listener: Option<ListenerId>,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        e: FlowEvent,
    ) {
        if let Some(l) = listener.and_then(|id| self.listeners.get_mut(usize::from(id.0))?.as_mut())
        {
            l.selector.on_flow(now, inside, client, e);
        }
    }

    fn notify_packet(
        &mut self,
        listener: Option<ListenerId>,
        inside: SocketAddrV4,
        to_inside: bool,
        len: usize,
    ) {
        if let Some(l) = listener.and_then(|id| self.listeners.get_mut(usize::from(id.0))?.as_mut())
        {
            l.selector.on_packet(inside, to_inside, len);
        }
    }

    fn notify_change(
        &mut self,
        now: Instant,
        l: Option<ListenerId>,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        c: StateChange,
    ) {
        match c {
            StateChange::None => {}
            StateChange::Established => self.notify(now, l, inside, client, FlowEvent::Established),
            StateChange::Closing => self.notify(now, l, inside, client, FlowEvent::Closing),
        }
    }

    /// Expires idle flows. Call when [`Gateway::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut removed = Vec::new();
        self.table.expire(now, |r| removed.push(r));
        self.report_removed(now, removed);
    }

    fn report_removed(&mut self, now: Instant, removed: Vec<RemovedSession>) {
        self.stats.flows_removed += removed.len() as u64;
        for r in removed {
            let e = FlowEvent::Closed {
                was_established: r.was_established,
            };
            self.notify(now, r.mapping.listener, r.mapping.inside, r.remote, e);
        }
    }

    /// When to call [`Gateway::handle_timeout`] next (`None` while the table is empty).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// Removes every flow and dynamic mapping (`vipgate nat clear`); static forwards stay.
    /// Returns how many flows were removed.
    pub fn clear(&mut self, now: Instant) -> usize {
        let mut removed = Vec::new();
        self.table.clear(|r| removed.push(r));
        self.fragments.clear();
        let n = removed.len();
        self.report_removed(now, removed);
        n
    }

    /// The flows, for `show nat`.
    #[must_use]
    pub fn translations(&self, now: Instant) -> Vec<Translation> {
        self.table.translations(now)
    }

    /// The live flows `keep` selects, at most `limit`, each with its state as `ipvsadm -Lnc`
    /// names it; and how many `keep` selects in all (`show lb --connections`).
    pub fn translations_where(
        &self,
        now: Instant,
        keep: impl FnMut(&Translation) -> bool,
        limit: usize,
    ) -> (Vec<(Translation, &'static str)>, usize) {
        self.table.translations_where(now, keep, limit)
    }

    /// The ACL rules with their hit counters.
    pub fn acl_rules(&self) -> impl Iterator<Item = (&AclRule, u64)> {
        self.acl.rules()
    }

    /// The inside networks: a packet from one of them is the inside's, whatever its
    /// destination (a hairpin when that is a public endpoint).
    #[must_use]
    pub fn inside_networks(&self) -> &[Ipv4Net] {
        &self.inside_networks
    }

    /// Inside packets denied because no ACL rule matched.
    #[must_use]
    pub fn acl_implicit_denies(&self) -> u64 {
        self.acl.implicit_denies()
    }

    /// Packet counters.
    #[must_use]
    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// The translation table (size, capacity, memory).
    #[must_use]
    pub fn table(&self) -> &PatTable {
        &self.table
    }
}

fn table_config(config: &GatewayConfig) -> TableConfig {
    TableConfig {
        timeouts: config.timeouts,
        max_sessions: config.max_mappings,
        max_per_host: config.max_per_host,
        port_range: config.port_range.clone(),
        seed: config.seed,
        half_open: HalfOpenLimits {
            per_listener: config.max_half_open_per_listener,
            per_source: config.max_half_open_per_source,
            source_prefix: config.half_open_source_prefix,
            inbound_per_mapping: config.max_inbound_per_mapping,
        },
    }
}

#[cfg(test)]
mod tests;

/// A TCP segment that may continue a connection but never opens one (no SYN, no RST): what
/// stateless adoption takes over.
fn mid_stream(seg: Option<&Segment>) -> bool {
    seg.is_some_and(|g| g.flags & (TCP_SYN | TCP_RST) == 0)
}
