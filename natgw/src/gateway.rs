//! `Gateway`: the sans-IO PAT gateway core.
//!
//! Call order (as in quinn-proto's `Connection`): for every packet read from `nat0`, call
//! [`Gateway::handle_packet`] and write the buffer back if the verdict is
//! [`Verdict::Forward`]; whenever [`Gateway::poll_timeout`] has passed, call
//! [`Gateway::handle_timeout`]. Everything else (`show`, `clear`, listeners) is plain method
//! calls between packets.

use std::any::Any;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use ipnet::Ipv4Net;

use crate::acl::{Acl, AclDecision, AclPacket, AclRule};
use crate::config::{Filtering, GatewayConfig, Proto, StaticEntry};
use crate::error::{DropReason, NatError};
use crate::fragments::{FragmentKey, FragmentTable, Rewrite};
use crate::table::{
    HalfOpenLimits, NO_LISTENER, PatTable, PublicOwner, RemovedSession, StateChange, TableConfig,
    Translation,
};
use crate::translate::{self, L4, L4Checksum, Parsed, Side};

/// Where a packet read from `nat0` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From an inside host (steered into `nat0` by policy routing). A packet to a public
    /// address is hairpinned.
    Outbound,
    /// From the outside, addressed to one of the gateway's public addresses.
    Inbound,
}

/// What the driver does with the buffer after [`Gateway::handle_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Write the buffer (rewritten in place, same length) back to `nat0`. This includes
    /// packets passed through untouched (to the gateway itself, or not translatable).
    Forward,
    /// Drop it; the reason has been counted.
    Drop(DropReason),
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

/// Identifies a listener (a static forward or a virtual service) in a [`Gateway`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u16);

/// What happened to a flow of a listener; delivered to its [`InsideSelector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// A new flow to `inside` was opened (right after [`InsideSelector::select`] chose it).
    Opened,
    /// The TCP flow became established (LVS: an active connection).
    Established,
    /// The TCP flow left established: FIN both ways or RST (LVS: inactive).
    Closing,
    /// The flow was removed (idle timeout or `nat clear`).
    Closed {
        /// Whether it was still established when removed.
        was_established: bool,
    },
}

/// Decides the inside endpoint of each new inbound flow to one public endpoint.
///
/// This is the extension point for load-balanced virtual services: a static forward always
/// answers the same endpoint ([`StaticForward`]); a virtual service picks a backend from a
/// pool. Every flow keeps the endpoint chosen for it for its whole life, and the selector is
/// told about its life cycle through [`InsideSelector::on_flow`] (to count active and
/// inactive connections per backend).
pub trait InsideSelector: fmt::Debug + Send {
    /// A new flow from `client` arrived: the inside endpoint to send it to, or `None` to
    /// refuse it (counted as [`DropReason::NoInsideEndpoint`]).
    fn select(&mut self, now: Instant, client: SocketAddrV4) -> Option<SocketAddrV4>;

    /// The flow between `client` and `inside` changed state. The default ignores it.
    /// (`client` lets a virtual service release the client's persistence template.)
    fn on_flow(
        &mut self,
        now: Instant,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        event: FlowEvent,
    ) {
        let _ = (now, inside, client, event);
    }

    /// A packet of `len` bytes of a flow to `inside` was translated, towards `inside` when
    /// `to_inside`. The default ignores it (virtual services count bytes per backend).
    fn on_packet(&mut self, inside: SocketAddrV4, to_inside: bool, len: usize) {
        let _ = (inside, to_inside, len);
    }

    /// For downcasting to the concrete selector (e.g. to change a backend's weight).
    fn as_any(&self) -> &dyn Any;

    /// For downcasting to the concrete selector.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The selector of a static port forward: always the same inside endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticForward {
    /// The inside endpoint.
    pub inside: SocketAddrV4,
}

impl InsideSelector for StaticForward {
    fn select(&mut self, _now: Instant, _client: SocketAddrV4) -> Option<SocketAddrV4> {
        Some(self.inside)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// One public endpoint whose new inbound flows are handed to a selector.
#[derive(Debug)]
pub struct Listener {
    /// Protocol.
    pub proto: Proto,
    /// The public endpoint.
    pub public: SocketAddrV4,
    /// Who picks the inside endpoint.
    pub selector: Box<dyn InsideSelector>,
    /// Flows opened through this listener.
    pub flows_opened: u64,
}

/// Packet counters of a [`Gateway`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Inside → outside packets translated.
    pub translated_out: u64,
    /// Outside → inside packets translated.
    pub translated_in: u64,
    /// Inside → public address → inside packets (hairpinning).
    pub hairpinned: u64,
    /// ICMP errors translated (either way).
    pub icmp_errors: u64,
    /// Packets forwarded untouched (to the gateway itself, or not translatable).
    pub passed_through: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows removed (expired or cleared).
    pub flows_removed: u64,
    /// Half-open flows removed to make room (table full, or their listener at its bound).
    pub early_drops: u64,
    /// Echo requests to a public address not assigned here (a VIP), answered by the gateway.
    pub answered_echo: u64,
    /// TCP segments to such an address that nothing translates, answered with a RST.
    pub answered_rst: u64,
    /// Drops, indexed like [`DropReason::ALL`].
    pub drops: Vec<u64>,
}

impl GatewayStats {
    /// The counter of one drop reason.
    #[must_use]
    pub fn dropped(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.drops[i])
    }
}

/// The PAT gateway core: ACL, static forwards and listeners, dynamic PAT, the table.
#[derive(Debug)]
pub struct Gateway {
    overload: Option<u8>,
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
            stats: GatewayStats {
                drops: vec![0; DropReason::ALL.len()],
                ..Default::default()
            },
        };
        for s in &config.statics {
            gw.add_static(now, *s)?;
        }
        for s in &config.services {
            gw.add_service(s.clone())?;
        }
        Ok(gw)
    }

    fn add_static(&mut self, _now: Instant, s: StaticEntry) -> Result<ListenerId, NatError> {
        if s.proto == Proto::Icmp {
            return Err(NatError::UnforwardableProto(s.proto));
        }
        if self.table.mapping_of_inside(s.proto, s.inside).is_some() {
            return Err(NatError::DuplicateInside {
                proto: s.proto,
                inside: s.inside,
            });
        }
        let id = self.add_listener(
            s.proto,
            s.public,
            Box::new(StaticForward { inside: s.inside }),
        )?;
        let idx = self
            .table
            .find_public(*s.public.ip())
            .ok_or(NatError::TooManyPublicAddresses)?;
        // The forward's mapping is permanent so that the inside host's own traffic from that
        // port also leaves as PUBLIC:PORT (IOS static entries are bidirectional).
        self.table
            .create_mapping(s.proto, s.inside, idx, Some(s.public.port()), id.0, true)
            .map_err(|_| NatError::DuplicateInside {
                proto: s.proto,
                inside: s.inside,
            })?;
        Ok(id)
    }

    /// Applies a changed configuration without dropping other flows: ACL (counters restart),
    /// filtering, timeouts, bounds, port range and TTL compensation change in place; static
    /// forwards that disappeared are removed with their flows, and new ones are added (a
    /// changed one is both). The inside networks are replaced.
    ///
    /// # Errors
    /// [`NatError::NeedsRestart`] when the overload address changed (the caller restarts the
    /// gateway then); a new static forward that clashes with a forward or mapping that stays.
    /// Nothing is changed on error.
    pub fn reconfigure(&mut self, now: Instant, config: GatewayConfig) -> Result<(), NatError> {
        if config.port_range.is_empty() {
            return Err(NatError::EmptyPortRange);
        }
        let overload = config.overload.map(|a| self.table.find_public(a));
        if overload != self.overload.map(Some) {
            return Err(NatError::NeedsRestart);
        }
        let gone: Vec<ListenerId> = self
            .listeners()
            .filter_map(|(id, l)| {
                let s = l.selector.as_any().downcast_ref::<StaticForward>()?;
                let e = StaticEntry {
                    proto: l.proto,
                    public: l.public,
                    inside: s.inside,
                };
                (!config.statics.contains(&e)).then_some(id)
            })
            .collect();
        let current: Vec<StaticEntry> = self.static_entries().collect();
        let added: Vec<StaticEntry> = config
            .statics
            .iter()
            .filter(|s| !current.contains(s))
            .copied()
            .collect();
        self.check_statics_fit(&added, &gone)?;
        for id in gone {
            self.remove_listener(id);
        }
        for s in added {
            self.add_static(now, s)?;
        }
        self.table.set_config(table_config(&config));
        self.local_addresses = config.local_addresses;
        self.acl = Acl::new(config.acl);
        self.filtering = config.filtering;
        self.compensate_ttl = config.compensate_ttl;
        self.inside_networks = config.inside_networks;
        Ok(())
    }

    /// Whether `added` static forwards can be added once the listeners `gone` are removed: no
    /// clash with a listener or a mapping that stays, nor among themselves.
    fn check_statics_fit(
        &self,
        added: &[StaticEntry],
        gone: &[ListenerId],
    ) -> Result<(), NatError> {
        let stays = |listener: Option<u16>| listener.is_none_or(|l| !gone.contains(&ListenerId(l)));
        for (i, s) in added.iter().enumerate() {
            if s.proto == Proto::Icmp {
                return Err(NatError::UnforwardableProto(s.proto));
            }
            let dup_public = NatError::DuplicatePublic {
                proto: s.proto,
                public: s.public,
            };
            let dup_inside = NatError::DuplicateInside {
                proto: s.proto,
                inside: s.inside,
            };
            if added[..i]
                .iter()
                .any(|o| o.proto == s.proto && o.public == s.public)
            {
                return Err(dup_public);
            }
            if added[..i]
                .iter()
                .any(|o| o.proto == s.proto && o.inside == s.inside)
            {
                return Err(dup_inside);
            }
            if let Some(idx) = self.table.find_public(*s.public.ip()) {
                match self.table.public_owner(s.proto, idx, s.public.port()) {
                    Some(PublicOwner::Listener(l)) if stays(Some(l)) => return Err(dup_public),
                    Some(PublicOwner::Mapping(m)) if stays(self.table.mapping(m).listener) => {
                        return Err(dup_public);
                    }
                    _ => {}
                }
            }
            if let Some(m) = self.table.mapping_of_inside(s.proto, s.inside)
                && stays(self.table.mapping(m).listener)
            {
                return Err(dup_inside);
            }
        }
        Ok(())
    }

    /// Registers a public endpoint whose new inbound flows go to `selector` (a static forward
    /// or a virtual service). The public address becomes one of the gateway's addresses.
    ///
    /// # Errors
    /// When the endpoint is already forwarded, or there are too many public addresses.
    pub fn add_listener(
        &mut self,
        proto: Proto,
        public: SocketAddrV4,
        selector: Box<dyn InsideSelector>,
    ) -> Result<ListenerId, NatError> {
        let idx = self
            .table
            .public_index(*public.ip())
            .ok_or(NatError::TooManyPublicAddresses)?;
        let slot = self
            .listeners
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.listeners.len());
        let id = u16::try_from(slot)
            .ok()
            .filter(|id| *id != NO_LISTENER)
            .ok_or(NatError::DuplicatePublic { proto, public })?;
        if !self.table.add_listener(proto, idx, public.port(), id) {
            return Err(NatError::DuplicatePublic { proto, public });
        }
        let listener = Listener {
            proto,
            public,
            selector,
            flows_opened: 0,
        };
        if slot == self.listeners.len() {
            self.listeners.push(Some(listener));
        } else {
            self.listeners[slot] = Some(listener);
        }
        Ok(ListenerId(id))
    }

    /// Removes a listener at once: its public endpoint stops answering, and every flow it
    /// opened is closed (reported to no one: its selector goes with it). Every other flow
    /// keeps working. Returns how many flows were closed, or `None` for an unknown id.
    ///
    /// The listener's public address stays known to the gateway (the driver keeps routing
    /// it); packets to it that no flow or listener owns pass through untouched.
    pub fn remove_listener(&mut self, id: ListenerId) -> Option<usize> {
        let l = self.listeners.get_mut(usize::from(id.0))?.take()?;
        let idx = self.table.find_public(*l.public.ip())?;
        let mut removed = Vec::new();
        self.table
            .remove_listener(l.proto, idx, l.public.port(), id.0, |r| removed.push(r));
        let n = removed.len();
        // The selector is gone, so only the counters hear about these flows.
        self.stats.flows_removed += n as u64;
        Some(n)
    }

    /// The listeners with their ids, in id order.
    pub fn listeners(&self) -> impl Iterator<Item = (ListenerId, &Listener)> {
        self.listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((ListenerId(u16::try_from(i).ok()?), l.as_ref()?)))
    }

    /// A listener by id.
    #[must_use]
    pub fn listener(&self, id: ListenerId) -> Option<&Listener> {
        self.listeners.get(usize::from(id.0))?.as_ref()
    }

    /// The static forwards (listeners whose selector is a [`StaticForward`]), for `show nat`.
    pub fn static_entries(&self) -> impl Iterator<Item = StaticEntry> + '_ {
        self.listeners().filter_map(|(_, l)| {
            let s = l.selector.as_any().downcast_ref::<StaticForward>()?;
            Some(StaticEntry {
                proto: l.proto,
                public: l.public,
                inside: s.inside,
            })
        })
    }

    /// A listener's selector, e.g. to downcast it and change its pool at run time.
    pub fn selector_mut(&mut self, id: ListenerId) -> Option<&mut (dyn InsideSelector + 'static)> {
        self.listeners
            .get_mut(usize::from(id.0))?
            .as_mut()
            .map(|l| &mut *l.selector)
    }

    /// Every public address the gateway owns (overload address and listener addresses): the
    /// driver routes each into `nat0` and answers for it on the outside link.
    #[must_use]
    pub fn public_addresses(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .overload
            .iter()
            .map(|i| self.table.public_addr(*i))
            .collect();
        for (_, l) in self.listeners() {
            if !v.contains(l.public.ip()) {
                v.push(*l.public.ip());
            }
        }
        v
    }

    /// Classifies a packet read from `nat0`: inbound when it is addressed to a public address
    /// and does not come from an inside network; outbound otherwise (including hairpin).
    #[must_use]
    pub fn direction(&self, buf: &[u8]) -> Direction {
        if buf.len() < 20 {
            return Direction::Outbound;
        }
        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
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
            Ok(()) => Verdict::Forward,
            Err(reason) => {
                if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
                    self.stats.drops[i] += n;
                }
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
    ) -> Result<(), DropReason> {
        let p = translate::parse(buf)?;
        let buf = &mut buf[..p.len];
        if p.l4 == L4::LaterFragment {
            // Follows its first fragment, which went through the ACL and the table.
            return self.later_fragment(now, buf);
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
                return self.not_translated(buf, &p, n);
            }
            L4::IcmpError => return self.icmp_error(dir, buf, &p, csum),
            _ => {}
        }
        let translated = match dir {
            Direction::Inbound => self.inbound(now, buf, &p, false, csum, n)?,
            Direction::Outbound => {
                let hairpin = self.table.find_public(p.dst).is_some();
                if hairpin && !self.inbound_would_match(&p) {
                    // To a public address, not a forward: the host's, or answered here.
                    return self.not_translated(buf, &p, n);
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
            return Ok(());
        }
        if !translated {
            return self.not_translated(buf, &p, n);
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
        Ok(())
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
                if flags & 0x04 == 0
                    && !p.first_fragment
                    && crate::service::refuse_in_place(buf) =>
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
                self.table.public_owner(proto, idx, dport).is_some()
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
        let m = match self.table.mapping_of_inside(proto, inside) {
            Some(m) => m,
            None => {
                let Some(idx) = self.overload else {
                    return Ok(false);
                };
                self.table
                    .create_mapping(proto, inside, idx, None, NO_LISTENER, false)?
            }
        };
        let view = self.table.mapping(m);
        let s = match self
            .table
            .session(proto, view.public_idx, view.public_port, remote)
        {
            Some(s) => s,
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
        translate::set_ip(buf, 0, Side::Src, public_ip, csum);
        translate::set_port(buf, 0, Side::Src, view.public_port, csum);
        self.stats.translated_out += n;
        Ok(true)
    }

    fn table_release_if_unused(&mut self, m: u32) {
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
            && translate::is_initial_syn(flags)
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
                Some(PublicOwner::Listener(id)) => {
                    if proto == Proto::Tcp && !translate::is_initial_syn(flags) {
                        return Err(DropReason::NotSyn);
                    }
                    match self.open_listener_flow(now, id, idx, public_port, proto, remote) {
                        // A virtual service with no backend left refuses like a closed port.
                        Err(DropReason::NoInsideEndpoint)
                            if proto == Proto::Tcp
                                && !hairpin
                                && crate::service::refuse_in_place(buf) =>
                        {
                            self.refused_in_place = true;
                            return Ok(false);
                        }
                        r => r?,
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
                    if proto == Proto::Tcp && !translate::is_initial_syn(flags) {
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
        translate::set_ip(buf, 0, Side::Dst, *view.inside.ip(), csum);
        translate::set_port(buf, 0, Side::Dst, view.inside.port(), csum);
        self.stats.translated_in += n;
        Ok(true)
    }

    /// The one place where a new inbound flow to a listener gets its inside endpoint.
    fn open_listener_flow(
        &mut self,
        now: Instant,
        id: u16,
        idx: u8,
        public_port: u16,
        proto: Proto,
        client: SocketAddrV4,
    ) -> Result<u32, DropReason> {
        if self.table.len() >= self.table.capacity() && self.table.half_open() == 0 {
            return Err(DropReason::TableFull);
        }
        let listener = self
            .listeners
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoInsideEndpoint)?;
        let inside = listener
            .selector
            .select(now, client)
            .ok_or(DropReason::NoInsideEndpoint)?;
        let m = match self.table.mapping_of_inside(proto, inside) {
            Some(m) if self.table.mapping(m).listener == Some(id) => m,
            Some(_) => return Err(DropReason::InsideEndpointBusy),
            None => self
                .table
                .create_mapping(proto, inside, idx, Some(public_port), id, false)?,
        };
        let created = self.table.create_session(now, m, client, false);
        self.report_evicted(now);
        let s = created.inspect_err(|_| {
            self.table.release_unused_mapping(m);
        })?;
        if let Some(Some(l)) = self.listeners.get_mut(usize::from(id)) {
            l.flows_opened += 1;
        }
        self.stats.flows_created += 1;
        self.notify(now, Some(id), inside, client, FlowEvent::Opened);
        Ok(s)
    }

    fn notify(
        &mut self,
        now: Instant,
        listener: Option<u16>,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        e: FlowEvent,
    ) {
        if let Some(l) = listener.and_then(|id| self.listeners.get_mut(usize::from(id))?.as_mut()) {
            l.selector.on_flow(now, inside, client, e);
        }
    }

    fn notify_packet(
        &mut self,
        listener: Option<u16>,
        inside: SocketAddrV4,
        to_inside: bool,
        len: usize,
    ) {
        if let Some(l) = listener.and_then(|id| self.listeners.get_mut(usize::from(id))?.as_mut()) {
            l.selector.on_packet(inside, to_inside, len);
        }
    }

    fn notify_change(
        &mut self,
        now: Instant,
        l: Option<u16>,
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

    /// ICMP errors: rewrite the quoted packet back to what its sender saw (RFC 5508 REQ-4/5).
    /// Errors never create, refresh or delete flows (REQ-6).
    ///
    /// An ICMP checksum covers no pseudo-header, so a partial one (`csum`) cannot be verified:
    /// the caller finishes it first (the driver does); an unfinished one fails validation.
    fn icmp_error(
        &mut self,
        dir: Direction,
        buf: &mut [u8],
        p: &Parsed,
        csum: L4Checksum,
    ) -> Result<(), DropReason> {
        let q = translate::quoted(buf, p)?;
        // The quoted packet is ICMP payload: its checksums are complete, whatever the outer's.
        let quoted = L4Checksum::Full;
        match dir {
            Direction::Inbound => {
                // About a packet we sent out: quoted src is our public endpoint. One the
                // gateway does not translate goes to the host, if the address is the host's.
                let pass = |g: &mut Self| {
                    if g.local_addresses.contains(&p.dst) {
                        g.stats.passed_through += 1;
                        Ok(())
                    } else {
                        Err(DropReason::Unowned)
                    }
                };
                let Some(idx) = self.table.find_public(q.src) else {
                    return pass(self);
                };
                let remote =
                    SocketAddrV4::new(q.dst, if q.proto == Proto::Icmp { 0 } else { q.dport });
                let Some(s) = self.table.session(q.proto, idx, q.sport, remote) else {
                    if self.table.public_owner(q.proto, idx, q.sport).is_none() {
                        // About the gateway's own traffic: the kernel wants it.
                        return pass(self);
                    }
                    return Err(DropReason::NoSession);
                };
                let view = self.table.mapping(self.table.session_mapping(s));
                translate::set_ip(buf, q.ip, Side::Src, *view.inside.ip(), quoted);
                translate::set_port(buf, q.ip, Side::Src, view.inside.port(), quoted);
                translate::refresh_icmp_checksum(buf, p);
                translate::set_ip(buf, 0, Side::Dst, *view.inside.ip(), csum);
            }
            Direction::Outbound => {
                // About a packet an inside host received: quoted dst is the inside endpoint,
                // and only that host may report on it.
                if p.src != q.dst {
                    return Err(DropReason::IcmpErrorSpoofed);
                }
                let inside = SocketAddrV4::new(q.dst, q.dport);
                let remote =
                    SocketAddrV4::new(q.src, if q.proto == Proto::Icmp { 0 } else { q.sport });
                let Some(m) = self.table.mapping_of_inside(q.proto, inside) else {
                    return Err(DropReason::NoSession);
                };
                let view = self.table.mapping(m);
                if self
                    .table
                    .session(q.proto, view.public_idx, view.public_port, remote)
                    .is_none()
                {
                    return Err(DropReason::NoSession);
                }
                let public_ip = self.table.public_addr(view.public_idx);
                translate::set_ip(buf, q.ip, Side::Dst, public_ip, quoted);
                translate::set_port(buf, q.ip, Side::Dst, view.public_port, quoted);
                translate::refresh_icmp_checksum(buf, p);
                translate::set_ip(buf, 0, Side::Src, public_ip, csum);
            }
        }
        if self.compensate_ttl {
            translate::bump_ttl(buf);
        }
        self.stats.icmp_errors += 1;
        Ok(())
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

    /// The ACL rules with their hit counters.
    pub fn acl_rules(&self) -> impl Iterator<Item = (&AclRule, u64)> {
        self.acl.rules()
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
