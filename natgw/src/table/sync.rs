//! The table's side of flow sync: a journal of what changed, the full image of a flow, and
//! installing a flow a peer created.
//!
//! Invariants:
//! - the journal is off until [`PatTable::set_journal`] turns it on, and holds at most
//!   [`JOURNAL_CAP`] entries; past that it is emptied and marked overflowed, and the next
//!   drain says so (the caller then sends every flow instead of the changes);
//! - an installed flow keeps the public endpoint its peer chose (its overload port
//!   allocation, or its listener's address and port) and gets the full idle timeout of its
//!   state; it counts toward every bound from then on, and is refused only when the table is
//!   full (after early drop) or its endpoints clash with a flow of this node.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::{
    Mapping, MappingId, NIL, PatTable, PublicIdx, PublicOwner, S_ASSURED, S_FROM_INSIDE, S_REPLIED,
    SessionKey, raw_listener,
};
use crate::flow::{ListenerId, Proto};
use crate::tcp::{TcpState, Tracker};

/// The most journal entries held between two drains.
pub(crate) const JOURNAL_CAP: usize = 65_536;

/// Sessions created, changed (TCP state, flags) or removed, in order.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    on: bool,
    overflowed: bool,
    /// The session and whether it was removed.
    entries: Vec<(SessionKey, bool)>,
}

impl Journal {
    pub(super) fn record(&mut self, key: SessionKey, removed: bool) {
        if !self.on || self.overflowed {
            return;
        }
        if self.entries.last() == Some(&(key, removed)) {
            return;
        }
        if self.entries.len() >= JOURNAL_CAP {
            self.entries = Vec::new();
            self.overflowed = true;
            return;
        }
        self.entries.push((key, removed));
    }
}

/// A flow's full state (what sync sends, and what it installs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowImage {
    pub(crate) proto: Proto,
    pub(crate) inside: SocketAddrV4,
    pub(crate) public: SocketAddrV4,
    pub(crate) outside: SocketAddrV4,
    pub(crate) listener: Option<ListenerId>,
    pub(crate) tcp: TcpState,
    pub(crate) first_fin_orig: bool,
    pub(crate) from_inside: bool,
    pub(crate) replied: bool,
    pub(crate) assured: bool,
    pub(crate) expires_in_secs: u32,
}

/// One entry of a drained journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowChange {
    /// Created or changed: its current image.
    Live(FlowImage),
    /// Removed: `(proto, public, outside)`.
    Removed(Proto, SocketAddrV4, SocketAddrV4),
}

/// What changed since the last drain.
#[derive(Debug, Default)]
pub(crate) struct JournalDrain {
    /// The changes, in order (a flow changed and then removed appears only as removed).
    pub(crate) changes: Vec<FlowChange>,
    /// Changes were lost to the bound: send every flow.
    pub(crate) overflowed: bool,
}

/// Why a synced flow could not be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstallError {
    /// Its public address is not one of this node's.
    UnknownPublic,
    /// This node already has that flow, to the same inside endpoint (its own traffic
    /// created it first).
    Exists,
    /// Its inside endpoint or public endpoint is used differently here.
    Clash,
    /// The table is full.
    TableFull,
    /// A dynamic flow (no listener) on a public endpoint this node's PAT never allocates:
    /// not the overload address, or a TCP/UDP port outside the configured range.
    NotAllocatable,
}

impl PatTable {
    /// Whether the journal is on.
    pub(crate) fn journaling(&self) -> bool {
        self.journal.on
    }

    /// Turns the journal on or off (off empties it).
    pub(crate) fn set_journal(&mut self, on: bool) {
        self.journal = Journal {
            on,
            ..Default::default()
        };
    }

    fn key_parts(&self, key: &SessionKey) -> (Proto, SocketAddrV4, SocketAddrV4) {
        let proto = Proto::from_code((key.proto_public >> 8) as u8);
        let idx = PublicIdx((key.proto_public & 0xff) as u8);
        let public = SocketAddrV4::new(self.public_addr(idx), (key.ports >> 16) as u16);
        let outside = SocketAddrV4::new(Ipv4Addr::from(key.remote_ip), key.ports as u16);
        (proto, public, outside)
    }

    pub(super) fn session_key(&self, s: u32) -> SessionKey {
        let sess = &self.sessions[s as usize];
        let view = self.view(sess.mapping);
        let remote = SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port);
        SessionKey::new(view.proto, view.public_idx, view.public_port, remote)
    }

    fn image(&self, now_tick: u32, s: u32) -> FlowImage {
        let sess = &self.sessions[s as usize];
        let view = self.view(sess.mapping);
        FlowImage {
            proto: view.proto,
            inside: view.inside,
            public: SocketAddrV4::new(self.public_addr(view.public_idx), view.public_port),
            outside: SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port),
            listener: view.listener,
            tcp: sess.tcp.state,
            first_fin_orig: sess.tcp.first_fin_orig(),
            from_inside: sess.flags & S_FROM_INSIDE != 0,
            replied: sess.flags & S_REPLIED != 0,
            assured: sess.flags & S_ASSURED != 0,
            expires_in_secs: sess.expires.saturating_sub(now_tick),
        }
    }

    /// What changed since the last call.
    pub(crate) fn drain_journal(&mut self, now: std::time::Instant) -> JournalDrain {
        let now_tick = self.tick(now);
        let entries = std::mem::take(&mut self.journal.entries);
        let overflowed = std::mem::take(&mut self.journal.overflowed);
        let mut drain = JournalDrain {
            overflowed,
            ..Default::default()
        };
        for (key, removed) in entries {
            if removed {
                let (proto, public, outside) = self.key_parts(&key);
                drain
                    .changes
                    .push(FlowChange::Removed(proto, public, outside));
            } else if let Some(&s) = self.flows.get(&key) {
                drain
                    .changes
                    .push(FlowChange::Live(self.image(now_tick, s)));
            }
        }
        drain
    }

    /// Every live flow.
    pub(crate) fn export(&self, now: std::time::Instant) -> Vec<FlowImage> {
        let now_tick = self.tick(now);
        let mut out = Vec::with_capacity(self.live_sessions);
        for slot in &self.wheel {
            let mut s = *slot;
            while s != NIL {
                out.push(self.image(now_tick, s));
                s = self.sessions[s as usize].wheel_next;
            }
        }
        out
    }

    /// Installs a flow a peer created (a standby flow being promoted). See the module docs.
    ///
    /// `overload`: the public address dynamic flows use (`None`: dynamic PAT is off). A
    /// dynamic flow is installed only on it and, for TCP and UDP, only on a port of the
    /// configured range: a peer (or a previous run) never claims another endpoint.
    pub(crate) fn install(
        &mut self,
        now: std::time::Instant,
        img: &FlowImage,
        overload: Option<PublicIdx>,
    ) -> Result<(), InstallError> {
        let idx = self
            .find_public(*img.public.ip())
            .ok_or(InstallError::UnknownPublic)?;
        let proto = img.proto;
        if img.listener.is_none()
            && (overload != Some(idx)
                || (proto != Proto::Icmp && !self.cfg.port_range.contains(&img.public.port())))
        {
            return Err(InstallError::NotAllocatable);
        }
        let key = SessionKey::new(proto, idx, img.public.port(), img.outside);
        if let Some(&s) = self.flows.get(&key) {
            let view = self.view(self.sessions[s as usize].mapping);
            return Err(if view.inside == img.inside {
                InstallError::Exists
            } else {
                InstallError::Clash
            });
        }
        let m = match self.mapping_of_inside(proto, img.inside) {
            Some(m) => {
                let view = self.view(m.0);
                if view.public_idx != idx
                    || view.public_port != img.public.port()
                    || view.listener != img.listener
                {
                    return Err(InstallError::Clash);
                }
                m.0
            }
            None => self.install_mapping(proto, img, idx)?,
        };
        if self.live_sessions >= self.cfg.max_sessions && !self.evict_for_room() {
            self.release_unused_mapping(MappingId(m));
            return Err(InstallError::TableFull);
        }
        if !self.mapping_live(m) {
            return Err(InstallError::TableFull);
        }
        let inside_ip = u32::from(*img.inside.ip());
        let remote_ip = u32::from(*img.outside.ip());
        if img.from_inside {
            *self.per_host.entry(inside_ip).or_insert(0) += 1;
        } else {
            if !img.assured {
                *self
                    .half_open_sources
                    .entry(self.source_net(remote_ip))
                    .or_insert(0) += 1;
            }
            self.mappings[m as usize].inbound += 1;
        }
        let flags = (if img.from_inside { S_FROM_INSIDE } else { 0 })
            | (if img.replied { S_REPLIED } else { 0 })
            | (if img.assured { S_ASSURED } else { 0 });
        let tracker = Tracker::resumed(
            if proto == Proto::Tcp {
                img.tcp
            } else {
                TcpState::None
            },
            img.first_fin_orig,
        );
        let now_tick = self.tick(now);
        self.insert_session(now_tick, m, img.outside, flags, tracker);
        Ok(())
    }

    /// The mapping of a flow to install: a listener's (its public endpoint stays the
    /// listener's) or a dynamic one on exactly the port the peer allocated.
    fn install_mapping(
        &mut self,
        proto: Proto,
        img: &FlowImage,
        idx: PublicIdx,
    ) -> Result<u32, InstallError> {
        let port = img.public.port();
        match (img.listener, self.public_owner(proto, idx, port)) {
            (Some(l), Some(PublicOwner::Listener(owner))) if owner == l => {}
            (None, None) => {}
            _ => return Err(InstallError::Clash),
        }
        let m = self.alloc_mapping(Mapping {
            inside_ip: u32::from(*img.inside.ip()),
            inside_port: img.inside.port(),
            public_port: port,
            proto_flags: proto.code(),
            public_idx: idx.0,
            listener: raw_listener(img.listener),
            sessions: 0,
            inbound: 0,
            head: NIL,
        });
        self.index.insert(Self::inside_key(proto, img.inside), m);
        if img.listener.is_none() {
            self.index.insert(Self::public_key(proto, idx, port), m);
        }
        Ok(m)
    }
}
