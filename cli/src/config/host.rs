//! What `vipgate run` and `vipgate check --host` check against the host itself, beyond the
//! file: a direct-routing service's real servers must sit on a directly connected network.
//!
//! The routes come from `/proc/net/route` (the main table of the reading thread's network
//! namespace, the one the daemon runs in). Reading them needs no privilege; when they cannot
//! be read the check is skipped with a warning rather than guessed.

use std::net::Ipv4Addr;

/// One IPv4 route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    dest: Ipv4Addr,
    prefix: u8,
    /// `None`: the destination is on the link (no gateway).
    gateway: Option<Ipv4Addr>,
}

/// How the host reaches an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// On a directly connected network.
    OnLink,
    /// Through a gateway.
    Via(Ipv4Addr),
    /// No route at all.
    Unreachable,
}

/// The host's main routing table.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostRoutes {
    routes: Vec<Route>,
}

/// Most routes read (a router with a full table does not run a director's checks on it).
const MAX_ROUTES: usize = 100_000;

impl HostRoutes {
    /// The routes of the current network namespace.
    ///
    /// # Errors
    /// `/proc/net/route` cannot be read.
    pub(crate) fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/net/route")?))
    }

    /// Parses `/proc/net/route` (addresses in hex, in the host's byte order, which is little
    /// endian on every target this builds for); malformed lines are skipped.
    pub(crate) fn parse(text: &str) -> Self {
        let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::swap_bytes);
        let routes = text
            .lines()
            .skip(1)
            .take(MAX_ROUTES)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (dest, gateway, flags, mask) = (
                    hex(f.get(1)?)?,
                    hex(f.get(2)?)?,
                    u16::from_str_radix(f.get(3)?, 16).ok()?,
                    hex(f.get(7)?)?,
                );
                // RTF_UP
                if flags & 1 == 0 || mask.leading_ones() + mask.trailing_zeros() != 32 {
                    return None;
                }
                Some(Route {
                    dest: Ipv4Addr::from(dest),
                    prefix: u8::try_from(mask.leading_ones()).ok()?,
                    gateway: (gateway != 0).then(|| Ipv4Addr::from(gateway)),
                })
            })
            .collect();
        HostRoutes { routes }
    }

    /// How `ip` is reached: the longest matching prefix decides.
    pub(crate) fn reach(&self, ip: Ipv4Addr) -> Reach {
        let matches = |r: &&Route| {
            let mask = u32::MAX.checked_shl(32 - u32::from(r.prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(r.dest) & mask
        };
        match self.routes.iter().filter(matches).max_by_key(|r| r.prefix) {
            Some(Route { gateway: None, .. }) => Reach::OnLink,
            Some(Route {
                gateway: Some(g), ..
            }) => Reach::Via(*g),
            None => Reach::Unreachable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0B6433C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth1\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        eth1\t0000090A\t FE00000A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        junk line\n";

    #[test]
    fn the_longest_prefix_says_whether_an_address_is_on_link() {
        let r = HostRoutes::parse(TABLE);
        assert_eq!(r.reach(Ipv4Addr::new(10, 0, 0, 101)), Reach::OnLink);
        assert_eq!(
            r.reach(Ipv4Addr::new(10, 9, 0, 5)),
            Reach::Via(Ipv4Addr::new(10, 0, 0, 254))
        );
        assert_eq!(
            r.reach(Ipv4Addr::new(203, 0, 113, 1)),
            Reach::Via(Ipv4Addr::new(198, 51, 100, 11))
        );
        assert_eq!(
            HostRoutes::default().reach(Ipv4Addr::LOCALHOST),
            Reach::Unreachable
        );
    }
}
