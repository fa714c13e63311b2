//! `[[gre]]`: userspace GRE tunnels (Cisco `interface Tunnel`, Linux `ip tunnel ... mode gre`).

use super::{HumanDuration, Validator, check_unique};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::time::Duration;
use toml::Spanned;

/// `keepalive = { interval = "10s", retries = 3 }` (Cisco `keepalive 10 3`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GreKeepaliveSection {
    /// Time between keepalives. Default 10 s.
    #[serde(default = "default_keepalive_interval")]
    pub(crate) interval: Spanned<HumanDuration>,
    /// Missed replies before the tunnel is declared down. Default 3.
    #[serde(default = "default_keepalive_retries")]
    pub(crate) retries: Spanned<u32>,
}

fn default_keepalive_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(10)))
}

fn default_keepalive_retries() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}

/// One `[[gre]]` tunnel.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GreSection {
    /// TUN interface name (at most 15 characters).
    pub(crate) name: Spanned<String>,
    /// Outer source address.
    pub(crate) local: Ipv4Addr,
    /// Outer destination address (the peer).
    pub(crate) remote: Ipv4Addr,
    /// Inner address of the tunnel interface, with prefix length.
    pub(crate) address: Ipv4Net,
    /// Optional RFC 2890 key, the same on both ends.
    #[serde(default)]
    pub(crate) key: Option<u32>,
    /// RFC 2890 sequence numbers (drop out-of-order and duplicate packets). Default off.
    #[serde(default)]
    pub(crate) sequence: bool,
    /// RFC 2784 checksums on sent packets (received ones are always verified). Default off.
    #[serde(default)]
    pub(crate) checksum: bool,
    /// Tunnel MTU. Default: underlay MTU − 24 − 4 per option.
    #[serde(default)]
    pub(crate) mtu: Option<Spanned<u16>>,
    /// Prefixes routed into the tunnel while it is up.
    #[serde(default)]
    pub(crate) routes: Vec<Spanned<Ipv4Net>>,
    /// Cisco-compatible keepalives; off when absent.
    #[serde(default)]
    pub(crate) keepalive: Option<GreKeepaliveSection>,
    /// `gre` (default) or `udp` (RFC 8086).
    #[serde(default)]
    pub(crate) encap: gre::Underlay,
    /// TUN offload: the kernel hands over TCP super-packets (TSO) that are split after
    /// reading, and decapsulated TCP segments are coalesced before writing (GRO). Several
    /// times the throughput of one packet per read/write. Default on.
    #[serde(default = "default_offload")]
    pub(crate) offload: bool,
    /// Which data path carries the tunnel's plain traffic: `"kernel"` (TC eBPF programs
    /// encapsulate at the tunnel device's egress and decapsulate at the underlay's ingress,
    /// keeping GSO super-packets whole; where they load) or `"tun"` (every packet crosses
    /// the TUN and the core). Default `"kernel"`; `sequence`, `checksum` and `encap = "udp"`
    /// tunnels run on the TUN path.
    #[serde(default)]
    pub(crate) datapath: Option<Spanned<String>>,
}

fn default_offload() -> bool {
    true
}

/// Longest keepalive interval accepted (IOS `keepalive` allows 1..=32767 seconds).
const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(32_767);

pub(crate) fn validate_all(tunnels: &[GreSection], v: &mut Validator) {
    check_unique(
        tunnels
            .iter()
            .map(|t| (t.name.get_ref().clone(), t.name.span())),
        "tunnel name",
        v,
    );
    check_unique(
        tunnels
            .iter()
            .map(|t| ((t.remote, t.key.unwrap_or(0)), t.name.span()))
            .map(|((r, k), s)| (format!("{r} key {k}"), s)),
        "tunnel peer and key",
        v,
    );
    for t in tunnels {
        let name = t.name.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            v.error_at(&t.name, format!("tunnel name `{name}` is not a valid interface name (1-15 characters, no '/' or spaces)"));
        }
        if let Some(mtu) = t
            .mtu
            .as_ref()
            .filter(|m| !(576..=9000).contains(m.get_ref()))
        {
            v.error_at(
                mtu,
                format!("mtu {} is out of range 576..=9000", mtu.get_ref()),
            );
        }
        // A route covering the outer peer would send the tunnel's own packets into itself.
        for r in &t.routes {
            if r.get_ref().contains(&t.remote) || r.get_ref().contains(&t.local) {
                v.error_at(
                    r,
                    format!(
                        "route {} covers the tunnel's own outer address; the tunnel would carry itself",
                        r.get_ref()
                    ),
                );
            }
        }
        // The outer addresses are not spanned values: their mistakes point at the tunnel's
        // name, which opens the section.
        for (what, addr) in [("local", t.local), ("remote", t.remote)] {
            if addr.is_unspecified()
                || addr.is_loopback()
                || addr.is_multicast()
                || addr.is_broadcast()
            {
                v.error_at(
                    &t.name,
                    format!(
                        "tunnel `{name}`: {what} {addr} is not a unicast address a peer can reach"
                    ),
                );
            }
        }
        if t.local == t.remote {
            v.error_at(
                &t.name,
                format!("tunnel `{name}`: local and remote are both {}", t.local),
            );
        }
        // An inner prefix holding an outer address would route the tunnel into itself.
        if t.address.contains(&t.remote) || t.address.contains(&t.local) {
            v.error_at(
                &t.name,
                format!(
                    "tunnel `{name}`: address {} covers the tunnel's own outer address; the tunnel would carry itself",
                    t.address
                ),
            );
        }
        if let Some(d) = &t.datapath {
            match d.get_ref().as_str() {
                "tun" => {}
                "kernel" => {
                    let why = if t.sequence {
                        Some("sequence = true")
                    } else if t.checksum {
                        Some("checksum = true")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        v.error_at(
                            d,
                            format!("datapath = \"kernel\" cannot carry a tunnel with {why}: it runs on the TUN path (leave datapath out, or set \"tun\")"),
                        );
                    }
                }
                other => v.error_at(
                    d,
                    format!("datapath must be \"kernel\" or \"tun\", not {other:?}"),
                ),
            }
        }
        if let Some(ka) = &t.keepalive {
            let interval = ka.interval.get_ref().0;
            if interval < Duration::from_millis(100) {
                v.error_at(&ka.interval, "keepalive interval must be at least 100ms");
            } else if interval > MAX_KEEPALIVE_INTERVAL {
                v.error_at(
                    &ka.interval,
                    "keepalive interval must be at most 32767s (as on IOS); a dead peer would go unnoticed for longer",
                );
            }
            if !(1..=255).contains(ka.retries.get_ref()) {
                v.error_at(&ka.retries, "keepalive retries must be in 1..=255");
            }
        }
    }
    // Two tunnels routing overlapping prefixes would make the kernel pick one silently.
    let routes: Vec<(&str, &Spanned<Ipv4Net>)> = tunnels
        .iter()
        .flat_map(|t| t.routes.iter().map(move |r| (t.name.get_ref().as_str(), r)))
        .collect();
    for (i, (name_a, a)) in routes.iter().enumerate() {
        for (name_b, b) in &routes[..i] {
            let (a_net, b_net) = (a.get_ref(), b.get_ref());
            if a_net.contains(&b_net.network()) || b_net.contains(&a_net.network()) {
                let place = v.place_of(b.span().start);
                v.error_at(
                    a,
                    format!("route {a_net} of tunnel `{name_a}` overlaps route {b_net} of tunnel `{name_b}` ({place})"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::path::Path;

    const HQ: &str = include_str!("../../../examples/branch-hq.toml");
    const BR: &str = include_str!("../../../examples/branch-br.toml");

    #[test]
    fn branch_examples_are_valid_mirror_images() {
        let hq = parse(Path::new("branch-hq.toml"), HQ).expect("branch-hq.toml validates");
        let br = parse(Path::new("branch-br.toml"), BR).expect("branch-br.toml validates");
        let (a, b) = (&hq.gre[0], &br.gre[0]);
        assert_eq!((a.local, a.remote), (b.remote, b.local));
        assert_eq!(a.key, b.key);
        assert!(a.offload && b.offload);
    }

    /// Values that parse but would misbehave at run time are refused, each at its place.
    #[test]
    fn runtime_misbehaving_values_are_refused_with_their_position() {
        let base = |extra: &str, remote: &str| {
            format!(
                "[[gre]]\nname = \"g\"\nlocal = \"198.51.100.1\"\nremote = \"{remote}\"\n\
                 address = \"172.16.0.1/30\"\n{extra}\n"
            )
        };
        let cases = [
            (
                base("keepalive = { interval = \"0s\" }", "198.51.100.2"),
                "site.toml:6:26: keepalive interval must be at least 100ms",
            ),
            (
                base("keepalive = { interval = \"10h\" }", "198.51.100.2"),
                "site.toml:6:26: keepalive interval must be at most 32767s",
            ),
            (
                base("keepalive = { retries = 0 }", "198.51.100.2"),
                "site.toml:6:25: keepalive retries must be in 1..=255",
            ),
            (
                base("keepalive = { retries = 100000 }", "198.51.100.2"),
                "site.toml:6:25: keepalive retries must be in 1..=255",
            ),
            (
                base("mtu = 100", "198.51.100.2"),
                "site.toml:6:7: mtu 100 is out of range 576..=9000",
            ),
            (
                base("mtu = 9001", "198.51.100.2"),
                "site.toml:6:7: mtu 9001 is out of range 576..=9000",
            ),
            (
                base("", "198.51.100.1"),
                "site.toml:2:8: tunnel `g`: local and remote are both 198.51.100.1",
            ),
            (
                base("", "0.0.0.0"),
                "site.toml:2:8: tunnel `g`: remote 0.0.0.0 is not a unicast address",
            ),
            (
                base("", "224.0.0.5"),
                "site.toml:2:8: tunnel `g`: remote 224.0.0.5 is not a unicast address",
            ),
            (
                base("", "172.16.0.2"),
                "site.toml:2:8: tunnel `g`: address 172.16.0.1/30 covers the tunnel's own outer address",
            ),
            (
                base("datapath = \"xdp\"", "198.51.100.2"),
                "site.toml:6:12: datapath must be \"kernel\" or \"tun\", not \"xdp\"",
            ),
            (
                base("sequence = true\ndatapath = \"kernel\"", "198.51.100.2"),
                "site.toml:7:12: datapath = \"kernel\" cannot carry a tunnel with sequence = true",
            ),
            (
                base("checksum = true\ndatapath = \"kernel\"", "198.51.100.2"),
                "site.toml:7:12: datapath = \"kernel\" cannot carry a tunnel with checksum = true",
            ),
        ];
        for (text, want) in cases {
            let err = parse(Path::new("site.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "want {want}\n got {err}");
        }
    }

    #[test]
    fn route_covering_the_peer_is_refused_with_its_position() {
        let text = "[[gre]]\nname = \"g\"\nlocal = \"198.51.100.1\"\nremote = \"198.51.100.2\"\n\
                    address = \"172.16.0.1/30\"\nroutes = [\"198.51.100.0/24\"]\n";
        let err = parse(Path::new("site.toml"), text).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "site.toml:6:11: route 198.51.100.0/24 covers the tunnel's own outer address"
            ),
            "{err}"
        );
    }
}
