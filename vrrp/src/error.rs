//! Errors of the codec and the driver.

/// Why bytes were not a valid VRRPv3 advert. Small and `Copy`, like smoltcp's `wire::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than the header plus the addresses it announces.
    #[error("truncated advert")]
    Truncated,
    /// Version is not 3.
    #[error("version is not 3")]
    BadVersion,
    /// Type is not ADVERTISEMENT (1).
    #[error("type is not ADVERTISEMENT")]
    BadType,
    /// Checksum over the pseudo-header and message does not verify.
    #[error("bad checksum")]
    BadChecksum,
    /// Address count disagrees with the packet length.
    #[error("address count does not match the packet length")]
    AddressCount,
    /// VRID 0 is reserved.
    #[error("VRID 0")]
    BadVrid,
    /// Not an unfragmented IPv4 packet of protocol 112 with consistent lengths.
    #[error("bad IPv4 header")]
    BadIpHeader,
}

impl WireError {
    /// Every parse error, in counter order.
    pub const ALL: [Self; 7] = [
        Self::Truncated,
        Self::BadVersion,
        Self::BadType,
        Self::BadChecksum,
        Self::AddressCount,
        Self::BadVrid,
        Self::BadIpHeader,
    ];

    /// The stable snake_case name, the counter key in `show vrrp --json`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadVersion => "bad_version",
            Self::BadType => "bad_type",
            Self::BadChecksum => "bad_checksum",
            Self::AddressCount => "address_count",
            Self::BadVrid => "bad_vrid",
            Self::BadIpHeader => "bad_ip_header",
        }
    }
}

/// Malformed adverts are counted per parse error like drops (`DropCounters<WireError>`);
/// the enum keeps its own `Display` (the error message), so it is not declared with
/// `drop_reasons!`.
impl netutil::Reason for WireError {
    const ALL: &'static [Self] = &WireError::ALL;
    type Counts = [u64; WireError::ALL.len()];

    fn zeroed() -> Self::Counts {
        [0; WireError::ALL.len()]
    }

    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        WireError::as_str(self)
    }
}

/// Why a new configuration cannot be applied to a running instance: these change what the
/// instance is on the wire, so it must be stopped and started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReconfigureError {
    /// The VRID is the virtual router's identity on the link.
    #[error("the VRID changed from {old} to {new}")]
    VridChanged {
        /// Running VRID.
        old: u8,
        /// Configured VRID.
        new: u8,
    },
    /// The primary address is the advert source and the tie-breaker.
    #[error("the primary address changed from {old} to {new}")]
    PrimaryAddressChanged {
        /// Running primary address.
        old: std::net::Ipv4Addr,
        /// Configured primary address.
        new: std::net::Ipv4Addr,
    },
    /// A runtime priority must be 1..=254: 0 is the resignation, 255 the address owner's.
    #[error("priority {0} is outside 1..=254")]
    RuntimePriority(u8),
}

/// Why the driver failed; each variant says which operation and wraps the OS error.
#[cfg(feature = "driver")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The configured interface does not exist.
    #[error("interface {0} not found")]
    NoInterface(String),
    /// The interface has no IPv4 address to send adverts from.
    #[error("interface {0} has no IPv4 address (set primary_address)")]
    NoPrimaryAddress(String),
    /// Opening or configuring the raw VRRP socket failed.
    #[error("VRRP socket on {interface}: {source}")]
    Socket {
        /// Interface name.
        interface: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Opening the AF_PACKET socket for gratuitous ARP failed.
    #[error("ARP socket on {interface}: {source}")]
    ArpSocket {
        /// Interface name.
        interface: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A runtime priority must be 1..=254.
    #[error("priority {0} is outside 1..=254 (0 is the resignation, 255 the address owner's)")]
    Priority(u8),
    /// The group's driver has stopped (or cannot take another command now).
    #[error("the VRRP driver is not running")]
    NotRunning,
    /// The rtnetlink socket could not be opened.
    #[error("opening the netlink socket: {0}")]
    NetlinkSocket(std::io::Error),
    /// An rtnetlink request failed.
    #[error(transparent)]
    Netlink(#[from] netsys::netlink::NetlinkError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use netutil::Reason;

    #[test]
    fn every_parse_error_has_its_own_counter() {
        for (i, e) in WireError::ALL.iter().enumerate() {
            assert_eq!(Reason::index(*e), i, "{e:?}");
        }
        let mut names: Vec<&str> = WireError::ALL.iter().map(|e| e.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), WireError::ALL.len());
        let mut c = netutil::DropCounters::<WireError>::default();
        c.count(WireError::BadIpHeader);
        assert_eq!(c.get(WireError::BadIpHeader), 1);
        assert_eq!(c.total(), 1);
    }
}
