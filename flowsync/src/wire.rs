//! The sync message format (version 2), network byte order:
//!
//! ```text
//!  0       4    5    6     7     8        12            20           28     32      34
//!  | magic | ver| kind|flags| rsvd | node  | incarnation | sent (unix s)| seq | paylen | payload … | HMAC-SHA256 (32) |
//! ```
//!
//! - `magic` is `VGSY`, `ver` is [`VERSION`]; `rsvd` is 0.
//! - `node` is the sender's node id (never 0), `incarnation` grows each time it starts.
//! - `seq`: for the sequenced kinds ([`Body::Updates`], [`Body::BulkEnd`]) the message's
//!   place in the sender's data stream; for the control kinds a separate counter that grows
//!   by one per control message (what the receiver's replay check uses).
//! - The HMAC covers every byte before it; it is checked before anything past the fixed
//!   header is read, so nothing in an unauthenticated payload is ever parsed.
//!
//! Payloads: `Hello` = next data seq, oldest seq still resendable; `Updates` = a record count
//! (1..=255) and that many records ([`crate::Update`]), filling the payload exactly;
//! `BulkEnd` = the number of records the snapshot held, and the `owner` flag (0x02: the
//! sender was the master of the VIP when it sent the snapshot); `Ack` = a count (1..=[`MAX_PEERS`])
//! of `(node, next seq expected)` pairs; `Nack` = node, first and last missing seq (at most
//! [`MAX_NACK_SPAN`] of them); `BulkRequest` = the node asked (0: every peer); `Features` =
//! a bit set of what the sender understands beyond version 2 ([`FEATURE_LOCALITY`]; bits it
//! does not know are ignored by the receiver).
//!
//! Versions: 2 added `BulkEnd`'s owner flag (and the persistence records are installed from
//! then on); a node refuses every message of another version ([`WireError::UnsupportedVersion`],
//! before the HMAC), so a pair of a version-1 and a version-2 node do not sync at all rather
//! than half understand each other.
//!
//! Within version 2, additions are negotiated instead: a node sends `Features` (a control
//! kind) with every `Hello`, and sends a record type added later only while every live peer
//! announced it. A node that predates `Features` refuses it as an unknown kind (one
//! `malformed` a second on it during a rolling upgrade) and is never sent what it could not
//! decode: a refused data message would stall its stream, in order, for good.
//!
//! Invariants: a datagram is at most [`MAX_DATAGRAM`] bytes (below a 1500-byte MTU with
//! IP and UDP headers); [`decode`] returns either an authentic message every field of which
//! is in range, or the one [`WireError`] that says why not; [`encode`] of a decoded message
//! gives the same bytes back (with the same key).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{KeyError, WireError};
use crate::record::{Reader, Update};

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"VGSY";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 2;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 34;
/// Bytes of the HMAC-SHA256 trailer.
pub const MAC_LEN: usize = 32;
/// The largest datagram (fits a 1500-byte MTU with IPv4 and UDP headers to spare).
pub const MAX_DATAGRAM: usize = 1400;
/// The largest payload.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - HEADER_LEN - MAC_LEN;
/// The most peers a node tracks (and so the longest acknowledgement list).
pub const MAX_PEERS: usize = 16;
/// The most sequence numbers one negative acknowledgement may ask for.
pub const MAX_NACK_SPAN: u32 = 1024;
/// The shortest shared key accepted (bytes).
pub const MIN_KEY_LEN: usize = 16;
/// The longest shared key accepted (bytes).
pub const MAX_KEY_LEN: usize = 1024;

const KIND_HELLO: u8 = 1;
const KIND_UPDATES: u8 = 2;
const KIND_BULK_END: u8 = 3;
const KIND_ACK: u8 = 4;
const KIND_NACK: u8 = 5;
const KIND_BULK_REQUEST: u8 = 6;
const KIND_FEATURES: u8 = 7;

/// `Features` bit: the sender decodes and installs locality records
/// ([`crate::Update::Locality`]).
pub const FEATURE_LOCALITY: u32 = 0x0000_0001;
/// `Features` bit: the sender decodes and applies locality removals
/// ([`crate::Update::LocalityGone`]).
pub const FEATURE_LOCALITY_GONE: u32 = 0x0000_0002;
/// The features this build announces.
pub const FEATURES: u32 = FEATURE_LOCALITY | FEATURE_LOCALITY_GONE;

/// Flag of an `Updates` message that belongs to a bulk snapshot.
const FLAG_BULK: u8 = 0x01;
/// Flag of a `BulkEnd`: the sender owned the VIP (was master) when it sent the snapshot.
const FLAG_OWNER: u8 = 0x02;

/// The shared key of a sync group, ready to authenticate messages.
#[derive(Clone)]
pub struct SyncKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncKey(redacted)")
    }
}

impl SyncKey {
    /// A key from its bytes ([`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] of them).
    ///
    /// # Errors
    /// [`KeyError`] when the key is too short or too long.
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(bytes.len()));
        }
        // HMAC takes a key of any length; the bounds above are ours.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(bytes)
            .map_err(|_| KeyError::TooLong(bytes.len()))?;
        Ok(SyncKey { mac })
    }

    fn tag(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Liveness, and where the sender's data stream stands (control).
    Hello {
        /// The seq the sender's next data message will carry.
        next: u32,
        /// The oldest seq the sender can still resend.
        oldest: u32,
    },
    /// Batched flow changes (sequenced).
    Updates {
        /// Part of a bulk snapshot.
        bulk: bool,
        /// The changes, in order (1..=255).
        updates: Vec<Update>,
    },
    /// The end of a bulk snapshot (sequenced).
    BulkEnd {
        /// Records the snapshot held.
        records: u32,
        /// The sender was the master of the VIP when it sent the snapshot.
        owner: bool,
    },
    /// Cumulative acknowledgements: `(node, next seq expected from it)` (control).
    Ack(Vec<(u32, u32)>),
    /// Messages `from..=to` of `node`'s stream are missing (control).
    Nack {
        /// Whose stream.
        node: u32,
        /// First missing seq.
        from: u32,
        /// Last missing seq.
        to: u32,
    },
    /// Asks `node` (0: every peer) for a full snapshot (control).
    BulkRequest {
        /// The node asked.
        node: u32,
    },
    /// What the sender understands beyond the base protocol (control): a bit set of
    /// `FEATURE_*`.
    Features(u32),
}

impl Body {
    /// Whether the message takes a place in the sender's data stream.
    #[must_use]
    pub fn is_sequenced(&self) -> bool {
        matches!(self, Body::Updates { .. } | Body::BulkEnd { .. })
    }

    fn kind(&self) -> u8 {
        match self {
            Body::Hello { .. } => KIND_HELLO,
            Body::Updates { .. } => KIND_UPDATES,
            Body::BulkEnd { .. } => KIND_BULK_END,
            Body::Ack(_) => KIND_ACK,
            Body::Nack { .. } => KIND_NACK,
            Body::BulkRequest { .. } => KIND_BULK_REQUEST,
            Body::Features(_) => KIND_FEATURES,
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Body::Updates { bulk: true, .. } => FLAG_BULK,
            Body::BulkEnd { owner: true, .. } => FLAG_OWNER,
            _ => 0,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Body::Hello { next, oldest } => {
                out.extend_from_slice(&next.to_be_bytes());
                out.extend_from_slice(&oldest.to_be_bytes());
            }
            Body::Updates { updates, .. } => {
                out.push(u8::try_from(updates.len()).unwrap_or(u8::MAX));
                for u in updates.iter().take(usize::from(u8::MAX)) {
                    u.encode(out);
                }
            }
            Body::BulkEnd { records, .. } => out.extend_from_slice(&records.to_be_bytes()),
            Body::Ack(acks) => {
                out.push(u8::try_from(acks.len().min(MAX_PEERS)).unwrap_or(0));
                for (node, next) in acks.iter().take(MAX_PEERS) {
                    out.extend_from_slice(&node.to_be_bytes());
                    out.extend_from_slice(&next.to_be_bytes());
                }
            }
            Body::Nack { node, from, to } => {
                for v in [node, from, to] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Body::BulkRequest { node } => out.extend_from_slice(&node.to_be_bytes()),
            Body::Features(bits) => out.extend_from_slice(&bits.to_be_bytes()),
        }
    }

    fn decode(kind: u8, flags: u8, payload: &[u8]) -> Result<Body, WireError> {
        let allowed = match kind {
            KIND_UPDATES => FLAG_BULK,
            KIND_BULK_END => FLAG_OWNER,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags { kind, flags });
        }
        let mut r = Reader::new(payload);
        let body = match kind {
            KIND_HELLO => Body::Hello {
                next: r.u32()?,
                oldest: r.u32()?,
            },
            KIND_UPDATES => {
                let count = usize::from(r.u8()?);
                if count == 0 {
                    return Err(WireError::RecordCount(0));
                }
                let mut updates = Vec::with_capacity(count);
                for _ in 0..count {
                    if r.remaining() == 0 {
                        return Err(WireError::RecordCount(count));
                    }
                    updates.push(Update::decode(&mut r)?);
                }
                Body::Updates {
                    bulk: flags & FLAG_BULK != 0,
                    updates,
                }
            }
            KIND_BULK_END => Body::BulkEnd {
                records: r.u32()?,
                owner: flags & FLAG_OWNER != 0,
            },
            KIND_ACK => {
                let count = usize::from(r.u8()?);
                if count == 0 || count > MAX_PEERS {
                    return Err(WireError::AckCount(count));
                }
                let mut acks = Vec::with_capacity(count);
                for _ in 0..count {
                    let node = r.u32()?;
                    if node == 0 {
                        return Err(WireError::ZeroNode);
                    }
                    acks.push((node, r.u32()?));
                }
                Body::Ack(acks)
            }
            KIND_NACK => {
                let node = r.u32()?;
                let from = r.u32()?;
                let to = r.u32()?;
                if node == 0 {
                    return Err(WireError::ZeroNode);
                }
                if to.wrapping_sub(from) >= MAX_NACK_SPAN {
                    return Err(WireError::NackRange { from, to });
                }
                Body::Nack { node, from, to }
            }
            KIND_BULK_REQUEST => Body::BulkRequest { node: r.u32()? },
            KIND_FEATURES => Body::Features(r.u32()?),
            other => return Err(WireError::UnknownKind(other)),
        };
        match r.remaining() {
            0 => Ok(body),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

/// One sync message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Sender's node id (never 0).
    pub node: u32,
    /// Sender's incarnation (grows with every start).
    pub incarnation: u64,
    /// Sender's wall clock when sent (Unix seconds).
    pub sent_unix: u64,
    /// Data seq (sequenced kinds) or control seq (control kinds).
    pub seq: u32,
    /// What the message says.
    pub body: Body,
}

/// The HMAC of `data` under `key`: for the fuzz target, which re-signs its inputs.
#[doc(hidden)]
#[must_use]
pub fn fuzz_tag(key: &SyncKey, data: &[u8]) -> [u8; MAC_LEN] {
    key.tag(data)
}

/// The wire form of `msg`, authenticated with `key`.
///
/// The caller keeps the payload within [`MAX_PAYLOAD`] (the engine packs records so that it
/// does); an `Updates` body is cut at 255 records and an `Ack` at [`MAX_PEERS`] entries.
#[must_use]
pub fn encode(msg: &Message, key: &SyncKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(msg.body.kind());
    out.push(msg.body.flags());
    out.push(0);
    out.extend_from_slice(&msg.node.to_be_bytes());
    out.extend_from_slice(&msg.incarnation.to_be_bytes());
    out.extend_from_slice(&msg.sent_unix.to_be_bytes());
    out.extend_from_slice(&msg.seq.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    msg.body.encode_payload(&mut out);
    let payload_len = u16::try_from(out.len() - HEADER_LEN).unwrap_or(u16::MAX);
    out[32..34].copy_from_slice(&payload_len.to_be_bytes());
    let tag = key.tag(&out);
    out.extend_from_slice(&tag);
    out
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Parses and authenticates one datagram.
///
/// # Errors
/// The first [`WireError`] found, in this order: length bounds, magic, version, HMAC, then
/// the header's fields and the payload.
pub fn decode(datagram: &[u8], key: &SyncKey) -> Result<Message, WireError> {
    let len = datagram.len();
    if len < HEADER_LEN + MAC_LEN {
        return Err(WireError::Truncated {
            len,
            min: HEADER_LEN + MAC_LEN,
        });
    }
    if len > MAX_DATAGRAM {
        return Err(WireError::Oversize {
            len,
            max: MAX_DATAGRAM,
        });
    }
    if datagram[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(WireError::UnsupportedVersion(datagram[4]));
    }
    let (signed, tag) = datagram.split_at(len - MAC_LEN);
    if !key.verify(signed, tag) {
        return Err(WireError::BadMac);
    }
    let (kind, flags) = (signed[5], signed[6]);
    if signed[7] != 0 {
        return Err(WireError::BadFlags {
            kind,
            flags: signed[7],
        });
    }
    let node = be_u32(&signed[8..12]);
    if node == 0 {
        return Err(WireError::ZeroNode);
    }
    let declared = usize::from(u16::from_be_bytes([signed[32], signed[33]]));
    let payload = &signed[HEADER_LEN..];
    if declared != payload.len() {
        return Err(WireError::PayloadLength {
            declared,
            actual: payload.len(),
        });
    }
    Ok(Message {
        node,
        incarnation: be_u64(&signed[12..20]),
        sent_unix: be_u64(&signed[20..28]),
        seq: be_u32(&signed[28..32]),
        body: Body::decode(kind, flags, payload)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FlowKey, FlowProto, LocalityKey, LocalityState, PersistKey};
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn key() -> SyncKey {
        SyncKey::new(b"0123456789abcdef-shared").unwrap()
    }

    fn msg(body: Body) -> Message {
        Message {
            node: 7,
            incarnation: 1_700_000_000_123,
            sent_unix: 1_700_000_000,
            seq: 42,
            body,
        }
    }

    fn gone(n: u16) -> Update {
        Update::FlowGone(FlowKey {
            proto: FlowProto::Udp,
            public: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), n),
            outside: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 53),
        })
    }

    #[test]
    fn every_kind_round_trips_byte_for_byte() {
        let bodies = [
            Body::Hello { next: 5, oldest: 1 },
            Body::Updates {
                bulk: true,
                updates: vec![
                    gone(1),
                    Update::PersistGone(PersistKey {
                        listener: 2,
                        client: Ipv4Addr::new(198, 51, 100, 3),
                    }),
                ],
            },
            Body::BulkEnd {
                records: 100_000,
                owner: true,
            },
            Body::BulkEnd {
                records: 0,
                owner: false,
            },
            Body::Ack(vec![(3, 9), (4, 1)]),
            Body::Nack {
                node: 3,
                from: u32::MAX - 1,
                to: 2,
            },
            Body::BulkRequest { node: 0 },
            Body::Features(FEATURES),
            Body::Features(u32::MAX),
        ];
        for body in bodies {
            let m = msg(body);
            let bytes = encode(&m, &key());
            assert!(bytes.len() <= MAX_DATAGRAM);
            let back = decode(&bytes, &key()).unwrap();
            assert_eq!(back, m);
            assert_eq!(encode(&back, &key()), bytes);
        }
    }

    #[test]
    fn a_wrong_key_or_a_flipped_bit_fails_authentication() {
        let bytes = encode(&msg(Body::BulkRequest { node: 0 }), &key());
        let other = SyncKey::new(b"another key of 16+ bytes").unwrap();
        assert_eq!(decode(&bytes, &other), Err(WireError::BadMac));
        for i in 5..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad, &key()), Err(WireError::BadMac), "byte {i}");
        }
    }

    #[test]
    fn length_magic_and_version_are_checked_first() {
        let bytes = encode(&msg(Body::BulkRequest { node: 0 }), &key());
        assert!(matches!(
            decode(&bytes[..40], &key()),
            Err(WireError::Truncated { len: 40, .. })
        ));
        let mut long = bytes.clone();
        long.resize(MAX_DATAGRAM + 1, 0);
        assert!(matches!(
            decode(&long, &key()),
            Err(WireError::Oversize { .. })
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, &key()), Err(WireError::BadMagic));
        let mut bad = bytes;
        bad[4] = 1;
        assert_eq!(
            decode(&bad, &key()),
            Err(WireError::UnsupportedVersion(1)),
            "a version-1 peer's messages"
        );
        bad[4] = 3;
        assert_eq!(decode(&bad, &key()), Err(WireError::UnsupportedVersion(3)));
    }

    /// Re-signs a hand-edited message, so the checks behind the HMAC are reached.
    fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
        let n = bytes.len() - MAC_LEN;
        bytes.truncate(n);
        let tag = key().tag(&bytes);
        bytes.extend_from_slice(&tag);
        bytes
    }

    #[test]
    fn authentic_but_malformed_messages_get_their_own_error() {
        let hello = encode(&msg(Body::Hello { next: 1, oldest: 1 }), &key());
        let mut bad = hello.clone();
        bad[5] = 99;
        assert_eq!(
            decode(&resign(bad), &key()),
            Err(WireError::UnknownKind(99))
        );
        let mut bad = hello.clone();
        bad[6] = 1;
        assert_eq!(
            decode(&resign(bad), &key()),
            Err(WireError::BadFlags { kind: 1, flags: 1 })
        );
        // The owner flag belongs to BulkEnd, the bulk flag to Updates.
        let mut bad = hello.clone();
        bad[6] = 2;
        assert_eq!(
            decode(&resign(bad), &key()),
            Err(WireError::BadFlags { kind: 1, flags: 2 })
        );
        let mut end = encode(
            &msg(Body::BulkEnd {
                records: 1,
                owner: true,
            }),
            &key(),
        );
        end[6] |= 1;
        assert_eq!(
            decode(&resign(end), &key()),
            Err(WireError::BadFlags { kind: 3, flags: 3 })
        );
        let mut bad = hello.clone();
        bad[8..12].copy_from_slice(&[0; 4]);
        assert_eq!(decode(&resign(bad), &key()), Err(WireError::ZeroNode));
        let mut bad = hello.clone();
        bad[33] = 9;
        assert_eq!(
            decode(&resign(bad), &key()),
            Err(WireError::PayloadLength {
                declared: 9,
                actual: 8
            })
        );
        // A payload longer than Hello's: trailing bytes.
        let mut bad = hello[..HEADER_LEN + 8].to_vec();
        bad.extend_from_slice(&[0, 0]);
        bad[33] = 10;
        bad.extend_from_slice(&[0; MAC_LEN]);
        assert_eq!(
            decode(&resign(bad), &key()),
            Err(WireError::TrailingBytes(2))
        );
        // An update count larger than the records present.
        let mut upd = encode(
            &msg(Body::Updates {
                bulk: false,
                updates: vec![gone(1)],
            }),
            &key(),
        );
        upd[HEADER_LEN] = 2;
        assert_eq!(decode(&resign(upd), &key()), Err(WireError::RecordCount(2)));
        let nack = encode(
            &msg(Body::Nack {
                node: 3,
                from: 10,
                to: 10 + MAX_NACK_SPAN,
            }),
            &key(),
        );
        assert_eq!(
            decode(&nack, &key()),
            Err(WireError::NackRange {
                from: 10,
                to: 10 + MAX_NACK_SPAN
            })
        );
        let acks = encode(&msg(Body::Ack(vec![(0, 1)])), &key());
        assert_eq!(decode(&acks, &key()), Err(WireError::ZeroNode));
    }

    #[test]
    fn keys_are_bounded_and_never_printed() {
        assert_eq!(SyncKey::new(b"short").unwrap_err(), KeyError::TooShort(5));
        assert_eq!(
            SyncKey::new(&[0; MAX_KEY_LEN + 1]).unwrap_err(),
            KeyError::TooLong(MAX_KEY_LEN + 1)
        );
        assert_eq!(format!("{:?}", key()), "SyncKey(redacted)");
    }

    fn arb_endpoint() -> impl proptest::strategy::Strategy<Value = SocketAddrV4> {
        use proptest::prelude::*;
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(ip.into(), port))
    }

    fn arb_key() -> impl proptest::strategy::Strategy<Value = FlowKey> {
        use proptest::prelude::*;
        (0..3usize, arb_endpoint(), arb_endpoint()).prop_map(|(p, public, outside)| FlowKey {
            proto: [FlowProto::Tcp, FlowProto::Udp, FlowProto::Icmp][p],
            public,
            outside,
        })
    }

    fn arb_update() -> impl proptest::strategy::Strategy<Value = Update> {
        use crate::record::{FlowState, PersistState, TcpPhase};
        use proptest::prelude::*;
        let phases = [
            TcpPhase::None,
            TcpPhase::SynSent,
            TcpPhase::Established,
            TcpPhase::FinWait,
            TcpPhase::TimeWait,
        ];
        let flow = (
            arb_key(),
            arb_endpoint(),
            proptest::option::of(0..u16::MAX),
            0..phases.len(),
            any::<[bool; 4]>(),
            0..=crate::record::MAX_EXPIRES_SECS,
        )
            .prop_map(move |(key, inside, listener, phase, f, expires_in_secs)| {
                Update::Flow(FlowState {
                    key,
                    inside,
                    listener,
                    tcp: if key.proto == FlowProto::Tcp {
                        phases[phase]
                    } else {
                        TcpPhase::None
                    },
                    first_fin_from_originator: f[0],
                    from_inside: f[1],
                    replied: f[2],
                    assured: f[3],
                    expires_in_secs,
                })
            });
        let persist = (any::<u16>(), any::<u32>(), arb_endpoint(), 0..=3600u32).prop_map(
            |(listener, client, backend, expires_in_secs)| {
                Update::Persist(PersistState {
                    key: PersistKey {
                        listener,
                        client: client.into(),
                    },
                    backend,
                    expires_in_secs,
                })
            },
        );
        let persist_gone = (any::<u16>(), any::<u32>()).prop_map(|(listener, client)| {
            Update::PersistGone(PersistKey {
                listener,
                client: client.into(),
            })
        });
        let locality = (
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(arb_endpoint(), 1..4),
            0..=crate::record::MAX_EXPIRES_SECS,
            0..=crate::record::MAX_EXPIRES_SECS,
        )
            .prop_map(|(listener, dest, backends, idle_secs, unchanged_secs)| {
                Update::Locality(LocalityState {
                    key: LocalityKey {
                        listener,
                        dest: dest.into(),
                    },
                    backends,
                    idle_secs,
                    unchanged_secs,
                })
            });
        let locality_gone = (any::<u16>(), any::<u32>()).prop_map(|(listener, dest)| {
            Update::LocalityGone(LocalityKey {
                listener,
                dest: dest.into(),
            })
        });
        prop_oneof![
            flow,
            arb_key().prop_map(Update::FlowGone),
            persist,
            persist_gone,
            locality,
            locality_gone
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_batch_that_fits_round_trips(
            updates in proptest::collection::vec(arb_update(), 1..40),
            bulk in proptest::prelude::any::<bool>(),
            seq in proptest::prelude::any::<u32>(),
        ) {
            let m = Message { seq, ..msg(Body::Updates { bulk, updates }) };
            let bytes = encode(&m, &key());
            proptest::prop_assert!(bytes.len() <= MAX_DATAGRAM);
            proptest::prop_assert_eq!(decode(&bytes, &key()), Ok(m));
        }

        #[test]
        fn any_bytes_are_refused_without_a_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1500),
        ) {
            proptest::prop_assert!(decode(&data, &key()).is_err());
        }
    }
}
