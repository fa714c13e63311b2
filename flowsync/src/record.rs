//! What is synced: one flow's full state, or a persistence template, and their removals; and
//! the destination table entries of the locality-based schedulers (`lblc`, `lblcr`).
//!
//! A record is what a backup needs to continue a flow exactly where the master left it: both
//! sides' endpoints and the public endpoint chosen for it (a dynamic mapping's overload port,
//! or a listener's address and port), the backend (`inside`), the TCP state, the flags that
//! decide eviction and filtering, and the remaining idle timeout.
//!
//! A locality record ([`Update::Locality`]) is the only one of variable length: its backend
//! set holds 1..=[`MAX_LOCALITY_BACKENDS`] endpoints, so the largest (790 bytes) still fits a
//! message. It is sent only to peers that announced they understand it (see
//! [`crate::wire::FEATURE_LOCALITY`]), and its removal ([`Update::LocalityGone`], added later)
//! only to peers that announced that too ([`crate::wire::FEATURE_LOCALITY_GONE`]): an older
//! node refuses a whole message holding a record type it does not know, and would never get
//! past it in the stream ([`Update::feature`] says which bit a record needs).
//!
//! Invariant: [`Update::decode`] accepts exactly what [`Update::encode`] writes; every field
//! is range-checked (protocol, TCP state, flag bits, timeout, set size), so a decoded record
//! is always one the encoder could have produced.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::error::WireError;

/// The longest remaining idle timeout a record may carry (7 days, above every timeout the
/// gateway allows): a larger one is refused as malformed.
pub const MAX_EXPIRES_SECS: u32 = 7 * 24 * 3600;

/// Bytes of an encoded [`Update::Flow`].
pub(crate) const FLOW_LEN: usize = 1 + 1 + 6 + 6 + 6 + 2 + 1 + 1 + 4;
/// Bytes of an encoded [`Update::FlowGone`].
pub(crate) const FLOW_GONE_LEN: usize = 1 + 1 + 6 + 6;
/// Bytes of an encoded [`Update::Persist`].
pub(crate) const PERSIST_LEN: usize = 1 + 2 + 4 + 6 + 4;
/// Bytes of an encoded [`Update::PersistGone`].
pub(crate) const PERSIST_GONE_LEN: usize = 1 + 2 + 4;
/// Bytes of an encoded [`Update::Locality`] before its backends (6 bytes each).
pub(crate) const LOCALITY_HEAD_LEN: usize = 1 + 2 + 4 + 4 + 4 + 1;
/// Bytes of an encoded [`Update::LocalityGone`].
pub(crate) const LOCALITY_GONE_LEN: usize = 1 + 2 + 4;

/// The most backends one locality record carries: an `lblcr` set larger than this is sent
/// as its most recently added members (a set grows by one backend each time all of its
/// members are busy, so a real one stays far below).
pub const MAX_LOCALITY_BACKENDS: usize = 128;

const OP_FLOW: u8 = 1;
const OP_FLOW_GONE: u8 = 2;
const OP_PERSIST: u8 = 3;
const OP_PERSIST_GONE: u8 = 4;
const OP_LOCALITY: u8 = 5;
const OP_LOCALITY_GONE: u8 = 6;

/// `listener` on the wire for a flow of a dynamic mapping.
const NO_LISTENER: u16 = u16::MAX;

const F_FROM_INSIDE: u8 = 0x01;
const F_REPLIED: u8 = 0x02;
const F_ASSURED: u8 = 0x04;
const F_FIRST_FIN_ORIGINATOR: u8 = 0x08;
const F_ALL: u8 = F_FROM_INSIDE | F_REPLIED | F_ASSURED | F_FIRST_FIN_ORIGINATOR;

/// Transport protocol of a synced flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (ports are the query identifier).
    Icmp,
}

impl FlowProto {
    /// The IP protocol number (what the wire carries).
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            FlowProto::Tcp => 6,
            FlowProto::Udp => 17,
            FlowProto::Icmp => 1,
        }
    }

    fn from_number(n: u8) -> Result<Self, WireError> {
        match n {
            6 => Ok(FlowProto::Tcp),
            17 => Ok(FlowProto::Udp),
            1 => Ok(FlowProto::Icmp),
            other => Err(WireError::BadProto(other)),
        }
    }
}

/// TCP connection state (conntrack's states; `None` for UDP and ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpPhase {
    /// Not TCP, or no segment tracked yet.
    None,
    /// The originator's SYN was seen.
    SynSent,
    /// The responder's SYN-ACK was seen.
    SynRecv,
    /// Established.
    Established,
    /// One side sent a FIN.
    FinWait,
    /// The other side acknowledged it without its own FIN.
    CloseWait,
    /// Both sides sent a FIN.
    LastAck,
    /// The last FIN was acknowledged.
    TimeWait,
    /// An in-window RST was seen.
    Close,
}

impl TcpPhase {
    const ALL: [TcpPhase; 9] = [
        TcpPhase::None,
        TcpPhase::SynSent,
        TcpPhase::SynRecv,
        TcpPhase::Established,
        TcpPhase::FinWait,
        TcpPhase::CloseWait,
        TcpPhase::LastAck,
        TcpPhase::TimeWait,
        TcpPhase::Close,
    ];

    fn code(self) -> u8 {
        match self {
            TcpPhase::None => 0,
            TcpPhase::SynSent => 1,
            TcpPhase::SynRecv => 2,
            TcpPhase::Established => 3,
            TcpPhase::FinWait => 4,
            TcpPhase::CloseWait => 5,
            TcpPhase::LastAck => 6,
            TcpPhase::TimeWait => 7,
            TcpPhase::Close => 8,
        }
    }

    fn from_code(c: u8) -> Result<Self, WireError> {
        Self::ALL
            .get(usize::from(c))
            .copied()
            .ok_or(WireError::BadTcpState(c))
    }
}

/// What identifies a flow on every node: its public endpoint and the remote endpoint (the
/// same in both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Protocol.
    pub proto: FlowProto,
    /// Public endpoint (the overload address and port, or a listener's VIP and port).
    pub public: SocketAddrV4,
    /// Remote endpoint (the outside host, or a virtual service's client).
    pub outside: SocketAddrV4,
}

/// One flow's full state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// Identity of the flow.
    pub key: FlowKey,
    /// Inside endpoint: the inside host of a PAT mapping, or the backend a service chose.
    pub inside: SocketAddrV4,
    /// The listener (static forward or virtual service) that placed the flow, by id; `None`
    /// for a dynamic mapping (then `key.public` is its overload port allocation).
    pub listener: Option<u16>,
    /// TCP state.
    pub tcp: TcpPhase,
    /// Which side sent the first FIN (true: the originator); meaningful while closing.
    pub first_fin_from_originator: bool,
    /// Opened by an inside host (counts toward its per-host limit once live).
    pub from_inside: bool,
    /// The responder answered.
    pub replied: bool,
    /// Assured: established or answered (never evicted for new flows).
    pub assured: bool,
    /// Remaining idle timeout in seconds (at most [`MAX_EXPIRES_SECS`]).
    pub expires_in_secs: u32,
}

/// What identifies a persistence template: the listener and the client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PersistKey {
    /// The virtual service's listener id.
    pub listener: u16,
    /// Client address.
    pub client: Ipv4Addr,
}

/// A persistence template: a client sticks to a backend until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PersistState {
    /// Identity of the template.
    pub key: PersistKey,
    /// The backend the client sticks to.
    pub backend: SocketAddrV4,
    /// Remaining lifetime in seconds (at most [`MAX_EXPIRES_SECS`]).
    pub expires_in_secs: u32,
}

/// What identifies a locality entry: the listener and the destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalityKey {
    /// The virtual service's listener id.
    pub listener: u16,
    /// The destination address the entry is for.
    pub dest: Ipv4Addr,
}

/// A destination table entry of an `lblc` or `lblcr` service: the backends serving a
/// destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalityState {
    /// Identity of the entry.
    pub key: LocalityKey,
    /// The backends serving the destination, by address, most recently added first
    /// (1..=[`MAX_LOCALITY_BACKENDS`]; one for `lblc`).
    pub backends: Vec<SocketAddrV4>,
    /// Seconds since the entry was last used (at most [`MAX_EXPIRES_SECS`]).
    pub idle_secs: u32,
    /// Seconds since its backend set last changed (at most [`MAX_EXPIRES_SECS`]).
    pub unchanged_secs: u32,
}

/// One synced change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Update {
    /// A flow was created or changed (idempotent: the latest state wins).
    Flow(FlowState),
    /// A flow was removed.
    FlowGone(FlowKey),
    /// A persistence template was created or refreshed.
    Persist(PersistState),
    /// A persistence template expired.
    PersistGone(PersistKey),
    /// A locality entry was created or its backend set changed, or is refreshed (the latest
    /// state wins).
    Locality(LocalityState),
    /// A locality entry was removed (expired, its slot reclaimed for another destination, or
    /// its backends gone). A peer that does not take it keeps its copy until it expires, a
    /// day (the schedulers' expiry) after the last use it was told of.
    LocalityGone(LocalityKey),
}

fn put_endpoint(out: &mut Vec<u8>, e: SocketAddrV4) {
    out.extend_from_slice(&e.ip().octets());
    out.extend_from_slice(&e.port().to_be_bytes());
}

/// A cursor over a message's payload that refuses to read past its end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(WireError::TruncatedRecord);
        };
        self.buf = rest;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn ip(&mut self) -> Result<Ipv4Addr, WireError> {
        Ok(Ipv4Addr::from(self.take::<4>()?))
    }

    fn endpoint(&mut self) -> Result<SocketAddrV4, WireError> {
        let ip = self.ip()?;
        Ok(SocketAddrV4::new(ip, self.u16()?))
    }

    fn expires(&mut self) -> Result<u32, WireError> {
        let secs = self.u32()?;
        if secs > MAX_EXPIRES_SECS {
            return Err(WireError::TimeoutTooLong(secs));
        }
        Ok(secs)
    }
}

impl Update {
    /// Bytes this update takes on the wire.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        match self {
            Update::Flow(_) => FLOW_LEN,
            Update::FlowGone(_) => FLOW_GONE_LEN,
            Update::Persist(_) => PERSIST_LEN,
            Update::PersistGone(_) => PERSIST_GONE_LEN,
            Update::Locality(l) => {
                LOCALITY_HEAD_LEN + 6 * l.backends.len().clamp(1, MAX_LOCALITY_BACKENDS)
            }
            Update::LocalityGone(_) => LOCALITY_GONE_LEN,
        }
    }

    /// The `Features` bit a peer must have announced to be sent this record (0: the base
    /// format, every peer takes it).
    #[must_use]
    pub fn feature(&self) -> u32 {
        match self {
            Update::Flow(_) | Update::FlowGone(_) | Update::Persist(_) | Update::PersistGone(_) => {
                0
            }
            Update::Locality(_) => crate::wire::FEATURE_LOCALITY,
            Update::LocalityGone(_) => crate::wire::FEATURE_LOCALITY_GONE,
        }
    }

    /// Appends the wire form (network byte order) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Update::Flow(f) => {
                out.push(OP_FLOW);
                out.push(f.key.proto.number());
                put_endpoint(out, f.key.public);
                put_endpoint(out, f.key.outside);
                put_endpoint(out, f.inside);
                out.extend_from_slice(&f.listener.unwrap_or(NO_LISTENER).to_be_bytes());
                out.push(f.tcp.code());
                let flags = (if f.from_inside { F_FROM_INSIDE } else { 0 })
                    | (if f.replied { F_REPLIED } else { 0 })
                    | (if f.assured { F_ASSURED } else { 0 })
                    | (if f.first_fin_from_originator {
                        F_FIRST_FIN_ORIGINATOR
                    } else {
                        0
                    });
                out.push(flags);
                out.extend_from_slice(&f.expires_in_secs.min(MAX_EXPIRES_SECS).to_be_bytes());
            }
            Update::FlowGone(k) => {
                out.push(OP_FLOW_GONE);
                out.push(k.proto.number());
                put_endpoint(out, k.public);
                put_endpoint(out, k.outside);
            }
            Update::Persist(p) => {
                out.push(OP_PERSIST);
                out.extend_from_slice(&p.key.listener.to_be_bytes());
                out.extend_from_slice(&p.key.client.octets());
                put_endpoint(out, p.backend);
                out.extend_from_slice(&p.expires_in_secs.min(MAX_EXPIRES_SECS).to_be_bytes());
            }
            Update::PersistGone(k) => {
                out.push(OP_PERSIST_GONE);
                out.extend_from_slice(&k.listener.to_be_bytes());
                out.extend_from_slice(&k.client.octets());
            }
            Update::Locality(l) => {
                out.push(OP_LOCALITY);
                out.extend_from_slice(&l.key.listener.to_be_bytes());
                out.extend_from_slice(&l.key.dest.octets());
                out.extend_from_slice(&l.idle_secs.min(MAX_EXPIRES_SECS).to_be_bytes());
                out.extend_from_slice(&l.unchanged_secs.min(MAX_EXPIRES_SECS).to_be_bytes());
                // The constructors keep 1..=MAX_LOCALITY_BACKENDS; an empty set still
                // encodes as one (unspecified) endpoint so the length stays as announced.
                let backends = &l.backends[..l.backends.len().min(MAX_LOCALITY_BACKENDS)];
                let count = backends.len().max(1);
                out.push(u8::try_from(count).unwrap_or(u8::MAX));
                for b in backends {
                    put_endpoint(out, *b);
                }
                if backends.is_empty() {
                    put_endpoint(out, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
                }
            }
            Update::LocalityGone(k) => {
                out.push(OP_LOCALITY_GONE);
                out.extend_from_slice(&k.listener.to_be_bytes());
                out.extend_from_slice(&k.dest.octets());
            }
        }
    }

    /// Reads one update from the front of `r`.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Update, WireError> {
        match r.u8()? {
            OP_FLOW => {
                let proto = FlowProto::from_number(r.u8()?)?;
                let public = r.endpoint()?;
                let outside = r.endpoint()?;
                let inside = r.endpoint()?;
                let listener = match r.u16()? {
                    NO_LISTENER => None,
                    id => Some(id),
                };
                let tcp = TcpPhase::from_code(r.u8()?)?;
                if proto != FlowProto::Tcp && tcp != TcpPhase::None {
                    return Err(WireError::BadTcpState(tcp.code()));
                }
                let flags = r.u8()?;
                if flags & !F_ALL != 0 {
                    return Err(WireError::BadRecordFlags(flags));
                }
                Ok(Update::Flow(FlowState {
                    key: FlowKey {
                        proto,
                        public,
                        outside,
                    },
                    inside,
                    listener,
                    tcp,
                    first_fin_from_originator: flags & F_FIRST_FIN_ORIGINATOR != 0,
                    from_inside: flags & F_FROM_INSIDE != 0,
                    replied: flags & F_REPLIED != 0,
                    assured: flags & F_ASSURED != 0,
                    expires_in_secs: r.expires()?,
                }))
            }
            OP_FLOW_GONE => {
                let proto = FlowProto::from_number(r.u8()?)?;
                let public = r.endpoint()?;
                Ok(Update::FlowGone(FlowKey {
                    proto,
                    public,
                    outside: r.endpoint()?,
                }))
            }
            OP_PERSIST => {
                let listener = r.u16()?;
                let client = r.ip()?;
                let backend = r.endpoint()?;
                Ok(Update::Persist(PersistState {
                    key: PersistKey { listener, client },
                    backend,
                    expires_in_secs: r.expires()?,
                }))
            }
            OP_PERSIST_GONE => {
                let listener = r.u16()?;
                Ok(Update::PersistGone(PersistKey {
                    listener,
                    client: r.ip()?,
                }))
            }
            OP_LOCALITY => {
                let listener = r.u16()?;
                let dest = r.ip()?;
                let idle_secs = r.expires()?;
                let unchanged_secs = r.expires()?;
                let count = usize::from(r.u8()?);
                if count == 0 || count > MAX_LOCALITY_BACKENDS {
                    return Err(WireError::LocalityBackends(count));
                }
                let backends = (0..count)
                    .map(|_| r.endpoint())
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Update::Locality(LocalityState {
                    key: LocalityKey { listener, dest },
                    backends,
                    idle_secs,
                    unchanged_secs,
                }))
            }
            OP_LOCALITY_GONE => {
                let listener = r.u16()?;
                Ok(Update::LocalityGone(LocalityKey {
                    listener,
                    dest: r.ip()?,
                }))
            }
            op => Err(WireError::UnknownRecord(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u16) -> Update {
        Update::Flow(FlowState {
            key: FlowKey {
                proto: FlowProto::Tcp,
                public: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 40000 + n),
                outside: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 443),
            },
            inside: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 50000 + n),
            listener: None,
            tcp: TcpPhase::Established,
            first_fin_from_originator: false,
            from_inside: true,
            replied: true,
            assured: true,
            expires_in_secs: 7440,
        })
    }

    fn round_trip(u: Update) {
        let mut out = Vec::new();
        u.encode(&mut out);
        assert_eq!(out.len(), u.encoded_len());
        let mut r = Reader::new(&out);
        assert_eq!(Update::decode(&mut r).unwrap(), u);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(flow(1));
        let Update::Flow(mut f) = flow(2) else {
            unreachable!()
        };
        f.listener = Some(3);
        f.tcp = TcpPhase::FinWait;
        f.first_fin_from_originator = true;
        round_trip(Update::Flow(f));
        round_trip(Update::FlowGone(f.key));
        let p = PersistState {
            key: PersistKey {
                listener: 3,
                client: Ipv4Addr::new(198, 51, 100, 9),
            },
            backend: SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 80),
            expires_in_secs: 300,
        };
        round_trip(Update::Persist(p));
        round_trip(Update::PersistGone(p.key));
        round_trip(locality(1));
        round_trip(locality(MAX_LOCALITY_BACKENDS));
        round_trip(locality_gone());
    }

    fn locality_gone() -> Update {
        Update::LocalityGone(LocalityKey {
            listener: 3,
            dest: Ipv4Addr::new(192, 0, 2, 80),
        })
    }

    #[test]
    fn a_truncated_locality_removal_is_refused_and_each_record_names_its_feature() {
        let good = encoded(locality_gone());
        assert_eq!(good.len(), LOCALITY_GONE_LEN);
        for cut in 1..good.len() {
            assert_eq!(decode(&good[..cut]), Err(WireError::TruncatedRecord));
        }
        assert_eq!(flow(1).feature(), 0);
        assert_eq!(locality(1).feature(), crate::wire::FEATURE_LOCALITY);
        assert_eq!(
            locality_gone().feature(),
            crate::wire::FEATURE_LOCALITY_GONE
        );
    }

    fn locality(backends: usize) -> Update {
        Update::Locality(LocalityState {
            key: LocalityKey {
                listener: 3,
                dest: Ipv4Addr::new(192, 0, 2, 80),
            },
            backends: (0..backends)
                .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 1), 3128 + i as u16))
                .collect(),
            idle_secs: 60,
            unchanged_secs: 86_400,
        })
    }

    #[test]
    fn the_largest_locality_record_fits_a_message() {
        let largest = locality(MAX_LOCALITY_BACKENDS);
        // An `Updates` payload: the record count, then the record.
        let payload = 1 + largest.encoded_len();
        assert!(payload <= crate::wire::MAX_PAYLOAD, "{payload} bytes");
        // A larger set is sent as its first (most recently added) members.
        let Update::Locality(mut l) = largest else {
            unreachable!()
        };
        let first = l.backends[..MAX_LOCALITY_BACKENDS].to_vec();
        l.backends
            .push(SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 1));
        let bytes = encoded(Update::Locality(l.clone()));
        assert_eq!(bytes.len(), Update::Locality(l.clone()).encoded_len());
        let Ok(Update::Locality(back)) = decode(&bytes) else {
            panic!("decodes")
        };
        assert_eq!(back.backends, first);
    }

    #[test]
    fn a_locality_record_with_no_or_too_many_backends_is_refused() {
        let good = encoded(locality(2));
        // The count is the byte after the two ages.
        let at = LOCALITY_HEAD_LEN - 1;
        let mut bad = good.clone();
        bad[at] = 0;
        assert_eq!(decode(&bad), Err(WireError::LocalityBackends(0)));
        let mut bad = good.clone();
        bad[at] = u8::try_from(MAX_LOCALITY_BACKENDS + 1).unwrap();
        assert_eq!(
            decode(&bad),
            Err(WireError::LocalityBackends(MAX_LOCALITY_BACKENDS + 1))
        );
        let mut bad = good.clone();
        bad[at] = 3;
        assert_eq!(decode(&bad), Err(WireError::TruncatedRecord));
        let mut bad = good.clone();
        bad[7..11].copy_from_slice(&(MAX_EXPIRES_SECS + 1).to_be_bytes());
        assert_eq!(
            decode(&bad),
            Err(WireError::TimeoutTooLong(MAX_EXPIRES_SECS + 1))
        );
    }

    fn encoded(u: Update) -> Vec<u8> {
        let mut out = Vec::new();
        u.encode(&mut out);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Update, WireError> {
        Update::decode(&mut Reader::new(bytes))
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let good = encoded(flow(1));
        let mut bad = good.clone();
        bad[1] = 47; // GRE
        assert_eq!(decode(&bad), Err(WireError::BadProto(47)));
        let mut bad = good.clone();
        bad[22] = 9;
        assert_eq!(decode(&bad), Err(WireError::BadTcpState(9)));
        let mut bad = good.clone();
        bad[23] = 0x80;
        assert_eq!(decode(&bad), Err(WireError::BadRecordFlags(0x80)));
        let mut bad = good.clone();
        bad[24..28].copy_from_slice(&(MAX_EXPIRES_SECS + 1).to_be_bytes());
        assert_eq!(
            decode(&bad),
            Err(WireError::TimeoutTooLong(MAX_EXPIRES_SECS + 1))
        );
        let mut bad = good.clone();
        bad[0] = 9;
        assert_eq!(decode(&bad), Err(WireError::UnknownRecord(9)));
        assert_eq!(decode(&good[..10]), Err(WireError::TruncatedRecord));
    }

    #[test]
    fn a_udp_flow_with_a_tcp_state_is_refused() {
        let Update::Flow(mut f) = flow(1) else {
            unreachable!()
        };
        f.key.proto = FlowProto::Udp;
        let bytes = encoded(Update::Flow(f));
        assert_eq!(decode(&bytes), Err(WireError::BadTcpState(3)));
    }
}
