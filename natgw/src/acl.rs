//! The ACL stage that runs before translation, as an `ip access-group` does on a router.
//!
//! Rules are evaluated in order on the packet as it arrived (before any rewrite); the first
//! rule that matches decides and its hit counter goes up. When no rule matches:
//! - a packet from the inside is denied if the list holds at least one `permit` rule (the
//!   implicit deny of an IOS access list used as `ip nat inside source list N`), and permitted
//!   when the list is empty or holds only `deny` rules;
//! - a packet from the outside is permitted: inbound traffic is then filtered by the NAT
//!   itself (only forwarded ports and replies to mappings get in).

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

use crate::flow::Proto;

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum AclAction {
    /// Let the packet through to translation.
    Permit,
    /// Drop the packet and count it on the rule.
    Deny,
}

/// One ACL line. `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AclRule {
    /// Permit or deny.
    pub action: AclAction,
    /// Source prefix.
    pub src: Option<Ipv4Net>,
    /// Destination prefix.
    pub dst: Option<Ipv4Net>,
    /// Protocol.
    pub proto: Option<Proto>,
    /// Source ports (TCP/UDP only; a rule with ports never matches other protocols).
    pub src_ports: Option<RangeInclusive<u16>>,
    /// Destination ports (TCP/UDP only).
    pub dst_ports: Option<RangeInclusive<u16>>,
}

impl AclRule {
    /// A rule matching everything with the given action.
    #[must_use]
    pub fn any(action: AclAction) -> Self {
        AclRule {
            action,
            src: None,
            dst: None,
            proto: None,
            src_ports: None,
            dst_ports: None,
        }
    }

    fn matches(&self, p: &AclPacket) -> bool {
        fn net(n: &Option<Ipv4Net>, a: Ipv4Addr) -> bool {
            n.is_none_or(|n| n.contains(&a))
        }
        fn port(r: &Option<RangeInclusive<u16>>, p: Option<u16>) -> bool {
            match (r, p) {
                (None, _) => true,
                (Some(r), Some(p)) => r.contains(&p),
                (Some(_), None) => false,
            }
        }
        net(&self.src, p.src)
            && net(&self.dst, p.dst)
            && self.proto.is_none_or(|x| Some(x) == p.proto)
            && port(&self.src_ports, p.src_port)
            && port(&self.dst_ports, p.dst_port)
    }
}

/// The header fields an ACL looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclPacket {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol, if one the gateway knows.
    pub proto: Option<Proto>,
    /// TCP/UDP source port.
    pub src_port: Option<u16>,
    /// TCP/UDP destination port.
    pub dst_port: Option<u16>,
}

/// The outcome of [`Acl::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclDecision {
    /// Rule `n` (0-based) permitted the packet.
    Permit(Option<usize>),
    /// Rule `n` denied it, or `None` for the implicit deny.
    Deny(Option<usize>),
}

/// An ordered rule list with per-rule hit counters.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<AclRule>,
    hits: Vec<u64>,
    implicit_denies: u64,
    has_permit: bool,
}

impl Acl {
    /// Builds the list; counters start at zero.
    #[must_use]
    pub fn new(rules: Vec<AclRule>) -> Self {
        let has_permit = rules.iter().any(|r| r.action == AclAction::Permit);
        Acl {
            hits: vec![0; rules.len()],
            rules,
            implicit_denies: 0,
            has_permit,
        }
    }

    /// First match wins; counts the hit. `from_inside` selects the no-match default.
    pub fn check(&mut self, p: &AclPacket, from_inside: bool) -> AclDecision {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(p) {
                self.hits[i] += 1;
                return match rule.action {
                    AclAction::Permit => AclDecision::Permit(Some(i)),
                    AclAction::Deny => AclDecision::Deny(Some(i)),
                };
            }
        }
        if from_inside && self.has_permit {
            self.implicit_denies += 1;
            AclDecision::Deny(None)
        } else {
            AclDecision::Permit(None)
        }
    }

    /// The rules with their hit counters.
    pub fn rules(&self) -> impl Iterator<Item = (&AclRule, u64)> {
        self.rules.iter().zip(self.hits.iter().copied())
    }

    /// Inside packets dropped because no rule matched.
    #[must_use]
    pub fn implicit_denies(&self) -> u64 {
        self.implicit_denies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(src: [u8; 4], dst: [u8; 4], proto: Proto, dport: u16) -> AclPacket {
        AclPacket {
            src: src.into(),
            dst: dst.into(),
            proto: Some(proto),
            src_port: Some(40000),
            dst_port: Some(dport),
        }
    }

    #[test]
    fn first_match_wins_and_counts() {
        let mut acl = Acl::new(vec![
            AclRule {
                src: Some("192.168.101.66/32".parse().unwrap()),
                ..AclRule::any(AclAction::Deny)
            },
            AclRule {
                src: Some("192.168.101.0/24".parse().unwrap()),
                ..AclRule::any(AclAction::Permit)
            },
        ]);
        let bad = pkt([192, 168, 101, 66], [8, 8, 8, 8], Proto::Udp, 53);
        let good = pkt([192, 168, 101, 10], [8, 8, 8, 8], Proto::Udp, 53);
        assert_eq!(acl.check(&bad, true), AclDecision::Deny(Some(0)));
        assert_eq!(acl.check(&good, true), AclDecision::Permit(Some(1)));
        assert_eq!(acl.check(&good, true), AclDecision::Permit(Some(1)));
        let hits: Vec<u64> = acl.rules().map(|(_, h)| h).collect();
        assert_eq!(hits, vec![1, 2]);
    }

    #[test]
    fn implicit_deny_only_for_inside_with_permits() {
        let mut acl = Acl::new(vec![AclRule {
            src: Some("192.168.101.0/24".parse().unwrap()),
            ..AclRule::any(AclAction::Permit)
        }]);
        let other = pkt([10, 9, 9, 9], [8, 8, 8, 8], Proto::Tcp, 80);
        assert_eq!(acl.check(&other, true), AclDecision::Deny(None));
        assert_eq!(acl.check(&other, false), AclDecision::Permit(None));
        assert_eq!(acl.implicit_denies(), 1);
        let mut only_deny = Acl::new(vec![AclRule::any(AclAction::Deny)]);
        assert_eq!(only_deny.check(&other, true), AclDecision::Deny(Some(0)));
        let mut empty = Acl::new(vec![]);
        assert_eq!(empty.check(&other, true), AclDecision::Permit(None));
    }

    #[test]
    fn ports_and_proto() {
        let mut acl = Acl::new(vec![AclRule {
            proto: Some(Proto::Tcp),
            dst_ports: Some(22..=22),
            ..AclRule::any(AclAction::Deny)
        }]);
        assert_eq!(
            acl.check(&pkt([1, 1, 1, 1], [2, 2, 2, 2], Proto::Tcp, 22), false),
            AclDecision::Deny(Some(0))
        );
        assert_eq!(
            acl.check(&pkt([1, 1, 1, 1], [2, 2, 2, 2], Proto::Udp, 22), false),
            AclDecision::Permit(None)
        );
        let icmp = AclPacket {
            src_port: None,
            dst_port: None,
            ..pkt([1; 4], [2; 4], Proto::Icmp, 0)
        };
        assert_eq!(acl.check(&icmp, false), AclDecision::Permit(None));
    }
}
