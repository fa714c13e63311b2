//! Listeners of a [`Gateway`]: public endpoints whose new inbound flows a [`Selector`]
//! places (static forwards and virtual services), and the live reconfiguration of the static
//! forwards.
//!
//! Invariant: a listener's id is its slot in `Gateway::listeners`; a removed listener leaves a
//! tombstone so the ids of the others stay valid.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use super::Gateway;
use crate::config::StaticEntry;
use crate::error::NatError;
use crate::flow::{ListenerId, Proto};
use crate::selector::{Selector, StaticForward};
use crate::service::{Forward, VirtualService};
use crate::table::{LISTENER_LIMIT, PublicOwner};

/// One public endpoint whose new inbound flows are handed to a selector.
#[derive(Debug)]
pub struct Listener {
    /// Protocol.
    pub proto: Proto,
    /// The public endpoint (a multi-port service's lowest port).
    pub public: SocketAddrV4,
    /// Every public port of the listener's address it owns (`public`'s alone but for a
    /// multi-port service), as reserved in the table.
    pub ports: Vec<u16>,
    /// Who picks the inside endpoint.
    pub selector: Selector,
    /// Flows opened through this listener.
    pub flows_opened: u64,
}

impl Gateway {
    pub(super) fn add_static(
        &mut self,
        _now: Instant,
        s: StaticEntry,
    ) -> Result<ListenerId, NatError> {
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
            Selector::Static(StaticForward { inside: s.inside }),
        )?;
        let idx = self
            .table
            .find_public(*s.public.ip())
            .ok_or(NatError::TooManyPublicAddresses)?;
        // The forward's mapping is permanent so that the inside host's own traffic from that
        // port also leaves as PUBLIC:PORT (IOS static entries are bidirectional).
        self.table
            .create_mapping(
                s.proto,
                s.inside,
                idx,
                Some(s.public.port()),
                Some(id),
                true,
            )
            .map_err(|_| NatError::DuplicateInside {
                proto: s.proto,
                inside: s.inside,
            })?;
        Ok(id)
    }

    /// Brings the static forwards to `statics`: forwards that disappeared are removed with
    /// their flows, new ones are added (a changed one is both). Nothing changes on error.
    pub(super) fn reconfigure_statics(
        &mut self,
        now: Instant,
        statics: &[StaticEntry],
    ) -> Result<(), NatError> {
        let gone: Vec<ListenerId> = self
            .listeners()
            .filter_map(|(id, l)| {
                let s = l.selector.as_static()?;
                let e = StaticEntry {
                    proto: l.proto,
                    public: l.public,
                    inside: s.inside,
                };
                (!statics.contains(&e)).then_some(id)
            })
            .collect();
        let current: Vec<StaticEntry> = self.static_entries().collect();
        let added: Vec<StaticEntry> = statics
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
        Ok(())
    }

    /// Whether `added` static forwards can be added once the listeners `gone` are removed: no
    /// clash with a listener or a mapping that stays, nor among themselves.
    fn check_statics_fit(
        &self,
        added: &[StaticEntry],
        gone: &[ListenerId],
    ) -> Result<(), NatError> {
        let stays = |listener: Option<ListenerId>| listener.is_none_or(|l| !gone.contains(&l));
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
        selector: impl Into<Selector>,
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
            .filter(|_| slot < LISTENER_LIMIT)
            .map(ListenerId)
            .ok_or(NatError::DuplicatePublic { proto, public })?;
        let selector = selector.into();
        let ports: Vec<u16> = selector
            .as_service()
            .and_then(VirtualService::ports)
            .map_or_else(|| vec![public.port()], |p| p.iter().collect());
        self.reserve_ports(proto, idx, *public.ip(), &ports, id)?;
        let mut listener = Listener {
            proto,
            public,
            ports,
            selector,
            flows_opened: 0,
        };
        if let Some(svc) = listener.selector.as_service_mut() {
            // A service added while this node syncs journals its templates as the others do.
            svc.set_sync_journal(self.table.journaling());
        }
        // A direct-routing service sees its clients' side of each flow only.
        let one_way = listener
            .selector
            .as_service()
            .is_some_and(|s| s.forward() == Forward::DirectRoute);
        self.table.set_one_way(id, one_way);
        if slot == self.listeners.len() {
            self.listeners.push(Some(listener));
        } else {
            self.listeners[slot] = Some(listener);
        }
        Ok(id)
    }

    /// Reserves `ports` of public address `idx` (`ip`) for listener `id`: all of them, or
    /// none when one is taken.
    fn reserve_ports(
        &mut self,
        proto: Proto,
        idx: crate::table::PublicIdx,
        ip: Ipv4Addr,
        ports: &[u16],
        id: ListenerId,
    ) -> Result<(), NatError> {
        for (i, &port) in ports.iter().enumerate() {
            if !self.table.add_listener(proto, idx, port, id) {
                self.table
                    .release_listener_ports(proto, idx, &ports[..i], id);
                return Err(NatError::DuplicatePublic {
                    proto,
                    public: SocketAddrV4::new(ip, port),
                });
            }
        }
        Ok(())
    }

    /// Moves listener `id` (a multi-port service) to the public ports `ports`: new ports
    /// answer at once; a port dropped takes no new flow, while the flows it has keep going
    /// (as LVS's connections outlive the firewall mark that scheduled them). Nothing changes
    /// when a new port is taken.
    pub(super) fn move_listener_ports(
        &mut self,
        id: ListenerId,
        ports: Vec<u16>,
    ) -> Result<(), NatError> {
        let Some(l) = self.listener(id) else {
            return Ok(());
        };
        let (proto, ip) = (l.proto, *l.public.ip());
        let added: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !l.ports.contains(p))
            .collect();
        let dropped: Vec<u16> = l
            .ports
            .iter()
            .copied()
            .filter(|p| !ports.contains(p))
            .collect();
        let idx = self
            .table
            .find_public(ip)
            .ok_or(NatError::TooManyPublicAddresses)?;
        self.reserve_ports(proto, idx, ip, &added, id)?;
        self.table.release_listener_ports(proto, idx, &dropped, id);
        if let Some(Some(l)) = self.listeners.get_mut(usize::from(id.0)) {
            l.public = SocketAddrV4::new(ip, ports.first().copied().unwrap_or(l.public.port()));
            l.ports = ports;
        }
        Ok(())
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
            .remove_listener(l.proto, idx, &l.ports, id, |r| removed.push(r));
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
            let s = l.selector.as_static()?;
            Some(StaticEntry {
                proto: l.proto,
                public: l.public,
                inside: s.inside,
            })
        })
    }

    /// A listener's selector, e.g. to change a virtual service's pool at run time.
    pub fn selector_mut(&mut self, id: ListenerId) -> Option<&mut Selector> {
        self.listeners
            .get_mut(usize::from(id.0))?
            .as_mut()
            .map(|l| &mut l.selector)
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
}
