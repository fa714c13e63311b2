//! Why a sync datagram or a key was refused.

use thiserror::Error;

/// A datagram that is not a well-formed, authentic sync message. Each variant is one
/// distinct reason, counted as such by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than a header plus the MAC.
    #[error("truncated: {len} bytes, a message has at least {min}")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// The smallest message.
        min: usize,
    },
    /// Longer than the largest message a node sends.
    #[error("oversize: {len} bytes, at most {max}")]
    Oversize {
        /// Bytes received.
        len: usize,
        /// The largest message.
        max: usize,
    },
    /// Not a vipgate sync message.
    #[error("bad magic")]
    BadMagic,
    /// A protocol version this node does not speak.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// The HMAC-SHA256 does not match (wrong key, or altered in transit).
    #[error("authentication failed (HMAC mismatch)")]
    BadMac,
    /// The declared payload length disagrees with the datagram.
    #[error("payload length {declared} but {actual} bytes present")]
    PayloadLength {
        /// Length in the header.
        declared: usize,
        /// Length actually present.
        actual: usize,
    },
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flag bits the message kind does not define, or a non-zero reserved byte.
    #[error("flags {flags:#04x} not valid for message kind {kind}")]
    BadFlags {
        /// The kind.
        kind: u8,
        /// The flags byte.
        flags: u8,
    },
    /// The node id 0 (reserved: "every peer").
    #[error("node id 0 is reserved")]
    ZeroNode,
    /// A record count of 0 or above the bound, or one that disagrees with the payload.
    #[error("record count {0} out of bounds")]
    RecordCount(usize),
    /// An acknowledgement list longer than the peer bound.
    #[error("{0} acknowledgements, more than the peer bound")]
    AckCount(usize),
    /// A negative acknowledgement whose range is reversed or too long.
    #[error("nack range {from}..={to} reversed or too long")]
    NackRange {
        /// First missing sequence number.
        from: u32,
        /// Last missing sequence number.
        to: u32,
    },
    /// Bytes left after the last field of the payload.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// A record ends before its last field.
    #[error("truncated record")]
    TruncatedRecord,
    /// An unknown record type.
    #[error("unknown record type {0}")]
    UnknownRecord(u8),
    /// A protocol the gateway does not translate.
    #[error("protocol {0} not synced")]
    BadProto(u8),
    /// A TCP state code out of range, or a TCP state on a UDP/ICMP flow.
    #[error("bad tcp state {0}")]
    BadTcpState(u8),
    /// Undefined flag bits in a flow record.
    #[error("bad record flags {0:#04x}")]
    BadRecordFlags(u8),
    /// A remaining timeout above the bound.
    #[error("timeout {0} s above the bound")]
    TimeoutTooLong(u32),
    /// A locality record's backend count is 0 or above [`crate::MAX_LOCALITY_BACKENDS`].
    #[error("locality record with {0} backends (1..={max} allowed)", max = crate::MAX_LOCALITY_BACKENDS)]
    LocalityBackends(usize),
}

/// A shared key that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KeyError {
    /// Too short to resist guessing.
    #[error("sync key of {0} bytes: at least {min} needed", min = crate::wire::MIN_KEY_LEN)]
    TooShort(usize),
    /// Longer than any sensible key file.
    #[error("sync key of {0} bytes: at most {max} allowed", max = crate::wire::MAX_KEY_LEN)]
    TooLong(usize),
}
