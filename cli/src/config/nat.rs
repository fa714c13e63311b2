//! `[nat]`, `[[nat.acl]]`, `[[nat.static]]`: the PAT gateway (Cisco `ip nat inside source ...
//! overload` and `ip nat inside source static tcp ...`).

use super::{HumanDuration, Validator, check_unique};
use ipnet::Ipv4Net;
use natgw::{AclAction, Filtering, Proto};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use toml::Spanned;

/// A port or an inclusive range, written `80` or `"1024-65535"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortRange {
    pub(crate) first: u16,
    pub(crate) last: u16,
}

/// Written back the way it is read, so `vipgate check --dump` re-parses.
impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            s.serialize_u16(self.first)
        } else {
            s.serialize_str(&format!("{}-{}", self.first, self.last))
        }
    }
}

impl PortRange {
    /// A port (`80`) or a range (`"1024-65535"`) as written, or what is wrong with it.
    fn read(raw: RawPort) -> Result<Self, String> {
        let bad = |s: &str| format!("invalid port range {s:?}: write 80 or \"1024-65535\"");
        match raw {
            RawPort::Number(n) => match u16::try_from(n) {
                Ok(p) => Ok(PortRange { first: p, last: p }),
                Err(_) => Err(format!("port {n} is out of range: ports are 1..=65535")),
            },
            RawPort::Text(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let first: u16 = a.trim().parse().map_err(|_| bad(&s))?;
                let last: u16 = b.trim().parse().map_err(|_| bad(&s))?;
                if first > last {
                    return Err(bad(&s));
                }
                Ok(PortRange { first, last })
            }
        }
    }
}

/// A port or a range as TOML holds it, before it is checked.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PortRange::read(RawPort::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// One item of a list of ports (a service's `ports`): a port or range, or why it is neither.
///
/// Reading never fails on a number or a string, so that validation reports a bad item at its
/// own position; the TOML reader would put a failed item at the start of its list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortItem(pub(crate) Result<PortRange, String>);

impl PortItem {
    /// The port or range, when the item is one.
    pub(crate) fn range(&self) -> Option<PortRange> {
        self.0.as_ref().ok().copied()
    }
}

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(PortItem(PortRange::read(RawPort::deserialize(d)?)))
    }
}

/// Only a valid item is ever written back (`vipgate check --dump` runs after validation).
impl Serialize for PortItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Ok(range) => range.serialize(s),
            Err(why) => Err(serde::ser::Error::custom(why)),
        }
    }
}

/// One `[[nat.acl]]` rule; absent fields match anything. First match wins.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AclSection {
    pub(crate) action: AclAction,
    #[serde(default)]
    pub(crate) src: Option<Ipv4Net>,
    #[serde(default)]
    pub(crate) dst: Option<Ipv4Net>,
    #[serde(default)]
    pub(crate) proto: Option<Proto>,
    #[serde(default)]
    pub(crate) src_port: Option<PortRange>,
    #[serde(default)]
    pub(crate) dst_port: Option<Spanned<PortRange>>,
}

/// One `[[nat.static]]` port forward.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaticSection {
    /// `tcp` or `udp`.
    pub(crate) proto: Spanned<Proto>,
    /// Public port.
    pub(crate) outside_port: Spanned<u16>,
    /// Inside address and port the public port forwards to.
    pub(crate) inside: SocketAddrV4,
    /// Public address, default `[nat] address`.
    #[serde(default)]
    pub(crate) address: Option<Ipv4Addr>,
}

/// Idle timeouts (RFC 4787 / 5382 / 5508 defaults).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NatTimeouts {
    #[serde(default = "d_udp")]
    pub(crate) udp: Spanned<HumanDuration>,
    #[serde(default = "d_tcp_established")]
    pub(crate) tcp_established: Spanned<HumanDuration>,
    #[serde(default = "d_tcp_transitory")]
    pub(crate) tcp_transitory: Spanned<HumanDuration>,
    #[serde(default = "d_icmp")]
    pub(crate) icmp: Spanned<HumanDuration>,
}

fn dur(secs: u64) -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(secs)))
}
fn d_udp() -> Spanned<HumanDuration> {
    dur(300)
}
fn d_tcp_established() -> Spanned<HumanDuration> {
    dur(7440)
}
fn d_tcp_transitory() -> Spanned<HumanDuration> {
    dur(240)
}
fn d_icmp() -> Spanned<HumanDuration> {
    dur(60)
}

impl Default for NatTimeouts {
    fn default() -> Self {
        NatTimeouts {
            udp: d_udp(),
            tcp_established: d_tcp_established(),
            tcp_transitory: d_tcp_transitory(),
            icmp: d_icmp(),
        }
    }
}

/// `[nat]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NatSection {
    /// Inside interfaces (traffic from them is translated).
    pub(crate) inside: Vec<String>,
    /// Outside interface.
    pub(crate) outside: Spanned<String>,
    /// Public address used for overload and static forwards.
    pub(crate) address: Ipv4Addr,
    /// Dynamic port range. Default 1024-65535.
    #[serde(default = "default_port_range")]
    pub(crate) ports: PortRange,
    /// Bound on the translation table. Default 65536.
    #[serde(default = "default_max_mappings")]
    pub(crate) max_mappings: Spanned<u32>,
    /// Bound per inside host. Default 4096.
    #[serde(default = "default_max_per_host")]
    pub(crate) max_mappings_per_host: Spanned<u32>,
    /// Idle timeouts.
    #[serde(default)]
    pub(crate) timeouts: NatTimeouts,
    /// ACL, evaluated before NAT on every packet; first match wins. No match: permitted, except
    /// packets from the inside when the list has a `permit` rule (IOS implicit deny).
    #[serde(default)]
    pub(crate) acl: Vec<AclSection>,
    /// Static port forwards.
    #[serde(default, rename = "static")]
    pub(crate) statics: Vec<StaticSection>,
    /// Inbound filtering of dynamic mappings. Default `address-dependent`.
    #[serde(default)]
    pub(crate) filtering: Filtering,
    /// Inside networks besides the subnets of the inside interfaces (routed LANs behind
    /// them): their packets to a public address are hairpinned, not treated as inbound.
    #[serde(default)]
    pub(crate) inside_networks: Vec<Ipv4Net>,
    /// Routing table of the steering routes. Default 4787.
    #[serde(default = "default_table")]
    pub(crate) table: Spanned<u32>,
    /// First `ip rule` priority used (up to +62). Default 100.
    #[serde(default = "default_rule_priority")]
    pub(crate) rule_priority: Spanned<u32>,
    /// Inbound half-open flows per static forward or service (the oldest makes room).
    /// Default 16384.
    #[serde(default = "default_half_open_per_listener")]
    pub(crate) max_half_open_per_listener: Spanned<u32>,
    /// Inbound half-open flows per source network (more are refused). Default 256.
    #[serde(default = "default_half_open_per_source")]
    pub(crate) max_half_open_per_source: Spanned<u32>,
    /// Prefix length of a source network. Default 24.
    #[serde(default = "default_half_open_prefix")]
    pub(crate) half_open_source_prefix: Spanned<u8>,
    /// Sessions outside hosts may open to one dynamic mapping. Default 1024.
    #[serde(default = "default_inbound_per_mapping")]
    pub(crate) max_inbound_per_mapping: Spanned<u32>,
    /// TUN queues, one packet task each (the kernel spreads flows over them). Default 1, at
    /// most 8.
    #[serde(default)]
    pub(crate) queues: Option<Spanned<u32>>,
    /// Which data path moves established flows: `"kernel"` (the eBPF fast path at TC, where
    /// it loads; the TUN otherwise) or `"tun"`. Default `"kernel"`.
    #[serde(default)]
    pub(crate) datapath: Option<Spanned<String>>,
}

fn default_table() -> Spanned<u32> {
    Spanned::new(0..0, 4787)
}
fn default_rule_priority() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}
fn default_half_open_per_listener() -> Spanned<u32> {
    Spanned::new(0..0, 16_384)
}
fn default_half_open_per_source() -> Spanned<u32> {
    Spanned::new(0..0, 256)
}
fn default_half_open_prefix() -> Spanned<u8> {
    Spanned::new(0..0, 24)
}
fn default_inbound_per_mapping() -> Spanned<u32> {
    Spanned::new(0..0, 1024)
}

/// Upper bound of every table size: the table's index tags assume fewer than 2^31 entries,
/// and 2^24 flows already take about 2 GiB.
pub(crate) const MAX_TABLE_ENTRIES: u32 = 1 << 24;
/// The steering rules use `rule_priority` .. `rule_priority + 62`.
pub(crate) const MAX_RULE_PRIORITY: u32 = u32::MAX - 62;

fn default_port_range() -> PortRange {
    PortRange {
        first: 1024,
        last: 65535,
    }
}
fn default_max_mappings() -> Spanned<u32> {
    Spanned::new(0..0, 65536)
}
fn default_max_per_host() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}

impl NatSection {
    pub(crate) fn validate(&self, v: &mut Validator) {
        check_unique(
            self.statics.iter().map(|s| {
                let addr = s.address.unwrap_or(self.address);
                (
                    format!("{}/{addr}:{}", s.proto.get_ref(), s.outside_port.get_ref()),
                    s.outside_port.span(),
                )
            }),
            "static port",
            v,
        );
        for s in &self.statics {
            if *s.proto.get_ref() == Proto::Icmp {
                v.error_at(&s.proto, "a static port forward is `tcp` or `udp`");
            }
            if *s.outside_port.get_ref() == 0 {
                v.error_at(&s.outside_port, "outside_port 0 is not a port");
            }
        }
        if let Some(d) = &self.datapath
            && !matches!(d.get_ref().as_str(), "kernel" | "tun")
        {
            v.error_at(
                d,
                format!(
                    "datapath must be \"kernel\" or \"tun\", not {:?}",
                    d.get_ref()
                ),
            );
        }
        if let Some(q) = &self.queues {
            let max = natgw::driver::DriverConfig::MAX_QUEUES;
            if *q.get_ref() == 0 || *q.get_ref() as usize > max {
                v.error_at(q, format!("queues must be between 1 and {max}"));
            }
        }
        for (name, n) in [
            ("max_mappings", &self.max_mappings),
            ("max_mappings_per_host", &self.max_mappings_per_host),
            (
                "max_half_open_per_listener",
                &self.max_half_open_per_listener,
            ),
            ("max_half_open_per_source", &self.max_half_open_per_source),
            ("max_inbound_per_mapping", &self.max_inbound_per_mapping),
        ] {
            if *n.get_ref() == 0 || *n.get_ref() > MAX_TABLE_ENTRIES {
                v.error_at(
                    n,
                    format!("{name} must be between 1 and {MAX_TABLE_ENTRIES}"),
                );
            }
        }
        if !(1..=32).contains(self.half_open_source_prefix.get_ref()) {
            v.error_at(
                &self.half_open_source_prefix,
                "half_open_source_prefix must be between 1 and 32",
            );
        }
        if *self.rule_priority.get_ref() > MAX_RULE_PRIORITY {
            v.error_at(
                &self.rule_priority,
                format!(
                    "rule_priority must be at most {MAX_RULE_PRIORITY} (the rules use up to +62)"
                ),
            );
        }
        let t = &self.timeouts;
        for (name, d, min) in [
            ("udp", &t.udp, 120),
            ("tcp_established", &t.tcp_established, 7440),
            ("tcp_transitory", &t.tcp_transitory, 1),
            ("icmp", &t.icmp, 60),
        ] {
            if d.get_ref().0 < Duration::from_secs(min) {
                v.error_at(
                    d,
                    format!("timeouts.{name} must be at least {min}s (RFC 4787/5382/5508)"),
                );
            }
        }
        if matches!(*self.table.get_ref(), 0 | 253..=255) {
            v.error_at(
                &self.table,
                format!("table {} is reserved by the kernel", self.table.get_ref()),
            );
        }
        if self.inside.iter().any(|i| i == self.outside.get_ref()) {
            v.error_at(
                &self.outside,
                format!(
                    "interface `{}` is both inside and outside",
                    self.outside.get_ref()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::path::Path;

    const BASE: &str =
        "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"198.51.100.1\"\n";

    #[test]
    fn huge_rule_priority_and_table_sizes_are_refused_with_their_position() {
        let text = format!(
            "{BASE}rule_priority = 4294967290\nmax_mappings = 4294967295\n\
             max_mappings_per_host = 4294967295\nhalf_open_source_prefix = 0\n"
        );
        let err = parse(Path::new("site.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("site.toml:5:17: rule_priority must be at most 4294967233"),
            "{err}"
        );
        assert!(
            err.contains("site.toml:6:16: max_mappings must be between 1 and 16777216"),
            "{err}"
        );
        assert!(
            err.contains("site.toml:7:25: max_mappings_per_host must be between"),
            "{err}"
        );
        assert!(
            err.contains("site.toml:8:27: half_open_source_prefix must be between 1 and 32"),
            "{err}"
        );
    }

    #[test]
    fn half_open_bounds_have_safe_defaults() {
        let site = parse(Path::new("site.toml"), BASE).expect("valid");
        let nat = site.nat.expect("nat section");
        assert_eq!(*nat.max_half_open_per_listener.get_ref(), 16_384);
        assert_eq!(*nat.max_half_open_per_source.get_ref(), 256);
        assert_eq!(*nat.half_open_source_prefix.get_ref(), 24);
        assert_eq!(*nat.max_inbound_per_mapping.get_ref(), 1024);
        assert_eq!(*nat.rule_priority.get_ref(), 100);
    }
}
